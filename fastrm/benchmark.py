"""``fastrm bench``: reward-model benchmarks (RM-Bench, RewardBench 1 and 2, pair and best-of-N files) scored with
shared prompts.

    fastrm bench --model runs/rm rm-bench
    fastrm bench --model runs/rm rm-bench:chat,code pairs.jsonl bon_folder/ --output-dir runs/rm-bench
    fastrm bench --model runs/rm rm-bench --rendering rm-bench    # RM-Bench's own rendering: its leaderboard's numbers

Each record is one scoring group (an RM-Bench prompt with its 3 chosen and 3 rejected responses, a pair, or a
prompt with N candidates): the prompt is computed once and every response attends to it and to itself only, so
each score equals the score of that (prompt, response) alone (tested), with the prompt's compute paid once.
Inputs and formats: :mod:`fastrm.bench_data`; a benchmark's own rendering: :mod:`fastrm.bench_render`; metrics,
plot and table: :mod:`fastrm.bench_report` and :mod:`fastrm.bench_rewardbench`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from fastrm.bench_data import (
    RM_BENCH_DOMAINS,
    read_inputs,
    resolve_chat_template,
    tokenize_bench_file,
)
from fastrm.bench_render import CONV_TEMPLATES, DEFAULT_CONV_TEMPLATE, RENDERINGS
from fastrm.bench_report import build_report, format_table, write_outputs
from fastrm.data import OnBadRow
from fastrm.formatting import add_rule_flags, resolve_rule


def evaluate_benchmark(
    model: Any,
    benchmark_or_files: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    tokenizer: Any = None,
    chat_template: str | None = None,
    scoring_rule: str = "auto",
    max_length: int | None = None,
    append_eos: bool | None = None,
    rendering: str = "default",
    conv_template: str = DEFAULT_CONV_TEMPLATE,
    max_tokens_per_batch: int = 16384,
    prefix_sharing: bool = True,
    on_bad_row: OnBadRow = "error",
    rm_bench_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    output_dir: str | os.PathLike | None = None,
    progress: bool = False,
) -> dict:
    """Score benchmark files and return the report (a JSON-ready dict); with ``output_dir`` also write it.

    >>> report = evaluate_benchmark("runs/rm", "rm-bench")                      # a checkpoint folder, RM-Bench
    >>> report["rm_bench"]["domain_mean"]["hard"]
    >>> evaluate_benchmark(model, ["pairs.jsonl", "bon/"], tokenizer=tok, output_dir="runs/bench")

    Args:
        model: a :class:`fastrm.RewardModel` or any spec :func:`fastrm.load_model` takes (a fastrm or HF
            sequence-classification checkpoint folder, a preset, ...).
        benchmark_or_files: ``"rm-bench"`` (RM-Bench's domain files; ``"rm-bench:chat,code"`` for some), data files
            and folders (see :mod:`fastrm.bench_data` for the formats), or a list of those.
        tokenizer: default: the model's (a checkpoint's own tokenizer).
        chat_template: "none" (plain prompt + response, as ``fastrm eval``: bench = eval on pair files), "auto" (the
            tokenizer's template when it has one), or a Jinja template file; the report's ``prompt_format`` says.
            Unset: "none" under the default rendering, "auto" under a reference rendering (as the reference script).
        scoring_rule: "auto" (the checkpoint's ``fastrm_scoring.json``; stock transformers' rule without one),
            "fastrm" or "hf" (:mod:`fastrm.formatting`); the report's ``scoring_rule`` says which was used.
        max_length: tokens of one prompt + response (default: the rule's; 2048 under a reference rendering);
            prompts are cut from the left (counted).
        append_eos: append the EOS to each response (default: the rule's).
        rendering: "default" (fastrm's formatting, as training and ``fastrm eval``) or "rm-bench" / "rewardbench"
            (the benchmarks' reference rendering, :mod:`fastrm.bench_render`; the leaderboards' numbers).
        conv_template: the FastChat conversation template of the reference rendering when no chat template is used
            (default "tulu", the reference's).
        max_tokens_per_batch: token budget of one packed forward pass.
        prefix_sharing: score a record's responses as one shared-prompt group (False: one sequence per response,
            to compare; the scores are the same).
        on_bad_row: "error" stops at the first bad record (``file:line: field ...``); "skip" counts and lists it.
        rm_bench_dir: the RM-Bench folder (default: see :func:`fastrm.bench_data.find_rm_bench_dir`).
        limit: score only the first ``limit`` records of each file (quick runs).
        output_dir: write ``bench_report.json``, ``bench_scores.jsonl`` (per-response scores) and the PNGs here.
        progress: show a progress bar (responses).

    Returns:
        The report: model, rendering, settings, files (bytes, records, skipped, truncated), one section per file,
        ``rm_bench`` (``files``, RM-Bench's ``domains`` with one Safety domain, ``overall``, ``pooled``),
        ``rewardbench`` (subsets, sections, prior sets, overall), ``rewardbench_2``, ``comparable_with``, timing.
    """
    if rendering not in RENDERINGS:
        raise ValueError(f"unknown rendering {rendering!r}; known: {', '.join(RENDERINGS)}")
    t0 = time.perf_counter()
    tokenizer_spec = str(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else None
    model, tokenizer, spec = _resolve_model(model, tokenizer)
    names = [benchmark_or_files] if isinstance(benchmark_or_files, (str, os.PathLike)) else list(benchmark_or_files)
    files = read_inputs([str(n) for n in names], rm_bench_dir=rm_bench_dir, on_bad_row=on_bad_row, limit=limit)
    from fastrm.seq2seq_rewards import is_seq2seq

    if is_seq2seq(model):
        return _seq2seq_report(
            model,
            tokenizer,
            spec,
            tokenizer_spec,
            files,
            t0,
            dict(
                chat_template=chat_template,
                scoring_rule=scoring_rule,
                max_length=max_length,
                append_eos=append_eos,
                rendering=rendering,
                max_tokens_per_batch=max_tokens_per_batch,
                on_bad_row=on_bad_row,
                limit=limit,
                output_dir=output_dir,
                progress=progress,
            ),
        )
    rule = resolve_rule(model, tokenizer, scoring_rule, max_length=max_length, append_eos=append_eos)
    if rendering == "default":
        template, prompt_format = resolve_chat_template(tokenizer, chat_template or "none")
        groups = [tokenize_bench_file(f, tokenizer, template, rule=rule, on_bad_row=on_bad_row) for f in files]
        rendering_info: dict[str, Any] = {"name": "default", "description": prompt_format}
        used_max_length = rule.max_length
    else:  # a benchmark's own convention: a separate, named step (fastrm.bench_render)
        from fastrm.bench_render import model_pad_token_id, render_reference_file, resolve_reference

        used_max_length = max_length or 2048
        ref = resolve_reference(
            rendering,
            tokenizer,
            chat_template=chat_template or "auto",
            conv_template=conv_template,
            model_pad_token_id=model_pad_token_id(model),
            max_length=used_max_length,
        )
        groups = [render_reference_file(f, tokenizer, ref, on_bad_row=on_bad_row) for f in files]
        prompt_format, rendering_info = ref.describe(), ref.as_dict()
    t1 = time.perf_counter()
    scores, tokens = score_groups(
        model, groups, max_tokens_per_batch=max_tokens_per_batch, prefix_sharing=prefix_sharing, progress=progress
    )
    settings = dict(max_length=used_max_length, max_tokens_per_batch=max_tokens_per_batch)
    settings.update(prefix_sharing=prefix_sharing, on_bad_row=on_bad_row, limit=limit)
    scoring = (
        {"rule": rule.rule, "description": rule.describe(), **rule.to_dict()}
        if rendering == "default"
        else {"rule": "reference", "description": "the reference rendering's own (see rendering)"}
    )
    meta = _meta(model, spec, tokenizer, tokenizer_spec, prompt_format, scoring, rendering_info, settings)
    return _finish(files, scores, meta, (t0, t1, time.perf_counter()), tokens, output_dir)


def _meta(model, spec, tokenizer, tokenizer_spec, prompt_format, scoring: dict, rendering: dict, settings: dict):
    """The report's description of what was scored and how (everything but the timing)."""
    return {
        "model": _describe_model(model, spec),
        "tokenizer": tokenizer_spec or getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__,
        "prompt_format": prompt_format,
        "scoring_rule": scoring,
        "rendering": rendering,
        "settings": {**settings, "device": str(next(model.parameters()).device)},
    }


def _finish(files, scores, meta: dict, times: tuple[float, float, float], tokens: dict, output_dir) -> dict:
    """The report from the scores (``times``: start, scoring start, scoring end); written to ``output_dir``."""
    t0, t1, t2 = times
    n_resp = sum(len(s) for per_file in scores for s in per_file)
    meta["timing"] = {
        "total_s": time.perf_counter() - t0,
        "read_tokenize_s": t1 - t0,
        "scoring_s": t2 - t1,
        "responses": n_resp,
        "responses_per_s": n_resp / max(t2 - t1, 1e-9),
        **tokens,
    }
    report = build_report(files, scores, meta)
    if output_dir is not None:
        write_outputs(report, files, scores, output_dir)
    return report


def _seq2seq_report(model, tokenizer, spec, tokenizer_spec, files, t0: float, o: dict) -> dict:
    """:func:`evaluate_benchmark` for a seq2seq RM: every response's sequence score (fastrm/seq2seq_rewards.py), the
    same report. Its template, max_length and reward rule are the checkpoint's; the benchmarks' reference
    renderings (a scalar RM's chat rendering of prompt + response) do not apply."""
    from fastrm.formatting import refuse_rule_settings
    from fastrm.seq2seq_rewards import score_bench_files
    from fastrm.serve_seq2seq import describe

    refuse_rule_settings(o["scoring_rule"], o["max_length"], o["append_eos"])
    if o["rendering"] != "default":
        raise ValueError(
            f"--rendering {o['rendering']}: the benchmarks' reference renderings are a scalar reward model's (its chat "
            "rendering of prompt + response); a seq2seq one reads both through its checkpoint's template"
        )
    template, prompt_format = resolve_chat_template(tokenizer, o["chat_template"] or "none")
    t1 = time.perf_counter()
    scores = score_bench_files(
        model,
        tokenizer,
        files,
        template=template,
        on_bad_row=o["on_bad_row"],
        progress=o["progress"],
        max_tokens_per_batch=o["max_tokens_per_batch"],
    )
    settings = dict(max_length=model.settings.max_length, max_tokens_per_batch=o["max_tokens_per_batch"])
    settings.update(prefix_sharing=True, on_bad_row=o["on_bad_row"], limit=o["limit"])
    scoring = {"rule": "seq2seq", "description": describe(model)}
    rendering = {"name": "default", "description": prompt_format}
    meta = _meta(model, spec, tokenizer, tokenizer_spec, prompt_format, scoring, rendering, settings)
    return _finish(files, scores, meta, (t0, t1, time.perf_counter()), {}, o["output_dir"])


def _resolve_model(model: Any, tokenizer: Any) -> tuple[Any, Any, str | None]:
    """(RewardModel, tokenizer, spec) from a model object or a spec, through the one loading module."""
    from fastrm.loading import load_model, load_tokenizer

    spec = None
    if isinstance(tokenizer, (str, os.PathLike)) and not isinstance(model, (str, os.PathLike)):
        tokenizer = load_tokenizer(str(tokenizer))
    if isinstance(model, (str, os.PathLike)):
        spec = str(model)
        if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = load_tokenizer(None if tokenizer is None else str(tokenizer), spec)
        model = load_model(spec, tokenizer=tokenizer)
        import torch

        if torch.cuda.is_available():
            model = model.to("cuda")
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("benchmarks need a tokenizer (pass tokenizer=, or a checkpoint that has one)")
    return model, tokenizer, spec


def _describe_model(model: Any, spec: str | None) -> dict:
    cfg = getattr(getattr(model, "backbone", None), "config", None)
    return {
        "spec": spec,
        "model_type": getattr(cfg, "model_type", None),
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }


def score_groups(
    model: Any,
    groups: Sequence[tuple[list[list[int]], list[list[list[int]]]]],
    *,
    max_tokens_per_batch: int = 16384,
    prefix_sharing: bool = True,
    progress: bool = False,
    desc: str = "bench",
) -> tuple[list[list[list[float]]], dict]:
    """Scores of every file's groups (``groups[f] = (prompt_ids [G][P], response_ids [G][N][R])``), in order:
    scores[f][g] = [N floats]; and token counts {"tokens_computed", "tokens_unshared"}.

    Groups go to :func:`fastrm.scoring.score_token_groups` in slices of a few micro-batches' worth of tokens, so
    the progress bar moves while packing stays first-fit-decreasing within each slice. A group larger than one
    micro-batch is scored in pieces of its responses, each with the prompt (:func:`_fit_budget`).
    """
    from tqdm.auto import tqdm

    from fastrm.packing import group_cost
    from fastrm.scoring import score_token_groups

    layout = "shared_prompt" if prefix_sharing else "separate"
    flat, owner = [], []  # (prompt, responses) pieces that each fit one micro-batch, and the group each belongs to
    for g, (p, rs) in enumerate((p, rs) for prompts, responses in groups for p, rs in zip(prompts, responses)):
        for piece in _fit_budget(p, rs, max_tokens_per_batch, layout):
            flat.append((p, piece))
            owner.append(g)
    costs = [group_cost(len(p), [len(r) for r in rs], layout) for p, rs in flat]
    unshared = sum(group_cost(len(p), [len(r) for r in rs], "separate") for p, rs in flat)
    pieces: list[list[float]] = []
    bar = tqdm(total=sum(len(rs) for _, rs in flat), desc=desc, unit="resp", disable=not progress)
    start = 0
    while start < len(flat):
        end, used = start, 0
        while end < len(flat) and (end == start or used + costs[end] <= 4 * max_tokens_per_batch):
            used += costs[end]
            end += 1
        part = flat[start:end]
        pieces.extend(
            score_token_groups(
                model,
                [p for p, _ in part],
                [rs for _, rs in part],
                max_tokens_per_batch=max_tokens_per_batch,
                prefix_sharing=prefix_sharing,
            )
        )
        bar.update(sum(len(rs) for _, rs in part))
        start = end
    bar.close()
    out: list[list[float]] = [[] for _ in range(sum(len(prompts) for prompts, _ in groups))]
    for g, s in zip(owner, pieces):
        out[g].extend(s)
    per_file, k = [], 0
    for prompts, _ in groups:
        per_file.append(out[k : k + len(prompts)])
        k += len(prompts)
    return per_file, {"tokens_computed": int(sum(costs)), "tokens_unshared": int(unshared)}


def _fit_budget(prompt: list[int], responses: list[list[int]], budget: int, layout: str) -> list[list[list[int]]]:
    """A group's responses in consecutive pieces that fit one micro-batch each with their prompt (one piece when the
    whole group fits). Every response still sees exactly its prompt and itself, so its score does not change."""
    shared = layout == "shared_prompt"
    base = len(prompt) if shared else 0
    pieces, cur, cost = [], [], base
    for r in responses:
        c = len(r) + (0 if shared else len(prompt))
        if base + c > budget:
            raise ValueError(
                f"a response needs {len(prompt) + len(r)} tokens with its prompt, more than max_tokens_per_batch="
                f"{budget}: raise --max-tokens-per-batch or lower --max-length"
            )
        if cur and cost + c > budget:
            pieces.append(cur)
            cur, cost = [], base
        cur.append(r)
        cost += c
    pieces.append(cur)
    return pieces


# ------------------------------------------------------------------------------------------------ command line

EPILOG = f"""benchmarks and files (positional, several at once; one report with a section per file):
  rm-bench                 RM-Bench's domain files ({", ".join(RM_BENCH_DOMAINS)}; those present) from
                           --rm-bench-dir (default ../shared/data/rm-bench); rm-bench:chat,code for some domains
  FILE or FOLDER           .jsonl / .json (.gz; JSON Lines under a .json name too): pairs in any format fastrm
                           trains on (accuracy, margins, histogram), RM-Bench records {{"prompt", "chosen": [..],
                           "rejected": [..]}}, RewardBench records {{"prompt", "chosen", "rejected", "subset"}},
                           RewardBench 2 records {{"prompt", "chosen": [..], "rejected": [..], "num_correct",
                           "subset"}}, or best-of-N records {{"prompt", "responses": [..], "best": i}} or
                           {{.., "scores": [..]}}

rendering (--rendering): default = fastrm's own formatting, the same as training and fastrm eval (bench = eval);
rm-bench (= rewardbench) = the reference scripts' rendering (RewardBench's scripts/run_rm.py, copied by RM-Bench):
the tokenizer's chat template over the whole conversation, else a FastChat conversation template
(--conv-template, default tulu) + EOS; special tokens on, left-truncated; the leaderboards' numbers.

RM-Bench accuracy: per prompt M[i][j] = 1 if score(chosen_i) > score(rejected_j) (a tie counts 0), averaged
over prompts; hard = upper-right triangle (chosen plainer than rejected), normal = diagonal, easy = lower-left;
per file, per RM-Bench domain (both safety files are one Safety domain), overall = mean over the domains.
RewardBench: subset accuracy; sections (Chat, Chat Hard, Safety, Reasoning) weighted by its EXAMPLE_COUNTS;
Prior Sets = mean of anthropic_helpful, anthropic_hhh, shp, summarize; overall weights 2, 2, 2, 2, 1.

examples:
  fastrm bench --model runs/hh rm-bench
  fastrm bench --model runs/hh rm-bench --rendering rm-bench     (RM-Bench's own rendering and numbers)
  fastrm bench --model runs/hh reward-bench/filtered.jsonl --rendering rewardbench
  fastrm bench --model runs/hh --tokenizer ../shared/data/tokenizers/gpt-neox-20b_tokenizer.json \\
      rm-bench:chat ../shared/data/hh-rlhf/helpful-base_test.jsonl.gz --max-length 1024 --output-dir runs/hh-bench
  fastrm bench --model runs/hh --limit 20 rm-bench                 (a quick look: 20 prompts per domain)
  fastrm bench --model runs/hh --no-prefix-sharing rm-bench         (one sequence per response, to compare)
  fastrm bench --model runs/hh --ray --num-actors 4 bon.jsonl       (best-of-N files on a Ray cluster)
"""


def build_parser() -> argparse.ArgumentParser:
    from fastrm.loading import describe_model_spec

    p = argparse.ArgumentParser(
        prog="fastrm bench",
        description="Reward-model benchmarks (RM-Bench, pair and best-of-N files), scored with shared prompts: "
        "writes a JSON report, per-response scores and plots, and prints a table.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inputs", nargs="+", metavar="BENCHMARK_OR_FILE", help="rm-bench, data files or folders")
    p.add_argument(
        "--model",
        required=True,
        help=f"fastrm or HF sequence-classification checkpoint folder, or {describe_model_spec()}",
    )
    p.add_argument("--tokenizer", help="tokenizer folder, tokenizer.json or 'byte' (default: the checkpoint's)")
    p.add_argument("--output-dir", help="report, scores and plots (default: runs/bench/<model name>)")
    p.add_argument(
        "--chat-template",
        default=None,
        help="none (plain prompt + response, as fastrm train/eval: the default rendering's default), auto (the "
        "tokenizer's template, if any: a reference rendering's default) or a Jinja file",
    )
    p.add_argument(
        "--no-chat-template",
        dest="chat_template",
        action="store_const",
        const="none",
        help="plain prompt + response text (the default)",
    )
    add_rule_flags(p)
    p.add_argument(
        "--rendering",
        default="default",
        choices=RENDERINGS,
        help="default: fastrm's formatting (as training and eval); rm-bench / rewardbench: the reference scripts'",
    )
    p.add_argument(
        "--conv-template",
        default=DEFAULT_CONV_TEMPLATE,
        choices=sorted(CONV_TEMPLATES),
        help="FastChat conversation template of the reference rendering when no chat template is used",
    )
    p.add_argument("--max-tokens-per-batch", type=int, default=16384, help="token budget of one forward pass")
    p.add_argument("--on-bad-row", default="error", choices=("error", "skip"), help="stop, or count and list")
    p.add_argument("--no-prefix-sharing", action="store_true", help="score each response as its own sequence")
    p.add_argument("--rm-bench-dir", help="folder with RM-Bench's <domain>_filtered.json(.gz) files")
    p.add_argument("--limit", type=int, help="score only the first N records of each file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    ray = p.add_argument_group("Ray Data (best-of-N files; see fastrm/ray_bon.py)")
    ray.add_argument("--ray", action="store_true", help="score best-of-N .jsonl files with a Ray Data actor pool")
    ray.add_argument("--num-actors", type=int, default=1, help="scoring actors")
    ray.add_argument("--use-gpu", action="store_true", help="one GPU per actor")
    return p


def default_output_dir(model: str) -> Path:
    """runs/bench/<model folder or preset name>: bench's own folder, never a training run's files."""
    name = Path(str(model).rstrip("/\\")).name or "model"
    return Path("runs", "bench", name)


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    out = Path(a.output_dir) if a.output_dir else default_output_dir(a.model)
    if a.ray:
        from fastrm.bench_ray import evaluate_best_of_n_on_ray

        if a.rendering != "default":
            raise ValueError(
                f"--rendering {a.rendering} is not supported with --ray (the Ray job scores the default rendering)"
            )

        report = evaluate_best_of_n_on_ray(
            a.model,
            a.inputs,
            tokenizer=a.tokenizer,
            chat_template=a.chat_template,
            scoring_rule=a.scoring_rule,
            max_length=a.max_length,
            append_eos=a.append_eos,
            max_tokens_per_batch=a.max_tokens_per_batch,
            prefix_sharing=not a.no_prefix_sharing,
            on_bad_row=a.on_bad_row,
            limit=a.limit,
            num_actors=a.num_actors,
            use_gpu=a.use_gpu,
            output_dir=out,
        )
    else:
        report = evaluate_benchmark(
            a.model,
            a.inputs,
            tokenizer=a.tokenizer,
            chat_template=a.chat_template,
            scoring_rule=a.scoring_rule,
            rendering=a.rendering,
            conv_template=a.conv_template,
            max_length=a.max_length,
            append_eos=a.append_eos,
            max_tokens_per_batch=a.max_tokens_per_batch,
            prefix_sharing=not a.no_prefix_sharing,
            on_bad_row=a.on_bad_row,
            rm_bench_dir=a.rm_bench_dir,
            limit=a.limit,
            output_dir=out,
            progress=not a.no_progress,
        )
    print(format_table(report))
    print(f"report, per-response scores and plots in {out}", file=sys.stderr)
    return 0
