"""python -m tests.fuzz [--cases N] [--seed S] [--case N --keep DIR] [--jobs J] [--subprocess] [--compare N]

Runs N fuzz cases against loractl and prints, per mutation family and command, how many commands
broke which rule, then each kind of failure with reproducers. Exits 1 if any rule was broken.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

from . import harness, seeds
from .harness import FAMILIES
from .runner import ForkRunner, SubprocessRunner, global_env


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__.split("\n\n")[1])
    p.add_argument("--cases", type=int, default=200, help="number of cases (default 200)")
    p.add_argument("--start", type=int, default=0, help="first case number (default 0)")
    p.add_argument("--seed", type=int, default=0, help="the run's seed (default 0)")
    p.add_argument("--case", type=int, help="run only this case, printing its mutations and commands")
    p.add_argument("--keep", type=Path, help="with --case: the folder to run it in, kept afterwards")
    p.add_argument("--only", help=f"comma-separated mutation families ({', '.join(FAMILIES)})")
    p.add_argument(
        "--jobs", type=int, default=min(2, os.cpu_count() or 1), help="cases run in parallel (default: 2)"
    )
    p.add_argument(
        "--timeout", type=float, default=20.0, help="seconds before a command counts as a hang (default 20)"
    )
    p.add_argument(
        "--subprocess", action="store_true", help="run every command as a real `python -m loractl`"
    )
    p.add_argument("--compare", type=int, metavar="N",
                   help="run the first N cases both ways (fork server and subprocess) and compare the results")  # fmt: skip
    p.add_argument(
        "--examples", type=int, default=3, help="reproducers shown per kind of failure (default 3)"
    )
    p.add_argument("--report", type=Path, help="write a JSON summary here")
    p.add_argument("--results", type=Path, help="write every case's result here (JSON lines)")
    p.add_argument("--root", type=Path, help="work folder (default: a new temporary one, removed afterwards)")
    a = p.parse_args(argv)
    if a.only:
        a.only = set(a.only.split(","))
        unknown = a.only - set(FAMILIES)
        if unknown:
            p.error(f"unknown families: {', '.join(sorted(unknown))}")
    if a.keep and a.case is None:
        p.error("--keep goes with --case")
    return a


def main(argv: list[str] | None = None) -> int:
    a = _args(argv)
    root = a.root or Path(tempfile.mkdtemp(prefix="loractl-fuzz-"))
    root.mkdir(parents=True, exist_ok=True)
    os.environ.update(global_env(root))  # before loractl, torch and huggingface_hub are imported
    t0 = time.monotonic()
    runner = SubprocessRunner() if a.subprocess else ForkRunner()
    seeds_dir = root / "seeds"
    if seeds_dir.exists():
        shutil.rmtree(seeds_dir)
    (root / "tmp").mkdir(exist_ok=True)
    seeds.build(seeds_dir, runner, harness.command_env(root), a.timeout)
    digest = seeds.digest(seeds_dir)
    setup = time.monotonic() - t0
    try:
        if a.case is not None:
            keep = a.keep.resolve() if a.keep else None
            r = harness.run_case(
                a.seed, a.case, root, seeds_dir, runner, a.timeout, a.only, keep=keep, verbose=True
            )
            if keep:
                print(
                    f"files kept in {keep}; run a command there with: cd {keep} && TMPDIR=$PWD/tmp loractl ..."
                )
            if r.error:
                print(f"HARNESS ERROR: {r.error}")
            return 1 if r.error or any(c.problems for c in r.commands) else 0
        if a.compare:
            return compare(a, root, seeds_dir, runner)
        t1 = time.monotonic()
        results = run_many(a, root, seeds_dir, runner)
        seconds = time.monotonic() - t1
        text, summary = harness.report(results, a.seed, a.examples)
        print(text)
        n_cmd = summary["commands"]
        print(f"\n{len(results)} cases in {seconds:.1f} s ({len(results) / seconds:.1f} cases/s, "
              f"{n_cmd / seconds:.1f} commands/s; {a.jobs} job(s), {runner.name} runner; setup {setup:.1f} s)")  # fmt: skip
        if seeds.digest(seeds_dir) != digest:
            print("the seeds changed during the run: a command wrote outside its case folder")
            summary["seeds_changed"] = True
        summary.update(
            seconds=round(seconds, 1),
            setup_seconds=round(setup, 1),
            jobs=a.jobs,
            runner=runner.name,
            seed=a.seed,
        )
        if a.report:
            a.report.write_text(json.dumps(summary, indent=2))
        if a.results:
            harness.dump(results, a.results)
        bad = summary["failed_commands"] or summary["harness_errors"] or summary.get("seeds_changed")
        return 1 if bad else 0
    finally:
        if a.root is None:
            shutil.rmtree(root, ignore_errors=True)


def run_many(a: argparse.Namespace, root: Path, seeds_dir: Path, runner) -> list[harness.CaseResult]:
    """Run cases start..start+cases-1: in this process, or in ``jobs`` forked workers (each a copy of
    the warm server) taking every jobs-th case."""
    indices = list(range(a.start, a.start + a.cases))
    jobs = max(1, min(a.jobs, len(indices)))
    if jobs == 1:
        return _work(a, root, seeds_dir, runner, indices, 0)
    pids = []
    for w in range(jobs):
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                results = _work(a, root, seeds_dir, runner, indices[w::jobs], w)
                harness.dump(results, root / f"results-{w}.jsonl")
                code = 0
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                os._exit(code)
        pids.append(pid)
    failed = [w for w, pid in enumerate(pids) if os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 0]
    if failed:
        raise SystemExit(f"fuzz worker(s) {failed} failed")
    results = [r for w in range(jobs) for r in harness.load(root / f"results-{w}.jsonl")]
    return sorted(results, key=lambda r: r.case)


def _work(
    a, root: Path, seeds_dir: Path, runner, indices: list[int], worker: int
) -> list[harness.CaseResult]:
    results = []
    t0 = last = time.monotonic()
    for n, i in enumerate(indices, 1):
        results.append(harness.run_case(a.seed, i, root, seeds_dir, runner, a.timeout, a.only))
        if time.monotonic() - last > 30:
            last = time.monotonic()
            bad = sum(1 for r in results for c in r.commands if c.problems)
            print(
                f"[worker {worker}] {n}/{len(indices)} cases, {bad} failed commands, {last - t0:.0f} s",
                file=sys.stderr,
            )
    return results


def _blur(text: str) -> str:
    text = re.sub(r"\d+(\.\d+)?\s?(s|ms)\b", "T", text)  # timings
    text = re.sub(r"(?<![\d.])\d+\.\d(?![\d])", "T", text)  # a table's seconds column (0.1)
    text = re.sub(r'"(seconds|elapsed)": [0-9.e-]+', r'"\1": T', text)
    return re.sub(r"loractl-tmp-\d+-[0-9a-f]+", "loractl-tmp-P-X", text)


def compare(a: argparse.Namespace, root: Path, seeds_dir: Path, fork_runner) -> int:
    """The first N cases through the fork server and through real subprocesses: same exit codes,
    same stdout and stderr (timings aside), same broken rules?"""
    sub = SubprocessRunner()
    same = differ = 0
    for i in range(a.start, a.start + a.compare):
        outs = {}
        for name, runner in (("fork", fork_runner), ("subprocess", sub)):
            captured: list = []
            orig = runner.run

            def spy(*args, _orig=orig, _captured=captured, **kw):
                o = _orig(*args, **kw)
                _captured.append(o)
                return o

            runner.run = spy
            try:
                r = harness.run_case(a.seed, i, root, seeds_dir, runner, a.timeout, a.only)
            finally:
                runner.run = orig
            outs[name] = (r, captured)
        (rf, of), (rs, os_) = outs["fork"], outs["subprocess"]
        for cf, cs, xf, xs in zip(rf.commands, rs.commands, of, os_):
            keys_f = (cf.code, sorted(p[0] for p in cf.problems), _blur(xf.stdout), _blur(xf.stderr))
            keys_s = (cs.code, sorted(p[0] for p in cs.problems), _blur(xs.stdout), _blur(xs.stderr))
            if keys_f == keys_s:
                same += 1
            else:
                differ += 1
                print(f"case {i}: {harness.shell(cf.argv)}")
                for label, kf, ks in zip(("exit", "rules", "stdout", "stderr"), keys_f, keys_s):
                    if kf != ks:
                        print(
                            f"  {label}: fork {str(kf)[:300]!r}\n  {' ' * len(label)}  subprocess {str(ks)[:300]!r}"
                        )
    print(f"{same + differ} commands run both ways: {same} agree, {differ} differ")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
