"""Scoring: rewards of prompt/response texts, and best-of-N selection.

One prompt with N candidate responses packs as one shared-prompt segment ``[prompt | r_1 | ... | r_N]`` by default
(the prompt is computed once; each response sees exactly what it would see alone), or as N separate sequences
with ``prefix_sharing=False``. Both give the same scores (tested). Used in-process (``fastrm score``,
``RewardModel.score``) and by the Ray Data job (ray_jobs/best_of_n.py), so all three agree.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch

from fastrm.formatting import ScoringRule, encode_groups, refuse_rule_settings, resolve_rule
from fastrm.packing import group_cost, pack_prompt_responses, plan_micro_batches


def tokenize_groups(
    tokenizer,
    prompts: Sequence[str],
    responses: Sequence[Sequence[str]],
    *,
    rule: ScoringRule | None = None,
    max_length: int | None = None,
    append_eos: bool | None = None,
) -> tuple[list[list[int]], list[list[list[int]]]]:
    """Token ids of prompts [G][P] and their responses [G][N][R] under ``rule`` (default: fastrm's training rule,
    :class:`fastrm.formatting.ScoringRule`), truncated per group; ``max_length`` / ``append_eos`` replace the rule's."""
    rule = rule if rule is not None else ScoringRule()
    changes = {k: v for k, v in (("max_length", max_length), ("append_eos", append_eos)) if v is not None}
    rule = dataclasses.replace(rule, **changes) if changes else rule
    enc = encode_groups(rule, tokenizer, prompts, responses)
    return [e.prompt for e in enc], [e.responses for e in enc]


@torch.no_grad()
def score_token_groups(
    model,
    prompts: Sequence[list[int]],
    responses: Sequence[Sequence[list[int]]],
    *,
    max_tokens_per_batch: int = 16384,
    prefix_sharing: bool = True,
    autocast: bool | None = None,
) -> list[list[float]]:
    """Rewards [N_g] for each group of token ids, in input order."""
    layout = "shared_prompt" if prefix_sharing else "separate"
    device = next(model.parameters()).device
    autocast = device.type == "cuda" if autocast is None else autocast
    was_training = model.training
    model.eval()
    costs = [group_cost(len(p), [len(r) for r in rs], layout) for p, rs in zip(prompts, responses)]
    out: list[list[float] | None] = [None] * len(prompts)
    for b in plan_micro_batches(costs, max_tokens_per_batch, [f"prompt {i}" for i in range(len(prompts))]):
        batch = pack_prompt_responses([prompts[i] for i in b], [responses[i] for i in b], layout).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            r = model(batch).float().cpu().tolist()
        k = 0
        for i in b:
            n = len(responses[i])
            out[i] = r[k : k + n]
            k += n
    model.train(was_training)
    return out  # type: ignore[return-value]


def normalize_texts(prompts: Any, responses: Any) -> tuple[list[str], list[list[str]], bool]:
    """Check the shapes :func:`score` accepts; returns (prompts, response lists, single) where ``single`` says the
    caller passed one prompt (a string) and gets a flat list back.

    Accepted: ``"Q", ["A1", "A2"]`` (one prompt), ``["Q1", "Q2"], [["A"], ["B", "C"]]`` (one list per prompt), and
    ``["Q1", "Q2"], ["A", "B"]`` where a string stands for a list of one response (unambiguous: a string is never a
    list of responses). Anything else is a TypeError/ValueError naming the argument and index.
    """
    single = isinstance(prompts, str)
    if single:
        if not isinstance(responses, (str, list, tuple)):
            raise TypeError(f"responses must be a list of strings for one prompt, got {type(responses).__name__}")
        prompts, responses = [prompts], [[responses] if isinstance(responses, str) else responses]
    if not isinstance(prompts, (list, tuple)):
        raise TypeError(f"prompts must be a string or a list of strings, got {type(prompts).__name__}")
    if not isinstance(responses, (list, tuple)):
        raise TypeError(f"responses must be a list (one entry per prompt), got {type(responses).__name__}")
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} response lists: give one list per prompt")
    out: list[list[str]] = []
    for i, (p, rs) in enumerate(zip(prompts, responses)):
        if not isinstance(p, str):
            raise TypeError(f"prompts[{i}] must be a string, got {type(p).__name__}")
        rs = [rs] if isinstance(rs, str) else rs
        if not isinstance(rs, (list, tuple)) or not rs:
            got = "an empty list" if isinstance(rs, (list, tuple)) else type(rs).__name__
            raise ValueError(f"responses[{i}] must be a non-empty list of strings, got {got}")
        for j, r in enumerate(rs):
            if not isinstance(r, str):
                raise TypeError(f"responses[{i}][{j}] must be a string, got {type(r).__name__}")
            if not r.strip():
                raise ValueError(f"responses[{i}][{j}] is empty or whitespace: there is nothing to score")
        out.append(list(rs))
    return list(prompts), out, single


