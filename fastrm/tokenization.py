"""Tokenization: text pairs -> token-id pairs, truncated to ``max_length`` with every cut counted; the train/eval split.

The stage after :mod:`fastrm.data` (rows -> pairs) and before :mod:`fastrm.packing`. Prompt and responses are
tokenized separately (``add_special_tokens=False``), the tokenizer's EOS is appended to each response (the pooled
token), and over-long sequences lose prompt tokens from the left (:func:`truncate_group`, shared with scoring).
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Sequence
from typing import Any

from fastrm.data import LoadStats, MarginPolicy, PreferencePair, TokenizedPair, handle_bad_row, load_items
from fastrm.formatting import ScoringRule, encode_groups, truncate_group
from fastrm.rows import DataError, OnBadRow, RowError, check_on_bad_row, check_vocab, describe_source

__all__ = ["truncate_group", "tokenize_pairs", "load_tokenized", "train_eval_split", "model_vocab_size"]

# Below this many pairs a progress bar is noise: tokenizing takes well under a second.
_PROGRESS_MIN_PAIRS = 4096
_TOKENIZER_VOCAB_HINT = " (the tokenizer makes ids the model has no embedding for: use the model's own tokenizer)"


def model_vocab_size(model: Any) -> int | None:
    """Rows of a reward model's input embedding (the bound every token id must stay below), or None if unknown."""
    backbone = getattr(model, "backbone", model)
    emb = backbone.get_input_embeddings() if hasattr(backbone, "get_input_embeddings") else None
    return getattr(emb, "num_embeddings", None)


def check_token_ids(pairs: Sequence[TokenizedPair], vocab_size: int | None) -> None:
    """Raise :class:`DataError` naming the first pair (its source and field) with an id >= ``vocab_size``."""
    for p in pairs:
        for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
            try:
                check_vocab(getattr(p, key), key, vocab_size)
            except RowError as e:
                raise DataError(e.message(p.source or "pair")) from None


def _fit(prompt: list[int], chosen: list[int], rejected: list[int], max_length: int, stats: LoadStats):
    """:func:`truncate_group` for a pair, counting what was cut."""
    new_prompt, (c, r) = truncate_group(prompt, [chosen, rejected], max_length)
    if max(len(chosen), len(rejected)) > max_length:
        stats.response_truncated += 1
    if len(new_prompt) < len(prompt):
        stats.prompt_truncated += 1
    return new_prompt, c, r


def _batched_ids(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _tokenize_texts(
    pairs: Sequence[PreferencePair],
    tokenizer: Any,
    *,
    max_length: int,
    append_eos: bool,
    batch_size: int,
    on_bad_row: OnBadRow,
    stats: LoadStats,
    progress: bool,
    vocab_size: int | None = None,
    rule: ScoringRule | None = None,
) -> list[TokenizedPair | None]:
    """Tokenize text pairs; the result is aligned with ``pairs`` (``None`` = dropped tie or skipped row)."""
    if rule is not None and rule.rule == "hf":
        return _tokenize_joined(pairs, tokenizer, rule, on_bad_row, stats, vocab_size)
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    eos = getattr(tokenizer, "eos_token_id", None) if append_eos else None
    if append_eos and eos is None and pairs:
        warnings.warn("append_eos=True but the tokenizer has no eos_token_id; responses get no EOS", stacklevel=3)
    bar = None
    if progress and len(pairs) > _PROGRESS_MIN_PAIRS:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(pairs), desc="tokenizing", unit="pair")
    out: list[TokenizedPair | None] = []
    try:
        for start in range(0, len(pairs), batch_size):
            batch = pairs[start : start + batch_size]
            n = len(batch)
            # One call per batch lets fast tokenizers parallelize across all three texts of every pair.
            ids = _batched_ids(
                tokenizer, [p.prompt for p in batch] + [p.chosen for p in batch] + [p.rejected for p in batch]
            )
            for j, pair in enumerate(batch):
                prompt, chosen, rejected = ids[j], ids[n + j], ids[2 * n + j]
                try:
                    for key, resp in (("chosen", chosen), ("rejected", rejected)):
                        if not resp and eos is None:
                            raise RowError(key, "response tokenizes to zero tokens")
                    for key, ids_ in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
                        check_vocab(ids_, key, vocab_size, _TOKENIZER_VOCAB_HINT)
                except RowError as e:
                    handle_bad_row(e, pair.source, on_bad_row, stats)
                    stats.pairs -= 1
                    out.append(None)
                    continue
                if eos is not None:
                    chosen.append(eos)
                    rejected.append(eos)
                out.append(
                    _finish(TokenizedPair(prompt, chosen, rejected, pair.margin, pair.source), max_length, stats)
                )
            if bar is not None:
                bar.update(n)
    finally:
        if bar is not None:
            bar.close()
    return out


