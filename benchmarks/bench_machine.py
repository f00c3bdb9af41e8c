"""What the benchmarks' JSON files say about the machine, and the fresh-process runner of the memory benchmarks."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else (platform.processor() or "unknown")


def run_fresh(cmd: list[str], what: str, timeout: int, env: dict[str, str] | None = None) -> dict:
    """Run one measurement in a fresh process (so one variant's freed memory cannot hide another's peak) and return
    the JSON object its last stdout line prints. glibc is told to return freed blocks to the system (they would
    otherwise stay in the peak RSS of the next allocation)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", **(env or {}))
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    if p.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])
