"""What both benchmarks share: timing a command under ``/usr/bin/time -v``, the run and case records,
removing outputs, the PEFT ``adapter_config.json`` of the adapters they build, the machine's CPU
and RAM, and exporting one commit's ``loractl`` for ``--loractl-ref``."""

from __future__ import annotations

import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

TIME = "/usr/bin/time"
#: stands in for /usr/bin/time where it is missing: peak RSS of the child from getrusage
RSS_WRAPPER = (
    "import resource, subprocess, sys\n"
    "rc = subprocess.call(sys.argv[2:])\n"
    "kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
    "open(sys.argv[1], 'w').write(f'Maximum resident set size (kbytes): {kib}\\n')\n"
    "sys.exit(rc)\n"
)


@dataclass
class Run:
    seconds: float
    peak_rss_kib: int | None = None
    user_s: float | None = None
    sys_s: float | None = None
    load1: float = 0.0  # 1-minute load average when the run started: other work on the machine skews timings


@dataclass
class Case:
    label: str
    runs: list[Run] = field(default_factory=list)
    key: str = ""

    @property
    def median(self) -> float:
        return statistics.median(r.seconds for r in self.runs)

    @property
    def min(self) -> float:
        return min(r.seconds for r in self.runs)

    @property
    def peak_rss_mib(self) -> float | None:
        rss = [r.peak_rss_kib for r in self.runs if r.peak_rss_kib]
        return max(rss) / 1024 if rss else None


def timed(cmd: list[str], log: Path, cwd: Path | None = None, env: dict[str, str] | None = None) -> Run:
    """Run ``cmd`` under /usr/bin/time -v (or :data:`RSS_WRAPPER`), its stdout to ``log`` and stderr
    beside it (``.err``); the wall clock is measured here, after an ``os.sync()`` so no earlier run's
    writeback overlaps this one.

    It runs in ``cwd`` (default: the log's folder, in the workdir), never in the repository:
    ``python -m`` and ``python -c`` put the current folder first on sys.path, which would pick a
    working tree's ``loractl`` over a ``--loractl-ref`` export.
    """
    stats = log.with_suffix(".time")
    if os.access(TIME, os.X_OK):
        full = [TIME, "-v", "-o", str(stats), *cmd]
    else:
        full = [sys.executable, "-c", RSS_WRAPPER, str(stats), *cmd]
    os.sync()
    load1 = os.getloadavg()[0]
    err = log.with_suffix(".err")
    with open(log, "wb") as out, open(err, "wb") as errors:
        t0 = time.perf_counter()
        rc = subprocess.run(
            full, stdout=out, stderr=errors, stdin=subprocess.DEVNULL, env=env, cwd=cwd or log.parent
        ).returncode
        seconds = time.perf_counter() - t0
    text = stats.read_text() if stats.exists() else ""
    if rc != 0:
        tail = (log.read_text(errors="replace") + err.read_text(errors="replace"))[-3000:]
        raise SystemExit(f"command failed (exit {rc}): {' '.join(cmd)}\n{tail}\n{text}")

    def num(pattern: str) -> float | None:
        m = re.search(pattern + r":\s*([\d.]+)", text)
        return float(m[1]) if m else None

    rss = num(r"Maximum resident set size \(kbytes\)")
    return Run(
        seconds,
        int(rss) if rss else None,
        num(r"User time \(seconds\)"),
        num(r"System time \(seconds\)"),
        round(load1, 2),
    )


def remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()


def peft_config(rank: int, alpha: float, targets: list[str] | tuple[str, ...], base: str) -> dict:
    """The ``adapter_config.json`` PEFT writes for a plain LoRA on ``targets`` of a causal LM."""
    return {
        "alpha_pattern": {},
        "base_model_name_or_path": base,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": rank,
        "rank_pattern": {},
        "target_modules": sorted(targets),
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": False,
    }


def cpu_and_ram() -> dict:
    """The CPU model and the RAM in GiB, from /proc (the CPU from ``platform`` where /proc is missing)."""
    info: dict = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["ram_gib"] = round(int(line.split()[1]) / 1024**2, 1)
        models = [
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ]
        info["cpu"] = models[0] if models else platform.processor()
    except OSError:
        info["cpu"] = platform.processor()
    return info


def export_ref(ref: str, work: Path) -> tuple[str, Path]:
    """Export the ``loractl`` package of git commit ``ref`` of this repository to ``work/loractl-src-SHA``;
    returns the commit's sha and that folder (the caller puts it first on the import path)."""
    repo = Path(__file__).resolve().parent.parent
    rev = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "--verify", ref + "^{commit}"], capture_output=True, text=True
    )
    if rev.returncode != 0:
        raise SystemExit(f"--loractl-ref {ref!r}: not a commit of {repo}")
    sha = rev.stdout.strip()
    src = work / f"loractl-src-{sha[:12]}"
    remove(src)
    src.mkdir()
    files = subprocess.run(
        ["git", "-C", str(repo), "ls-tree", "--name-only", sha, "setup.py", "pyproject.toml", "README.md"],
        capture_output=True, text=True, check=True,
    ).stdout.split()
    archive = subprocess.run(
        ["git", "-C", str(repo), "archive", sha, "loractl", *files], capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive.stdout, check=True)
    if "setup.py" in files:  # the commit's native kernels, built as pip builds them
        subprocess.run(
            [sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=src, check=True, capture_output=True
        )
    return sha, src
