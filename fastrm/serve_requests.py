"""Validated request bodies -> token-id groups for the batcher, within the per-request limits (no HTTP here).

Three request shapes (the models of :mod:`fastrm.serve_schema`):

* ``POST /score`` ``{"prompts": [P], "responses": [[R_p, ...], ...]}``: the shapes and rules of
  :func:`fastrm.scoring.score` (each prompt with its responses is one group, truncated by the training rule).
* ``POST /get_reward`` (OpenRLHF) ``{"query": [full texts], "prompts": [P]?}`` and ``POST /classify`` (vLLM)
  ``{"input": [full texts]}``: a query that starts with its prompt is split there and tokenized as ``prompt`` +
  ``response``, as fastrm trains. A query without a usable prompt is split the way training splits a row that
  has none: at the last ``"\n\nAssistant:"`` (an HH-RLHF transcript, :func:`fastrm.data.split_hh_transcript`),
  else tokenized whole (training keeps such a row as one sequence). The answer's ``split`` says which rule each
  query got whenever one was not split at its given prompt, so a client that meant another split can tell.
  Queries of a request tokenized whole that share a leading run of tokens are scored with that run as their
  shared prompt (exact: the same tokens at the same positions). Trailing EOS/pad strings of a query are removed
  before the EOS id is appended, so a query decoded with its EOS (OpenRLHF decodes with
  ``skip_special_tokens=False``) scores like one without.

Every sequence longer than ``max_length`` loses tokens as in training (:func:`fastrm.tokenization.truncate_group`:
the prompt from the left, the response end is always kept); each response's ``truncated`` flag says whether its
sequence lost any token. A request over ``max_responses`` responses or ``max_request_tokens`` tokens to score is
refused (413) before it reaches the model. Bad input raises :class:`BadRequest` naming the field.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from dataclasses import dataclass
from typing import Any, Sequence

from fastrm.batching import Group, request_tokens
from fastrm.data import split_hh_transcript
from fastrm.formatting import ScoringRule, encode_groups, pooled_prefix
from fastrm.packing import Layout
from fastrm.scoring import normalize_texts, tokenize_groups
from fastrm.serve_schema import BadRequest, ClassifyRequest, GetRewardRequest, ScoreRequest, SplitRule
from fastrm.tokenization import truncate_group

__all__ = ["BadRequest", "Limits", "Prepared", "prepare_classify", "prepare_get_reward", "prepare_score"]

_FIELD = re.compile(r"^(prompts|responses|query|input)(\[\d+\])*")


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server (``fastrm serve`` flags), the layout its cost is counted in, and the
    scoring rule its texts are tokenized by (:mod:`fastrm.formatting`; ``max_length`` replaces the rule's)."""

    max_length: int
    max_responses: int
    max_request_tokens: int
    layout: Layout = "shared_prompt"
    rule: ScoringRule = ScoringRule()


@dataclass
class Prepared:
    """A request ready for the batcher: groups [G], per-response truncation flags (the request's shape), how each
    query was split (None when every one was split at its given prompt, and for /score), tokens to score."""

    groups: list[Group]
    truncated: list[Any]
    split: list[SplitRule] | None
    tokens: int


def field_of(message: str, default: str) -> str:
    m = _FIELD.match(message)
    return m.group(0) if m else default


def check_count(n: int, limits: Limits, field: str) -> None:
    if n > limits.max_responses:
        raise BadRequest(
            field, f"{field}: {n} responses, more than this server takes ({limits.max_responses}, --max-responses)", 413
        )


def _check_tokens(groups: list[Group], limits: Limits, field: str) -> int:
    n = request_tokens(groups, limits.layout)
    if n > limits.max_request_tokens:
        raise BadRequest(
            field,
            f"{field}: {n} tokens to score, more than this server takes in one request ({limits.max_request_tokens}, "
            "--max-request-tokens): send them in several requests",
            413,
        )
    return n


