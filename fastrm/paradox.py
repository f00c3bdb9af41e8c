"""``fastrm paradox``: accuracy against outcome along training, a built-in check for the accuracy paradox.

    fastrm paradox runs/rm --gold-model runs/gold --pairs eval.jsonl --candidates candidates.jsonl

Chen et al. 2024 ("The Accuracy Paradox in RLHF", EMNLP) found that the most accurate reward model is not always
the one that leads to the best policy. This command shows both sides for every checkpoint of a run (its
``checkpoint-N`` folders and the final model) or for any list of model folders:

* **accuracy**: pairwise accuracy, Bradley-Terry loss and the margin statistics of ``fastrm eval`` on PAIRS;
* **outcome**: best-of-N under a gold reward model on CANDIDATES (``{"prompt", "responses": [...]}`` rows, N >= 2
  each): the exact expected gold reward of the candidate the checkpoint ranks first in a uniformly random
  N-subset, for N = 1, 2, 4, ... (formula in :mod:`fastrm.paradox_report`), with the gold oracle, the random pick
  and Kendall's tau of checkpoint against gold per prompt; the gold RM against itself is the ceiling.

Every model scores every text once, a prompt's candidates as one shared-prompt group, in process (CPU or GPU) or
on the Ray Data best-of-N job (``--ray``); every N comes from those scores. Inputs and tokenizers:
:mod:`fastrm.paradox_data`; numbers, plots and table: :mod:`fastrm.paradox_report`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from fastrm import paradox_report as rep
from fastrm.data import DataError, OnBadRow
from fastrm.paradox_data import GOLD, Inputs, ModelRef, prepare_inputs

REPORT, SCORES = "paradox_report.json", "paradox_scores.jsonl"
PLOT_ACCURACY, PLOT_CURVES = "paradox_accuracy_vs_outcome.png", "paradox_bon_curves.png"
PROMPT_FORMAT = "plain prompt + response text, tokenized separately, EOS appended (as in training); no chat template"


# ------------------------------------------------------------------------------------------------ scoring


def _load(ref: ModelRef):
    import torch

    from fastrm.loading import load_model

    model = load_model(ref.path, tokenizer=ref.tokenizer)
    return model.to("cuda") if torch.cuda.is_available() else model


def score_pairs(model, pairs: Sequence, *, max_tokens_per_batch: int, prefix_sharing: bool, progress: bool):
    """Rewards (chosen [P], rejected [P]) float64, exactly as ``fastrm eval`` computes them."""
    from fastrm.evaluation import compute_pair_rewards

    return compute_pair_rewards(
        model,
        pairs,
        max_tokens_per_batch=max_tokens_per_batch,
        layout="shared_prompt" if prefix_sharing else "separate",
        autocast=next(model.parameters()).is_cuda,
        progress=progress,
    )


def score_candidates(model, prompts, responses, *, max_tokens_per_batch: int, prefix_sharing: bool, progress: bool):
    """Scores [G][N] of token-id groups (one shared-prompt group per prompt; big groups in pieces, same scores).

    Identical responses of a prompt are scored once, so they tie exactly (as in the Ray job): scored twice, their
    places in the packed batch could differ in the last bit and decide a "tie" the exact best-of-N splits evenly."""
    from fastrm.benchmark import score_groups

    unique, inverse = [], []
    for rs in responses:
        first: dict[tuple, int] = {}
        inverse.append([first.setdefault(tuple(r), len(first)) for r in rs])
        unique.append([list(r) for r in first])
    scores, _ = score_groups(
        model,
        [(prompts, unique)],
        max_tokens_per_batch=max_tokens_per_batch,
        prefix_sharing=prefix_sharing,
        progress=progress,
        desc="candidates",
    )
    return [[s[k] for k in inv] for s, inv in zip(scores[0], inverse)]


def score_candidates_on_ray(
    ref: ModelRef, tokenizer: str | None, rows: Sequence[dict], out: Path, **kw: Any
) -> list[list[float] | str]:
    """Each row's scores from the Ray Data best-of-N job (:func:`fastrm.ray_bon.run_best_of_n`, one run per
    candidates file), or the reason the job rejected the row; rows are joined back by file and line number."""
    from fastrm.ray_bon import run_best_of_n

    safe = ref.name.replace("/", "_").replace("#", "_")
    by_file: dict[str, dict[int, Any]] = {}
    for k, f in enumerate(dict.fromkeys(r["file"] for r in rows)):
        scored, errors = out / f"{safe}.{k}.scored.jsonl", out / f"{safe}.{k}.errors.jsonl"
        run_best_of_n(f, str(scored), ref.path, errors=str(errors), tokenizer=tokenizer, overwrite=True, **kw)
        lines: dict[int, Any] = {}
        for path, key in ((errors, "reason"), (scored, "scores")):
            for text in path.read_text(encoding="utf-8").splitlines():
                if text.strip():
                    row = json.loads(text)
                    lines[int(str(row["source"]).rsplit(":", 1)[1])] = row[key]
        by_file[f] = lines
    out_rows: list[list[float] | str] = []
    for r in rows:
        got = by_file[r["file"]].get(int(r["source"].rsplit(":", 1)[1]), "missing from the Ray job's output")
        if not isinstance(got, str) and len(got) != len(r["responses"]):
            got = f"the Ray job returned {len(got)} scores for {len(r['responses'])} responses"
        out_rows.append(got)
    return out_rows


def score_all(
    inp: Inputs,
    *,
    max_length: int,
    max_tokens_per_batch: int,
    prefix_sharing: bool,
    ray: bool,
    num_actors: int,
    use_gpu: bool,
    tokenizers: tuple[str | None, str | None],
    ray_dir: Path,
    progress: bool,
) -> tuple[dict, dict, dict[int, str]]:
    """Score every model (one at a time, so one model is in memory): ({name: (chosen, rejected, {row: scores})},
    {name: seconds}, {row: reason} for rows the Ray job rejected)."""
    from tqdm.auto import tqdm

    kw = dict(max_tokens_per_batch=max_tokens_per_batch, prefix_sharing=prefix_sharing)
    scores, timing, failed = {}, {}, {}
    bar = tqdm([*inp.refs, inp.gold], desc="paradox", unit="model", disable=not progress)
    for ref in bar:
        bar.set_postfix_str(ref.name)
        t = time.perf_counter()
        g = ref.tokenizer_group
        model = _load(ref)
        rc, rr = score_pairs(model, [inp.pairs[g][s] for s in inp.common], progress=progress, **kw)
        if ray:
            tok = tokenizers[1] if ref.role == "gold" else tokenizers[0]
            rows = [inp.rows[i] for i in inp.keep]
            got = score_candidates_on_ray(
                ref, tok, rows, ray_dir, num_actors=num_actors, use_gpu=use_gpu, max_length=max_length, **kw
            )
            for i, s in zip(inp.keep, got):
                if isinstance(s, str):
                    failed.setdefault(i, f"{s} (the Ray job, model {ref.name})")
            cand = [s if not isinstance(s, str) else [] for s in got]
        else:
            p_ids, r_ids = inp.tokens[g]
            cand = score_candidates(
                model, [p_ids[i] for i in inp.keep], [r_ids[i] for i in inp.keep], progress=progress, **kw
            )
        del model
        scores[ref.name] = (np.asarray(rc), np.asarray(rr), {i: [float(x) for x in s] for i, s in zip(inp.keep, cand)})
        timing[ref.name] = time.perf_counter() - t
    bar.close()
    return scores, timing, failed


# ------------------------------------------------------------------------------------------------ the report


def evaluate_paradox(
    models: Sequence[str | os.PathLike],
    gold_model: str | os.PathLike,
    pairs: Sequence[str | os.PathLike],
    candidates: Sequence[str | os.PathLike],
    *,
    tokenizer: str | None = None,
    gold_tokenizer: str | None = None,
    max_length: int = 2048,
    max_tokens_per_batch: int = 16384,
    prefix_sharing: bool = True,
    on_bad_row: OnBadRow = "error",
    limit: int | None = None,
    ns: Sequence[int] | None = None,
    x_axis: str = "n",
    ray: bool = False,
    num_actors: int = 1,
    use_gpu: bool = False,
    output_dir: str | os.PathLike | None = None,
    progress: bool = False,
) -> dict:
    """Accuracy and best-of-N outcome of every checkpoint; returns the report (and writes it with ``output_dir``).

    >>> report = evaluate_paradox(["runs/rm"], "runs/gold", ["eval.jsonl"], ["cands.jsonl"], output_dir="out")
    >>> report["across_checkpoints"]["paradox"]

    Args:
        models: run folders (their ``checkpoint-N`` folders and final model) and/or model folders.
        gold_model: the judge: any model spec :func:`fastrm.load_model` takes (a folder with ``ray``).
        pairs: preference-pair files in any format ``fastrm train`` reads (accuracy, margins).
        candidates: best-of-N files of ``{"prompt", "responses": [...]}`` rows with 2 or more responses.
        tokenizer, gold_tokenizer: override the checkpoints' / the gold RM's own saved tokenizer.
        ns: the N values (default 1, 2, 4, ... up to the most candidates, plus the fewest and the most).
        x_axis: "n" (log2 N) or "kl" (log N - (N-1)/N) for the best-of-N curves plot.
        ray: score the candidates with the Ray Data best-of-N job (``num_actors``, ``use_gpu``); the pairs are
            scored on the driver.
        limit: the first ``limit`` pairs and candidate rows of each file (the whole file is still read and checked).
    """
    if x_axis not in ("n", "kl"):
        raise ValueError(f"x_axis must be 'n' or 'kl', got {x_axis!r}")
    if ray and limit is not None:
        raise ValueError("--limit is not supported with --ray (the Ray job reads whole files)")
    t0 = time.perf_counter()
    inp = prepare_inputs(
        models,
        gold_model,
        pairs,
        candidates,
        tokenizer=tokenizer,
        gold_tokenizer=gold_tokenizer,
        max_length=max_length,
        on_bad_row=on_bad_row,
        limit=limit,
    )
    t1 = time.perf_counter()
    scores, timing, failed = score_all(
        inp,
        max_length=max_length,
        max_tokens_per_batch=max_tokens_per_batch,
        prefix_sharing=prefix_sharing,
        ray=ray,
        num_actors=num_actors,
        use_gpu=use_gpu,
        tokenizers=(tokenizer, gold_tokenizer),
        ray_dir=Path(output_dir or "runs/paradox") / "ray",
        progress=progress,
    )
    if failed:  # a row the Ray job could not score (for any model) is left out for all of them
        first = min(failed)
        if on_bad_row == "error":
            raise DataError(f"{inp.rows[first]['source']}: {failed[first]}")
        inp.skipped.extend({"source": inp.rows[i]["source"], "reason": failed[i]} for i in sorted(failed))
        inp.keep = [i for i in inp.keep if i not in failed]
        if not inp.keep:
            raise DataError("no candidate rows left to score")
    counts = [len(inp.rows[i]["responses"]) for i in inp.keep]
    ns = rep.default_ns(counts) if ns is None else _check_ns(ns, max(counts))
    n_star = rep.summary_n(ns, counts)
    gold = [scores[GOLD][2][i] for i in inp.keep]

    def entry(ref: ModelRef) -> dict:
        rc, rr, cand = scores[ref.name]
        info = {**ref.info(), "tokenizer": ref.tokenizer_group, "scoring_s": timing[ref.name]}
        return rep.model_entry(info, rc, rr, [cand[i] for i in inp.keep], gold, ns, n_star)

    def per_prompt(ref: ModelRef) -> np.ndarray:
        return rep.per_prompt_bon([scores[ref.name][2][i] for i in inp.keep], gold, n_star)

    entries = [entry(r) for r in inp.refs]
    settings = {
        "max_length": max_length,
        "max_tokens_per_batch": max_tokens_per_batch,
        "prefix_sharing": prefix_sharing,
        "on_bad_row": on_bad_row,
        "limit": limit,
        "x_axis": x_axis,
        "device": _device(ray, num_actors, use_gpu),
    }
    report = {
        "fastrm_version": _version(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "definition": (rep.__doc__ or "").split("\n\n", 1)[1].strip(),
        "inputs": {
            "models": [str(m) for m in models],
            "gold_model": str(gold_model),
            "pairs": [str(p) for p in pairs],
            "candidates": [str(c) for c in candidates],
        },
        "settings": settings,
        "prompt_format": PROMPT_FORMAT,
        "tokenizers": _tokenizer_section(inp),
        "warnings": inp.warnings,
        "data": {"pairs": _pairs_section(inp, limit), "candidates": _candidates_section(inp, counts)},
        "ns": list(ns),
        "summary_n": n_star,
        "baselines": rep.baseline_curves(gold, ns),
        "models": entries,
        "gold": entry(inp.gold),
        "across_checkpoints": rep.across_checkpoints(entries, [per_prompt(r) for r in inp.refs]),
        "timing": {
            "total_s": time.perf_counter() - t0,
            "read_tokenize_s": t1 - t0,
            "scoring_s": sum(timing.values()),
            "pairs_per_model": len(inp.common),
            "responses_per_model": int(sum(counts)),
        },
    }
    if output_dir is not None:
        write_outputs(report, inp, scores, output_dir)
    return report


def _check_ns(ns: Sequence[int], most: int) -> list[int]:
    ns = sorted({int(n) for n in ns})
    bad = [n for n in ns if not 1 <= n <= most]
    if bad:
        raise ValueError(f"--ns: N={bad[0]} is outside 1..{most} (the most candidates of any prompt)")
    return ns


def _device(ray: bool, num_actors: int, use_gpu: bool) -> str:
    import torch

    here = "cuda" if torch.cuda.is_available() else "cpu"
    if ray:
        return f"candidates: ray, {num_actors} actor(s){' with a GPU each' if use_gpu else ''}; pairs: {here}"
    return here


def _version() -> str:
    from fastrm import __version__

    return __version__


def _tokenizer_section(inp: Inputs) -> dict:
    groups = [{"id": i, **{k: g[k] for k in ("name", "fingerprint", "models")}} for i, g in enumerate(inp.groups)]
    out: dict[str, Any] = {"same_for_all": len(groups) == 1, "groups": groups}
    others = [r.name for r in inp.refs if r.tokenizer_group != inp.gold.tokenizer_group]
    if others:
        out["note"] = (
            f"the gold RM's tokenizer differs from that of {', '.join(others)}: each model tokenized the same texts "
            "with its own tokenizer"
        )
    elif len(groups) > 1:
        out["note"] = f"the models use {len(groups)} different tokenizers: each tokenized the same texts with its own"
    return out


def _pairs_section(inp: Inputs, limit: int | None) -> dict:
    files = []
    for k, (path, st, loaded, used) in enumerate(inp.pair_stats[0]):
        row = {"path": path, "rows": st.rows, "pairs": used, "skipped": st.bad_rows_skipped}
        row.update(ties_dropped=st.ties_dropped, unshared_prompt=st.unshared_prompt)
        if limit:
            row["left_out_by_limit"] = loaded - used
        row["truncated"] = [  # per tokenizer group (report["tokenizers"]["groups"])
            {"tokenizer": g, "prompt": s[k][1].prompt_truncated, "response": s[k][1].response_truncated}
            for g, s in enumerate(inp.pair_stats)
        ]
        files.append(row)
    seen = {s for ps in inp.pairs for s in ps}
    skipped = {s["source"]: s for st in inp.pair_stats for _, ls, _, _ in st for s in ls.skipped}
    return {
        "files": files,
        "num_pairs": len(inp.common),
        "skipped": list(skipped.values()),
        "not_scorable_by_every_tokenizer": sorted(seen - set(inp.common)),
    }


def _candidates_section(inp: Inputs, counts: list[int]) -> dict:
    return {
        "files": inp.candidate_files,
        "num_prompts": len(inp.keep),
        "num_responses": int(sum(counts)),
        "min_candidates": min(counts),
        "max_candidates": max(counts),
        "truncated": [{"tokenizer": g, **t} for g, t in enumerate(inp.truncated)],
        "skipped": inp.skipped,
    }


def write_outputs(report: dict, inp: Inputs, scores: dict, output_dir: str | os.PathLike) -> None:
    """paradox_report.json, paradox_scores.jsonl (one line per pair and per prompt, every model's scores; the
    gold RM's under "gold") and the two PNGs."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = [
        str(rep.plot_accuracy_vs_outcome(report, out / PLOT_ACCURACY)),
        str(rep.plot_bon_curves(report, out / PLOT_CURVES, report["settings"]["x_axis"])),
    ]
    report["outputs"] = {"report": str(out / REPORT), "scores": str(out / SCORES), "plots": plots}
    names = list(scores)
    with open(out / SCORES, "w", encoding="utf-8") as fh:
        for k, src in enumerate(inp.common):
            chosen = {m: float(scores[m][0][k]) for m in names}
            rejected = {m: float(scores[m][1][k]) for m in names}
            fh.write(json.dumps({"kind": "pair", "source": src, "chosen": chosen, "rejected": rejected}) + "\n")
        for i in inp.keep:
            row = inp.rows[i]
            cand = {m: scores[m][2][i] for m in names}
            fh.write(json.dumps({"kind": "candidates", "source": row["source"], "scores": cand}) + "\n")
    (out / REPORT).write_text(json.dumps(_json_safe(report), indent=2, allow_nan=False))