def _tokenize_joined(
    pairs: Sequence[PreferencePair],
    tokenizer: Any,
    rule: ScoringRule,
    on_bad_row: OnBadRow,
    stats: LoadStats,
    vocab_size: int | None,
) -> list[TokenizedPair | None]:
    """Pairs under stock transformers' rule (:func:`fastrm.formatting.encode_groups`): each side is ``prompt +
    response`` tokenized as one text, cut after its pooled token; the common leading ids are the shared prompt."""
    out: list[TokenizedPair | None] = []
    for pair in pairs:
        try:
            (enc,) = encode_groups(rule, tokenizer, [pair.prompt], [[pair.chosen, pair.rejected]])
            for key, ids_ in (("prompt", enc.prompt), ("chosen", enc.responses[0]), ("rejected", enc.responses[1])):
                check_vocab(ids_, key, vocab_size, _TOKENIZER_VOCAB_HINT)
        except (ValueError, RowError) as e:
            e = e if isinstance(e, RowError) else RowError("chosen", str(e))
            handle_bad_row(e, pair.source, on_bad_row, stats)
            stats.pairs -= 1
            out.append(None)
            continue
        stats.response_truncated += any(enc.truncated)
        tp = TokenizedPair(enc.prompt, enc.responses[0], enc.responses[1], pair.margin, pair.source)
        if tp.chosen_ids == tp.rejected_ids:
            stats.ties_dropped += 1
            stats.pairs -= 1
            out.append(None)
            continue
        out.append(tp)
    return out


def _finish(pair: TokenizedPair, max_length: int, stats: LoadStats) -> TokenizedPair | None:
    """Truncate, then drop the pair if both sides are now identical (the model would see a tie)."""
    pair.prompt_ids, pair.chosen_ids, pair.rejected_ids = _fit(
        pair.prompt_ids, pair.chosen_ids, pair.rejected_ids, max_length, stats
    )
    if pair.chosen_ids == pair.rejected_ids:
        stats.ties_dropped += 1
        stats.pairs -= 1
        return None
    return pair


def tokenize_pairs(
    pairs: Sequence[PreferencePair],
    tokenizer: Any,
    *,
    max_length: int = 2048,
    append_eos: bool = True,
    batch_size: int = 1000,
    stats: LoadStats | None = None,
    progress: bool = False,
    on_bad_row: OnBadRow = "error",
) -> tuple[list[TokenizedPair], LoadStats]:
    """Tokenize text pairs with any Hugging Face tokenizer (batched, ``add_special_tokens=False``).

    Prompt and responses are tokenized separately. With ``append_eos`` the tokenizer's EOS id is appended to each
    response, so the pooled last token is the EOS. Each full sequence is cut to ``max_length``: first the shared
    prompt loses tokens from its left; if a response alone is too long, the prompt is dropped and the response keeps
    its last ``max_length`` tokens. Truncations, ties after tokenization (identical token sequences) and responses
    that tokenize to nothing (a bad row, raised or skipped per ``on_bad_row``) are counted in the stats.

    ``stats`` is assumed to already count ``pairs`` (as returned by :func:`load_pairs`): dropped pairs are
    subtracted from ``stats.pairs``. Without ``stats`` a fresh object with ``rows=pairs=len(pairs)`` is used.
    """
    check_on_bad_row(on_bad_row)
    stats = stats if stats is not None else LoadStats(rows=len(pairs), pairs=len(pairs))
    out = _tokenize_texts(
        pairs,
        tokenizer,
        max_length=max_length,
        append_eos=append_eos,
        batch_size=batch_size,
        on_bad_row=on_bad_row,
        stats=stats,
        progress=progress,
    )
    result = [p for p in out if p is not None]
    if pairs and not result:
        raise DataError("no pairs left after tokenization")
    return result, stats


