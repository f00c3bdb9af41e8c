"""End-to-end training-step and best-of-N scoring throughput: fastrm against the stacks users would pick instead.

Stacks, on the same pairs, model shape, optimizer and global batch (128 pairs), measured side by side in one run:
  A   TRL RewardTrainer style: AutoModelForSequenceClassification, chosen+rejected right-padded into one batch,
      SDPA with the padding mask, head on every token.
  B   OpenRLHF style: the same HF model fed packed sequences through varlen attention, head on every token, gather.
  C   fastrm: packed varlen + fused pooling/norm/head/loss (the Triton op on CUDA), ``RewardTrainer.train_step``.
  C0  C without the fused head (the PyTorch head and loss): what the fused op buys inside a real step.
  D   fastrm with shared-prompt packing.
  CT  C with ``loss=threshold`` (step-wide mu_B over several micro-batches): its step time against C's ``bt``.
Scoring (responses/s, N in --bon-ns): HF padded vs fastrm packed vs fastrm shared prompt.

The workload is real HH-RLHF lengths (benchmarks/data/hh_rlhf_lengths.json, carried in the repo; random token ids,
random init): without that file the script stops, it never falls back to made-up lengths. Reported per stack:
pairs/s, real tokens/s (the pairs' unpadded tokens, the same workload for every stack), MFU = (6 N * tokens the stack
computes + attention FLOPs) per second (N = non-embedding parameters; D computes each prompt once) over the bf16
matmul rate measured by this script, peak memory, micro-batches per step, and how many Triton kernels were compiled
during the timed steps (bounded launchers compile none there). ``--profile`` adds the top device ops of one step.
The JSON is rewritten after every row (``"complete": false`` until the end), so a run cut by a time limit keeps what
it measured.

GPU:      python benchmarks/bench_train.py --shapes pythia-410m --checkpointing off --profile C
Dry run:  python benchmarks/bench_train.py --dry-run --out /tmp/t.json   (CPU, tiny shapes, seconds; the same code)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from functools import partial
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import hh_lengths  # noqa: E402

STACKS = ("A", "B", "C", "C0", "D", "CT")


# ---------------------------------------------------------------------------------------------- measurement
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_tflops(device) -> float:
    """Measured bf16 (CUDA) / fp32 (CPU) matmul rate on random data: the MFU denominator."""
    n = 8192 if device.type == "cuda" else 512
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dt), torch.randn(n, n, device=device, dtype=dt)
    for _ in range(3):
        a @ b
    sync(device)
    reps = 20 if device.type == "cuda" else 5
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e12


def attention_flops(pairs, cfg, shared: bool) -> float:
    """Forward+backward causal attention FLOPs (QK^T and PV, 3x forward) of the sequences as a stack attends them:
    separately (prompt + response each), or with the prompt once and each response attending to it."""
    per_token_pair = 2 * 2 * cfg.hidden_size * cfg.num_hidden_layers  # QK^T + PV, multiply-add
    total = 0.0
    for p in pairs:
        P, C, R = len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)
        if shared:
            total += P * P / 2 + sum(x * P + x * x / 2 for x in (C, R))
        else:
            total += (P + C) ** 2 / 2 + (P + R) ** 2 / 2
    return 3 * per_token_pair * total


def triton_compilations() -> int | None:
    """Kernels Triton has compiled so far for fastrm's fused head + loss (None under the interpreter)."""
    from fastrm_kernels import pairwise_loss, reward_head_bwd, reward_head_fwd

    kernels = (
        reward_head_fwd._head_fwd_kernel,
        pairwise_loss._pairwise_loss_kernel,
        reward_head_bwd._head_bwd_kernel,
        reward_head_bwd._head_param_grad_kernel,
    )
    try:
        return sum(len(caches[0]) for k in kernels for caches in k.device_caches.values())
    except AttributeError:
        return None


def time_steps(step_fn, steps: int, warmup: int, device) -> dict:
    for _ in range(warmup):
        step_fn()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    compiled = triton_compilations()
    t = time.perf_counter()
    for _ in range(steps):
        step_fn()
    sync(device)
    dt = (time.perf_counter() - t) / steps
    after = triton_compilations()
    return {
        "step_s": dt,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        "triton_compiles_in_timed_steps": after - compiled if after is not None else None,
    }


