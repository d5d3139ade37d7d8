#!/usr/bin/env python
"""Benchmark ``loractl extract`` against ``mergekit-extract-lora`` on a TinyLlama-shaped 1.1B bf16 pair.

Run:  python benchmarks/extract.py [--workdir DIR] [--rank 16] [--keep] [--json FILE]

It builds, from seeds, a bf16 base model (benchmarks/merge.py's streamed 1.1B base: TinyLlama
shapes, 22 layers, shards of 1 GB) and a "tuned" copy in which every linear weight W of every
block (q, k, v, o, gate, up, down: 154 matrices) becomes, in float32 and then rounded to bf16,

    W + U·diag(σ)·Vᵀ + E,    σᵢ = c·(1 + i)^-0.5 (i < 64),   E ~ N(0, 2e-4²)

(U, V random orthonormal; c sets the update's RMS to 2e-3, a tenth of the weights'; the noise E is
full rank, its spectral norm ~0.02 below σ₆₄ ~0.3, as a full fine-tune's long tail). Embeddings,
norms and lm_head are unchanged. Then, each in its own subprocess under ``/usr/bin/time -v``:

* ``loractl extract base tuned -o out --rank R --json``
* ``mergekit-extract-lora --model tuned --base-model base --out-path out --max-rank R``
  (from ``$LORACTL_MERGEKIT_VENV`` or /work/venvs/mergekit; absolute paths, offline, CPU)

and, as the truth, a dense float64 SVD of ``tuned − base`` of layer 0's q_proj, k_proj, gate_proj
and down_proj (one module per shape): the optimal rank-R error, against which both tools' outputs
are measured (their factors read back, ``‖ΔW − scale·B·A‖_F / ‖ΔW‖_F`` in float64). It prints the
times and their ratio, the peak RSS of each, and per module and in total the relative errors and
their ratio to the optimum; loractl's reported error (its certificate) is printed beside the
measured one.

The models go to ``--workdir`` (default /work/bench/extract; ~5 GB) and are deleted at the end
unless ``--keep`` (a later run with ``--keep`` reuses them).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from _common import cpu_and_ram, remove, timed  # noqa: E402
from merge import TARGETS, build_base  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
UPDATE_RANK, UPDATE_RMS, NOISE_STD = 64, 2e-3, 2e-4
TRUTH = ["self_attn.q_proj", "self_attn.k_proj", "mlp.gate_proj", "mlp.down_proj"]


def _orthonormal(n: int, k: int, g):
    import torch

    q, _ = torch.linalg.qr(torch.randn(n, k, generator=g))
    return q


def tuned_tensor(w, seed: int):
    """``w`` + a rank-64 update with σᵢ ∝ (1 + i)^-0.5 (RMS UPDATE_RMS) + N(0, NOISE_STD²), in float32, to bf16."""
    import torch

    g = torch.Generator().manual_seed(seed)
    m, n = w.shape
    s = (1 + torch.arange(UPDATE_RANK, dtype=torch.float32)) ** -0.5
    s *= UPDATE_RMS * math.sqrt(m * n) / float(s.square().sum().sqrt())
    u, v = _orthonormal(m, UPDATE_RANK, g), _orthonormal(n, UPDATE_RANK, g)
    out = torch.randn(m, n, generator=g).mul_(NOISE_STD)
    out.addmm_(u * s, v.T).add_(w.to(torch.float32))
    return out.to(torch.bfloat16)


def build_tuned(base: Path, tuned: Path, seed: int) -> dict:
    """Copy ``base`` shard by shard, every linear weight of a block replaced by :func:`tuned_tensor`."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    t0 = time.perf_counter()
    tuned.mkdir(parents=True)
    changed = 0
    for shard in sorted(base.glob("*.safetensors")):
        out = {}
        with safe_open(shard, "pt") as f:
            for name in f.keys():
                w = f.get_tensor(name)
                if name.endswith(".weight") and name.split(".")[-2] in TARGETS:
                    w = tuned_tensor(w, seed * 100_003 + hash_name(name))
                    changed += 1
                out[name] = w
        save_file(out, tuned / shard.name, metadata={"format": "pt"})
        del out
    for extra in ("config.json", "model.safetensors.index.json"):
        shutil.copy(base / extra, tuned / extra)
    return {"seconds": time.perf_counter() - t0, "changed": changed}


