#!/usr/bin/env python
"""Benchmark loractl's factor-space algebra (``truncate``, ``similarity``) on a Llama-2-7B-shaped adapter.

Run:  python benchmarks/algebra.py [--repeat N] [--workdir DIR] [--keep] [--json FILE]
                                    [--loractl-ref HEAD] [--profile]
      python benchmarks/algebra.py --modules-subset 2 --repeat 1 --error-extra 0   # quick run

It builds, from seeds, two fp32 PEFT rank-64 LoRAs on q, k, v, o, gate, up and down of all 32
Llama-2-7B layers (224 modules, ~640 MB each) whose spectra decay like a trained adapter's, and in
one run, interleaved, ``--repeat`` times:

* times ``loractl truncate adapter -o out --rank 16`` end to end (subprocess under
  ``/usr/bin/time -v``: wall clock and peak RSS; start-up and I/O included), with the default
  threads and with ``OMP_NUM_THREADS=1``, and the start-up alone;
* times the dense-SVD way of doing the same, sd-scripts' ``networks/resize_lora.py`` with
  ``--svd_lowrank_niter 0`` (``ΔW = B·A`` in fp32, ``torch.linalg.svd(ΔW)``, top 16 kept as
  ``U·diag(S)`` and ``Vh``), on one module of each of the three shapes, and extrapolates it to the
  whole adapter (it would take hours); also sd-scripts' current default ``torch.svd_lowrank``;
* times ``loractl similarity A1 A2 --json`` (subprocess, both thread settings) and
  ``loractl.api.similarity`` (in process, reading the adapters and on preloaded ones) over all
  modules;

then checks loractl's truncation, read back from the file it wrote, against the best rank-16
approximation from a dense float64 SVD of the same modules (and against the theoretical error
``sqrt(Σ discarded σ²)``), and prints a table and the machine. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from _common import Case, Run, cpu_and_ram, export_ref, peft_config, remove, timed

# --------------------------------------------------------------------------------------------
# the adapter: Llama-2-7B shapes, PEFT layout
# --------------------------------------------------------------------------------------------
HIDDEN, INTERMEDIATE, LAYERS = 4096, 11008, 32
RANK, ALPHA = 64, 128  # scale s = alpha / r = 2
NEW_RANK = 16
DECAY = 0.85  # A and B each carry d_i = DECAY**i, so σ_i of ΔW falls roughly like DECAY**(2i)
B_STD = 0.01
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: the three distinct [out, in] shapes and how many modules of each a layer has
SHAPES: dict[str, tuple[int, int]] = {
    "q": (HIDDEN, HIDDEN),
    "gate": (INTERMEDIATE, HIDDEN),
    "down": (HIDDEN, INTERMEDIATE),
}
SHAPE_OF = {
    "q_proj": "q",
    "k_proj": "q",
    "v_proj": "q",
    "o_proj": "q",
    "gate_proj": "gate",
    "up_proj": "gate",
    "down_proj": "down",
}
PER_LAYER = {shape: sum(1 for t in TARGETS if SHAPE_OF[t] == shape) for shape in SHAPES}  # 4, 2, 1
TIMED = {"q": "q_proj", "gate": "gate_proj", "down": "down_proj"}  # the dense-timed module of each shape
WEIGHTS = "adapter_model.safetensors"

# --------------------------------------------------------------------------------------------
# targets (the project's goals, printed beside the measurements)
# --------------------------------------------------------------------------------------------
TARGET_SPEEDUP = 300.0
TARGET_REL_ERROR = 1e-5
TARGET_PHI_SECONDS = 2.0
TARGET_RSS_FACTOR = 2.0  # peak RSS below this many times the adapter file

STAMP = "algebra-bench.json"
STARTUP = [sys.executable, "-c", "import loractl.cli.app, loractl.api"]


def module_name(layer: int, proj: str) -> str:
    """PEFT's module path of one projection, without the ``base_model.model.`` prefix."""
    block = "self_attn" if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
    return f"model.layers.{layer}.{block}.{proj}"


def key(module: str, factor: str) -> str:
    """The safetensors key of a module's ``lora_A`` or ``lora_B`` weight."""
    return f"base_model.model.{module}.lora_{factor}.weight"