def _json_safe(report: dict) -> dict:
    from fastrm.evaluation import json_safe

    return json_safe(report)


# ------------------------------------------------------------------------------------------------ command line

EPILOG = """RUN_OR_MODEL: a training run folder (its checkpoint-N folders, by step, and its final model; the final
model is folded into the checkpoint with the same weights) or a model folder; several at once.

best-of-N (exact, no sampling): for each prompt and N, the expected gold reward of the candidate the model ranks
first in a uniformly random N-subset of the prompt's candidates (ties split evenly), from one score per candidate
per model; the gold oracle (the gold RM picking) and the random pick alongside; KL(best-of-N) = log N - (N-1)/N.

examples:
  fastrm paradox runs/noisy --gold-model runs/gold --pairs synth/eval.jsonl --candidates synth/candidates.jsonl
  fastrm paradox runs/a/checkpoint-100 runs/b --gold-model runs/gold --pairs eval.jsonl --candidates bon.jsonl \\
      --ns 1,4,16 --x-axis kl --output-dir runs/paradox/ab
  fastrm paradox runs/hh --gold-model runs/hh-gold --pairs ../shared/data/hh-rlhf/harmless-base_test.jsonl.gz \\
      --candidates hh_candidates.jsonl --on-bad-row skip --ray --num-actors 2
"""


