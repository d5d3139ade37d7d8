#!/usr/bin/env python
"""In-process time of verifying one merged tensor (``loractl.ops.verify``) against re-merging it and comparing.

Run:  python benchmarks/verify_tensor.py [--rows 4096] [--cols 11008] [--rank 16] [--repeat 5] [--dtype bf16]

One Llama-2-7B-shaped weight (default 4096×11008, the MLP's down_proj), seeded, |ΔW| about 1 % of |W|,
merged once by ``api.merged_tensor`` (PEFT's order). Then, each ``--repeat`` times, interleaved:

* ``merged_tensor + equal``: re-merge the base (``api.merged_tensor``) and compare bits with ``torch.equal``;
* ``fused_merge + equal``: the merge's own row-block path (``ops.merge.fused_merge``) then ``torch.equal``;
* ``check_changed`` (exact): what ``loractl verify`` does for a loractl or PEFT merge;
* ``check_changed(exact=False)``: the rounding bound and least-squares statistics (another tool's merge);
* ``check_changed`` on a merge at weight 1.01: exact pass fails at its first block, then the bound.

Prints the median and minimum seconds and the machine's load. Nothing is written to disk.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from loractl import api
from loractl.adapter import LoraModule
from loractl.ops import merge as merge_ops
from loractl.ops import verify

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--cols", type=int, default=11008)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    a = p.parse_args()
    dt = DTYPES[a.dtype]
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(a.rows, a.cols, generator=g) * 0.02).to(dt)
    std = (0.01 * 0.02 / (2 * a.rank**0.5)) ** 0.5  # s·√r·σ² ≈ 1 % of |W| with alpha = 2r
    m = LoraModule(
        "model.layers.0.mlp.down_proj",
        "linear",
        down=torch.randn(a.rank, a.cols, generator=g) * std,
        up=torch.randn(a.rows, a.rank, generator=g) * std,
        alpha=2.0 * a.rank,
    )
    one = [api.Contribution(0, "lora", 1.0, module=m)]
    merged = api.merged_tensor(w, one, dt)
    wrong = api.merged_tensor(w, [api.Contribution(0, "lora", 1.01, module=m)], dt)
    ibits = {2: torch.int16, 4: torch.int32}[merged.element_size()]
    out = torch.empty_like(w)

    def remerge() -> bool:
        again = api.merged_tensor(w, one, dt)
        return torch.equal(again.view(ibits), merged.view(ibits))

    def fused() -> bool:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            merge_ops.fused_merge(w, m, 1.0, out=out)
        finally:
            torch.set_num_threads(threads)
        return torch.equal(out.view(ibits), merged.view(ibits))

    cases = {
        "merged_tensor + equal": remerge,
        "fused_merge + equal": fused,
        "check_changed (exact)": lambda: verify.check_changed(merged, w, one).ok,
        "check_changed (bound)": lambda: verify.check_changed(merged, w, one, exact=False).ok,
        "check_changed (w=1.01)": lambda: verify.check_changed(wrong, w, one).verdict,
    }
    for f in cases.values():  # warm up: page faults, the per-shape row-block check, BLAS start-up
        f()
    times: dict[str, list[float]] = {k: [] for k in cases}
    results: dict[str, object] = {}
    for _ in range(a.repeat):
        for k, f in cases.items():
            t0 = time.perf_counter()
            results[k] = f()
            times[k].append(time.perf_counter() - t0)
    print(f"{a.rows}x{a.cols} {a.dtype}, rank {a.rank}, torch threads {torch.get_num_threads()}, "
          f"load {os.getloadavg()[0]:.1f}, {a.repeat} runs")  # fmt: skip
    for k, ts in times.items():
        print(f"  {k:24s} median {statistics.median(ts) * 1e3:7.1f} ms  min {min(ts) * 1e3:7.1f} ms  -> {results[k]}")


if __name__ == "__main__":
    main()
