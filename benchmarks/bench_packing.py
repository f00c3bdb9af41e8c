"""Host time of packing one optimizer step: what the prefetch thread (fastrm/prefetch.py, issue 31.7) moves off the
step's critical path.

    python benchmarks/bench_packing.py --out benchmarks/results/packing_cpu_<date>.json

Each step is ``--pairs`` HH-length pairs (benchmarks/data, the real length distribution) packed by
``fastrm.packing.micro_batches`` into ``--max-tokens-per-batch`` micro-batches, in both layouts; the median over
``--steps`` distinct steps is reported with the tokens and micro-batches of a step.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling helper modules, as bench_train does
import hh_lengths  # noqa: E402
from bench_machine import cpu_name  # noqa: E402

from fastrm.packing import micro_batches  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=128, help="pairs per optimizer step")
    p.add_argument("--steps", type=int, default=6, help="distinct steps timed")
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--max-tokens-per-batch", type=int, default=32768)
    p.add_argument("--out", type=Path, help="JSON results file")
    a = p.parse_args(argv)
    pairs = hh_lengths.hh_like_pairs(a.pairs * a.steps, a.max_length, seed=0)
    layouts = {}
    for layout in ("separate", "shared_prompt"):
        seconds, tokens, mbs = [], [], []
        for k in range(a.steps):
            t0 = time.perf_counter()
            batches = micro_batches(pairs[k * a.pairs : (k + 1) * a.pairs], a.max_tokens_per_batch, layout)
            seconds.append(time.perf_counter() - t0)
            tokens.append(sum(b.num_tokens for b in batches))
            mbs.append(len(batches))
        layouts[layout] = {
            "step_ms": [round(s * 1000, 2) for s in seconds],
            "median_ms": round(statistics.median(seconds) * 1000, 2),
            "tokens_per_step": tokens,
            "micro_batches_per_step": mbs,
        }
        print(f"{layout}: {layouts[layout]['median_ms']} ms per {a.pairs}-pair step (median of {a.steps})")
    result = {
        "date": datetime.date.today().isoformat(),
        "command": "python " + " ".join([os.path.relpath(sys.argv[0]), *sys.argv[1:]]),
        "device": "cpu",
        "cpu": cpu_name(),
        "cpus_visible": os.cpu_count(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "workload": {
            "pairs": a.pairs,
            "steps": a.steps,
            "max_length": a.max_length,
            "max_tokens": a.max_tokens_per_batch,
        },
        "layouts": layouts,
    }
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
