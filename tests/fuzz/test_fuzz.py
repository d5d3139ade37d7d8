"""The fuzzer in CI: a few hundred seeded cases (python -m tests.fuzz --cases 300 --seed 0), every
command of which must keep every rule of tests/fuzz/oracle.py.

It runs as its own process: the fuzzer forks a child per command from a process that has imported
torch but run nothing with it, which this pytest process (having run torch in other tests) is not.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CASES = int(os.environ.get("LORACTL_FUZZ_CASES", "300"))
SEED = int(os.environ.get("LORACTL_FUZZ_SEED", "0"))


def test_fuzz_cases_keep_every_rule(tmp_path):
    report = tmp_path / "report.json"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    }
    r = subprocess.run(
        [sys.executable, "-m", "tests.fuzz", "--cases", str(CASES), "--seed", str(SEED), "--report", str(report),
         "--root", str(tmp_path / "work"), "--examples", "2", "--timeout", "15"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=3600,
    )  # fmt: skip
    assert report.exists(), (
        f"the fuzzer did not finish (exit {r.returncode}):\n{r.stdout[-5000:]}\n{r.stderr[-5000:]}"
    )
    summary = json.loads(report.read_text())
    assert summary["cases"] == CASES
    assert summary["commands"] >= CASES  # every case ran at least one command
    assert summary["harness_errors"] == 0, r.stdout[-20000:]
    assert not summary.get("seeds_changed"), r.stdout[-20000:]
    assert summary["failed_commands"] == 0, "\n" + r.stdout[-20000:]
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-5000:]


def _fuzz(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    }
    return subprocess.run(
        [sys.executable, "-m", "tests.fuzz", "--root", str(tmp_path), *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip


def test_the_fork_server_runs_commands_as_real_processes_do(tmp_path):
    r = _fuzz(tmp_path, "--compare", "3", "--seed", "0", "--start", "5")
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-5000:]
    assert re.search(r"(\d+) commands run both ways: \1 agree, 0 differ", r.stdout), r.stdout[-3000:]


def test_a_case_replays_exactly(tmp_path):
    runs = []
    for i in (1, 2):
        results = tmp_path / f"r{i}.jsonl"
        r = _fuzz(
            tmp_path / f"w{i}", "--cases", "4", "--start", "40", "--seed", "3", "--results", str(results)
        )
        assert results.exists(), r.stdout[-3000:] + r.stderr[-3000:]
        cases = [json.loads(line) for line in results.read_text().splitlines()]
        for c in cases:
            for cmd in c["commands"]:
                del cmd["seconds"]
        runs.append(json.dumps(cases).replace(str(tmp_path / f"w{i}"), "ROOT"))
    assert runs[0] == runs[1]
