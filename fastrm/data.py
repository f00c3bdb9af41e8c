"""Preference rows -> pairs: the pair formats, their validation, and the counts of everything not kept.

Rows come from :mod:`fastrm.rows` (files, datasets, lists; the shared field checks). Four row formats are
detected per row, by key:

* HH-RLHF transcripts: ``chosen``/``rejected`` full dialogues and no ``prompt``; the shared prompt is
  everything up to and including the last ``"\\n\\nAssistant:"``. Other prompt-less text rows (TRL's "implicit
  prompt" standard format) have no marker to split at and are kept as two unshared sequences.
* ``prompt``/``chosen``/``rejected`` strings (TRL's standard format).
* TRL's conversational format: ``chosen``/``rejected`` (and optionally ``prompt``) lists of ``{"role", "content"}``
  messages, rendered with the tokenizer's chat template and split at the last assistant turn (:mod:`fastrm.chat`).
* token ids: ``chosen_input_ids``/``rejected_input_ids`` (full sequences, shared prefix = their longest common
  prefix) or, with ``prompt_input_ids``, responses only.

Every row may carry a finite numeric ``margin``. Nothing is dropped silently: ties, skipped bad rows, prompts that
differ between chosen and rejected, and truncations are all counted in :class:`LoadStats`. Tokenization, truncation
and the train/eval split are the next stage, :mod:`fastrm.tokenization`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fastrm import chat
from fastrm.rows import (
    DataError,
    OnBadRow,
    RowError,
    check_on_bad_row,
    ids_field,
    iter_groups,
    margin_field,
    text_field,
    type_name,
)

ASSISTANT_MARKER = "\n\nAssistant:"

MarginPolicy = Literal["keep", "require", "ignore"]


@dataclass
class PreferencePair:
    """One preference comparison in text form."""

    prompt: str  # may be "" when there is no shared prompt
    chosen: str  # response text, without the prompt
    rejected: str
    margin: float | None = None
    source: str = ""  # "path:line" (1-based), "path[i]", "dataset[i]" or "rows[i]" (0-based index)


@dataclass
class TokenizedPair:
    """One preference comparison in token-id form; full sequences are ``prompt_ids + chosen_ids`` etc."""

    prompt_ids: list[int]
    chosen_ids: list[int]  # never empty
    rejected_ids: list[int]  # never empty
    margin: float | None
    source: str

    @property
    def chosen_len(self) -> int:
        return len(self.prompt_ids) + len(self.chosen_ids)

    @property
    def rejected_len(self) -> int:
        return len(self.prompt_ids) + len(self.rejected_ids)

    @property
    def num_tokens(self) -> int:
        """Tokens when chosen and rejected are two separate sequences (prompt counted twice)."""
        return self.chosen_len + self.rejected_len


@dataclass
class LoadStats:
    """Counts reported to the user: every row is either a pair or accounted for here."""

    rows: int = 0  # input rows seen (blank JSONL lines are not rows)
    pairs: int = 0  # pairs produced (after ties and bad rows are removed)
    ties_dropped: int = 0
    bad_rows_skipped: int = 0
    unshared_prompt: int = 0  # HH pairs whose transcripts have different prompts: kept as separate full sequences
    prompt_truncated: int = 0  # pairs whose prompt lost tokens (filled by tokenize_pairs)
    response_truncated: int = 0  # pairs where a response alone exceeded max_length (filled by tokenize_pairs)
    margins_ignored: int = 0  # rows whose margin the loss does not use (margins="ignore")
    skipped: list[dict[str, str]] = field(default_factory=list)  # every skipped row: {"source", "reason"}

    def summary(self) -> str:
        """One human-readable line, e.g. for logging after loading."""
        parts = [f"{self.pairs} pairs from {self.rows} rows"]
        for name in (
            "ties_dropped",
            "bad_rows_skipped",
            "unshared_prompt",
            "prompt_truncated",
            "response_truncated",
            "margins_ignored",
        ):
            if getattr(self, name):
                parts.append(f"{name}={getattr(self, name)}")
        return ", ".join(parts)

    @property
    def skipped_examples(self) -> list[str]:
        """The skipped rows as one-line messages ``"source: reason"``."""
        return [f"{s['source']}: {s['reason']}" for s in self.skipped]

    def write_skip_report(self, path: str | Path) -> Path | None:
        """Write every skipped row (JSONL ``{"source", "reason"}``) to ``path``; nothing when none was skipped."""
        if not self.skipped:
            return None
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(s) + "\n" for s in self.skipped))
        return path

    def record_skip(self, source: str, reason: str) -> None:
        """Count a skipped row and list it (``source``: ``file:line`` or ``dataset[i]``)."""
        self.bad_rows_skipped += 1
        self.skipped.append({"source": source, "reason": reason})


def handle_bad_row(err: RowError, source: str, on_bad_row: OnBadRow, stats: LoadStats) -> None:
    """Raise ``err`` as a :class:`DataError` naming ``source`` (``on_bad_row="error"``), or count and list the skip."""
    if on_bad_row == "error":
        raise DataError(err.message(source))
    stats.record_skip(source, err.detail())


# ----------------------------------------------------------------------------------------------- row parsing


def split_hh_transcript(text: str) -> tuple[str, str]:
    """Split an HH-RLHF transcript into (prompt up to and including the last ``"\\n\\nAssistant:"``, response).

    Without the marker the whole text is the response and the prompt is ``""``.
    """
    i = text.rfind(ASSISTANT_MARKER)
    if i < 0:
        return "", text
    cut = i + len(ASSISTANT_MARKER)
    return text[:cut], text[cut:]


def _common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def parse_row(
    row: Any, stats: LoadStats, tokenizer: Any = None, vocab_size: int | None = None
) -> PreferencePair | TokenizedPair | None:
    """Parse one row; ``None`` means a tie (counted). Raises ``RowError`` for a bad row. ``tokenizer`` renders
    conversational rows with its chat template; token ids must be below ``vocab_size`` (the model's) when given."""
    if not isinstance(row, dict):
        raise RowError(None, f"expected a JSON object, got {type_name(row)}")
    margin = margin_field(row)
    if chat.is_chat_row(row):
        pair = PreferencePair(*chat.parse_chat_row(row, tokenizer), margin)
        if pair.chosen == pair.rejected:
            stats.ties_dropped += 1
            return None
        return pair
    if "chosen_input_ids" in row or "rejected_input_ids" in row:
        chosen_ids = ids_field(row, "chosen_input_ids", vocab_size=vocab_size)
        rejected_ids = ids_field(row, "rejected_input_ids", vocab_size=vocab_size)
        if "prompt_input_ids" in row:
            prompt_ids = ids_field(row, "prompt_input_ids", allow_empty=True, vocab_size=vocab_size)
        else:
            if chosen_ids == rejected_ids:
                stats.ties_dropped += 1
                return None
            # Cap the prefix so that each response keeps at least one token (the pooled one).
            n = min(_common_prefix_len(chosen_ids, rejected_ids), len(chosen_ids) - 1, len(rejected_ids) - 1)
            prompt_ids, chosen_ids, rejected_ids = chosen_ids[:n], chosen_ids[n:], rejected_ids[n:]
        if chosen_ids == rejected_ids:
            stats.ties_dropped += 1
            return None
        return TokenizedPair(prompt_ids, chosen_ids, rejected_ids, margin, "")
    if "prompt" in row:
        prompt = text_field(row, "prompt", allow_empty=True)
        chosen, rejected = text_field(row, "chosen"), text_field(row, "rejected")
    else:
        chosen_full, rejected_full = text_field(row, "chosen"), text_field(row, "rejected")
        if chosen_full == rejected_full:
            stats.ties_dropped += 1
            return None
        c_prompt, chosen = split_hh_transcript(chosen_full)
        r_prompt, rejected = split_hh_transcript(rejected_full)
        if c_prompt and c_prompt == r_prompt:
            prompt = c_prompt
            for key, resp in (("chosen", chosen), ("rejected", rejected)):
                if not resp.strip():
                    raise RowError(key, f"empty response after the last {ASSISTANT_MARKER!r}")
        else:
            # Different (or missing) prompts: no shared prefix exists, so each transcript is its own sequence.
            stats.unshared_prompt += 1
            prompt, chosen, rejected = "", chosen_full, rejected_full
    if chosen == rejected:
        stats.ties_dropped += 1
        return None
    return PreferencePair(prompt, chosen, rejected, margin)


def load_items(
    source: Any,
    on_bad_row: OnBadRow,
    stats: LoadStats,
    margins: MarginPolicy = "keep",
    tokenizer: Any = None,
    vocab_size: int | None = None,
) -> list[PreferencePair | TokenizedPair]:
    """Load every row of every group in input order, as text pairs or (for token-id rows) tokenized pairs."""
    check_on_bad_row(on_bad_row)
    if margins not in ("keep", "require", "ignore"):
        raise ValueError(f"margins must be 'keep', 'require' or 'ignore', got {margins!r}")
    items: list[PreferencePair | TokenizedPair] = []
    for group, rows in iter_groups(source):
        before, skipped_before = len(items), stats.bad_rows_skipped
        for src, row in rows:
            stats.rows += 1
            try:
                if isinstance(row, RowError):
                    raise row
                item = parse_row(row, stats, tokenizer, vocab_size)
                if item is not None and margins == "require" and item.margin is None:
                    raise RowError("margin", "missing (loss='margin' needs a margin on every row)")
            except RowError as e:
                handle_bad_row(e, src, on_bad_row, stats)
                continue
            if item is not None:
                item.source = src
                if margins == "ignore" and item.margin is not None:
                    item.margin = None
                    stats.margins_ignored += 1
                items.append(item)
        if len(items) == before:
            skipped = stats.bad_rows_skipped - skipped_before
            detail = f" ({skipped} bad rows skipped)" if skipped else ""
            raise DataError(f"{group}: no pairs left after loading{detail}")
    stats.pairs += len(items)
    return items


def load_pairs(
    source: Any,
    *,
    on_bad_row: OnBadRow = "error",
    stats: LoadStats | None = None,
    margins: MarginPolicy = "keep",
    tokenizer: Any = None,
) -> tuple[list[PreferencePair], LoadStats]:
    """Load text preference pairs.

    Args:
        source: a path (``.jsonl``, ``.jsonl.gz``, ``.json``, ``.json.gz``), a list of paths, a
            ``datasets.Dataset``, or a list of dict rows.
        on_bad_row: ``"error"`` raises :class:`DataError` at the first bad row; ``"skip"`` skips and counts it.
        stats: counts are added to this object when given (e.g. to accumulate over several calls).
        margins: ``"keep"`` (as given), ``"require"`` (a row without a margin is a bad row: what training with
            loss='margin' uses), ``"ignore"`` (margins are dropped and counted: what other losses and eval use).
        tokenizer: renders conversational rows (message lists) with its chat template; needed only for those.

    Returns:
        The pairs in input order (ties dropped) and the stats.

    Raises:
        DataError: a bad row (in error mode), an unreadable file, a group with no pairs left, or token-id rows
            (use :func:`load_tokenized` for those).
    """
    stats = stats if stats is not None else LoadStats()
    items = load_items(source, on_bad_row, stats, margins, tokenizer)
    for item in items:
        if isinstance(item, TokenizedPair):
            raise DataError(f"{item.source}: row holds token ids; use load_tokenized() for pre-tokenized data")
    return items, stats  # type: ignore[return-value]


# --------------------------------------------------------------------------------------- best-of-N prompts


def parse_prompt_row(row: Any) -> tuple[str, list[str]]:
    if not isinstance(row, dict):
        raise RowError(None, f"expected a JSON object, got {type_name(row)}")
    prompt = text_field(row, "prompt", allow_empty=True)
    if "responses" not in row:
        raise RowError("responses", "missing")
    responses = row["responses"]
    if not isinstance(responses, (list, tuple)) or not responses:
        got = "an empty list" if isinstance(responses, (list, tuple)) else type_name(responses)
        raise RowError("responses", f"expected a non-empty list of strings, got {got}")
    for i, r in enumerate(responses):
        if not isinstance(r, str) or not r.strip():
            got = ("an empty string" if not r else "only whitespace") if isinstance(r, str) else type_name(r)
            raise RowError(f"responses[{i}]", f"expected a non-empty string, got {got}")
    return prompt, list(responses)


def read_prompt_responses(source: Any, *, on_bad_row: OnBadRow = "error", errors: list | None = None) -> list[dict]:
    """Read best-of-N input rows ``{"prompt": str, "responses": [str, ...]}`` in input order.

    ``source`` is anything :func:`load_pairs` accepts. Each returned dict holds ``prompt``, ``responses`` and
    ``source``. Bad rows raise :class:`DataError`, or with ``on_bad_row="skip"`` are appended to ``errors`` as
    ``{"source": ..., "reason": ...}``. A source with no valid rows is a :class:`DataError`.
    """
    check_on_bad_row(on_bad_row)
    out: list[dict] = []
    for group, rows in iter_groups(source):
        before = len(out)
        for src, row in rows:
            try:
                if isinstance(row, RowError):
                    raise row
                prompt, responses = parse_prompt_row(row)
            except RowError as e:
                if on_bad_row == "error":
                    raise DataError(e.message(src)) from None
                if errors is not None:
                    errors.append({"source": src, "reason": e.detail()})
                continue
            out.append({"prompt": prompt, "responses": responses, "source": src})
        if len(out) == before:
            raise DataError(f"{group}: no valid prompt rows")
    return out
