"""Step time of the step-wide mu_B losses against ``bt``, with the extra no-grad forward and with kept graphs.

    python benchmarks/bench_step_mu.py --out benchmarks/results/step_mu_cpu_2026-12-03.json

One process, the real trainer's ``train_step``, a GPT-NeoX-shaped random model (``--hidden``/``--layers``) on real
HH-RLHF lengths (benchmarks/data, random ids), several micro-batches per step. Variants, timed in interleaved rounds
so drift hits all of them alike: ``bt``; ``threshold`` with the extra no-grad forward (``mu_keep_graphs=False``,
the only path before issue 31.6); ``threshold`` with kept graphs (``mu_keep_graphs=True``). Each with and without
gradient checkpointing. Reports median step seconds and the ratios to ``bt`` (target on the device: <= 1.05).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hh_lengths import hh_like_pairs  # noqa: E402

VARIANTS = {
    "bt": dict(loss="bt"),
    "threshold_extra_forward": dict(loss="threshold", mu_keep_graphs=False),
    "threshold_kept_graphs": dict(loss="threshold", mu_keep_graphs=True),
}


def make_step(variant: str, ckpt: bool, args, pairs):
    from transformers import AutoConfig

    from fastrm.config import RewardConfig
    from fastrm.model import RewardModel
    from fastrm.trainer import RewardTrainer

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(
        "gpt_neox",
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=max(args.hidden // 64, 1),
        max_position_embeddings=2048,
        rotary_pct=0.25,
        vocab_size=50304,
    )
    model = RewardModel.from_config(cfg)
    rc = RewardConfig(
        output_dir="/tmp/fastrm-bench-step-mu",
        max_tokens_per_batch=args.max_tokens_per_batch,
        gradient_checkpointing=ckpt,
        progress=False,
        learning_rate=1e-6,
        max_grad_norm=0.0,
        warmup_ratio=0.0,
        lr_scheduler_type="constant",
        **VARIANTS[variant],
    )
    tr = RewardTrainer(model, rc, [pairs[0]], run_folder=False)
    return lambda: tr.train_step(pairs, len(pairs))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--pairs-per-step", type=int, default=16)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--max-tokens-per-batch", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", help="JSON report path")
    a = p.parse_args(argv)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    pairs = hh_like_pairs(a.pairs_per_step, max_length=a.max_length, seed=1)
    steps = {(v, ck): make_step(v, ck, a, pairs) for ck in (False, True) for v in VARIANTS}
    times: dict = {k: [] for k in steps}
    micro = {}
    for k, fn in steps.items():  # warm-up (allocator, first-call costs)
        micro[k] = fn()["micro_batches"]
    for _ in range(a.rounds):
        for k, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    rows = []
    for ck in (False, True):
        bt = statistics.median(times[("bt", ck)])
        for v in VARIANTS:
            med = statistics.median(times[(v, ck)])
            rows.append(
                dict(
                    variant=v,
                    gradient_checkpointing=ck,
                    micro_batches=micro[(v, ck)],
                    median_step_s=round(med, 4),
                    step_s=[round(t, 4) for t in times[(v, ck)]],
                    ratio_to_bt=round(med / bt, 3),
                )
            )
            print(f"ckpt={ck!s:<5} {v:<26} {med:.3f}s  x{med / bt:.3f} of bt  ({micro[(v, ck)]} micro-batches)")
    report = dict(
        benchmark="step_mu",
        date=date.today().isoformat(),
        command="python " + " ".join([str(Path(__file__).relative_to(Path.cwd()))] + (argv or sys.argv[1:])),
        device=platform.processor() or platform.machine(),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        shape=dict(family="gpt_neox", hidden=a.hidden, layers=a.layers),
        pairs_per_step=a.pairs_per_step,
        tokens_per_step=sum(q.num_tokens for q in pairs),
        max_tokens_per_batch=a.max_tokens_per_batch,
        rows=rows,
    )
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