def prepare_score(tokenizer, req: ScoreRequest, limits: Limits) -> Prepared:
    """``/score``: groups [G] (prompt ids, response ids, by the scoring rule, truncated as
    :func:`fastrm.scoring.score` does) and the per-response truncation flags [G][N_g]."""
    try:
        prompts, responses, _ = normalize_texts(req.prompts, req.responses)
    except (TypeError, ValueError) as e:
        raise BadRequest(field_of(str(e), "responses"), str(e)) from None
    check_count(len(prompts), limits, "prompts")
    check_count(sum(map(len, responses)), limits, "responses")
    rule = dataclasses.replace(limits.rule, max_length=limits.max_length)
    try:
        enc = encode_groups(rule, tokenizer, prompts, responses)
    except ValueError as e:
        raise BadRequest("responses", str(e)) from None
    groups = [Group(e.prompt, e.responses) for e in enc]
    return Prepared(groups, [e.truncated for e in enc], None, _check_tokens(groups, limits, "responses"))


def prepare_get_reward(tokenizer, req: GetRewardRequest, limits: Limits) -> Prepared:
    """``/get_reward``: one group per query (see :func:`prepare_queries`)."""
    check_count(len(req.query), limits, "query")
    if req.prompts is not None and len(req.prompts) != len(req.query):
        raise BadRequest("prompts", f"prompts must have one entry per query ({len(req.query)}), got {len(req.prompts)}")
    groups, flags, split = prepare_queries(
        tokenizer, req.query, req.prompts, max_length=limits.max_length, rule=limits.rule
    )
    return Prepared(groups, flags, split, _check_tokens(groups, limits, "query"))


def prepare_classify(tokenizer, req: ClassifyRequest, limits: Limits) -> Prepared:
    """``/classify``: each input is a full text, scored as a query without a prompt (see :func:`prepare_queries`)."""
    if req.add_special_tokens:
        raise BadRequest(
            "add_special_tokens",
            "add_special_tokens: true is not supported: rewards are computed as in training, with no special "
            "tokens added (send false or leave it out)",
        )
    texts = [req.input] if isinstance(req.input, str) else req.input
    if not texts:
        raise BadRequest("input", "input: empty list, nothing to score")
    check_count(len(texts), limits, "input")
    groups, flags, split = prepare_queries(
        tokenizer, texts, None, max_length=limits.max_length, field="input", rule=limits.rule
    )
    return Prepared(groups, flags, split, _check_tokens(groups, limits, "input"))


def _truncate(prompt: list[int], responses: list[list[int]], max_length: int) -> tuple[Group, list[bool]]:
    new_prompt, new_responses = truncate_group(prompt, responses, max_length)
    cut = len(new_prompt) < len(prompt)
    return Group(new_prompt, new_responses), [cut or len(a) < len(b) for a, b in zip(new_responses, responses)]


def _strip_special(text: str, tokenizer) -> str:
    """Remove trailing EOS/pad strings and leading pad strings (left padding), which the server adds itself."""
    tails = [t for t in {tokenizer.eos_token, tokenizer.pad_token} if t]
    changed = True
    while changed:
        changed = False
        for t in tails:
            if text.endswith(t):
                text, changed = text[: -len(t)], True
    pad = tokenizer.pad_token
    while pad and text.startswith(pad):
        text = text[len(pad) :]
    return text


