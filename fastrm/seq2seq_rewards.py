"""Token rewards and sequence scores of a sequence-to-sequence reward model (Zhou et al. 2024's reward extracting).

To score y for x the RM reads [x | input(y) | y] in one teacher-forced forward, and at each target position t
compares y_t with its greedy prediction given y_<t (``argmax == y_t``, from the fused linear + cross-entropy op: no
logits tensor). Greedy decoding from [x | input(y)] produces exactly these predictions while its output equals y
(up to and including the first divergence); after it the paper feeds y token by token, which is teacher forcing:
so one forward is the paper's procedure, and fastrm defines the decisions by it (tests/test_seq2seq.py checks it
against stock HF ``generate`` followed by teacher forcing). All responses to one prompt are one shared-prompt
segment. The rules and constants are the checkpoint's (``fastrm_seq2seq.json``; see fastrm/seq2seq_model.py).
"""

from __future__ import annotations

from typing import Sequence

import torch

from fastrm.seq2seq import Seq2SeqSettings, pack_branches


def rewards_from_decisions(match: Sequence[bool], settings: Seq2SeqSettings, rule: str | None = None) -> list[float]:
    """Token rewards of one response from its per-token ``argmax == y_t`` decisions (module docstring)."""
    rule = rule or settings.reward_rule
    pos, neg = float(settings.positive), -float(settings.negative)
    if rule == "match_positive":
        return [pos if m else neg for m in match]
    if rule != "after_zero":
        raise ValueError(f"unknown reward rule {rule!r}; expected 'after_zero' or 'match_positive'")
    out, diverged = [], False
    for m in match:
        diverged = diverged or not m
        out.append(neg if not m else (0.0 if diverged else pos))
    return out


def sequence_score(rewards: Sequence[float], settings: Seq2SeqSettings) -> float:
    """The sequence-level score of one response: the mean (default) or sum of its token rewards (0 when empty)."""
    if not rewards:
        return 0.0
    total = float(sum(rewards))
    return total / len(rewards) if settings.sequence_score == "mean" else total


def scoring_branches(model, tokenizer, prompt: str, responses: Sequence[str], group: int | None = None):
    """(prompt ids, [(input ids, response ids)]) of one prompt's responses under the model's template, truncated as
    in training (prompt, then the input copy of the response, from the left); a response that cannot fit
    ``max_length`` whole as the target is a ValueError naming it (``responses[group][j]`` when ``group`` is given)."""
    s = model.settings
    name = (lambda j: f"response {j}") if group is None else (lambda j: f"responses[{group}][{j}]")  # noqa: E731
    pieces = s.template.pieces(tokenizer)
    enc = lambda t: list(tokenizer(t, add_special_tokens=False)["input_ids"]) if t else []  # noqa: E731
    p_ids = enc(pieces["_chat"][0] + prompt + pieces["_chat"][1]) if "_chat" in pieces else enc(prompt)
    branches = []
    for j, r in enumerate(responses):
        if not isinstance(r, str) or not r.strip():
            raise ValueError(f"{name(j)} is empty: there are no tokens to reward")
        y = enc(r)
        fixed = len(pieces["in_prefix"]) + len(pieces["out_prefix"]) + len(y)
        if fixed > s.max_length:
            raise ValueError(
                f"{name(j)} needs {len(y)} tokens as the target and the template {fixed - len(y)} more: more than "
                f"max_length={s.max_length} (it is never truncated)"
            )
        room = s.max_length - fixed
        y_in = y[len(y) - room :] if len(y) > room else y
        branches.append((pieces["in_prefix"] + (y_in if room else []) + pieces["out_prefix"], y))
    longest = max(len(i) + len(t) for i, t in branches)
    room = s.max_length - longest
    return (p_ids[len(p_ids) - room :] if len(p_ids) > room else p_ids), branches


@torch.no_grad()
def token_decisions(model, groups, *, max_tokens_per_batch: int = 16384, autocast=False):
    """groups: [(prompt ids, [(input ids, target ids)])] -> per group, per branch, the list of argmax == target
    decisions. One teacher-forced forward per micro-batch; each group is one shared-prompt segment."""
    from fastrm.packing import group_cost, plan_micro_batches

    device = next(model.parameters()).device
    was = model.training
    model.eval()
    costs = [group_cost(len(p), [len(i) + len(t) for i, t in bs], "shared_prompt") for p, bs in groups]
    out: list = [None] * len(groups)
    try:
        for idx in plan_micro_batches(costs, max(max_tokens_per_batch, max(costs))):
            batch = pack_branches([groups[g][0] for g in idx], [groups[g][1] for g in idx], "shared_prompt")
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                match, _ = model.predictions(batch.to(device))
            flat = match.cpu().tolist()
            k = 0
            for g in idx:
                per = []
                for _, t in groups[g][1]:
                    per.append(flat[k : k + len(t)])
                    k += len(t)
                out[g] = per
    finally:
        model.train(was)
    return out