def _ns(text: str) -> list[int]:
    try:
        ns = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,2,4,8, got {text!r}") from None
    if not ns:
        raise argparse.ArgumentTypeError("expected at least one N")
    return ns


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastrm paradox",
        description="Accuracy against outcome for every checkpoint of a run: pairwise accuracy and margins on "
        "PAIRS, exact best-of-N gold reward on CANDIDATES (Chen et al. 2024, the accuracy paradox).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("models", nargs="+", metavar="RUN_OR_MODEL", help="run folders and/or model folders")
    p.add_argument(
        "--gold-model",
        "--gold",
        dest="gold_model",
        required=True,
        help="the judge: a fastrm or HF sequence-classification folder (or any --model spec fastrm scores)",
    )
    p.add_argument("--pairs", nargs="+", required=True, help="pair files in any format `fastrm train` reads")
    p.add_argument(
        "--candidates", nargs="+", required=True, help='best-of-N .jsonl files: {"prompt", "responses": [2 or more]}'
    )
    p.add_argument("--output-dir", help="report, scores and plots (default: runs/paradox/<first input's name>)")
    p.add_argument("--tokenizer", help="tokenizer for the checkpoints (default: each checkpoint's own)")
    p.add_argument("--gold-tokenizer", help="tokenizer for the gold RM (default: its own)")
    p.add_argument("--ns", type=_ns, help="comma-separated N values (default: 1,2,4,... up to the most candidates)")
    p.add_argument("--x-axis", default="n", choices=("n", "kl"), help="best-of-N curves against N or against KL")
    p.add_argument("--max-length", type=int, default=2048, help="tokens of prompt + response (prompt cut from left)")
    p.add_argument("--max-tokens-per-batch", type=int, default=16384, help="token budget of one forward pass")
    p.add_argument("--on-bad-row", default="error", choices=("error", "skip"), help="stop, or count and list")
    p.add_argument("--no-prefix-sharing", action="store_true", help="score each response as its own sequence")
    p.add_argument("--limit", type=int, help="score only the first N pairs and candidate rows of each file")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    ray = p.add_argument_group("Ray Data (candidates; see fastrm/ray_bon.py)")
    ray.add_argument("--ray", action="store_true", help="score the candidates with a Ray Data actor pool")
    ray.add_argument("--num-actors", type=int, default=1, help="scoring actors")
    ray.add_argument("--use-gpu", action="store_true", help="one GPU per actor")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    out = Path(a.output_dir) if a.output_dir else Path("runs", "paradox", Path(a.models[0].rstrip("/\\")).name)
    report = evaluate_paradox(
        a.models,
        a.gold_model,
        a.pairs,
        a.candidates,
        tokenizer=a.tokenizer,
        gold_tokenizer=a.gold_tokenizer,
        max_length=a.max_length,
        max_tokens_per_batch=a.max_tokens_per_batch,
        prefix_sharing=not a.no_prefix_sharing,
        on_bad_row=a.on_bad_row,
        limit=a.limit,
        ns=a.ns,
        x_axis=a.x_axis,
        ray=a.ray,
        num_actors=a.num_actors,
        use_gpu=a.use_gpu,
        output_dir=out,
        progress=not a.no_progress,
    )
    data = report["data"]
    skipped = data["pairs"]["skipped"] + data["candidates"]["skipped"]
    if skipped:
        print(f"[paradox] {len(skipped)} bad rows skipped (listed in {out / REPORT}):", file=sys.stderr)
        for s in skipped[:5]:
            print(f"  {s['source']}: {s['reason']}", file=sys.stderr)
    if "note" in report["tokenizers"]:
        print(f"[paradox] note: {report['tokenizers']['note']}", file=sys.stderr)
    print(rep.format_table(report))
    print(f"report, per-response scores and plots in {out}", file=sys.stderr)
    return 0
