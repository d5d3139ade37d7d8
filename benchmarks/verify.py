#!/usr/bin/env python
"""Benchmark ``loractl verify`` against ``cp -rL`` of the same merged files, and against re-merging and comparing.

Run:  python benchmarks/verify.py [--size 1b|7b] [--repeat N] [--workdir DIR] [--keep] [--json FILE]

It builds (or, with ``--keep``, reuses) the bf16 base and the rank-16 all-linear PEFT adapter of
benchmarks/merge.py, merges them once with ``loractl merge --no-receipt`` (untimed), reads the base
and the merged model once (``cat > /dev/null``: warm page cache), then times, each in its own
subprocess under ``/usr/bin/time -v`` (wall clock, peak RSS, CPU), interleaved, ``--repeat`` times:

* ``cp -rL merged out``                          (reading and writing the merged files: the floor)
* ``loractl verify merged adapter --base base``  (reads the base and the merged model, writes nothing)
* ``loractl merge base adapter -o again --no-receipt && cmp`` of every weight file
  (re-merging and comparing byte for byte: what verify replaces; it can only accept loractl's own bits)
* with ``--bound``: ``loractl verify`` of a model merged at weight 1 + 2⁻²⁰ checked at weight 1, where
  the bits differ from PEFT's in every tensor, so each is judged by the rounding bound (another tool's merge)

and prints a table (median and min seconds, ratio to cp, peak RSS, CPU seconds) and the machine's load.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import shutil
import statistics
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from _common import Case, remove, timed
from merge import (
    BF16,
    SIZES,
    build_adapter,
    build_base,
    loractl_cmd,
    machine_info,
    same_spec,
    tensor_shapes,
    warm,
)

#: the weight of the "another tool's merge" case: 1 + 2⁻²⁰ changes some bits of every tensor, by far less than the bound
NEAR_ONE = 1 + 2**-20


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="See benchmarks/README.md.")
    p.add_argument("--size", choices=sorted(SIZES), default="1b")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "loractl-bench-verify")
    p.add_argument("--keep", action="store_true", help="keep the workdir (and reuse its base next time)")
    p.add_argument("--bound", action="store_true", help="also time verify of a merge judged by the bound")
    p.add_argument("--shard-size", default="1GB", help="base shard size (default 1GB)")
    p.add_argument("--loractl-ref", metavar="REF", help="time the loractl of this git commit (e.g. HEAD)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also save every number to this JSON file")
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMG]?)B?", args.shard_size.strip(), re.I)
    if not m:
        p.error(f"cannot read --shard-size {args.shard_size!r}")
    args.shard_bytes = int(float(m[1]) * 1000 ** " KMG".index((m[2] or " ").upper()))
    return args


def prepare(work: Path, size: str, args: argparse.Namespace) -> tuple[Path, Path, dict]:
    """The base and the adapter of benchmarks/merge.py, built or reused."""
    base, adapter, stamp = work / f"base-{size}", work / f"adapter-{size}", work / f"base-{size}.json"
    spec = {
        "size": size,
        "seed": args.seed,
        "shard_bytes": args.shard_bytes,
        "block": 16_777_213,
        "version": 1,
    }
    if base.exists() and adapter.exists() and stamp.exists() and same_spec(stamp, spec):
        print(f"reusing base {base} and adapter {adapter}", flush=True)
        return base, adapter, json.loads(stamp.read_text()).get("build", {})
    for p in (base, adapter, stamp):
        remove(p)
    print(f"building {size} base ...", flush=True)
    build = {
        "base": build_base(base, size, args.seed, args.shard_bytes),
        "adapter": build_adapter(adapter, size, args.seed, base),
    }
    stamp.write_text(json.dumps({**spec, "build": build}))
    return base, adapter, build


def weight_files(folder: Path) -> list[str]:
    return sorted(f.name for f in folder.glob("*.safetensors"))


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    size = args.size
    base_bytes = sum(math.prod(s) * BF16 for _, s in tensor_shapes(size))
    work: Path = args.workdir.resolve()
    created = not work.exists()
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "bench-logs"
    merged, near, out_cp, again = (work / n for n in ("merged", "merged-near-one", "out_cp", "again"))
    try:
        logs.mkdir(exist_ok=True)
        for o in (merged, near, out_cp, again):
            remove(o)
        if shutil.disk_usage(work).free < base_bytes * 4.2:
            raise SystemExit(f"{work}: needs about {base_bytes * 4.2 / 1e9:.1f} GB free")
        base, adapter, _ = prepare(work, size, args)
        lc, lc_env, lc_what = loractl_cmd(args.loractl_ref, work)
        print(f"timing {lc_what}; merging once (untimed) ...", flush=True)
        timed(
            [*lc, "merge", str(base), str(adapter), "-o", str(merged), "--no-receipt", "-q"],
            logs / "merge.log",
            work,
            lc_env,
        )
        if args.bound:
            timed(
                [*lc, "merge", str(base), str(adapter), "-o", str(near), "--no-receipt", "-q", "--weight", repr(NEAR_ONE)],
                logs / "merge-near.log", work, lc_env,
            )  # fmt: skip
        files = weight_files(merged)
        cmp = " && ".join(f'cmp -s "$0/{f}" "$1/{f}"' for f in files)
        remerge = f'{shlex.join(lc)} merge "$2" "$3" -o "$1" --no-receipt -q && {cmp}'
        cases: list[tuple[Case, list[str], Path | None, dict | None]] = [
            (Case("cp -rL merged", key="cp"), ["cp", "-rL", str(merged), str(out_cp)], out_cp, None),
            (
                Case("loractl verify", key="verify"),
                [*lc, "verify", str(merged), str(adapter), "--base", str(base), "--json"],
                None,
                lc_env,
            ),
            (
                Case("loractl merge + cmp", key="remerge"),
                ["sh", "-c", remerge, str(merged), str(again), str(base), str(adapter)],
                again,
                lc_env,
            ),
        ]
        if args.bound:
            cases.append(
                (
                    Case("loractl verify (bound)", key="verify_bound"),
                    [*lc, "verify", str(near), str(adapter), "--base", str(base), "--json"],
                    None,
                    lc_env,
                )
            )
        print(
            f"warm-up: {warm(base):.1f}s base, {warm(merged):.1f}s merged (page caches are not dropped)",
            flush=True,
        )
        if args.bound:
            warm(near)
        results: dict[str, dict] = {}
        for r in range(args.repeat):
            for case, cmd, out, env in cases:
                log = logs / f"{case.key}-{r}.log"
                run = timed(cmd, log, work, env)
                case.runs.append(run)
                print(
                    f"  [{r + 1}/{args.repeat}] {case.label:<24} {run.seconds:8.2f}s  peak RSS "
                    f"{(run.peak_rss_kib or 0) / 1024:6.0f} MiB  (load {run.load1:.1f})",
                    flush=True,
                )
                if case.key.startswith("verify"):
                    doc = json.loads(log.read_text())
                    assert doc["ok"], doc["findings"][:3]
                    results[case.key] = doc["tensors"]
                if out is not None:
                    remove(out)
        info = machine_info(work)
        info["loractl_code"] = lc_what
        report(size, base_bytes, [c for c, _, _, _ in cases], results, info, args)
        if args.json:
            doc = {
                "size": size,
                "repeat": args.repeat,
                "cases": {
                    c.key: {
                        "label": c.label,
                        "median_s": c.median,
                        "min_s": c.min,
                        "peak_rss_mib": c.peak_rss_mib,
                        "runs": [asdict(x) for x in c.runs],
                    }
                    for c, _, _, _ in cases
                },  # fmt: skip
                "verify_tensors": results,
                "machine": info,
            }
            args.json.write_text(json.dumps(doc, indent=2) + "\n")
    finally:
        for o in (merged, near, out_cp, again):
            remove(o) if o.exists() else None
        if not args.keep:
            if created:
                shutil.rmtree(work, ignore_errors=True)
            else:
                for p in (
                    work / f"base-{size}",
                    work / f"adapter-{size}",
                    work / f"base-{size}.json",
                    logs,
                    work / "loractl-src",
                ):
                    remove(p) if p.exists() else None
    return 0


def report(
    size: str, base_bytes: int, cases: list[Case], results: dict, info: dict, args: argparse.Namespace
) -> None:
    cp = cases[0].median
    print()
    print(
        f"loractl verify benchmark: {size} ({base_bytes / 1e9:.2f} GB bf16 base and merged model), median of {args.repeat}"
    )
    print()
    head = f"{'what':<26} {'median s':>9} {'min s':>8} {'× cp':>6} {'peak RSS MiB':>12} {'CPU s':>7}"
    print(head)
    print("-" * len(head))
    for c in cases:
        cpu = [r.user_s + r.sys_s for r in c.runs if r.user_s is not None and r.sys_s is not None]
        cpu_s = f"{statistics.median(cpu):7.1f}" if cpu else f"{'-':>7}"
        print(
            f"{c.label:<26} {c.median:9.2f} {c.min:8.2f} {c.median / cp:6.2f} {c.peak_rss_mib or 0:12.0f} {cpu_s}"
        )
    print()
    for key, t in results.items():
        print(f"{key}: {t}")
    loads = [r.load1 for c in cases for r in c.runs]
    print(
        f"machine: {info['nproc']} CPUs ({info['cpu']}), {info.get('ram_gib')} GiB RAM, torch {info['torch']}, "
        f"{info['loractl_code']}, load average at the runs' starts {min(loads):.1f}-{max(loads):.1f}, now {info['load_average']}"
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