def token_rewards(
    model,
    prompt: str,
    responses: Sequence[str],
    tokenizer=None,
    *,
    rule: str | None = None,
    return_tokens: bool = False,
    max_tokens_per_batch: int = 16384,
) -> list:
    """Token rewards of each response to ``prompt``: one float per token of the response (as the RM's tokenizer
    tokenizes it, ``add_special_tokens=False``), in one teacher-forced forward over [x | input(y) | y] per response
    (all responses of the prompt in one shared-prompt segment). ``rule``: ``after_zero`` / ``match_positive``
    (default: the checkpoint's). ``return_tokens``: also the token strings, as ``[(tokens, rewards)]``.

    >>> fastrm.token_rewards(model, "Say something about Bob.\\n", [" Bob is rude."], tokenizer=tok)  # doctest: +SKIP
    [[1.0, 1.0, -1.0, 0.0]]
    """
    tok = tokenizer if tokenizer is not None else model.tokenizer
    if tok is None:
        raise ValueError("token_rewards needs a tokenizer (tokenizer=..., or a model loaded with its tokenizer)")
    if not is_seq2seq(model):
        raise ValueError("token_rewards needs a seq2seq reward model (fastrm.load_model of a seq2seq checkpoint)")
    if isinstance(responses, str):
        raise ValueError("responses must be a list of strings (one response: [response])")
    p_ids, branches = scoring_branches(model, tok, prompt, responses)
    dec = token_decisions(model, [(p_ids, branches)], max_tokens_per_batch=max_tokens_per_batch)[0]
    rewards = [rewards_from_decisions(m, model.settings, rule) for m in dec]
    if return_tokens:
        return [(tok.convert_ids_to_tokens(t), r) for (_, t), r in zip(branches, rewards)]
    return rewards


def is_seq2seq(model) -> bool:
    """True for a sequence-to-sequence reward model (its rewards are token-level, scalars are sequence scores)."""
    return bool(getattr(model, "token_level", False))  # Seq2SeqRewardModel's class attribute


def score_groups(
    model,
    tokenizer,
    prompts: Sequence[str],
    responses: Sequence[Sequence[str]],
    *,
    rule: str | None = None,
    max_tokens_per_batch: int = 16384,
) -> tuple[list[list[float]], list[list[list[float]]], list[list[list[int]]]]:
    """Many prompts' responses at once: (sequence scores [G][N], token rewards [G][N][L], target ids [G][N][L]).

    Whole groups go into shared-prompt micro-batches of ``max_tokens_per_batch`` (a group is never split), so the
    values equal :func:`token_rewards` prompt by prompt (tested). A response that cannot be scored is a ValueError
    naming it as ``responses[g][j]``."""
    groups = [scoring_branches(model, tokenizer, p, rs, group=g) for g, (p, rs) in enumerate(zip(prompts, responses))]
    return score_encoded(model, groups, rule=rule, max_tokens_per_batch=max_tokens_per_batch)


def score_encoded(model, groups, *, rule: str | None = None, max_tokens_per_batch: int = 16384):
    """:func:`score_groups` of groups already encoded by :func:`scoring_branches` (callers that check each group
    first, to name a bad row, encode it once)."""
    decisions = token_decisions(model, groups, max_tokens_per_batch=max_tokens_per_batch)
    rewards = [[rewards_from_decisions(m, model.settings, rule) for m in per] for per in decisions]
    scores = [[sequence_score(r, model.settings) for r in per] for per in rewards]
    return scores, rewards, [[t for _, t in bs] for _, bs in groups]


def sequence_scores(model, prompt: str, responses: Sequence[str], tokenizer=None, **kw):
    """The sequence score of each response (:func:`sequence_score` of its :func:`token_rewards`)."""
    return [sequence_score(r, model.settings) for r in token_rewards(model, prompt, responses, tokenizer, **kw)]


def score_rows(
    model, rows: Sequence[dict], tokenizer, *, top_k: int | None = None, token_level: bool = False, **kw
) -> list[dict]:
    """``fastrm score`` for a seq2seq RM: each {prompt, responses} row + ``scores`` (sequence scores),
    ``best_index``, ``best_response`` (``top_k``), and with ``token_level`` the ``token_rewards`` and ``tokens``."""
    tok = tokenizer if tokenizer is not None else model.tokenizer
    prompts, responses = [r["prompt"] for r in rows], [r["responses"] for r in rows]
    all_scores, all_rewards, all_targets = score_groups(model, tok, prompts, responses, **kw)  # one batched pass
    out = []
    for row, scores, rewards, targets in zip(rows, all_scores, all_rewards, all_targets):
        best = max(range(len(scores)), key=lambda i: scores[i])
        rec = {k: v for k, v in row.items() if k != "source"}
        rec.update(scores=scores, best_index=best, best_response=row["responses"][best])
        if top_k:
            rec["top_k"] = sorted(range(len(scores)), key=lambda i: -scores[i])[:top_k]
        if token_level:
            rec.update(token_rewards=rewards, tokens=[tok.convert_ids_to_tokens(t) for t in targets])
        out.append(rec)
    return out


