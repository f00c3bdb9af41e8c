"""Rows in: where preference rows come from and the field checks every row format shares.

The first stage of the data path. :mod:`fastrm.data` (pair formats), :mod:`fastrm.chat` (conversations),
:mod:`fastrm.bench_data` (benchmark records) and the TRL drop-in read their rows through :func:`iter_groups` /
:func:`iter_file` and check fields with :func:`text_field`, :func:`ids_field` and :func:`margin_field`. A bad field
raises :class:`RowError` (field + reason); the caller adds the row's source (``file:line``, ``dataset[i]``) and
either raises :class:`DataError` or counts a skip, as the user asked (``on_bad_row``).
"""

from __future__ import annotations

import gzip
import json
import math
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

OnBadRow = Literal["error", "skip"]


class DataError(ValueError):
    """Bad input data; the message names the file (or dataset), the line/row and the field."""


class RowError(Exception):
    """A problem with one row; the caller adds the source and decides between raising and skipping."""

    def __init__(self, field_name: str | None, reason: str):
        super().__init__(reason)
        self.field_name = field_name
        self.reason = reason

    def detail(self) -> str:
        return f"field '{self.field_name}': {self.reason}" if self.field_name else self.reason

    def message(self, source: str) -> str:
        return f"{source}: {self.detail()}"


def check_on_bad_row(on_bad_row: str) -> None:
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _decode_line(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = raw[e.start : e.start + 4]
        raise RowError(None, f"not valid UTF-8: byte {bad[:1]!r} at column {e.start + 1} ({e.reason})") from None


def _iter_lines(path: Path, lines: Iterable[bytes]) -> Iterator[tuple[str, Any]]:
    """JSON Lines rows; lines are split as bytes and decoded one by one, so an encoding error names its line."""
    for lineno, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            yield f"{path}:{lineno}", json.loads(_decode_line(raw))
        except RowError as e:
            yield f"{path}:{lineno}", e
        except json.JSONDecodeError as e:
            yield f"{path}:{lineno}", RowError(None, f"invalid JSON: {e}")


def _first_line_is_json(data: bytes) -> bool:
    """The first non-blank line is one whole JSON value: the file is JSON Lines, whatever its name says."""
    first = next((line for line in data.splitlines() if line.strip()), b"")
    try:
        json.loads(first.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False
    return True


def iter_file(path: Path) -> Iterator[tuple[str, Any]]:
    """Yield ``(source, row)``; a JSONL line that is not valid UTF-8 or not valid JSON is yielded as a
    ``RowError`` with its line number, so it can be reported or skipped like any other bad row. A ``.json`` file
    that holds JSON Lines (one value per line; the whole does not parse) is read as JSON Lines."""
    name = path.name.lower()
    if not name.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz")):
        raise DataError(f"{path}: unknown file type (expected .jsonl, .jsonl.gz, .json or .json.gz)")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        with _open_binary(path) as fh:
            if name.endswith((".jsonl", ".jsonl.gz")):
                yield from _iter_lines(path, fh)
                return
            data = fh.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read file: {e}") from e
    try:
        doc = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path}:{line}: not valid UTF-8 ({e.reason}); a .json file is read whole, so the file "
            "cannot be loaded; fix the byte or convert the file to JSONL to skip the row"
        ) from None
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and _first_line_is_json(data):
            # JSON Lines under a .json name (as some public datasets ship): read line by line, named by line.
            yield from _iter_lines(path, data.splitlines(keepends=True))
            return
        raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
    prefix = str(path)
    if isinstance(doc, dict):
        key = next((k for k in ("data", "train") if isinstance(doc.get(k), list)), None)
        if key is None:
            raise DataError(
                f"{path}: expected a JSON list of objects, an object with a 'data' or 'train' list, or JSON Lines "
                "(one object per line; a one-line file of them is this one object: name it .jsonl)"
            )
        doc, prefix = doc[key], f"{path}:{key}"
    elif not isinstance(doc, list):
        raise DataError(f"{path}: expected a JSON list of objects, got {type(doc).__name__}")
    for i, row in enumerate(doc):
        yield f"{prefix}[{i}]", row


