"""Shared-prompt scoring against one (prompt, response) at a time, on RM-Bench, in one run (the speed claim of
``fastrm bench``).

The workload is the first --prompts records of each RM-Bench domain: each prompt with its 6 responses. Variants, on
the same model and token ids (prompts cut from the left to --max-length exactly as ``fastrm bench`` does):

  shared_prompt    fastrm bench's default (its scoring function): each record is one group [prompt | r1 | ... | r6]
                   (the prompt computed once), groups packed under --max-tokens-per-batch
  separate_packed  ``--no-prefix-sharing``: every (prompt, response) its own sequence, packed the same way
  one_at_a_time    every (prompt, response) alone, one forward pass each (what a per-response script does)
  hf_padded        stock transformers AutoModelForSequenceClassification on right-padded batches of --hf-batch
                   (prompt + response) sequences in input order, as a reward-bench style pipeline does

Each variant runs --reps times, interleaved; the median time counts. Scores of every variant are checked against
shared_prompt. The JSON (machine, versions, date, command, workload, times, ratios) goes to --out, by default
benchmarks/results/bench_scoring_<device>_<date>.json.

CPU:   python benchmarks/bench_scoring.py                 (Pythia-14M shape, random weights; a few minutes)
       python benchmarks/bench_scoring.py --workload hh-best-of-n   (HH prompts, 6 responses each)
GPU:   python benchmarks/bench_scoring.py --shape pythia-410m --prompts 100 --device cuda
Smoke: python benchmarks/bench_scoring.py --smoke --out /tmp/s.json   (seconds; numbers meaningless)
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
from bench_machine import cpu_name  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
# A Pythia-14M-shaped GPT-NeoX (random weights): big enough that compute, not Python, dominates on a CPU.
SHAPES = {
    "pythia-14m": dict(
        model_type="gpt_neox",
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=6,
        num_attention_heads=4,
        max_position_embeddings=2048,
        rotary_pct=0.25,
    ),
    "smoke": dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
}


def build_models(shape: str, vocab: int, device: torch.device):
    """The same random weights as a fastrm RewardModel and as a stock HF sequence-classification model."""
    import tempfile

    from transformers import AutoConfig, AutoModelForSequenceClassification

    from fastrm.loading import load_model

    if shape in SHAPES:
        kw = dict(SHAPES[shape])
        cfg = AutoConfig.for_model(kw.pop("model_type"), vocab_size=vocab, num_labels=1, **kw)
    else:
        from fastrm.presets import resolve_config

        cfg = resolve_config(shape, vocab)
        cfg.num_labels = 1
    torch.manual_seed(0)
    hf = AutoModelForSequenceClassification.from_config(cfg, attn_implementation="sdpa")
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        rm = load_model(tmp)
    return rm.to(device).eval(), hf.to(device).eval()


def workload(tokenizer, n_prompts: int, max_length: int, rm_dir: Path):
    """Token ids of the first n_prompts records of each RM-Bench domain, as fastrm bench builds them."""
    from fastrm.bench_data import read_bench_file, rm_bench_files, tokenize_bench_file

    prompts, responses = [], []
    for f in rm_bench_files(rm_dir):
        bf = read_bench_file(f, benchmark="rm-bench", limit=n_prompts)
        p, r = tokenize_bench_file(bf, tokenizer, None, max_length=max_length)
        prompts += p
        responses += r
    return prompts, responses


def hh_best_of_n_workload(tokenizer, n_prompts: int, n_responses: int, max_length: int, hh_file: Path):
    """Best-of-N on HH-RLHF dialogues: the first n_prompts prompts (everything up to the last "Assistant:") of
    helpful-base, each with n_responses real HH responses (its own chosen and rejected, then responses of other
    rows, seeded). Prompts are about a third of an HH pair's tokens, so sharing them matters more than on
    RM-Bench, whose prompts are about a tenth."""
    import random

    from fastrm.data import load_pairs
    from fastrm.scoring import tokenize_groups

    pairs, _ = load_pairs(hh_file, on_bad_row="skip")
    pairs = [p for p in pairs if p.prompt]
    pool = [r for p in pairs for r in (p.chosen, p.rejected)]
    rng = random.Random(0)
    prompts = [p.prompt for p in pairs[:n_prompts]]
    responses = [[p.chosen, p.rejected] + rng.sample(pool, max(0, n_responses - 2)) for p in pairs[:n_prompts]]
    return tokenize_groups(tokenizer, prompts, [r[:n_responses] for r in responses], max_length=max_length)


def timed(fn, device) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds). On a shared CPU with one torch thread the CPU time is the
    stable measure (waiting for a core does not count); on a GPU the wall time is."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t, c = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, time.process_time() - c


def variants(rm, hf, prompts, responses, budget: int, hf_batch: int, device):
    from fastrm.benchmark import score_groups
    from fastrm.scoring import score_token_groups

    def shared():  # exactly what fastrm bench runs
        return score_groups(rm, [(prompts, responses)], max_tokens_per_batch=budget)[0][0]

    def separate():
        return score_groups(rm, [(prompts, responses)], max_tokens_per_batch=budget, prefix_sharing=False)[0][0]

    def one_at_a_time():
        return [[score_token_groups(rm, [p], [[r]], max_tokens_per_batch=budget)[0][0] for r in rs] for p, rs in pairs]

    @torch.no_grad()
    def hf_padded():
        seqs = [p + r for p, rs in pairs for r in rs]
        out = []
        for k in range(0, len(seqs), hf_batch):
            part = seqs[k : k + hf_batch]
            L = max(len(x) for x in part)
            ids = torch.zeros(len(part), L, dtype=torch.long)
            mask = torch.zeros(len(part), L, dtype=torch.long)
            for i, x in enumerate(part):
                ids[i, : len(x)], mask[i, : len(x)] = torch.tensor(x), 1
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                hidden = hf.base_model(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
            # pooled at the last real token by the attention mask (the pad-id rule breaks when pad == eos)
            last = hidden[torch.arange(len(part), device=device), mask.sum(1).to(device) - 1]
            out += hf.score(last).squeeze(-1).float().tolist()
        it = iter(out)
        return [[next(it) for _ in rs] for _, rs in pairs]

    pairs = list(zip(prompts, responses))
    return {
        "shared_prompt": shared,
        "separate_packed": separate,
        "one_at_a_time": one_at_a_time,
        "hf_padded": hf_padded,
    }


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu: {cpu_name()}, {os.cpu_count()} cores visible"


def main(argv=None) -> dict:
    import transformers

    import fastrm
    from fastrm.loading import load_tokenizer

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", default="pythia-14m", help=f"{', '.join(SHAPES)} or a fastrm preset")
    p.add_argument("--workload", default="rm-bench", choices=("rm-bench", "hh-best-of-n"), help="what is scored")
    p.add_argument("--prompts", type=int, default=20, help="records per RM-Bench domain, or HH prompts")
    p.add_argument("--responses", type=int, default=6, help="responses per prompt (hh-best-of-n)")
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--max-tokens-per-batch", type=int, default=16384)
    p.add_argument("--hf-batch", type=int, default=8, help="padded rows per batch for hf_padded")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU (recorded)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rm-bench-dir", default=str(SHARED / "rm-bench"))
    p.add_argument("--tokenizer", default=str(SHARED / "tokenizers" / "gpt-neox-20b_tokenizer.json"))
    p.add_argument("--smoke", action="store_true", help="tiny model, 2 prompts per domain, 1 rep")
    p.add_argument("--out")
    a = p.parse_args(argv)
    if a.smoke:
        a.shape, a.prompts, a.reps, a.max_length = "smoke", 2, 1, 512
    device = torch.device(a.device)
    if device.type == "cpu":
        torch.set_num_threads(a.threads)
    data = Path(a.rm_bench_dir) if a.workload == "rm-bench" else SHARED / "hh-rlhf" / "helpful-base_test.jsonl.gz"
    for need in (Path(a.tokenizer), data):
        if not need.exists():  # no made-up workload: this benchmark scores real text (see hh_lengths.py for lengths)
            sys.exit(
                f"bench_scoring: {need} not found: this benchmark scores real RM-Bench / HH-RLHF text and the "
                "GPT-NeoX tokenizer from ../shared/data (it does not travel to the device; the device runbook's "
                "best-of-N block uses bench_train.py with the carried HH lengths)"
            )
    tok = load_tokenizer(a.tokenizer)
    rm, hf = build_models(a.shape, len(tok), device)
    if a.workload == "rm-bench":
        prompts, responses = workload(tok, a.prompts, a.max_length, Path(a.rm_bench_dir))
    else:
        hh = SHARED / "hh-rlhf" / "helpful-base_test.jsonl.gz"
        prompts, responses = hh_best_of_n_workload(tok, a.prompts, a.responses, a.max_length, hh)
    n_resp = sum(len(r) for r in responses)
    shared_tokens = sum(len(x) for x in prompts) + sum(len(r) for rs in responses for r in rs)
    alone_tokens = sum(len(x) * len(rs) + sum(len(r) for r in rs) for x, rs in zip(prompts, responses))
    fns = variants(rm, hf, prompts, responses, a.max_tokens_per_batch, a.hf_batch, device)
    ref = fns["shared_prompt"]()  # warm-up, and the reference scores
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in fns}
    max_diff = {}
    for name, fn in fns.items():
        got = fn()
        max_diff[name] = max(abs(x - y) for g, r in zip(got, ref) for x, y in zip(g, r))
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    for _ in range(a.reps):
        for name, fn in fns.items():
            times[name].append(timed(fn, device))
    # The ratios use CPU seconds on a CPU (threads=1: immune to other processes' load) and wall seconds on a GPU.
    key = "cpu_seconds_median" if device.type == "cpu" else "wall_seconds_median"
    rows = {
        name: {
            "wall_seconds_median": statistics.median(w for w, _ in ts),
            "cpu_seconds_median": statistics.median(c for _, c in ts),
            "wall_seconds_all": [w for w, _ in ts],
            "cpu_seconds_all": [c for _, c in ts],
            "max_abs_score_diff_vs_shared": max_diff[name],
        }
        for name, ts in times.items()
    }
    for r in rows.values():
        r["responses_per_s"] = n_resp / r[key]
    base = rows["shared_prompt"][key]
    results = {
        "meta": {
            "device": machine(device),
            "torch_threads": torch.get_num_threads() if device.type == "cpu" else None,
            "load_average_before_after": [load_before, os.getloadavg() if hasattr(os, "getloadavg") else None],
            "date": datetime.date.today().isoformat(),
            "command": " ".join(
                [Path(sys.argv[0]).name if argv is None else "bench_scoring.py", *(argv or sys.argv[1:])]
            ),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "fastrm": fastrm.__version__,
        },
        "workload": {
            "data": "RM-Bench, first records of each domain (chat, code, safety-refuse, safety-response)"
            if a.workload == "rm-bench"
            else f"HH-RLHF helpful-base prompts, {a.responses} real HH responses each (own chosen/rejected + others)",
            "shape": a.shape,
            "parameters": sum(x.numel() for x in rm.parameters()),
            "prompts": len(prompts),
            "responses": n_resp,
            "max_length": a.max_length,
            "max_tokens_per_batch": a.max_tokens_per_batch,
            "tokens_shared_prompt": shared_tokens,
            "tokens_one_sequence_per_response": alone_tokens,
            "reps": a.reps,
        },
        "variants": rows,
        "speedup_basis": key,
        "speedup_of_shared_prompt": {k: v[key] / base for k, v in rows.items() if k != "shared_prompt"},
    }
    for name, r in rows.items():
        print(f"{name:16s} {r[key]:8.2f} s ({key})  {r['responses_per_s']:8.1f} responses/s", flush=True)
    for k, v in results["speedup_of_shared_prompt"].items():
        print(f"{k} takes {v:.2f}x the time of shared_prompt (>1: shared prompts are faster)")
    stem = "bench_scoring" if a.workload == "rm-bench" else "bench_scoring_hh"
    out = a.out or ROOT / "benchmarks" / "results" / f"{stem}_{device.type}_{results['meta']['date']}.json"
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"-> {out}")
    return results


if __name__ == "__main__":
    main()