def hash_name(name: str) -> int:
    import hashlib

    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")


def mergekit_exe() -> Path:
    for venv in (os.environ.get("LORACTL_MERGEKIT_VENV"), REPO / ".venv-mergekit", "/work/venvs/mergekit"):
        if venv and (Path(venv) / "bin" / "mergekit-extract-lora").is_file():
            return Path(venv) / "bin" / "mergekit-extract-lora"
    raise SystemExit("mergekit-extract-lora not found: set LORACTL_MERGEKIT_VENV to a venv with mergekit")


def run_tools(work: Path, rank: int, layers: int | None = None) -> dict:
    """Time loractl, then mergekit, each once, in subprocesses (``layers``: only the first N blocks'
    linear weights, for both tools: loractl ``--module``, mergekit ``--include-regex``, with the
    unchanged embeddings and head excluded, which mergekit would otherwise copy in full)."""
    base, tuned = (work / "base").resolve(), (work / "tuned").resolve()
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    out_l, out_m = work / "out-loractl", work / "out-mergekit"
    for p in (out_l, out_m):
        remove(p)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "loractl", "extract", str(base), str(tuned), "-o", str(out_l)]
    sel: list[str] = []
    msel: list[str] = []
    if layers is not None:
        for i in range(layers):
            sel += ["--module", f"model.layers.{i}.*"]
        msel = ["-i", rf"^model\.layers\.({'|'.join(map(str, range(layers)))})\.", "-e", "embed_tokens", "-e", "lm_head"]
    runs = {"loractl": timed([*cmd, "--rank", str(rank), "--json", *sel], logs / "loractl.log", env=env)}
    report = json.loads((logs / "loractl.log").read_text())
    menv = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    menv.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    mcmd = [str(mergekit_exe()), "--model", str(tuned), "--base-model", str(base), "--out-path", str(out_m)]
    mcmd += ["--max-rank", str(rank), "--device", "cpu", "--no-copy-tokenizer", "--quiet", *msel]
    runs["mergekit"] = timed(mcmd, logs / "mergekit.log", env=menv)
    scope = "all 22 blocks" if layers is None else f"the first {layers} block(s) only"
    return {"runs": runs, "report": report, "out_loractl": out_l, "out_mergekit": out_m, "scope": scope}


def factors(folder: Path, module: str):
    """(B·A · scale) of ``module`` in a PEFT folder, float64."""
    from safetensors import safe_open

    cfg = json.loads((folder / "adapter_config.json").read_text())
    key = f"base_model.model.{module}"
    with safe_open(folder / "adapter_model.safetensors", "pt") as f:
        a = f.get_tensor(f"{key}.lora_A.weight").double()
        b = f.get_tensor(f"{key}.lora_B.weight").double()
    r = a.shape[0]
    leaf = module
    alpha = next((v for k, v in cfg.get("alpha_pattern", {}).items() if leaf.endswith(k)), cfg["lora_alpha"])
    return b @ a * (alpha / r)


def truth(work: Path, rank: int, tools: dict) -> list[dict]:
    """Per truth module: ‖ΔW‖, the optimal rank-R error (dense float64 SVD) and each tool's."""
    import torch
    from safetensors import safe_open

    index = json.loads((work / "base" / "model.safetensors.index.json").read_text())["weight_map"]
    reported = {m["name"]: m for m in tools["report"]["modules"]}
    rows = []
    for sub in TRUTH:
        module = f"model.layers.0.{sub}"
        name = module + ".weight"
        with safe_open(work / "base" / index[name], "pt") as fb, safe_open(work / "tuned" / index[name], "pt") as ft:
            delta = ft.get_tensor(name).double() - fb.get_tensor(name).double()
        t0 = time.perf_counter()
        s = torch.linalg.svdvals(delta)
        seconds = time.perf_counter() - t0
        norm = float(delta.norm())
        row = {"module": module, "shape": list(delta.shape), "norm": norm, "svd_fp64_seconds": seconds}
        row["optimal"] = float(s[rank:].square().sum().sqrt()) / norm
        for tool in ("loractl", "mergekit"):
            row[tool] = float((delta - factors(tools[f"out_{tool}"], module)).norm()) / norm
        row["loractl_reported"] = reported[module]["rel_error"]
        rows.append(row)
    return rows


