"""What the backbone self-test costs at RewardModel construction, on the CPU, for the tiny presets: this tree
against a baseline commit, side by side in one run (issue 29: construction may grow by less than 2 s).

For each preset and torch thread count, a worker process (one per tree, run alternately --rounds times) builds the
model once to warm up, then --reps times measures ``RewardModel.from_config(preset, self_test=False)`` and
``fastrm.backbones.self_test(model)`` separately (wall and process CPU seconds). Medians over all rounds count.
The JSON (machine, load, versions, commits, command, per-preset seconds and the growth) goes to --out, by default
benchmarks/results/self_test_cost_cpu_<date>.json.

    python benchmarks/bench_self_test.py --baseline-ref 3db32b5      # the self-test before issue 29
    python benchmarks/bench_self_test.py --baseline-ref HEAD~1 --rounds 1 --reps 2 --out /tmp/s.json   (smoke)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ("tiny-llama", "tiny-qwen2", "tiny-neox", "tiny-gpt2")


def worker(threads: int, reps: int) -> None:
    import torch

    from fastrm import backbones
    from fastrm.model import RewardModel

    torch.set_num_threads(threads)
    out = {}
    for preset in PRESETS:
        backbones.self_test(RewardModel.from_config(preset, self_test=False))  # warm-up: lazy imports, allocator
        rows = []
        for _ in range(reps):
            t, c = time.perf_counter(), time.process_time()
            model = RewardModel.from_config(preset, self_test=False)
            t1, c1 = time.perf_counter(), time.process_time()
            backbones.self_test(model)
            t2, c2 = time.perf_counter(), time.process_time()
            rows.append(
                {"build_wall": t1 - t, "build_cpu": c1 - c, "self_test_wall": t2 - t1, "self_test_cpu": c2 - c1}
            )
        out[preset] = rows
    print(json.dumps(out))


def tree_of(ref: str, into: Path) -> Path:
    """fastrm and its kernels at git ``ref``, importable from ``into``."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", ref, "fastrm", "kernels"], capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    (into / "kernels").rename(into / "fastrm_kernels")
    return into


def run_worker(tree: Path, threads: int, reps: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, __file__, "--worker", "--threads", str(threads), "--reps", str(reps)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline-ref", default="3db32b5", help="git commit of the baseline self-test")
    ap.add_argument("--threads", default="1,2", help="torch thread counts to measure")
    ap.add_argument("--rounds", type=int, default=3, help="alternating baseline/current worker runs per thread count")
    ap.add_argument("--reps", type=int, default=5, help="measurements per preset in each worker run")
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(int(a.threads), a.reps)
    import torch
    import transformers

    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    base = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", a.baseline_ref], capture_output=True, text=True, check=True
    ).stdout.strip()
    dirty = bool(
        subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "fastrm"], capture_output=True).stdout
    )
    trees = {"baseline": None, "current": Path(tempfile.mkdtemp()) / "current"}
    trees["baseline"] = tree_of(base, Path(tempfile.mkdtemp()))
    trees["current"].mkdir()
    (trees["current"] / "fastrm").symlink_to(ROOT / "fastrm")
    (trees["current"] / "fastrm_kernels").symlink_to(ROOT / "kernels")
    load = os.getloadavg()
    results: dict = {}
    for threads in [int(t) for t in a.threads.split(",")]:
        rows = {name: {p: [] for p in PRESETS} for name in trees}
        for _ in range(a.rounds):
            for name, tree in trees.items():
                for preset, reps in run_worker(tree, threads, a.reps).items():
                    rows[name][preset] += reps
        for preset in PRESETS:
            med = {
                name: {k: round(statistics.median(r[k] for r in rows[name][preset]), 4) for k in rows[name][preset][0]}
                for name in trees
            }
            growth = {k: round(med["current"][k] - med["baseline"][k], 4) for k in ("self_test_wall", "self_test_cpu")}
            results.setdefault(f"threads_{threads}", {})[preset] = med | {"growth_s": growth}
            print(
                f"threads={threads} {preset:11s} self-test wall {med['baseline']['self_test_wall']:.3f} -> "
                f"{med['current']['self_test_wall']:.3f} s, cpu {med['baseline']['self_test_cpu']:.3f} -> "
                f"{med['current']['self_test_cpu']:.3f} s (build {med['current']['build_wall']:.3f} s)",
                flush=True,
            )
    date = datetime.datetime.now(datetime.timezone.utc)
    out = Path(a.out or ROOT / "benchmarks" / "results" / f"self_test_cost_cpu_{date:%Y-%m-%d}.json")
    meta = {
        "date": date.isoformat(timespec="seconds"),
        "command": "python benchmarks/bench_self_test.py " + " ".join(sys.argv[1:]),
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_at_start": load,
        "load_average_at_end": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "current_commit": head + ("+uncommitted fastrm/" if dirty else ""),
        "baseline_commit": base,
        "presets": list(PRESETS),
        "statistic": f"median of {a.rounds} alternating worker runs x {a.reps} measurements, after a warm-up build",
        "note": "the machine is shared: wall time with 2 threads waits on other processes; CPU time is the work",
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