def _is_dataset(obj: Any) -> bool:
    if not type(obj).__module__.startswith("datasets"):  # avoid importing datasets (slow) for plain inputs
        return False
    try:
        import datasets
    except ImportError:  # datasets is a dependency, but loading plain files must not need it
        return False
    if isinstance(obj, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        raise DataError(f"got a DatasetDict with splits {list(obj.keys())}; pass one split, e.g. ds['train']")
    return isinstance(obj, (datasets.Dataset, datasets.IterableDataset))


def describe_source(source: Any) -> str:
    if isinstance(source, (str, Path)):
        return str(source)
    if isinstance(source, (list, tuple)) and source and all(isinstance(s, (str, Path)) for s in source):
        return ", ".join(map(str, source))
    return "rows" if isinstance(source, (list, tuple)) else "dataset"


def iter_groups(source: Any) -> Iterator[tuple[str, Iterable[tuple[str, Any]]]]:
    """Split ``source`` into named groups of ``(source, row)``; each group must yield at least one pair."""
    if isinstance(source, (str, Path)):
        yield str(source), iter_file(Path(source))
    elif _is_dataset(source):
        yield "dataset", ((f"dataset[{i}]", row) for i, row in enumerate(source))
    elif isinstance(source, (list, tuple)):
        if source and all(isinstance(s, (str, Path)) for s in source):
            for s in source:
                yield str(s), iter_file(Path(s))
        elif all(isinstance(s, dict) for s in source):
            yield "rows", ((f"rows[{i}]", row) for i, row in enumerate(source))
        else:
            raise DataError("a source list must hold only paths or only dict rows")
    else:
        raise DataError(f"unsupported data source of type {type(source).__name__}")


def type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def is_message_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "role" in m for m in value)


def text_field(row: dict, key: str, *, allow_empty: bool = False) -> str:
    if key not in row:
        raise RowError(key, "missing")
    value = row[key]
    if is_message_list(value):
        raise RowError(
            key,
            "chat-format message list; apply the tokenizer's chat template first "
            "and pass prompt/chosen/rejected strings",
        )
    if not isinstance(value, str) or (not value.strip() and not allow_empty):
        kind = "a string" if allow_empty else "a non-empty string"
        got = ("an empty string" if not value else "only whitespace") if isinstance(value, str) else type_name(value)
        raise RowError(key, f"expected {kind}, got {got}")
    return value


def margin_field(row: dict) -> float | None:
    value = row.get("margin")
    if value is None:
        return None
    # bool is an int subclass; True as a margin is almost certainly a mislabelled column.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RowError("margin", f"expected a finite number, got {type_name(value)}")
    if not math.isfinite(value):
        raise RowError("margin", f"expected a finite number, got {value}")
    return float(value)


def ids_field(row: dict, key: str, *, allow_empty: bool = False, vocab_size: int | None = None) -> list[int]:
    if key not in row:
        raise RowError(key, "missing")
    value = row[key]
    if not isinstance(value, (list, tuple)):
        raise RowError(key, f"expected a list of token ids, got {type_name(value)}")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise RowError(key, f"expected non-negative int token ids, got {v!r} ({type_name(v)})")
    check_vocab(value, key, vocab_size)
    if not value and not allow_empty:
        raise RowError(key, "expected a non-empty list of token ids, got an empty list")
    return list(value)


def check_vocab(ids: Sequence[int], key: str, vocab_size: int | None, why: str = "") -> None:
    """A bad row when an id has no embedding row (an embedding lookup would fail, on CUDA as a device assert)."""
    if vocab_size is not None and ids and max(ids) >= vocab_size:
        raise RowError(key, f"id {max(ids)} >= vocab size {vocab_size}{why}")
