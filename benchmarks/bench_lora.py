"""Full fine-tuning against LoRA r=8 and r=16 on the same backbone and batch: trainable parameters, optimizer-state
bytes, peak memory and pairs/s, side by side in one run (fastrm/lora.py; issue 23).

Each variant runs in a fresh process (so one variant's freed memory cannot hide another's peak): the model is built
(random init, the preset's shape, fp32), the trainer made (``lora_r`` 0 / 8 / 16, default targets: every attention
and MLP projection), then ``--steps`` optimizer steps of ``RewardTrainer.train_step`` on the same seeded pairs (the
first is a warm-up, the rest are timed). Reported per variant:

* trainable parameters, and optimizer-state bytes (every tensor AdamW holds after the steps);
* peak memory: CPU, the process's RSS high-water mark (VmHWM) over the steps, the whole process (weights, gradients,
  optimizer state, activations, the Python and torch runtime); with CUDA also ``torch.cuda.max_memory_allocated``;
* pairs/s over the timed steps.

Targets (issue 23, on the pythia-410m shape): LoRA's optimizer state <= 5% of full fine-tuning's, its peak <= 0.6x.

CPU:   python benchmarks/bench_lora.py --preset pythia-410m --out benchmarks/results/lora_memory_cpu_<date>.json
GPU:   python benchmarks/bench_lora.py --preset pythia-410m --pairs 16 --out /tmp/lora_gpu.json
Quick: python benchmarks/bench_lora.py --preset tiny-neox --steps 2 --out /tmp/l.json   (seconds)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling helper modules, as bench_train does
from bench_machine import cpu_name, run_fresh  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"full": 0, "lora-r8": 8, "lora-r16": 16}
TARGETS = {"optimizer_state": 0.05, "peak": 0.6}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def make_pairs(n: int, vocab: int, prompt: int, chosen: int, rejected: int, seed: int = 0):
    """Random token pairs of fixed lengths (the same for every variant)."""
    from fastrm.data import TokenizedPair

    rng = random.Random(seed)
    ids = lambda k: [rng.randrange(vocab) for _ in range(k)]  # noqa: E731
    return [TokenizedPair(ids(prompt), ids(chosen), ids(rejected), None, f"pair{i}") for i in range(n)]


def child(variant: str, a: argparse.Namespace) -> dict:
    """Inside the fresh process: build, train ``a.steps`` steps, report."""
    from fastrm.config import RewardConfig
    from fastrm.model import RewardModel
    from fastrm.presets import resolve_config
    from fastrm.trainer import RewardTrainer

    torch.manual_seed(0)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    cfg = resolve_config(a.preset)
    if a.layers:  # a shorter stack of the same shape (the per-layer ratios are the 410m ones; see NOTES.md)
        cfg.num_hidden_layers = a.layers
    model = RewardModel.from_config(cfg, self_test=False)
    pairs = make_pairs(a.pairs, cfg.vocab_size, a.prompt, a.chosen, a.rejected)
    args = RewardConfig(
        output_dir=str(Path(a.scratch) / variant),
        progress=False,
        pairs_per_step=a.pairs,
        max_tokens_per_batch=max(16, a.pairs * (a.prompt + a.chosen + a.rejected) * 2),
        learning_rate=1e-5,
        lora_r=VARIANTS[variant],
        lora_alpha=2.0 * VARIANTS[variant] if VARIANTS[variant] else 16.0,
        gradient_checkpointing=a.checkpointing,
        save_final=False,
        bf16=device.type == "cuda",
    )
    tr = RewardTrainer(model, args, pairs, device=device)
    baseline = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        m = tr.train_step(pairs, len(pairs))
        times.append(time.perf_counter() - t0)
        losses.append(m["loss"])
    timed = times[1:] or times
    state = tr.optimizer.state_dict()["state"]
    opt_bytes = sum(t.numel() * t.element_size() for s in state.values() for t in s.values() if torch.is_tensor(t))
    out = {
        "variant": variant,
        "lora_r": VARIANTS[variant],
        "parameters": sum(p.numel() for p in tr.model.parameters()),
        "trainable_parameters": sum(p.numel() for p in tr.model.parameters() if p.requires_grad),
        "optimizer_state_bytes": opt_bytes,
        "rss_before_steps_bytes": baseline * 1024,
        "peak_rss_bytes": _status_kib("VmHWM") * 1024,
        "step_seconds": [round(t, 3) for t in times],
        "pairs_per_s": round(len(pairs) * len(timed) / sum(timed), 4),
        "tokens_per_step": int(m["tokens"]),
        "losses": losses,
    }
    if device.type == "cuda":
        out["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
    return out


def run_variant(variant: str, argv: list[str], timeout: int) -> dict:
    return run_fresh([sys.executable, str(Path(__file__).resolve()), *argv, "--child", variant], variant, timeout)


def versions() -> dict:
    import peft
    import transformers

    from fastrm.version import __version__

    cpu = cpu_name()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {
        "machine": f"{platform.node()} ({platform.platform()})",
        "cpu": cpu,
        "cpus_visible": os.cpu_count(),
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "fastrm": __version__,
    }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="pythia-410m", help="backbone shape (random init; default pythia-410m)")
    p.add_argument("--layers", type=int, help="keep only this many decoder layers of the preset's shape")
    p.add_argument("--pairs", type=int, default=4, help="pairs per step, the same batch for every variant")
    p.add_argument("--prompt", type=int, default=96, help="prompt tokens per pair")
    p.add_argument("--chosen", type=int, default=64, help="chosen-response tokens per pair")
    p.add_argument("--rejected", type=int, default=48, help="rejected-response tokens per pair")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per variant (the first is not timed)")
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in every variant")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    p.add_argument("--scratch", default="/tmp/fastrm-bench-lora", help="output_dir of the runs (nothing is saved)")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per variant")
    p.add_argument("--out", type=Path, help="JSON results file")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child, a)))
        return 0
    rows = []
    report = {
        **versions(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, "benchmarks/bench_lora.py", *argv]),
        "workload": {k: getattr(a, k) for k in ("preset", "layers", "pairs", "prompt", "chosen", "rejected", "steps")},
        "gradient_checkpointing": a.checkpointing,
        "method": __doc__.split("\n\n")[1].replace("\n", " "),
        "targets": {
            "optimizer_state_vs_full": f"<= {TARGETS['optimizer_state']}",
            "peak_vs_full": f"<= {TARGETS['peak']}",
        },
        "results": rows,
    }
    for v in a.variants.split(","):
        rows.append(run_variant(v, argv, a.timeout))  # the child ignores --out
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        if a.out:  # rewritten after every variant: a run cut short keeps what it measured
            a.out.write_text(json.dumps({**report, "complete": False}, indent=1))
    full = next((r for r in rows if r["lora_r"] == 0), None)
    if full is not None:
        ratios = {}
        for r in rows:
            if r["lora_r"]:
                ratios[r["variant"]] = {
                    "trainable_parameters": round(r["trainable_parameters"] / full["trainable_parameters"], 5),
                    "optimizer_state": round(r["optimizer_state_bytes"] / full["optimizer_state_bytes"], 5),
                    "peak_rss": round(r["peak_rss_bytes"] / full["peak_rss_bytes"], 4),
                    "pairs_per_s": round(r["pairs_per_s"] / full["pairs_per_s"], 3),
                }
                if "cuda_peak_allocated_bytes" in r:
                    ratios[r["variant"]]["cuda_peak"] = round(
                        r["cuda_peak_allocated_bytes"] / full["cuda_peak_allocated_bytes"], 4
                    )
        report["ratios_to_full"] = ratios
        report["meets_targets"] = all(
            x["optimizer_state"] <= TARGETS["optimizer_state"] and x["peak_rss"] <= TARGETS["peak"]
            for x in ratios.values()
        )
    report["complete"] = True
    text = json.dumps(report, indent=1)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