def build_adapter(folder: Path, layers: int, seed: int) -> dict[str, Any]:
    """A PEFT rank-64 LoRA on every projection of ``layers`` Llama-2-7B layers, fp32, seeded.

    ``A = diag(d) · R`` with R's rows Gaussian / √in (nearly orthonormal for in ≫ 64) and
    ``B = G · diag(d)`` with G ~ N(0, B_STD²), ``d_i = DECAY**i``. The singular values of
    ``s·B·A`` therefore decay roughly like ``DECAY**(2i)`` (σ₁₇/σ₁ ≈ 0.005), as a trained
    adapter's do, and neighbouring ones differ by ~28%, so the best rank-16 approximation is
    well defined.
    """
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    d = DECAY ** torch.arange(RANK, dtype=torch.float32)
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(layers):
        for proj in TARGETS:
            out_f, in_f = SHAPES[SHAPE_OF[proj]]
            name = module_name(layer, proj)
            tensors[key(name, "A")] = torch.randn(RANK, in_f, generator=g).mul_(d[:, None] / math.sqrt(in_f))
            tensors[key(name, "B")] = torch.randn(out_f, RANK, generator=g).mul_(d * B_STD)
    save_file(tensors, folder / WEIGHTS, metadata={"format": "pt"})
    del tensors
    config = peft_config(RANK, ALPHA, TARGETS, "meta-llama/Llama-2-7b-hf")
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return {"modules": layers * len(TARGETS), "bytes": (folder / WEIGHTS).stat().st_size}


def read_factors(folder: Path, module: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """B [out, r], A [r, in] as stored, and the scale of one module of a PEFT adapter folder.

    The scale is read from ``adapter_config.json`` (``alpha_pattern`` and ``use_rslora``
    honoured, matched as PEFT does), so loractl's output is read independently of loractl.
    """
    from safetensors import safe_open

    cfg = json.loads((folder / "adapter_config.json").read_text())
    with safe_open(str(folder / WEIGHTS), "pt") as f:
        a = f.get_tensor(key(module, "A"))
        b = f.get_tensor(key(module, "B"))
    alpha = float(cfg["lora_alpha"])
    for pattern, value in (cfg.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?{pattern}$", module):
            alpha = float(value)
            break
    r = a.shape[0]
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    return b, a, scale


# --------------------------------------------------------------------------------------------
# the dense baselines (sd-scripts networks/resize_lora.py) and the float64 reference
# --------------------------------------------------------------------------------------------
def dense_resize(b: torch.Tensor, a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """sd-scripts ``resize_lora.py --svd_lowrank_niter 0``: ``merge_linear`` then ``extract_linear``.

    fp32 on the CPU, as sd-scripts computes (``merge_dtype = float``). The scale is not applied:
    sd-scripts keeps it in alpha (new alpha = scale · new rank), so the new update is
    ``s · up @ down``. ``torch.linalg.svd`` is called as sd-scripts calls it (full_matrices=True).
    """
    out_size, in_size = b.shape[0], a.shape[1]
    weight = b @ a
    U, S, Vh = torch.linalg.svd(weight)
    U = U[:, :rank]
    S = S[:rank]
    U = U @ torch.diag(S)
    Vh = Vh[:rank, :]
    return U.reshape(out_size, rank).contiguous(), Vh.reshape(rank, in_size).contiguous()


def lowrank_resize(
    b: torch.Tensor, a: torch.Tensor, rank: int, niter: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """sd-scripts' current default for matrices above 2048 in both dimensions: ``torch.svd_lowrank``
    with ``q = 2·rank`` and ``niter = 2`` (randomised, so approximate), then as :func:`dense_resize`."""
    weight = b @ a
    U, S, V = torch.svd_lowrank(weight, q=min(2 * rank, *weight.shape), niter=niter)
    return (U[:, :rank] @ torch.diag(S[:rank])).contiguous(), V.T[:rank].contiguous()


@dataclass
class Reference:
    """The float64 dense SVD of one module's update and its best rank-k approximation."""

    delta: torch.Tensor  # s·B·A, float64
    best: torch.Tensor  # U_k diag(S_k) Vh_k, float64
    S: torch.Tensor
    seconds: float

    @property
    def theory(self) -> float:
        """The Eckart–Young error ‖ΔW − best‖_F = sqrt(Σ discarded σ²)."""
        return float(self.S[NEW_RANK:].square().sum().sqrt())


def reference(b: torch.Tensor, a: torch.Tensor, scale: float, rank: int) -> Reference:
    t0 = time.perf_counter()
    delta = (b.double() @ a.double()) * scale
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    best = (U[:, :rank] * S[:rank]) @ Vh[:rank]
    return Reference(delta, best, S, time.perf_counter() - t0)


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(x - ref) / torch.linalg.matrix_norm(ref))


# --------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------
def in_process(fn: Callable[[], Any]) -> tuple[Run, Any]:
    """Wall clock and CPU time of ``fn()`` in this process."""
    load1 = os.getloadavg()[0]
    c0 = os.times()
    t0 = time.perf_counter()
    value = fn()
    seconds = time.perf_counter() - t0
    c1 = os.times()
    return Run(seconds, None, c1.user - c0.user, c1.system - c0.system, round(load1, 2)), value


def warm(*files: Path) -> None:
    """Read the files once, untimed, so every timed run starts from the page cache."""
    with open(os.devnull, "wb") as null:
        subprocess.run(["cat", *map(str, files)], stdout=null, check=True)


# --------------------------------------------------------------------------------------------
# machine
# --------------------------------------------------------------------------------------------
def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def loractl_source(frozen: str | None = None) -> str:
    """Where the imported loractl lives, its git commit and how many of its files differ from it.

    The install is editable: if others edit ``loractl/`` during a run, the runs time different code
    (``--loractl-ref`` prevents that; ``frozen`` then describes the export).
    """
    if frozen:
        return frozen
    import loractl

    repo = Path(loractl.__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--", "loractl"], capture_output=True, text=True
        ).stdout.splitlines()
    except OSError:
        return str(repo)
    return f"{repo} @ {head}" + (f" + {len(dirty)} changed file(s) in loractl/" if dirty else "")


def export_loractl(ref: str, work: Path) -> str:
    """Export the ``loractl`` package of git commit ``ref`` to ``work/loractl-src`` and make it the
    ``loractl`` that this process and every command it starts import (``PYTHONPATH``, sys.path).

    Others may edit the working tree, which the editable install follows, during a run; an export
    keeps the code under test the same for every run.
    """
    if "loractl" in sys.modules:
        raise SystemExit("--loractl-ref: loractl was imported before the export")
    sha, src = export_ref(ref, work)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(src), os.environ.get("PYTHONPATH")]))
    sys.path.insert(0, str(src))
    child = subprocess.run(
        [sys.executable, "-c", "import loractl; print(loractl.__file__)"],
        cwd=work,
        capture_output=True,
        text=True,
    ).stdout.strip()
    import loractl

    for where in (child, loractl.__file__):
        if not where.startswith(str(src)):
            raise SystemExit(
                f"--loractl-ref: the export in {src} is not the loractl that gets imported ({where})"
            )
    return f"loractl of {ref} ({sha[:12]}), exported to {src}"