def load_tokenized(
    source: Any,
    tokenizer: Any,
    *,
    max_length: int = 2048,
    append_eos: bool = True,
    on_bad_row: OnBadRow = "error",
    batch_size: int = 1000,
    progress: bool = False,
    margins: MarginPolicy = "keep",
    vocab_size: int | None = None,
    rule: ScoringRule | None = None,
) -> tuple[list[TokenizedPair], LoadStats]:
    """Load (see :func:`fastrm.data.load_pairs`, also for ``margins``) and tokenize (see :func:`tokenize_pairs`),
    keeping input order. The whole source is read and validated before this returns, so a bad row stops a run
    before its first step. With ``vocab_size`` (the model's, :func:`model_vocab_size`) a token id at or above it
    is a bad row (``file:line: field 'chosen_input_ids': id 70000 >= vocab size 50304``).

    Rows already in token-id form skip tokenization and are taken verbatim (no EOS is appended to them); they are
    only truncated to ``max_length`` and re-checked for ties.

    ``rule``: a :class:`fastrm.formatting.ScoringRule` to tokenize text pairs by instead (inference on a checkpoint
    scored by stock transformers' rule); None is training's rule with ``max_length`` and ``append_eos``.
    """
    if rule is not None:
        max_length, append_eos = rule.max_length, rule.append_eos
    stats = LoadStats()
    items = load_items(source, on_bad_row, stats, margins, tokenizer, vocab_size)
    text_pairs = [p for p in items if isinstance(p, PreferencePair)]
    tokenized = iter(
        _tokenize_texts(
            text_pairs,
            tokenizer,
            max_length=max_length,
            append_eos=append_eos,
            batch_size=batch_size,
            on_bad_row=on_bad_row,
            stats=stats,
            progress=progress,
            vocab_size=vocab_size,
            rule=rule,
        )
    )
    result: list[TokenizedPair] = []
    for item in items:
        done = next(tokenized) if isinstance(item, PreferencePair) else _finish(item, max_length, stats)
        if done is not None:
            result.append(done)
    if not result:
        raise DataError(f"{describe_source(source)}: no pairs left after tokenization")
    return result, stats


# ------------------------------------------------------------------------------------------------ splitting


def train_eval_split(items: list, eval_fraction: float, seed: int) -> tuple[list, list]:
    """Seeded random split into (train, eval); both keep the input order and together hold every item once.

    ``eval_fraction`` must be in [0, 1). A positive fraction gives at least one eval item when there are two or
    more items, and the train side always keeps at least one item.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    n = len(items)
    n_eval = round(n * eval_fraction)
    if eval_fraction > 0 and n >= 2:
        n_eval = max(n_eval, 1)
    n_eval = min(n_eval, max(n - 1, 0))
    order = list(range(n))
    random.Random(seed).shuffle(order)
    eval_idx = set(order[:n_eval])
    train = [x for i, x in enumerate(items) if i not in eval_idx]
    evals = [x for i, x in enumerate(items) if i in eval_idx]
    return train, evals