def profile_step(step_fn, device, top: int = 25) -> list[dict]:
    """The top ops of one step by self device time (CPU time on a CPU): where the step's time goes."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        step_fn()
        sync(device)
    rows = []
    for e in prof.key_averages():
        dev = getattr(e, "self_device_time_total", None)
        if dev is None:
            dev = getattr(e, "self_cuda_time_total", 0.0)
        rows.append(
            {"op": e.key, "calls": e.count, "self_device_ms": dev / 1e3, "self_cpu_ms": e.self_cpu_time_total / 1e3}
        )
    key = "self_device_ms" if device.type == "cuda" else "self_cpu_ms"
    rows.sort(key=lambda r: -r[key])
    return rows[:top]


# ---------------------------------------------------------------------------------------------- stacks
def build_hf(shape: str, vocab: int, device, attn: str, ckpt: bool):
    from transformers import AutoModelForSequenceClassification

    from fastrm.attention import register
    from fastrm.presets import resolve_config

    register()
    cfg = resolve_config(shape, vocab_size=vocab)
    cfg.num_labels = 1
    cfg.pad_token_id = 0
    torch.manual_seed(0)
    m = AutoModelForSequenceClassification.from_config(cfg, attn_implementation=attn).to(device)
    if ckpt:
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return m


def stack_a(shape, vocab, device, ckpt, micro_pairs, **_):
    """TRL style: right-padded [2b, Lmax] batches of b pairs, SDPA + padding mask, head on every token."""
    import torch.nn.functional as F

    m = build_hf(shape, vocab, device, "sdpa", ckpt)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-6, fused=device.type == "cuda")
    seen = {}

    def step(pairs):
        seen["micro_batches_per_step"] = -(-len(pairs) // micro_pairs)
        for k in range(0, len(pairs), micro_pairs):
            part = pairs[k : k + micro_pairs]
            seqs = [p.prompt_ids + p.chosen_ids for p in part] + [p.prompt_ids + p.rejected_ids for p in part]
            L = max(len(s) for s in seqs)
            ids = torch.zeros(len(seqs), L, dtype=torch.long)
            mask = torch.zeros(len(seqs), L, dtype=torch.long)
            for i, s in enumerate(seqs):
                ids[i, : len(s)] = torch.tensor(s)
                mask[i, : len(s)] = 1
            ids, mask = ids.to(device), mask.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                hidden = m.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
                logits = m.score(hidden).squeeze(-1)  # every token, as HF does
            last = mask.sum(1) - 1
            r = logits.float()[torch.arange(len(seqs), device=device), last]
            b = len(part)
            (F.softplus(-(r[:b] - r[b:])).sum() / len(pairs)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return m, step, seen


def stack_b(shape, vocab, device, ckpt, max_tokens, backend, **_):
    """OpenRLHF style: packed [1, T] through varlen attention, head on every token, then gather."""
    import torch.nn.functional as F

    from fastrm.packing import micro_batches

    m = build_hf(shape, vocab, device, "fastrm_varlen", ckpt)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-6, fused=device.type == "cuda")
    seen = {}

    def step(pairs):
        mbs = micro_batches(pairs, max_tokens, "separate")
        seen["micro_batches_per_step"] = len(mbs)
        for mb in mbs:
            mb = mb.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                hidden = m.base_model(
                    input_ids=mb.input_ids[None],
                    position_ids=mb.position_ids[None],
                    fastrm_plan=mb.attn,
                    fastrm_backend=backend,
                ).last_hidden_state[0]
                values = m.score(hidden).squeeze(-1)  # [T]: the head on every token
            r = values.float()[mb.pool_index]
            B = mb.num_pairs
            (F.softplus(-(r[:B] - r[B:])).sum() / len(pairs)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return m, step, seen


def stack_fastrm(name, shape, vocab, device, ckpt, max_tokens, backend, train_pair, **_):
    """C, C0, D, CT: the real trainer's step (packing, fused op where it runs, optimizer, the metrics' one sync)."""
    from fastrm.config import RewardConfig
    from fastrm.model import RewardModel
    from fastrm.presets import resolve_config
    from fastrm.trainer import RewardTrainer

    # On a CPU the fused op runs only under the Triton interpreter (the dry run), so the dry run takes its path too.
    fused = False if name == "C0" else (None if device.type == "cuda" else bool(os.environ.get("TRITON_INTERPRET")))
    torch.manual_seed(0)
    m = RewardModel.from_config(resolve_config(shape, vocab_size=vocab), attn_backend=backend)
    args = RewardConfig(
        output_dir="/tmp/fastrm-bench",
        loss="threshold" if name == "CT" else "bt",
        max_tokens_per_batch=max_tokens,
        prefix_sharing=name == "D",
        gradient_checkpointing=ckpt,
        fused_head=fused,
        progress=False,
        learning_rate=1e-6,
        attn_backend=backend,
        max_grad_norm=0.0,
        warmup_ratio=0.0,
        lr_scheduler_type="constant",
    )
    tr = RewardTrainer(m, args, [train_pair], device=device)
    seen = {}

    def step(pairs):
        seen["micro_batches_per_step"] = tr.train_step(pairs, len(pairs))["micro_batches"]

    return m, step, seen


def fused_runs(model, device) -> bool:
    return hasattr(model, "use_fused") and model.use_fused(device)


# ---------------------------------------------------------------------------------------------- main
def run(args, on_update=lambda results: None) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backend = "auto" if device.type == "cuda" else "exact"
    lengths = hh_lengths.load()  # MissingHHLengths: no made-up workload
    vocab = lengths["vocab_size"]
    pairs = hh_lengths.hh_like_pairs(args.pairs_per_step * (args.steps + args.warmup), args.max_length, seed=0)
    results = {
        "meta": {
            "date": datetime.date.today().isoformat(),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "device": _device_name(device),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "transformers": __import__("transformers").__version__,
            "triton": _version("triton"),
            "flash_attn": _version("flash_attn"),
            "python": platform.python_version(),
            "attention_backend": _resolved_backend(backend, device),
            "matmul_tflops_measured": matmul_tflops(device),
            "pairs_per_step": args.pairs_per_step,
            "steps": args.steps,
            "warmup": args.warmup,
            "data": f"HH-RLHF lengths ({hh_lengths.LENGTHS_FILE.relative_to(ROOT)}), random ids, random init",
            "mean_tokens_per_pair": sum(p.num_tokens for p in pairs) / len(pairs),
            "max_length": args.max_length,
            "max_tokens_per_batch": args.max_tokens_per_batch,
        },
        "train": [],
        "score": [],
        "complete": False,
    }
    on_update(results)
    steps = [pairs[i * args.pairs_per_step : (i + 1) * args.pairs_per_step] for i in range(args.steps + args.warmup)]
    timed = [p for s in steps[args.warmup :] for p in s]
    real_tokens = sum(p.num_tokens for p in timed) / args.steps
    shared_tokens = sum(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in timed) / args.steps
    build = {"A": stack_a, "B": stack_b}
    for shape in args.shapes:
        for ckpt in args.checkpointing:
            for name in args.stacks:
                maker = build.get(name, partial(stack_fastrm, name))
                model, step, seen = maker(
                    shape=shape,
                    vocab=vocab,
                    device=device,
                    ckpt=ckpt,
                    micro_pairs=args.padded_micro_pairs,
                    max_tokens=args.max_tokens_per_batch,
                    backend=backend,
                    train_pair=pairs[0],
                )
                emb = (
                    model.get_input_embeddings()
                    if hasattr(model, "get_input_embeddings")
                    else model.backbone.get_input_embeddings()
                ).weight.numel()
                params = sum(p.numel() for p in model.parameters()) - emb  # 6N counts non-embedding parameters
                batches = iter(steps)
                t = time_steps(lambda step=step, b=batches: step(next(b)), args.steps, args.warmup, device)
                cfg = getattr(model, "config", None) or model.backbone.config
                computed = shared_tokens if name == "D" else real_tokens
                attn = attention_flops(timed, cfg, shared=name == "D") / args.steps
                row = {
                    "shape": shape,
                    "stack": name,
                    "loss": "threshold" if name == "CT" else "bt",
                    "grad_ckpt": ckpt,
                    "fused_head": fused_runs(model, device),
                    **t,
                    "pairs_per_s": args.pairs_per_step / t["step_s"],
                    "real_tokens_per_s": real_tokens / t["step_s"],
                    "tokens_computed_per_step": computed,
                    "mfu": (6 * params * computed + attn)
                    / t["step_s"]
                    / (results["meta"]["matmul_tflops_measured"] * 1e12),
                    "params": params,
                    "micro_batches_per_step": seen.get("micro_batches_per_step"),
                }
                if name in args.profile:
                    row["profile_top_ops"] = profile_step(lambda step=step: step(steps[-1]), device)
                results["train"].append(row)
                on_update(results)
                print(json.dumps({k: v for k, v in row.items() if k != "profile_top_ops"}), flush=True)
                del model, step
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        if args.bon_ns:
            for row in bench_scoring(shape, vocab, device, backend, pairs, args):
                results["score"].append(row)
                on_update(results)
    results["meta"]["triton_compilations_total"] = triton_compilations()
    results["complete"] = True
    on_update(results)
    return results


def bench_scoring(shape, vocab, device, backend, pairs, args):
    """Best-of-N scoring throughput (responses/s): HF padded batches vs fastrm packed vs fastrm shared prompt.

    Candidates for a prompt are that HH pair's chosen/rejected responses cycled to N (the lengths are what matter)."""
    from fastrm.model import RewardModel
    from fastrm.presets import resolve_config
    from fastrm.scoring import score_token_groups

    hf = build_hf(shape, vocab, device, "sdpa", False).eval()
    torch.manual_seed(0)
    rm = RewardModel.from_config(resolve_config(shape, vocab_size=vocab), attn_backend=backend).to(device).eval()
    prompts = [p.prompt_ids for p in pairs[: args.bon_prompts]]
    for n in args.bon_ns:
        resps = [[(p.chosen_ids, p.rejected_ids)[j % 2] for j in range(n)] for p in pairs[: args.bon_prompts]]
        # fastrm packs a prompt's group whole (unshared: the prompt once per response), so the budget grows to the
        # largest group when it must (recorded in the row), the same for every variant.
        group = max(len(pr) * len(rs) + sum(map(len, rs)) for pr, rs in zip(prompts, resps))
        budget = max(args.max_tokens_per_batch, group)

        @torch.no_grad()
        def hf_padded(resps=resps, budget=budget):
            seqs = [pr + r for pr, rs in zip(prompts, resps) for r in rs]
            per = max(1, budget // max(len(s) for s in seqs))  # padded rows per batch under the token budget
            for k in range(0, len(seqs), per):
                part = seqs[k : k + per]
                L = max(len(x) for x in part)
                ids = torch.zeros(len(part), L, dtype=torch.long)
                mask = torch.zeros(len(part), L, dtype=torch.long)
                for i, x in enumerate(part):
                    ids[i, : len(x)], mask[i, : len(x)] = torch.tensor(x), 1
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    hf(input_ids=ids.to(device), attention_mask=mask.to(device))

        packed = partial(score_token_groups, rm, prompts, resps, max_tokens_per_batch=budget)
        variants = {
            "hf_padded": hf_padded,
            "fastrm_packed": partial(packed, prefix_sharing=False),
            "fastrm_shared_prompt": partial(packed, prefix_sharing=True),
        }
        for name, fn in variants.items():
            t = time_steps(fn, args.steps, 1, device)
            row = {
                "shape": shape,
                "n": n,
                "prompts": len(prompts),
                "variant": name,
                "max_tokens_per_batch": budget,
                "step_s": t["step_s"],
                "responses_per_s": n * len(prompts) / t["step_s"],
                "peak_mem_gib": t["peak_mem_gib"],
            }
            print(json.dumps(row), flush=True)
            yield row


def _device_name(device) -> str:
    return torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({platform.processor() or 'unknown'})"


def _resolved_backend(backend: str, device) -> str:
    from fastrm.attention import resolve_backend

    return resolve_backend(backend, device)


def _version(mod: str) -> str | None:
    try:
        return __import__(mod).__version__
    except Exception:
        return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--shapes", nargs="+", help="presets (default pythia-410m pythia-1.4b tinyllama-1.1b; dry run tiny-neox)"
    )
    p.add_argument("--stacks", nargs="*", default=list(STACKS), choices=STACKS, help="training stacks (none: skip)")
    p.add_argument(
        "--checkpointing",
        nargs="+",
        type=lambda s: s == "on",
        default=[False, True],
        help="gradient checkpointing settings to run: off on",
    )
    p.add_argument("--pairs-per-step", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--max-tokens-per-batch", type=int, default=32768)
    p.add_argument("--padded-micro-pairs", type=int, default=8, help="stack A: pairs per padded micro-batch")
    p.add_argument("--bon-ns", nargs="*", type=int, default=[4, 16, 64], help="best-of-N sizes to score (none: skip)")
    p.add_argument("--bon-prompts", type=int, default=32, help="prompts per best-of-N measurement")
    p.add_argument("--profile", nargs="*", default=[], choices=STACKS, help="stacks to profile one step of")
    p.add_argument("--dry-run", "--smoke", action="store_true", help="tiny CPU run of the same code (CI)")
    p.add_argument("--out", help="results JSON (default benchmarks/results/train_<device>_<date>.json)")
    a = p.parse_args(argv)
    a.shapes = a.shapes or (["tiny-neox"] if a.dry_run else ["pythia-410m", "pythia-1.4b", "tinyllama-1.1b"])
    if a.dry_run:
        a.checkpointing, a.pairs_per_step, a.steps, a.warmup = [False], 4, 1, 1
        a.max_length, a.max_tokens_per_batch, a.bon_prompts = 384, 1024, 1
    out = Path(a.out) if a.out else None

    def write(results):
        nonlocal out
        if out is None:
            gpu = results["meta"]["device"].split()[0].replace(" ", "_")
            out = ROOT / "benchmarks" / "results" / f"train_{gpu}_{results['meta']['date']}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")

    try:
        run(a, write)
    except hh_lengths.MissingHHLengths as e:
        print(f"bench_train: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