def machine_info(frozen: str | None = None) -> dict[str, Any]:
    info: dict[str, Any] = {
        "nproc": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    info.update(cpu_and_ram())
    import loractl

    info["loractl"] = loractl.__version__
    info["loractl_source"] = loractl_source(frozen)
    return info


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--workdir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "loractl-algebra-bench",
        help="where the adapters and outputs go (default: %(default)s); needs ~2 GB free",
    )
    p.add_argument("--repeat", type=int, default=3, help="timed runs of each case (default: 3)")
    p.add_argument(
        "--dense-repeat",
        type=int,
        default=None,
        help="timed runs of each dense SVD (default: --repeat); one run is ~4-10 min on 2 cores",
    )
    p.add_argument(
        "--modules-subset",
        type=int,
        default=None,
        metavar="LAYERS",
        help="quick run: build only the first LAYERS of the 32 layers (7 modules each); "
        "the dense extrapolation and the targets refer to that many modules",
    )
    p.add_argument(
        "--error-extra",
        type=int,
        default=2,
        help="modules checked against a float64 dense SVD besides the 3 timed ones (default: 2; "
        "each costs one float64 SVD, 1-3 min)",
    )
    p.add_argument(
        "--skip-dense", action="store_true", help="no dense SVD at all: no speedup, no error check"
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="also run `loractl truncate` and `loractl similarity` once each under cProfile (untimed) "
        "and print where the time goes",
    )
    p.add_argument(
        "--loractl-ref",
        metavar="REF",
        help="time the loractl package of this git commit (e.g. HEAD), exported to the workdir, instead "
        "of the installed one (the editable install follows a working tree others may edit)",
    )
    p.add_argument("--seed", type=int, default=0, help="RNG seed of the first adapter (the second: +1)")
    p.add_argument("--keep", action="store_true", help="keep the workdir (a later run reuses the adapters)")
    p.add_argument("--json", type=Path, default=None, help="also save every number to this file")
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    args.dense_repeat = args.repeat if args.dense_repeat is None else args.dense_repeat
    if args.dense_repeat < 1:
        p.error("--dense-repeat must be at least 1")
    if args.modules_subset is not None and not 1 <= args.modules_subset <= LAYERS:
        p.error(f"--modules-subset must be in 1..{LAYERS}")
    if args.error_extra < 0:
        p.error("--error-extra must be >= 0")
    return args


