"""Optional plots (``pip install loractl[plot]``): matplotlib is imported only here."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import UsageError


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--plot needs matplotlib", hint="pip install 'loractl[plot]'") from None
    return plt


def _save(fig: Any, path: Path, inputs: Sequence[str | None]) -> None:
    """Save atomically; the plot may replace an older plot, never an input (an adapter, the
    adapter_config.json read beside an adapter file, the base)."""
    from ..io.atomic import atomic_output

    protected: list[Path] = []
    for p in inputs:
        if p is not None:
            protected.append(Path(p))
            if Path(p).is_file():
                protected.append(Path(p).parent / "adapter_config.json")
    fmt = path.suffix[1:].lower() or "png"
    if fmt not in fig.canvas.get_supported_filetypes():
        raise UsageError(f"{path}: cannot draw a plot as .{fmt}", hint="end the name in .png, .svg or .pdf")
    with atomic_output(path, is_dir=False, inputs=protected, force=True) as tmp:
        fig.savefig(tmp, dpi=100, format=fmt)


def heatmap(result: Any, path: Path, inputs: Sequence[str | None] = ()) -> None:
    """The mean φ grid (the LoRA paper's Figure 3 style) as a PNG."""
    plt = _pyplot()
    grid = result.grid
    if grid is None:
        raise UsageError(
            "the modules have different ranks: no mean grid to plot", hint="filter with --module"
        )
    fig, ax = plt.subplots(figsize=(6, 5))
    im = ax.imshow(
        grid,
        origin="lower",
        vmin=0,
        vmax=1,
        cmap="viridis",
        aspect="auto",
        extent=(0.5, len(grid[0]) + 0.5, 0.5, len(grid) + 0.5),
    )
    ax.set_xlabel("j (second adapter)")
    ax.set_ylabel("i (first adapter)")
    ax.set_title(f"φ(i, j), mean over {len(result.modules)} modules")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    try:
        _save(fig, path, inputs)
    finally:
        plt.close(fig)


def spectrum_curves(result: Any, path: Path, inputs: Sequence[str | None] = ()) -> None:
    """Energy kept against rank, one curve per module, as a PNG."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    for a in result.adapters:
        for m in a.modules:
            s2 = [x * x for x in m.singular_values]
            total = sum(s2) or 1.0
            acc, ys = 0.0, []
            for x in s2:
                acc += x
                ys.append(acc / total)
            ax.plot(range(1, len(ys) + 1), ys, alpha=0.5, lw=1)
    ax.set_xlabel("rank k")
    ax.set_ylabel("energy kept Σσ²ₖ / Σσ²")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        _save(fig, path, inputs)
    finally:
        plt.close(fig)