def prepare_queries(
    tokenizer,
    queries: list[str],
    prompts: list[str | None] | None,
    *,
    max_length: int,
    append_eos: bool | None = None,
    field: str = "query",
    rule: ScoringRule | None = None,
) -> tuple[list[Group], list[bool], list[SplitRule] | None]:
    """One group [Q] per query (prompt ids, [response ids + EOS]), truncated per query; truncation flags [Q]; how
    each query was split [Q] ("prompt", "assistant_marker", "whole"), or None when all were split at their prompt.

    The batcher merges groups with equal prompt ids, so queries sharing a prompt become one shared-prompt segment.
    Under stock transformers' rule (``rule.rule == "hf"``) every query is its whole text as the tokenizer's
    default call encodes it, cut after its last non-pad token (``split`` is "whole" for each).
    """
    rule = rule if rule is not None else ScoringRule()
    append_eos = rule.append_eos if append_eos is None else append_eos
    if rule.rule == "hf":
        return _prepare_joined(tokenizer, queries, rule, max_length, field)
    texts = [_strip_special(q, tokenizer) for q in queries]
    for i, t in enumerate(texts):
        if not t.strip():
            raise BadRequest(f"{field}[{i}]", f"{field}[{i}] is empty or whitespace: there is nothing to score")
    rules: list[SplitRule] = []
    split: dict[int, tuple[str, str]] = {}
    for i, t in enumerate(texts):
        p = prompts[i] if prompts is not None else None
        if p and t.startswith(p) and t[len(p) :].strip():
            split[i], rule = (p, t[len(p) :]), "prompt"
        else:
            # No usable prompt: the rule training applies to a row without one (fastrm.data).
            hh_prompt, hh_response = split_hh_transcript(t)
            if hh_prompt and hh_response.strip():
                split[i], rule = (hh_prompt, hh_response), "assistant_marker"
            else:
                rule = "whole"
        rules.append(rule)
    whole = [i for i in range(len(texts)) if i not in split]
    eos = tokenizer.eos_token_id if append_eos else None
    groups: list[Group | None] = [None] * len(texts)
    flags: list[bool] = [False] * len(texts)
    if split:
        keys = list(split)
        p_ids, r_ids = tokenize_groups(
            tokenizer,
            [split[i][0] for i in keys],
            [[split[i][1]] for i in keys],
            max_length=sys.maxsize,
            append_eos=append_eos,
        )
        for i, p, rs in zip(keys, p_ids, r_ids):
            groups[i], (flags[i],) = _truncate(p, rs, max_length)
    if whole:
        ids = tokenizer([texts[i] for i in whole], add_special_tokens=False)["input_ids"]
        ids = [list(x) for x in ids]
        for i, seq, k in zip(whole, ids, shared_prefix_lengths(ids)):
            groups[i], (flags[i],) = _truncate(seq[:k], [seq[k:] + ([eos] if eos is not None else [])], max_length)
    return groups, flags, (None if all(r == "prompt" for r in rules) else rules)  # type: ignore[return-value]


def _prepare_joined(tokenizer, queries: list[str], rule: ScoringRule, max_length: int, field: str):
    for i, t in enumerate(queries):
        if not t.strip():
            raise BadRequest(f"{field}[{i}]", f"{field}[{i}] is empty or whitespace: there is nothing to score")
    eos = (tokenizer.eos_token or "") if rule.append_eos else ""
    texts = [t if t.endswith(eos) else t + eos for t in queries]
    ids = [
        pooled_prefix(x, rule.pad_token_id)
        for x in tokenizer(texts, add_special_tokens=rule.add_special_tokens)["input_ids"]
    ]
    groups, flags = [], []
    for seq, k in zip(ids, shared_prefix_lengths(ids)):
        k = min(k, len(seq) - 1)
        g, (cut,) = _truncate(seq[:k], [seq[k:]], max_length)
        groups.append(g)
        flags.append(cut)
    return groups, flags, ["whole"] * len(queries)


def _lcp(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def shared_prefix_lengths(seqs: Sequence[Sequence[int]]) -> list[int]:
    """For each sequence, the length of the leading run of tokens it shares with the other members of its cluster
    (0 for a sequence in no cluster); every member keeps at least one token of its own.

    Clusters are runs of the sequences sorted by value, grown while a member adds savings: a cluster of n
    sequences with a shared prefix of p tokens saves (n - 1) * p tokens, so a new member that shrinks the prefix
    to q joins when n * q > (n - 1) * p.

    >>> shared_prefix_lengths([[1, 2, 3, 4], [9, 9], [1, 2, 3, 5, 6]])
    [3, 0, 3]
    """
    order = sorted(range(len(seqs)), key=lambda i: seqs[i])
    out = [0] * len(seqs)

    def close(members: list[int], p: int) -> None:
        if len(members) > 1:
            for m in members:
                out[m] = p

    members: list[int] = []
    p = 0
    for i in order:
        if members:
            q = min(p, _lcp(seqs[members[0]], seqs[i]), len(seqs[i]) - 1)
            n = len(members)
            if q > 0 and n * q > (n - 1) * p:
                members.append(i)
                p = q
                continue
            close(members, p)
        members, p = [i], len(seqs[i]) - 1
    close(members, p)
    return out