def evaluate_text_pairs(
    model,
    tokenizer,
    pairs: Sequence,
    *,
    on_bad_row: str = "error",
    stats=None,
    max_tokens_per_batch: int = 16384,
    out_dir=None,
    name: str = "eval",
    progress: bool = False,
    chunk: int = 64,
) -> dict:
    """``fastrm eval`` for a seq2seq RM: each :class:`fastrm.data.PreferencePair`'s margin is the sequence score of
    its chosen response minus that of its rejected one (both read against the pair's prompt), reported as for a
    scalar RM (accuracy, margin statistics; with ``out_dir`` the metrics JSON, margins .npy and histogram PNG).

    A pair whose chosen or rejected response cannot be scored (empty, or over ``max_length`` as the target) is a bad
    row naming its ``file:line`` and field: raised, or with ``on_bad_row="skip"`` counted in ``stats`` and listed."""
    import numpy as np
    from tqdm.auto import tqdm

    from fastrm.data import LoadStats, handle_bad_row
    from fastrm.evaluation import margin_report
    from fastrm.rows import RowError

    stats = stats if stats is not None else LoadStats()
    groups = []  # each kept pair encoded once: (prompt ids, [chosen branch, rejected branch])
    for p in pairs:
        try:
            groups.append(scoring_branches(model, tokenizer, p.prompt, [p.chosen, p.rejected]))
        except ValueError as e:  # "response j ...": j = 0 the chosen response, 1 the rejected one
            j = 0 if str(e).startswith("response 0 ") else 1
            reason = str(e).replace(f"response {j} ", "the response ", 1)
            handle_bad_row(RowError(("chosen", "rejected")[j], reason), p.source, on_bad_row, stats)
    if not groups:
        raise ValueError("no pair left to evaluate" + (f" ({stats.bad_rows_skipped} skipped)" if stats.skipped else ""))
    d = []
    with tqdm(total=len(groups), desc="eval", unit="pair", disable=not progress) as bar:
        for i in range(0, len(groups), chunk):
            part = groups[i : i + chunk]
            scores, _, _ = score_encoded(model, part, max_tokens_per_batch=max_tokens_per_batch)
            d.extend(c - r for c, r in scores)
            bar.update(len(part))
    return margin_report(np.asarray(d, dtype=np.float64), out_dir=out_dir, name=name)


def score_bench_files(
    model,
    tokenizer,
    files,
    *,
    template=None,
    on_bad_row: str = "error",
    progress: bool = False,
    max_tokens_per_batch: int = 16384,
    chunk: int = 64,
) -> list[list[list[float]]]:
    """``fastrm bench`` for a seq2seq RM: the sequence score of every response of every record of each
    :class:`fastrm.bench_data.BenchFile` (prompt rendered with ``template`` when given), scores[f][g] = [N floats].

    A record that cannot be scored (pre-tokenized, a response with no tokens, or one over ``max_length`` as the
    target) is a bad record: raised naming its ``file:line``, or counted and listed with ``on_bad_row="skip"``;
    it leaves ``bf.records`` as in :func:`fastrm.bench_data.tokenize_bench_file`."""
    from tqdm.auto import tqdm

    from fastrm.bench_data import _texts
    from fastrm.rows import DataError

    per_file = []
    total = sum(len(r.responses) for f in files for r in f.records)
    bar = tqdm(total=total, desc="bench", unit="resp", disable=not progress)
    for bf in files:
        kept, groups = [], []  # each kept record encoded once
        for rec in bf.records:
            if rec.prompt_ids is not None:
                reason = "token-id rows cannot be read by a seq2seq reward model (it needs text)"
                bf.bad_record(rec.source, reason, on_bad_row)
                continue
            try:
                groups.append(scoring_branches(model, tokenizer, *_texts(tokenizer, template, rec)))
            except ValueError as e:
                bf.bad_record(rec.source, str(e), on_bad_row)
                continue
            kept.append(rec)
        bf.records = kept
        if bf.format == "pairs":
            bf.stats.pairs = len(kept)
        if not kept:
            raise DataError(f"{bf.path}: no records left to score")
        scores: list[list[float]] = []
        for i in range(0, len(groups), chunk):
            part = groups[i : i + chunk]
            got, _, _ = score_encoded(model, part, max_tokens_per_batch=max_tokens_per_batch)
            scores.extend(got)
            bar.update(sum(len(bs) for _, bs in part))
        per_file.append(scores)
    bar.close()
    return per_file