def score(
    model,
    prompts: str | Sequence[str],
    responses: Sequence[str] | Sequence[Sequence[str] | str],
    *,
    tokenizer=None,
    scoring_rule: str | ScoringRule = "auto",
    max_length: int | None = None,
    max_tokens_per_batch: int = 16384,
    prefix_sharing: bool = True,
    append_eos: bool | None = None,
) -> list[float] | list[list[float]]:
    """Rewards of each prompt's responses, with the prompt computed once per group (``prefix_sharing``).

    >>> score(model, "Q?", [" yes", " no"])                      # one prompt -> [r1, r2]
    >>> score(model, ["Q1?", "Q2?"], [[" a", " b"], [" c"]])     # one list per prompt -> [[r, r], [r]]

    Texts become ids by the model's scoring rule (:mod:`fastrm.formatting`): a fastrm checkpoint's saved rule (as
    trained: prompt and response tokenized separately, EOS appended), stock transformers' for a checkpoint without
    one. ``scoring_rule`` ("auto", "fastrm", "hf" or a :class:`~fastrm.formatting.ScoringRule`), ``max_length`` and
    ``append_eos`` override it (a one-line warning when they disagree with a saved record). Over-long groups lose
    prompt tokens from the left (see :func:`fastrm.tokenization.truncate_group`).

    A seq2seq reward model (fastrm/seq2seq_rewards.py) gives each response its sequence score: the mean (or sum) of
    its token rewards, by the checkpoint's reward rule.
    """
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("scoring texts needs a tokenizer (pass tokenizer=, or load a checkpoint that has one)")
    prompts, responses, single = normalize_texts(prompts, responses)
    if getattr(model, "token_level", False):  # a seq2seq RM: its template and max_length are the checkpoint's
        refuse_rule_settings(scoring_rule, max_length, append_eos)
        out = model.sequence_scores(tokenizer, prompts, responses, max_tokens_per_batch=max_tokens_per_batch)
        return out[0] if single else out
    if isinstance(scoring_rule, ScoringRule):
        p, r = tokenize_groups(
            tokenizer, prompts, responses, rule=scoring_rule, max_length=max_length, append_eos=append_eos
        )
    else:
        rule = resolve_rule(model, tokenizer, scoring_rule, max_length=max_length, append_eos=append_eos)
        p, r = tokenize_groups(tokenizer, prompts, responses, rule=rule)
    out = score_token_groups(model, p, r, max_tokens_per_batch=max_tokens_per_batch, prefix_sharing=prefix_sharing)
    return out[0] if single else out


def best_of_n(scores: Sequence[float], top_k: int | None = None) -> dict:
    """The best response of one group: index of the highest score (the first on ties) and optional top-k indices."""
    if not scores:
        raise ValueError("no scores")
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    out = {"best_index": best}
    if top_k:
        out["top_k"] = sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:top_k]
    return out


def score_rows(model, rows: list[dict], *, tokenizer=None, top_k: int | None = None, **kwargs) -> list[dict]:
    """Best-of-N over rows {"prompt", "responses"}: each row gains scores, best_index, best_response (and top_k)."""
    scores = score(model, [r["prompt"] for r in rows], [r["responses"] for r in rows], tokenizer=tokenizer, **kwargs)
    out = []
    for row, s in zip(rows, scores):
        pick = best_of_n(s, top_k)
        out.append({**row, "scores": s, **pick, "best_response": row["responses"][pick["best_index"]]})
    return out
