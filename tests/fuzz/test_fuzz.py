"""The fuzzer in CI: a few hundred seeded cases (python -m tests.fuzz --cases 300 --seed 0), every
command of which must keep every rule of tests/fuzz/oracle.py.

It runs as its own process: the fuzzer forks a child per command from a process that has imported
torch but run nothing with it, which this pytest process (having run torch in other tests) is not.
"""

from __future__ import annotations

import json
import os
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
