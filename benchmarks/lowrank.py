"""How fast is ``loractl.ops.lowrank.low_rank`` on one module, and how much memory does it add?

In-process timing (the maths alone, no files) of ``low_rank(delta, rank=R)`` against what
mergekit-extract-lora does per module, a dense float32 ``torch.linalg.svd(delta,
full_matrices=False)``, on float32 matrices of Llama shapes. Each (shape, kind, method) runs in a
fresh subprocess so that its peak memory can be read: the extra peak is ``VmHWM`` after the runs
minus ``VmRSS`` before them, with the peak reset (``/proc/self/clear_refs``) once the matrix is
built. The relative error of ``low_rank`` is compared with the optimum of the same rank taken from
the dense SVD's singular values (when the dense SVD is run).

Kinds of ΔW (seeded):

* ``decaying``: a rank-64 update with singular values ~ (1 + i)^-0.5 plus small full-rank Gaussian
  noise (spectral norm ~0.05, below σ₆₄ ≈ 0.125), the shape of the extract benchmark's tuned pair;
* ``flat``: pure Gaussian noise (a Marchenko-Pastur spectrum, flatter than any real fine-tune).

Usage::

    python benchmarks/lowrank.py                                   # 2048x5632 and 4096x11008, rank 16, 5 runs
    python benchmarks/lowrank.py --shapes 2048x5632 --repeat 3 --dense-repeat 1
    python benchmarks/lowrank.py --skip-dense                      # low_rank only (the dense SVD takes minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, math, os, sys, time
import torch
torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
from loractl.ops.lowrank import low_rank

m, n, kind, method, rank, repeat, seed = json.loads(sys.argv[1])

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise KeyError(key)

g = torch.Generator().manual_seed(seed)
if kind == "decaying":
    d = torch.randn(m, n, generator=g)
    d.mul_(0.05 / (math.sqrt(m) + math.sqrt(n)))
    s = (1 + torch.arange(64, dtype=torch.float32)) ** -0.5
    b = torch.randn(m, 64, generator=g) / math.sqrt(m) * s
    a = torch.randn(64, n, generator=g) / math.sqrt(n)
    d.addmm_(b, a)
elif kind == "flat":
    d = torch.randn(m, n, generator=g)
else:
    raise SystemExit(f"unknown kind {kind}")

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
rss0 = status("VmRSS:")
times, out = [], {}
for _ in range(repeat):
    t = time.perf_counter()
    if method == "low_rank":
        r = low_rank(d, rank=rank)
        times.append(time.perf_counter() - t)
        out = dict(rel_error=r.rel_error, power_iterations=r.power_iterations, method=r.method)
        del r
    else:
        u, sv, vh = torch.linalg.svd(d, full_matrices=False)
        times.append(time.perf_counter() - t)
        sq = sv.double().square()
        out = dict(optimal_rel_error=math.sqrt(float(sq[rank:].sum() / sq.sum())))
        del u, sv, vh
out.update(times=times, extra_peak_bytes=status("VmHWM:") - rss0, load1=os.getloadavg()[0])
print(json.dumps(out))
"""


def run_child(m: int, n: int, kind: str, method: str, rank: int, repeat: int, seed: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    args = json.dumps([m, n, kind, method, rank, repeat, seed])
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, args], env=env, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{method} {m}x{n} {kind} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="2048x5632,4096x11008", help="comma-separated MxN (out x in)")
    ap.add_argument("--kinds", default="decaying,flat", help="decaying and/or flat")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=5, help="timed runs of low_rank (median reported)")
    ap.add_argument("--dense-repeat", type=int, default=5, help="timed runs of the dense SVD")
    ap.add_argument("--skip-dense", action="store_true", help="do not run the dense SVD")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="save every number here")
    args = ap.parse_args()

    rows = []
    for shape in args.shapes.split(","):
        m, n = (int(v) for v in shape.lower().split("x"))
        for kind in args.kinds.split(","):
            ours = run_child(m, n, kind, "low_rank", args.rank, args.repeat, args.seed)
            dense = None
            if not args.skip_dense:
                dense = run_child(m, n, kind, "dense", args.rank, args.dense_repeat, args.seed)
            rows.append(dict(shape=shape, kind=kind, low_rank=ours, dense_svd=dense))
            t_ours = statistics.median(ours["times"])
            line = (
                f"{shape:>10} {kind:>9}  low_rank {t_ours:7.3f} s (min {min(ours['times']):.3f}, "
                f"{ours['method']}, q={ours['power_iterations']}), +{ours['extra_peak_bytes'] / 2**20:6.0f} MiB, "
                f"rel error {ours['rel_error']:.5f}"
            )
            if dense is not None:
                t_dense = statistics.median(dense["times"])
                line += (
                    f" | dense SVD {t_dense:7.2f} s (min {min(dense['times']):.2f}, {len(dense['times'])} runs), "
                    f"+{dense['extra_peak_bytes'] / 2**20:6.0f} MiB, optimum {dense['optimal_rel_error']:.5f}"
                    f" | {t_dense / t_ours:5.0f}x faster, error {ours['rel_error'] / dense['optimal_rel_error']:.5f}"
                    " x optimum"
                )
            print(line, flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
