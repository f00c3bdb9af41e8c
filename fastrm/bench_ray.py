"""``fastrm bench --ray``: best-of-N benchmark files scored by the Ray Data job (:mod:`fastrm.ray_bon`), for files
too large for one process; the report is the one :func:`fastrm.benchmark.evaluate_benchmark` writes.

The driver reads and validates the files itself (the labels, ``best`` or ``scores``, stay on the driver), Ray Data
scores every row with the same shared-prompt scoring (a pool of actors, one model each), and the scored rows are
joined back to the records by line number. The Ray job renders no chat template (it scores the plain prompt +
response text of training), so this path refuses a tokenizer whose template would otherwise be used.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Sequence

from fastrm.bench_data import BenchFile, resolve_chat_template
from fastrm.data import DataError, OnBadRow


def join_ray_scores(
    bf: BenchFile, scored: str | os.PathLike, errors: str | os.PathLike, *, on_bad_row: OnBadRow = "error"
) -> list[list[float]]:
    """Scores [G][N] of ``bf.records`` from the Ray job's output (rows with ``source`` = ``path:line`` and
    ``scores``) and its errors file (``source``, ``reason``). A record the job rejected is a bad record (raised,
    or with ``on_bad_row="skip"`` counted, listed and removed from ``bf.records``)."""

    def by_line(path) -> dict[int, dict]:
        out = {}
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    row = json.loads(line)
                    out[int(str(row["source"]).rsplit(":", 1)[1])] = row
        return out

    got, failed = by_line(scored), by_line(errors) if Path(errors).exists() else {}
    kept, scores = [], []
    for rec in bf.records:
        line = int(rec.source.rsplit(":", 1)[1])
        row = got.get(line)
        if row is None or len(row["scores"]) != len(rec.responses):
            bf.bad_record(
                rec.source, failed.get(line, {}).get("reason", "missing from the Ray job's output"), on_bad_row
            )
            continue
        kept.append(rec)
        scores.append([float(x) for x in row["scores"]])
    bf.records = kept
    return scores


def evaluate_best_of_n_on_ray(
    model: str,
    inputs: Sequence[str],
    *,
    tokenizer: str | None = None,
    chat_template: str = "none",
    scoring_rule: str = "auto",
    max_length: int | None = None,
    append_eos: bool | None = None,
    max_tokens_per_batch: int = 16384,
    prefix_sharing: bool = True,
    on_bad_row: OnBadRow = "error",
    limit: int | None = None,
    num_actors: int = 1,
    use_gpu: bool = False,
    output_dir: str | os.PathLike = "runs/bench",
) -> dict[str, Any]:
    """Best-of-N files (``.jsonl`` / ``.jsonl.gz``) scored on Ray Data; returns and writes the bench report.

    ``model`` is a checkpoint folder every Ray node can read; the scored rows go to
    ``<output_dir>/ray/<name>.scored.jsonl`` (and ``.errors.jsonl``).
    """
    from fastrm.bench_data import read_inputs
    from fastrm.bench_report import build_report, write_outputs
    from fastrm.loading import load_tokenizer
    from fastrm.ray_bon import run_best_of_n

    if limit is not None:
        raise ValueError("--limit is not supported with --ray (the Ray job reads whole files)")
    tok = load_tokenizer(tokenizer, model)
    template, prompt_format = resolve_chat_template(tok, chat_template)
    if template is not None:
        raise ValueError(
            "the Ray best-of-N job scores plain prompt + response text, but the tokenizer has a chat template: "
            "pass --no-chat-template (or score in process without --ray)"
        )
    t0 = time.perf_counter()
    files = read_inputs(list(inputs), on_bad_row=on_bad_row)
    for bf in files:
        if bf.format != "best-of-n" or not bf.path.endswith((".jsonl", ".jsonl.gz")):
            raise DataError(f"{bf.path}: --ray scores best-of-N .jsonl files only (this is a {bf.format} file)")
    out = Path(output_dir) / "ray"
    scores = []
    for bf in files:
        scored, errors = out / f"{bf.name}.scored.jsonl", out / f"{bf.name}.errors.jsonl"
        run_best_of_n(
            bf.path,
            str(scored),
            model,
            errors=str(errors),
            tokenizer=tokenizer,
            num_actors=num_actors,
            use_gpu=use_gpu,
            max_length=max_length,
            append_eos=append_eos,
            scoring_rule=scoring_rule,
            max_tokens_per_batch=max_tokens_per_batch,
            prefix_sharing=prefix_sharing,
        )
        scores.append(join_ray_scores(bf, scored, errors, on_bad_row=on_bad_row))
    elapsed = time.perf_counter() - t0
    n_resp = sum(len(s) for per_file in scores for s in per_file)
    meta = {
        "model": {"spec": model, "model_type": None, "parameters": None, "dtype": None},
        "tokenizer": tokenizer or model,
        "prompt_format": prompt_format,
        "scoring_rule": _rule_report(model, scoring_rule),
        "settings": {
            "max_length": max_length,
            "max_tokens_per_batch": max_tokens_per_batch,
            "prefix_sharing": prefix_sharing,
            "on_bad_row": on_bad_row,
            "limit": None,
            "device": f"ray: {num_actors} actor(s){' with a GPU each' if use_gpu else ''}",
        },
        # Ray reads, scores and writes in one streaming pipeline: its time is all "scoring".
        "timing": {
            "total_s": elapsed,
            "scoring_s": elapsed,
            "responses": n_resp,
            "responses_per_s": n_resp / max(elapsed, 1e-9),
        },
    }
    report = build_report(files, scores, meta)
    write_outputs(report, files, scores, output_dir)
    return report


def _rule_report(model: str, choice: str) -> dict[str, Any]:
    """What the actors score by (each resolves it from the checkpoint: :func:`fastrm.formatting.resolve_rule`)."""
    from fastrm.formatting import read_rule
    from fastrm.ray_cluster import is_uri
    from fastrm.seq2seq_model import is_seq2seq_dir

    if is_seq2seq_dir(model):  # the actors score sequence scores of token rewards (fastrm/seq2seq_rewards.py)
        return {"rule": "seq2seq", "description": "seq2seq (sequence scores of the checkpoint's token rewards)"}
    saved = read_rule(model) if not is_uri(model) and os.path.isdir(model) else None
    if choice == "auto" and saved is not None:
        return {"rule": saved.rule, "description": saved.describe(), **saved.to_dict()}
    if choice == "auto":
        return {"rule": "hf", "description": "hf (stock transformers' rule: the checkpoint has no fastrm_scoring.json)"}
    return {"rule": choice, "description": f"{choice} (--scoring-rule {choice})"}