def error_modules(layers: int, extra: int) -> list[str]:
    """The 3 dense-timed modules (layer 0), then ``extra`` more from other layers and projections."""
    chosen = [module_name(0, TIMED[s]) for s in SHAPES]
    pool = [
        (layers - 1, "o_proj"),
        (layers // 2, "k_proj"),
        (layers - 1, "up_proj"),
        (layers // 2, "v_proj"),
        (layers - 1, "down_proj"),
        (layers // 2, "q_proj"),
    ]
    for layer, proj in pool:
        if len(chosen) >= 3 + extra:
            break
        name = module_name(layer, proj)
        if name not in chosen:
            chosen.append(name)
    return chosen


def fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def times(x: float) -> str:
    """A speedup factor: ``1,093×``, or ``0.65×`` below 10."""
    return f"{x:,.0f}×" if x >= 10 else f"{x:.2f}×"


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    layers = args.modules_subset or LAYERS
    n_modules = layers * len(TARGETS)
    work: Path = args.workdir.resolve()
    spec = {"layers": layers, "seed": args.seed, "rank": RANK, "alpha": ALPHA, "decay": DECAY, "b_std": B_STD}
    up_before = uptime()
    print(f"uptime before: {up_before}", flush=True)

    stamp = work / STAMP
    created = not work.exists()
    if not created and any(work.iterdir()) and not stamp.exists():
        raise SystemExit(f"{work} exists and was not made by this script; choose another --workdir")
    work.mkdir(parents=True, exist_ok=True)
    a1, a2, out, logs = work / "adapter-1", work / "adapter-2", work / "out-r16", work / "logs"
    try:
        args.frozen = export_loractl(args.loractl_ref, work) if args.loractl_ref else None
        source_before = loractl_source(args.frozen)
        print(f"loractl: {source_before}", flush=True)
        return run(args, layers, n_modules, work, spec, stamp, a1, a2, out, logs, up_before, source_before)
    finally:
        if not args.keep:
            if created or stamp.exists():
                shutil.rmtree(work, ignore_errors=True)
            print(f"removed {work}", flush=True)


def run(
    args: argparse.Namespace,
    layers: int,
    n_modules: int,
    work: Path,
    spec: dict[str, Any],
    stamp: Path,
    a1: Path,
    a2: Path,
    out: Path,
    logs: Path,
    up_before: str,
    source_before: str,
) -> int:
    from loractl import api

    # ---- build (or reuse) the two adapters -----------------------------------------------
    reuse = stamp.exists() and json.loads(stamp.read_text()) == spec and (a1 / WEIGHTS).exists()
    reuse = reuse and (a2 / WEIGHTS).exists()
    build: dict[str, Any] = {}
    if reuse:
        print(f"reusing the adapters in {work}", flush=True)
    else:
        for p in (a1, a2, out, logs, stamp):
            remove(p)
        need = 2.6 * layers / LAYERS * 640e6 + 200e6
        free = shutil.disk_usage(work).free
        if free < need:
            raise SystemExit(f"{work}: {free / 1e9:.1f} GB free, need {need / 1e9:.1f} GB")
        for i, folder in enumerate((a1, a2)):
            t0 = time.perf_counter()
            info = build_adapter(folder, layers, args.seed + i)
            build[folder.name] = {**info, "seconds": round(time.perf_counter() - t0, 2)}
            print(
                f"built {folder.name}: {info['modules']} modules, {info['bytes'] / 1e6:.0f} MB "
                f"in {build[folder.name]['seconds']:.1f}s",
                flush=True,
            )
        stamp.write_text(json.dumps(spec))
    logs.mkdir(exist_ok=True)
    adapter_bytes = (a1 / WEIGHTS).stat().st_size
    warm(a1 / WEIGHTS, a2 / WEIGHTS)

    loractl_bin = Path(sys.executable).with_name("loractl")
    if loractl_bin.exists() and not args.frozen:
        loractl_cmd = [str(loractl_bin)]
    else:
        loractl_cmd = [sys.executable, "-m", "loractl"]
    one_thread = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out_1t = work / "out-r16-1thread"
    truncate = [*loractl_cmd, "truncate", str(a1), "-o", str(out), "--rank", str(NEW_RANK)]
    truncate_1t = [*loractl_cmd, "truncate", str(a1), "-o", str(out_1t), "--rank", str(NEW_RANK)]
    similarity = [*loractl_cmd, "similarity", str(a1), str(a2), "--json"]
    # (key, label, command or in-process function, environment), run in this order every repeat
    print("preloading both adapters for the math-only similarity case", flush=True)
    loaded = (api.load_adapter(a1), api.load_adapter(a2))
    plan: list[tuple[str, str, list[str] | Callable[[], Any], dict[str, str] | None]] = [
        ("startup", "start-up: python -c 'import loractl.cli.app, loractl.api'", STARTUP, None),
        ("truncate_1t", f"loractl truncate --rank {NEW_RANK}, OMP_NUM_THREADS=1", truncate_1t, one_thread),
        ("truncate", f"loractl truncate --rank {NEW_RANK} (CLI, all I/O)", truncate, None),
        ("similarity", "loractl similarity --json (CLI, all I/O)", similarity, None),
        ("similarity_1t", "loractl similarity --json, OMP_NUM_THREADS=1", similarity, one_thread),
        ("api_similarity", "api.similarity in process (reads both)", lambda: api.similarity(a1, a2), None),
        (
            "api_similarity_loaded",
            "api.similarity, adapters preloaded",
            lambda pair=loaded: api.similarity(*pair),
            None,
        ),
    ]
    cases = {k: Case(label) for k, label, _, _ in plan}
    dense: dict[str, Case] = {s: Case(f"dense fp32 SVD, 1 {s}-shape module") for s in SHAPES}
    lowrank: dict[str, Case] = {s: Case(f"svd_lowrank, 1 {s}-shape module") for s in SHAPES}
    dense_out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    lowrank_out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    factors = {s: read_factors(a1, module_name(0, TIMED[s])) for s in SHAPES} if not args.skip_dense else {}

    phi_cli: dict[str, Any] = {}
    phi_api: Any = None
    n_runs = max(args.repeat, 0 if args.skip_dense else args.dense_repeat)
    for rep in range(n_runs):
        tag = f"[{rep + 1}/{n_runs}]"
        for k, _, what, env in plan if rep < args.repeat else []:
            remove({"truncate": out, "truncate_1t": out_1t}.get(k, out_1t))
            if callable(what):
                r, value = in_process(what)
                if k == "api_similarity":
                    phi_api = value
            else:
                log = logs / f"{k}.log"
                r = timed(what, log, env=env)
                if k == "similarity":
                    phi_cli = json.loads(log.read_text())
            cases[k].runs.append(r)
            rss = f"RSS {r.peak_rss_kib / 1024:6.0f} MiB" if r.peak_rss_kib else " " * 14
            print(f"{tag} {k:<22}{r.seconds:9.2f}s  {rss}  load {r.load1}", flush=True)
        remove(out_1t)

        if args.skip_dense or rep >= args.dense_repeat:
            continue
        torch.manual_seed(args.seed)  # svd_lowrank draws its random test matrix from the global RNG
        for s, (b, a, _) in factors.items():
            r, lowrank_out[s] = in_process(lambda b=b, a=a: lowrank_resize(b, a, NEW_RANK))
            lowrank[s].runs.append(r)
            print(f"{tag} svd_lowrank {s:<10}{r.seconds:9.2f}s  {'':14}  load {r.load1}", flush=True)
        for s, (b, a, _) in factors.items():
            r, dense_out[s] = in_process(lambda b=b, a=a: dense_resize(b, a, NEW_RANK))
            dense[s].runs.append(r)
            print(f"{tag} dense SVD {s:<12}{r.seconds:9.2f}s  {'':14}  load {r.load1}", flush=True)
    del loaded, plan

    # ---- check the φ results and the truncated output -------------------------------------
    n_phi_cli = len(phi_cli.get("modules", [])) if isinstance(phi_cli, dict) else 0
    n_phi_api = len(phi_api.modules) if phi_api is not None else 0
    if n_phi_cli != n_modules or n_phi_api != n_modules:
        print(f"WARNING: similarity covered {n_phi_cli} (CLI) / {n_phi_api} (api) of {n_modules} modules")

    written = verify_output(out)
    errors: list[dict[str, Any]] = []
    if not args.skip_dense:
        for name in error_modules(layers, args.error_extra):
            b, a, s = read_factors(a1, name)
            ref = reference(b, a, s, NEW_RANK)
            lb, la, ls = read_factors(out, name)
            ours = (lb.double() @ la.double()) * ls
            shape = SHAPE_OF[name.rsplit(".", 1)[1]]
            row: dict[str, Any] = {
                "module": name,
                "shape": list(SHAPES[shape]),
                "rank_written": int(la.shape[0]),
                "ref_seconds": round(ref.seconds, 1),
                "sigma_1": float(ref.S[0]),
                "sigma_17_over_1": float(ref.S[NEW_RANK] / ref.S[0]),
                "norm_delta": float(torch.linalg.matrix_norm(ref.delta)),
                "theory": ref.theory,
                "err_loractl": float(torch.linalg.matrix_norm(ref.delta - ours)),
                "err_dense64": float(torch.linalg.matrix_norm(ref.delta - ref.best)),
                "rel_loractl": rel(ours, ref.best),
            }
            if name == module_name(0, TIMED[shape]) and shape in dense_out:
                up, down = dense_out[shape]
                row["rel_dense32"] = rel((up.double() @ down.double()) * s, ref.best)
                up, down = lowrank_out[shape]
                row["rel_lowrank"] = rel((up.double() @ down.double()) * s, ref.best)
            errors.append(row)
            print(
                f"checked {name}: rel error {row['rel_loractl']:.2e} (float64 dense SVD {ref.seconds:.0f}s)",
                flush=True,
            )
            del ref, ours

    profile = ""
    if args.profile:
        remove(out_1t)
        trunc_args = ["truncate", str(a1), "-o", str(out_1t), "--rank", str(NEW_RANK), "-q"]
        profile = profile_command("truncate", trunc_args, logs)
        remove(out_1t)
        profile += "\n\n" + profile_command("similarity", ["similarity", str(a1), str(a2), "--json"], logs)
    up_after = uptime()
    info = machine_info(args.frozen)
    info["loractl_source_before"] = source_before
    report(
        args,
        layers,
        n_modules,
        adapter_bytes,
        cases,
        dense,
        lowrank,
        errors,
        written,
        phi_cli,
        info,
        up_before,
        up_after,
    )
    if profile:
        print(f"\n{profile}")
    if args.json:
        payload = {
            "spec": {**spec, "modules": n_modules, "new_rank": NEW_RANK, "adapter_bytes": adapter_bytes},
            "build": build,
            "cases": {k: {"label": c.label, "runs": [asdict(r) for r in c.runs]} for k, c in cases.items()},
            "dense_fp32_per_module": {s: [asdict(r) for r in c.runs] for s, c in dense.items()},
            "svd_lowrank_per_module": {s: [asdict(r) for r in c.runs] for s, c in lowrank.items()},
            "dense_extrapolated": extrapolate(dense, layers) if dense["q"].runs else None,
            "same_repeat_speedups": {
                k: same_repeat_speedups(dense, cases[k], layers) for k in ("truncate", "truncate_1t")
            },
            "svd_lowrank_extrapolated": extrapolate(lowrank, layers) if lowrank["q"].runs else None,
            "errors": errors,
            "written": written,
            "profile": profile or None,
            "mean_phi": phi_cli.get("mean_phi") if isinstance(phi_cli, dict) else None,
            "machine": info,
            "uptime_before": up_before,
            "uptime_after": up_after,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def verify_output(folder: Path) -> dict[str, Any]:
    """Modules, ranks and alpha of the truncated PEFT adapter, read from its header and config."""
    from safetensors import safe_open

    cfg = json.loads((folder / "adapter_config.json").read_text())
    ranks: dict[int, int] = {}
    with safe_open(str(folder / WEIGHTS), "pt") as f:
        for k in f.keys():
            if k.endswith(".lora_A.weight"):
                r = int(f.get_slice(k).get_shape()[0])
                ranks[r] = ranks.get(r, 0) + 1
    return {
        "modules": ranks.get(NEW_RANK, 0),
        "ranks": {str(r): n for r, n in sorted(ranks.items())},
        "r": cfg.get("r"),
        "lora_alpha": cfg.get("lora_alpha"),
    }


def profile_command(label: str, args: list[str], logs: Path) -> str:
    """Run ``loractl ARGS`` once under cProfile (untimed) and return the top of its profile."""
    import io
    import pstats

    prof = logs / f"{label}.prof"
    cmd = [sys.executable, "-m", "cProfile", "-o", str(prof), "-m", "loractl", *args]
    r = timed(cmd, logs / f"profile-{label}.log")
    text = io.StringIO()
    stats = pstats.Stats(str(prof), stream=text)
    stats.sort_stats("tottime").print_stats(10)
    stats.sort_stats("cumulative").print_stats(r"loractl[/\\](api|ops|io|formats)", 10)
    lines = [
        x
        for x in text.getvalue().splitlines()
        if x.strip() and not x.startswith("   Ordered by") and not x.rstrip().endswith(".prof")
    ]
    head = f"profile of loractl {label} under cProfile ({r.seconds:.1f}s with the profiler, load {r.load1}):"
    return "\n".join([head, *lines])


def same_repeat_speedups(dense: dict[str, Case], case: Case, layers: int) -> list[float]:
    """Extrapolated dense seconds ÷ ``case``'s seconds, each from the same repeat.

    Cases and dense SVDs of one repeat run back to back, so on a machine whose load changes
    during the run these ratios are steadier than the ratio of the two medians.
    """
    n = min(len(case.runs), *(len(c.runs) for c in dense.values()))
    return [
        layers * sum(PER_LAYER[s] * c.runs[i].seconds for s, c in dense.items()) / case.runs[i].seconds
        for i in range(n)
    ]


def extrapolate(per_shape: dict[str, Case], layers: int) -> dict[str, float]:
    """Whole-adapter seconds from one module of each shape: layers × (4 q + 2 gate + 1 down)."""
    return {
        "median": layers * sum(PER_LAYER[s] * c.median for s, c in per_shape.items()),
        "min": layers * sum(PER_LAYER[s] * c.min for s, c in per_shape.items()),
    }


def report(
    args: argparse.Namespace,
    layers: int,
    n_modules: int,
    adapter_bytes: int,
    cases: dict[str, Case],
    dense: dict[str, Case],
    lowrank: dict[str, Case],
    errors: list[dict[str, Any]],
    written: dict[str, Any],
    phi_cli: dict[str, Any],
    info: dict[str, Any],
    up_before: str,
    up_after: str,
) -> None:
    have_dense = bool(dense["q"].runs)
    dense_total = extrapolate(dense, layers) if have_dense else None
    err_l = max((e["rel_loractl"] for e in errors), default=None)
    err_d = max((e["rel_dense32"] for e in errors if "rel_dense32" in e), default=None)
    err_r = max((e["rel_lowrank"] for e in errors if "rel_lowrank" in e), default=None)

    def speedup(seconds: float) -> str:
        if not dense_total:
            return "-"
        x = dense_total["median"] / seconds
        return times(x)

    header = (
        f"{'what':<58}{'median s':>11}{'min s':>11}{'vs dense':>10}{'peak RSS MiB':>14}{'rel. error':>12}"
    )
    print()
    print(
        f"{n_modules} modules ({layers} layers), rank {RANK} → {NEW_RANK}, adapter {adapter_bytes / 2**20:.0f} MiB fp32"
    )
    print(header)
    print("-" * len(header))

    def line(label: str, med: float, mn: float, sp: str, rss: float | None, err: float | None) -> None:
        print(f"{label:<58}{med:>11.3f}{mn:>11.3f}{sp:>10}{fmt(rss, '.0f'):>14}{fmt(err, '.1e'):>12}")

    if have_dense and dense_total:
        line(
            f"dense fp32 SVD (sd-scripts), EXTRAPOLATED to {n_modules}",
            dense_total["median"],
            dense_total["min"],
            "1×",
            None,
            err_d,
        )
        for s, c in dense.items():
            m, n = SHAPES[s]
            line(
                f"  measured: 1 {s}-shape module {m}×{n} (×{layers * PER_LAYER[s]})",
                c.median,
                c.min,
                "",
                None,
                None,
            )
        lr = extrapolate(lowrank, layers)
        line(
            "svd_lowrank q=32 niter=2 (sd-scripts default), EXTRAP.",
            lr["median"],
            lr["min"],
            speedup(lr["median"]),
            None,
            err_r,
        )
    for k in ("truncate", "truncate_1t"):
        c = cases[k]
        line(c.label, c.median, c.min, speedup(c.median), c.peak_rss_mib, err_l if k == "truncate" else None)
    for k in ("similarity", "similarity_1t", "api_similarity", "api_similarity_loaded", "startup"):
        c = cases[k]
        line(c.label, c.median, c.min, "", c.peak_rss_mib, None)
    print(
        f"runs: {args.repeat} (loractl), {args.dense_repeat if have_dense else 0} (dense, per shape); "
        "dense and svd_lowrank are in-process compute only (no I/O, no start-up)"
    )
    same: dict[str, list[float]] = {}
    if have_dense:
        for k in ("truncate", "truncate_1t"):
            same[k] = same_repeat_speedups(dense, cases[k], layers)
            if same[k]:
                runs = ", ".join(f"{times(x)} (load {r.load1})" for x, r in zip(same[k], cases[k].runs))
                print(
                    f"same-repeat speedup, {cases[k].label}: {runs}; median {times(statistics.median(same[k]))}"
                )

    if errors:
        print()
        print("truncation error vs a float64 dense SVD of ΔW = s·B·A (best rank-16 approximation U_d):")
        h = (
            f"{'module':<34}{'shape':>12}{'r':>4}{'σ17/σ1':>9}{'theory/‖ΔW‖':>13}"
            f"{'loractl/th−1':>14}{'dense64/th−1':>14}{'‖U_l−U_d‖/‖U_d‖':>18}{'dense32':>10}{'lowrank':>10}"
        )
        print(h)
        for e in errors:
            print(
                f"{e['module']:<34}{'×'.join(map(str, e['shape'])):>12}{e['rank_written']:>4}"
                f"{e['sigma_17_over_1']:>9.2e}{e['theory'] / e['norm_delta']:>13.3e}"
                f"{e['err_loractl'] / e['theory'] - 1:>14.1e}{e['err_dense64'] / e['theory'] - 1:>14.1e}"
                f"{e['rel_loractl']:>18.2e}{fmt(e.get('rel_dense32'), '.1e'):>10}{fmt(e.get('rel_lowrank'), '.1e'):>10}"
            )
        print("theory = sqrt(Σ_{i>16} σ_i²); x/th−1 = how far ‖ΔW − x‖_F is above it (0 = optimal)")

    print(
        f"\ntruncated output: {written['modules']}/{n_modules} modules at rank {NEW_RANK} "
        f"(ranks written: {written['ranks']}, lora_alpha {written['lora_alpha']}, r {written['r']})"
    )
    if isinstance(phi_cli, dict) and "mean_phi" in phi_cli:
        print(
            f"\nmean φ (two independent adapters) = {phi_cli['mean_phi']:.4f} over {len(phi_cli.get('modules', []))} modules"
        )

    print("\ntargets:")
    rss_cap = TARGET_RSS_FACTOR * adapter_bytes / 2**20
    checks: list[tuple[str, bool | None]] = []
    t = cases["truncate"]
    if dense_total:
        x = dense_total["median"] / t.median
        per = same.get("truncate") or []
        both = f"{times(x)} (medians)" + (
            f", {times(statistics.median(per))} (same-repeat median)" if per else ""
        )
        checks.append(
            (f"truncate ≥ {TARGET_SPEEDUP:.0f}× faster than dense SVD: {both}", x >= TARGET_SPEEDUP)
        )
    if err_l is not None:
        checks.append((f"relative error ≤ {TARGET_REL_ERROR:.0e}: {err_l:.1e}", err_l <= TARGET_REL_ERROR))
    for k in ("similarity", "api_similarity"):
        c = cases[k]
        checks.append(
            (
                f"φ over {n_modules} modules < {TARGET_PHI_SECONDS:.0f} s ({c.label}): {c.median:.2f} s",
                c.median < TARGET_PHI_SECONDS,
            )
        )
    for k in ("truncate", "similarity"):
        c = cases[k]
        rss = c.peak_rss_mib
        checks.append(
            (
                f"peak RSS < {rss_cap:.0f} MiB (2× adapter), {c.label}: {fmt(rss, '.0f')} MiB",
                None if rss is None else rss < rss_cap,
            )
        )
    for text, ok in checks:
        print(f"  [{'ok' if ok else 'MISS' if ok is not None else '?'}] {text}")
    if layers != LAYERS:
        print(f"  (--modules-subset {layers}: the targets are meant for all {LAYERS} layers)")

    print(
        f"\nmachine: {info['nproc']} CPUs ({info['cpu']}), {info.get('ram_gib', '?')} GiB RAM, "
        f"torch {info['torch']} ({info['torch_threads']} threads), python {info['python']}"
    )
    print(f"loractl {info['loractl']}: {info['loractl_source']}")
    if info.get("loractl_source_before") not in (None, info["loractl_source"]):
        print(f"  (at the start it was {info['loractl_source_before']}: loractl changed during the run)")
    print(f"uptime before: {up_before}")
    print(f"uptime after:  {up_after}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
