"""Rows -> token-id pairs exactly as ``trl.RewardTrainer`` tokenizes them, split for fastrm's packing.

TRL tokenizes each side as one sequence: a standard row as ``prompt + chosen`` text with the EOS text appended
(special tokens added, e.g. a BOS), a conversational row as the chat template applied to the whole conversation
(``prompt + chosen`` messages), a processed row as its ``chosen_ids``/``rejected_ids``. Rows with a side longer
than ``max_length`` are dropped. The drop-in uses the same ids, so the same rows give the same losses.

Two steps make those sequences fastrm pairs without changing any reward:

* trailing padding-id tokens are dropped: TRL's sequence-classification model scores the last token that is not
  the padding id (with the common pad = EOS, the token before the appended EOS), and under causal attention
  tokens after the scored one change nothing;
* the longest common token prefix of the two sides becomes the shared prompt (each side keeps at least one token),
  which is what ``prefix_sharing`` computes once. Rows whose sides are then identical are ties, dropped and counted.
"""

from __future__ import annotations

from typing import Any

from fastrm import chat
from fastrm.data import LoadStats, TokenizedPair, handle_bad_row, parse_row
from fastrm.rows import DataError, OnBadRow, RowError, check_on_bad_row, ids_field, iter_groups, text_field, type_name


def _side_ids(row: dict, tokenizer: Any) -> tuple[list[int], list[int]]:
    """Full chosen and rejected token ids of one row, tokenized as TRL 1.x does."""
    if "chosen_ids" in row or "rejected_ids" in row:
        return ids_field(row, "chosen_ids"), ids_field(row, "rejected_ids")
    if "chosen_input_ids" in row or "rejected_input_ids" in row:  # TRL's legacy names for the same columns
        return ids_field(row, "chosen_input_ids"), ids_field(row, "rejected_input_ids")
    if chat.is_chat_row(row):
        sides = chat.conversations(row)
        chat.require_chat_template(tokenizer)
        kwargs = chat.template_kwargs(row)
        out = []
        for key, conv in zip(("chosen", "rejected"), sides):
            try:  # TRL's call (trl.data_utils._tokenize)
                ids = tokenizer.apply_chat_template(conv, tokenize=True, return_dict=True, **kwargs)["input_ids"]
            except Exception as e:  # jinja2 errors and plain Python errors raised inside templates
                raise RowError(key, f"the chat template failed on these messages: {type(e).__name__}: {e}") from None
            out.append(list(ids))
        return out[0], out[1]
    prompt = text_field(row, "prompt", allow_empty=True) if "prompt" in row else ""
    eos = tokenizer.eos_token or ""
    out = []
    for key in ("chosen", "rejected"):
        text = prompt + text_field(row, key)
        out.append(list(tokenizer(text if text.endswith(eos) else text + eos)["input_ids"]))
    return out[0], out[1]


def _strip_padding(ids: list[int], pad_id: int | None, key: str) -> list[int]:
    end = len(ids)
    while pad_id is not None and end > 0 and ids[end - 1] == pad_id:
        end -= 1
    if end == 0:
        raise RowError(key, "tokenizes to padding tokens only: the model would score nothing")
    return ids[:end]


def tokenize_like_trl(
    source: Any, tokenizer: Any, *, max_length: int | None, on_bad_row: OnBadRow = "error"
) -> tuple[list[TokenizedPair], list[int], LoadStats, int]:
    """Load and tokenize ``source`` (a ``datasets.Dataset``, a list of dicts, or any :func:`fastrm.data.load_pairs`
    source) as TRL does.

    Returns:
        pairs; ``trl_tokens[i]``, the tokens TRL's batch holds for pair i (both sides, padding excluded), for
        TRL's ``num_tokens``; the load stats; and how many rows were dropped for exceeding ``max_length``.
    """
    check_on_bad_row(on_bad_row)
    pad_id = tokenizer.pad_token_id
    stats, pairs, trl_tokens, too_long = LoadStats(), [], [], 0
    for group, rows in iter_groups(source):
        before = len(pairs)
        for src, row in rows:
            stats.rows += 1
            try:
                if isinstance(row, RowError):
                    raise row
                if not isinstance(row, dict):
                    raise RowError(None, f"expected a JSON object, got {type_name(row)}")
                chosen, rejected = _side_ids(row, tokenizer)
                if max_length is not None and max(len(chosen), len(rejected)) > max_length:
                    too_long += 1
                    continue
                n_tokens = len(chosen) + len(rejected)
                ids_row = {
                    "chosen_input_ids": _strip_padding(chosen, pad_id, "chosen"),
                    "rejected_input_ids": _strip_padding(rejected, pad_id, "rejected"),
                    "margin": row.get("margin"),
                }
                pair = parse_row(ids_row, stats)  # common prefix -> prompt, ties dropped, margin checked
            except RowError as e:
                handle_bad_row(e, src, on_bad_row, stats)
                continue
            if pair is not None:
                pair.source = src
                pairs.append(pair)
                trl_tokens.append(n_tokens)
        if len(pairs) == before:
            raise DataError(f"{group}: no pairs left after loading ({too_long} rows longer than max_length)")
    stats.pairs = len(pairs)
    with_margin = [p.margin is not None for p in pairs]
    if any(with_margin) and not all(with_margin):
        first = pairs[with_margin.index(False)].source
        raise DataError(f"{first}: field 'margin': missing, while other rows have one (TRL needs it on every row)")
    return pairs, trl_tokens, stats, too_long