def cpu(r) -> float:
    """user + sys seconds of a run (what a busy machine does not inflate as it does wall time)."""
    return (r.user_s or 0.0) + (r.sys_s or 0.0)


def total(rows: list[dict], key: str) -> float:
    return math.sqrt(sum((r[key] * r["norm"]) ** 2 for r in rows) / sum(r["norm"] ** 2 for r in rows))


def report(rank: int, tools: dict, rows: list[dict], build: dict) -> dict:
    runs = tools["runs"]
    lor, mk = runs["loractl"], runs["mergekit"]
    print(f"\nloractl extract --rank {rank} vs mergekit-extract-lora --max-rank {rank}, 1.1B bf16 pair ({tools['scope']})")
    print(f"{'tool':10} {'wall s':>9} {'CPU s':>9} {'peak RSS':>10} {'load1':>6}")
    for label, r in runs.items():
        print(f"{label:10} {r.seconds:9.1f} {cpu(r):9.1f} {r.peak_rss_kib / 1024**2:8.2f} GiB {r.load1:6.2f}")
    print(f"speed-up: {mk.seconds / lor.seconds:.1f}x wall, {cpu(mk) / cpu(lor):.1f}x CPU")
    print(f"\n{'module':30} {'shape':>11} {'optimal':>9} {'loractl':>9} {'(reported)':>10} {'mergekit':>9} {'l/opt':>7} {'m/opt':>7}")
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        print(
            f"{r['module']:30} {shape:>11} {r['optimal']:9.5f} {r['loractl']:9.5f} {r['loractl_reported']:10.5f} "
            f"{r['mergekit']:9.5f} {r['loractl'] / r['optimal']:7.4f} {r['mergekit'] / r['optimal']:7.4f}"
        )
    tot = {k: total(rows, k) for k in ("optimal", "loractl", "mergekit")}
    print(
        f"{'total (these modules)':30} {'':>11} {tot['optimal']:9.5f} {tot['loractl']:9.5f} {'':>10} {tot['mergekit']:9.5f} "
        f"{tot['loractl'] / tot['optimal']:7.4f} {tot['mergekit'] / tot['optimal']:7.4f}"
    )
    t = tools["report"]["total"]
    print(f"loractl over all {t['modules']} modules: relative error {t['rel_error']:.5f}, energy kept {t['energy_kept']:.5f}")
    print(f"machine: {cpu_and_ram()}, {os.cpu_count()} CPUs; tuned model built in {build.get('seconds', 0):.0f}s")
    return {"runs": {k: vars(v) for k, v in runs.items()}, "truth": rows, "total": tot, "loractl_total": t}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/work/bench/extract"))
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep the models (a later run reuses them)")
    ap.add_argument("--layers", type=int, help="both tools on the first N blocks only (default: all)")
    ap.add_argument("--json", type=Path, help="save every number here")
    args = ap.parse_args(argv)
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    try:
        build: dict = {}
        if not (work / "tuned" / "config.json").exists():
            for p in ("base", "tuned"):
                remove(work / p)
            build["base"] = build_base(work / "base", "1b", args.seed, 1_000_000_000)
            build.update(build_tuned(work / "base", work / "tuned", args.seed))
        tools = run_tools(work, args.rank, args.layers)
        rows = truth(work, args.rank, tools)
        data = report(args.rank, tools, rows, build)
        if args.json:
            args.json.write_text(json.dumps(data, indent=2, default=str) + "\n")
    finally:
        for p in ("out-loractl", "out-mergekit") + (() if args.keep else ("base", "tuned")):
            remove(work / p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
