"""Benchmark inputs for ``fastrm bench``: which files, which format, validated records, prompt rendering, token ids.

Three record formats; a file's format is that of its first record (a record of another format is a bad record):

* ``rm-bench``: ``{"prompt", "chosen": [K str], "rejected": [K str]}`` (RM-Bench: K = 3 styles, concise / detailed
  plain / detailed markdown). The 2K responses of a prompt are one scoring group, in the order chosen then rejected.
* ``pairs``: every pair format ``fastrm train`` reads (:mod:`fastrm.data`): HH-RLHF transcripts,
  ``prompt``/``chosen``/``rejected`` strings, or token ids. Exact ties are dropped and counted, as in ``fastrm eval``.
* ``best-of-n``: ``{"prompt", "responses": [N str], "best": index}`` or ``{..., "scores": [N numbers]}``; the
  labelled best is the argmax of the given scores, and when several given scores share the maximum, each of them
  counts as a correct pick (the record's ``label_tie`` says so and the report counts them).
* ``rewardbench`` (RewardBench, allenai/reward-bench): ``{"prompt", "chosen", "rejected", "subset"}`` with string
  responses; the prompt a string or a message list (its prior preference sets), or ``chosen``/``rejected`` as
  message lists whose last message is the assistant reply. A pair whose two scores tie counts as wrong and
  identical texts are kept, as RewardBench scores them. A file without ``subset`` is one subset named after it.
* ``rewardbench-2``: ``{"prompt", "chosen": [str], "rejected": [str], "num_correct", "subset", "id"}`` (RewardBench
  2: best-of-4, and the Ties subset with several correct answers and ``id`` ``"ref:N"`` / ``"tied:N"``).

Metrics: :mod:`fastrm.bench_report` (RM-Bench) and :mod:`fastrm.bench_rewardbench` (RewardBench 1 and 2).

Every bad record is a :class:`~fastrm.data.DataError` naming ``file:line`` (JSONL) or ``file[i]`` (JSON) and the field,
or with ``on_bad_row="skip"`` a counted skip listed in the report.

Prompt rendering, ``--rendering default`` (:func:`render_prompt`): with a chat template, the prompt is the user
turn rendered with ``add_generation_prompt=True`` (an HH transcript becomes its user/assistant turns) and the response
is the assistant continuation; without one (the default, as training and ``fastrm eval`` read pair files) it is the
plain ``prompt + response`` text of training. The texts become ids by the model's scoring rule
(:mod:`fastrm.formatting`): for a fastrm checkpoint prompt and responses are tokenized separately and the EOS is
appended to each response, exactly as in training, so the prompt / response split of the tokens is the same in the
shared-prompt and the one-at-a-time layouts; a checkpoint without a record is scored as stock transformers scores it.
A benchmark's own rendering (``--rendering rm-bench``) is a separate step: :mod:`fastrm.bench_render`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastrm import chat
from fastrm.data import ASSISTANT_MARKER, LoadStats, PreferencePair, parse_prompt_row, parse_row, split_hh_transcript
from fastrm.formatting import ScoringRule, encode_groups, truncate_group
from fastrm.rows import DataError, OnBadRow, RowError, check_on_bad_row, iter_file, text_field, type_name

RM_BENCH = "rm-bench"
REWARDBENCH, REWARDBENCH_2 = "rewardbench", "rewardbench-2"
RM_BENCH_DOMAINS = ("chat", "code", "math", "safety-refuse", "safety-response")  # upstream data/*_filtered.json
DATA_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz")


@dataclass
class BenchRecord:
    """One scoring group: a prompt and its responses, with the label its format needs."""

    source: str  # "file:line" or "file[i]"
    prompt: str  # text (an HH transcript prompt is rendered as its turns under a chat template); "" for messages
    responses: list[str] | list[list[int]]  # texts, or token ids when prompt_ids is set (pre-tokenized pair rows)
    label: dict[str, Any] = field(default_factory=dict)  # format labels; "messages": a message-list prompt
    prompt_ids: list[int] | None = None


@dataclass
class BenchFile:
    """A validated benchmark file: its records, and what was read, skipped or cut."""

    path: str
    format: str  # "rm-bench" | "pairs" | "best-of-n" | "rewardbench" | "rewardbench-2"
    name: str  # section name: the RM-Bench domain or the file name without suffix
    benchmark: str | None  # "rm-bench" when named by the benchmark, else None
    bytes: int
    rows: int = 0  # records read (blank JSONL lines are not records)
    records: list[BenchRecord] = field(default_factory=list)
    stats: LoadStats = field(default_factory=LoadStats)
    k: int | None = None  # rm-bench: responses per side (styles)
    render_stats: dict = field(default_factory=dict)  # what a benchmark's own rendering counted (bench_render)

    @property
    def skipped(self) -> list[str]:
        """Every skipped record as ``"source: reason"`` (kept once, in ``stats``)."""
        return self.stats.skipped_examples

    def bad_record(self, source: str, reason: str, on_bad_row: OnBadRow) -> None:
        """A record that cannot be scored: a DataError naming it, or (skip mode) counted and listed."""
        if on_bad_row == "error":
            raise DataError(f"{source}: {reason}")
        self.stats.record_skip(source, reason)


# ------------------------------------------------------------------------------------------------ inputs


def find_rm_bench_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The RM-Bench data folder: ``explicit``, else ``$FASTRM_RM_BENCH_DIR``, else ``../shared/data/rm-bench`` from
    the working directory or from this repository's root (the layout of the fastrm workspace)."""
    if explicit is not None:
        tried = [Path(explicit)]
    else:
        env = os.environ.get("FASTRM_RM_BENCH_DIR")
        repo = Path(__file__).resolve().parents[1]
        tried = ([Path(env)] if env else []) + [
            Path("..", "shared", "data", "rm-bench"),
            repo.parent / "shared" / "data" / "rm-bench",
        ]
    for d in tried:
        if d.is_dir() and rm_bench_files(d):
            return d.resolve()  # the report names the files it read unambiguously
    raise DataError(
        f"RM-Bench data not found (looked in {', '.join(map(str, tried))}): pass --rm-bench-dir, a folder with "
        "RM-Bench's <domain>_filtered.json(.gz) files"
    )


def rm_bench_files(folder: Path, domains: list[str] | None = None, *, strict: bool = True) -> list[Path]:
    """The ``<domain>_filtered.json[.gz]`` files of an RM-Bench folder, in RM-Bench's domain order; a domain named
    in ``domains`` without a file is an error when ``strict``."""
    out = []
    for d in domains or RM_BENCH_DOMAINS:
        hits = [folder / f"{d}_filtered{s}" for s in (".json", ".json.gz", ".jsonl", ".jsonl.gz")]
        hit = next((h for h in hits if h.is_file()), None)
        if hit is not None:
            out.append(hit)
        elif domains and strict:
            raise DataError(f"{folder}: no RM-Bench file for domain {d!r} ({d}_filtered.json or .json.gz)")
    return out


def missing_rm_bench_domains(folder: Path) -> list[str]:
    """RM-Bench domains with no file in ``folder`` (the shared data has no math file)."""
    return [d for d in RM_BENCH_DOMAINS if not rm_bench_files(folder, [d], strict=False)]


def expand_inputs(names: list[str], rm_bench_dir: str | os.PathLike | None = None) -> list[tuple[Path, str | None]]:
    """Command-line inputs -> ``(file, benchmark)`` in order. ``rm-bench`` (or ``rm-bench:chat,code``) is the RM-Bench
    domain files; a folder is its data files (not recursive); anything else must be a data file."""
    out: list[tuple[Path, str | None]] = []
    for name in names:
        if name == RM_BENCH or name.startswith(RM_BENCH + ":"):
            domains = [d for d in name.partition(":")[2].split(",") if d] or None
            unknown = [d for d in domains or [] if d not in RM_BENCH_DOMAINS]
            if unknown:
                raise DataError(f"{name}: unknown RM-Bench domain(s) {unknown}; known: {', '.join(RM_BENCH_DOMAINS)}")
            out.extend((f, RM_BENCH) for f in rm_bench_files(find_rm_bench_dir(rm_bench_dir), domains))
        elif Path(name).is_dir():
            files = sorted(p for p in Path(name).iterdir() if p.is_file() and p.name.lower().endswith(DATA_SUFFIXES))
            if not files:
                raise DataError(f"{name}: the folder holds no .jsonl / .json (.gz) files")
            out.extend((f, None) for f in files)
        elif Path(name).is_file():
            out.append((Path(name), None))
        else:
            raise DataError(f"{name}: no such file or folder (and not a benchmark name; known: {RM_BENCH})")
    return out


def section_name(path: Path, benchmark: str | None) -> str:
    """'chat' for RM-Bench's chat_filtered.json.gz, else the file name without its data suffix."""
    name = path.name
    for s in sorted(DATA_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(s):
            name = name[: -len(s)]
            break
    return name.removesuffix("_filtered") if benchmark == RM_BENCH else name


# ------------------------------------------------------------------------------------------------ records


ACCEPTED_SHAPES = (
    'pairs: {"prompt", "chosen", "rejected"} strings, {"chosen", "rejected"} HH-RLHF transcripts, '
    '{"chosen": [messages], "rejected": [messages]} (optional "prompt": [messages]) or token ids '
    '{"chosen_input_ids", "rejected_input_ids"} (optional "prompt_input_ids")',
    'RewardBench: {"prompt", "chosen", "rejected", "subset"} (prompt a string or a message list)',
    'RewardBench 2: {"prompt", "chosen": [str], "rejected": [str], "num_correct", "subset"}',
    'RM-Bench: {"prompt", "chosen": [K str], "rejected": [K str]}',
    'best-of-N: {"prompt", "responses": [str], "best": index} or {..., "scores": [numbers]}',
)


def detect_format(row: Any) -> str:
    """The format of one record, or a ``RowError`` listing every accepted shape."""
    if not isinstance(row, dict):
        raise RowError(None, f"expected a JSON object, got {type_name(row)}")
    if "responses" in row:
        return "best-of-n"
    chosen = row.get("chosen")
    if isinstance(chosen, list) and not (chosen and isinstance(chosen[0], dict)):  # not a list of chat messages
        rb2 = any(k in row for k in ("num_correct", "num_rejected", "total_completions"))
        return REWARDBENCH_2 if rb2 else RM_BENCH
    ids = any(k in row for k in ("chosen_input_ids", "rejected_input_ids"))
    message_prompt = isinstance(row.get("prompt"), list) and not isinstance(chosen, list)
    if not ids and "chosen" in row and ("subset" in row or message_prompt):
        return REWARDBENCH
    if ids or any(k in row for k in ("chosen", "rejected")):
        return "pairs"
    keys = sorted(map(str, row))
    shown = ", ".join(keys[:30]) + (f", ... ({len(keys) - 30} more)" if len(keys) > 30 else "") or "none"
    raise RowError(None, f"unknown format (keys: {shown}); accepted record shapes: " + "; ".join(ACCEPTED_SHAPES))


def _string_list(row: dict, key: str) -> list[str]:
    if key not in row:
        raise RowError(key, "missing")
    value = row[key]
    if not isinstance(value, list) or not value:
        got = "an empty list" if isinstance(value, list) else type_name(value)
        raise RowError(key, f"expected a non-empty list of strings (at least one response), got {got}")
    for i, r in enumerate(value):
        if not isinstance(r, str) or not r:
            raise RowError(f"{key}[{i}]", f"expected a non-empty string, got {_got(r)}")
    return value


def _got(value: Any) -> str:
    return "an empty string" if value == "" else type_name(value)


def _parse_rm_bench(row: dict, k: int | None) -> BenchRecord:
    prompt = text_field(row, "prompt", allow_empty=True)
    chosen, rejected = _string_list(row, "chosen"), _string_list(row, "rejected")
    if len(chosen) != len(rejected):
        raise RowError("rejected", f"mismatched lengths: {len(chosen)} chosen but {len(rejected)} rejected responses")
    if k is not None and len(chosen) != k:
        raise RowError("chosen", f"expected {k} responses per side like the file's first record, got {len(chosen)}")
    subset, domain = row.get("subset"), row.get("domain")  # RM-Bench's total_dataset.json names each record's domain
    label = {"k": len(chosen), "id": row.get("id"), "subset": subset if isinstance(subset, str) else None}
    label["domain"] = domain if isinstance(domain, str) and domain else None
    return BenchRecord("", prompt, chosen + rejected, label)


def _parse_best_of_n(row: dict) -> BenchRecord:
    prompt, responses = parse_prompt_row(row)
    n = len(responses)
    best, scores = row.get("best"), row.get("scores")
    if best is None and scores is None:
        raise RowError("best", "missing: give 'best' (index of the best response) or 'scores' (one per response)")
    label_tie = False
    if scores is not None:
        if not isinstance(scores, list):
            raise RowError("scores", f"expected a list of numbers, got {type_name(scores)}")
        if len(scores) != n:
            raise RowError("scores", f"mismatched lengths: {len(scores)} scores for {n} responses")
        for i, s in enumerate(scores):
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
                raise RowError(f"scores[{i}]", f"expected a finite number, got {s!r}")
        top = max(scores)
        best_set = [i for i, s in enumerate(scores) if s == top]
        label_tie = len(best_set) > 1
    if best is not None:
        if isinstance(best, bool) or not isinstance(best, int) or not 0 <= best < n:
            raise RowError("best", f"expected an index in [0, {n}), got {best!r}")
        if scores is not None and best not in best_set:
            raise RowError("best", f"response {best} does not have the highest of the given scores")
        best_set = [best]
    return BenchRecord("", prompt, responses, {"best": best_set, "label_tie": label_tie})


def _subset(row: dict, default: str) -> str:
    """The record's ``subset``, or ``default`` (the file's name) when the file has no subset column."""
    if "subset" not in row or row["subset"] is None:
        return default
    value = row["subset"]
    if not isinstance(value, str) or not value.strip():
        raise RowError("subset", f"expected a non-empty string (the RewardBench subset), got {_got(value)}")
    return value


def _record_id(row: dict) -> Any:
    value = row.get("id")
    return value if isinstance(value, (str, int)) and not isinstance(value, bool) else None


def _parse_rewardbench(row: dict, default_subset: str) -> BenchRecord:
    """RewardBench: a string (or message-list) prompt and two string replies, or TRL-style message-list replies."""
    messages = None
    if isinstance(row.get("chosen"), list) or isinstance(row.get("rejected"), list):
        full_c, full_r = chat.conversations(row)  # validates the messages; prompt (if any) prepended
        k = chat.split_at_last_assistant(full_c, full_r)
        for key, conv in (("chosen", full_c), ("rejected", full_r)):
            if len(conv) != k + 1:
                raise RowError(key, "messages after the last assistant turn: the reply to score must be the last one")
        chosen, rejected = text_field(full_c[k], "content"), text_field(full_r[k], "content")
        messages, prompt = full_c[:k], ""
    elif isinstance(row.get("prompt"), list):
        messages, prompt = chat.check_messages(row["prompt"], "prompt"), ""
        chosen, rejected = text_field(row, "chosen"), text_field(row, "rejected")
    else:
        prompt = text_field(row, "prompt", allow_empty=True)
        chosen, rejected = text_field(row, "chosen"), text_field(row, "rejected")
    if messages is not None and not messages:
        raise RowError("prompt", "no prompt messages before the assistant reply")
    label = {"subset": _subset(row, default_subset), "id": _record_id(row), "messages": messages}
    return BenchRecord("", prompt, [chosen, rejected], label)


def _parse_rewardbench_2(row: dict, default_subset: str) -> BenchRecord:
    """RewardBench 2: the correct answers first (``chosen``), then the rejected ones; ``num_correct`` of them."""
    if isinstance(row.get("prompt"), list):
        messages, prompt = chat.check_messages(row["prompt"], "prompt"), ""
    else:
        messages, prompt = None, text_field(row, "prompt", allow_empty=True)
    chosen, rejected = _string_list(row, "chosen"), _string_list(row, "rejected")
    n = len(chosen) + len(rejected)
    num_correct = row.get("num_correct", len(chosen))
    if isinstance(num_correct, bool) or not isinstance(num_correct, int) or not 1 <= num_correct < n:
        raise RowError("num_correct", f"expected an integer in [1, {n}) (the first num_correct answers are correct)")
    subset = _subset(row, default_subset)
    rid = _record_id(row)
    if subset.lower() == "ties" and not (isinstance(rid, str) and re.fullmatch(r"(ref|tied):\d+", rid)):
        raise RowError("id", f"the Ties subset needs an id 'ref:N' or 'tied:N' (its scoring pairs them), got {rid!r}")
    label = {"subset": subset, "id": rid, "num_correct": num_correct, "messages": messages}
    return BenchRecord("", prompt, chosen + rejected, label)


def hh_messages(prompt: str) -> list[dict[str, str]] | None:
    """An HH-RLHF prompt (``"\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nHuman: ...\\n\\nAssistant:"``) as chat turns, or
    None if it is not one (so a chat template renders the turns instead of one user message holding the transcript).
    """
    if not (prompt.startswith("\n\nHuman:") and prompt.endswith(ASSISTANT_MARKER)):
        return None
    parts = re.split(r"\n\n(Human|Assistant):", prompt[: -len(ASSISTANT_MARKER)])
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[r], "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2])]


def _parse_pair(row: dict, stats: LoadStats) -> BenchRecord | None:
    item = parse_row(row, stats)  # the training parser: same formats, same errors, ties counted
    if item is None:
        return None
    if not isinstance(item, PreferencePair):  # token ids: scored verbatim (no template, no EOS), as load_tokenized
        return BenchRecord("", "", [item.chosen_ids, item.rejected_ids], {}, prompt_ids=item.prompt_ids)
    if item.prompt or "prompt" in row:
        return BenchRecord("", item.prompt, [item.chosen, item.rejected])
    # HH transcripts with different prompts: two separate full sequences (an empty shared prompt), as in training;
    # each transcript's own prompt part is rendered into its response text.
    return BenchRecord("", "", [item.chosen, item.rejected], {"transcripts": True})


def read_bench_file(
    path: str | os.PathLike, *, benchmark: str | None = None, on_bad_row: OnBadRow = "error", limit: int | None = None
) -> BenchFile:
    """Read and validate one benchmark file (at most ``limit`` records, for quick runs)."""
    check_on_bad_row(on_bad_row)
    path = Path(path)
    if not path.name.lower().endswith(DATA_SUFFIXES):
        raise DataError(f"{path}: unknown file type (expected .jsonl, .jsonl.gz, .json or .json.gz)")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    # A file named as RM-Bench must hold RM-Bench records; any other file takes the format of its first record.
    bf = BenchFile(str(path), benchmark or "", section_name(path, benchmark), benchmark, path.stat().st_size)
    for src, row in iter_file(path):
        if limit is not None and bf.rows >= limit:
            break
        bf.rows += 1
        try:
            if isinstance(row, RowError):
                raise row
            fmt = detect_format(row)
            if not bf.format:
                bf.format = fmt
            elif fmt != bf.format:
                raise RowError(None, f"this record is {fmt}, the file is {bf.format} (the format of its first record)")
            if fmt == RM_BENCH:
                rec = _parse_rm_bench(row, bf.k)
                bf.k = rec.label["k"]
            elif fmt == "best-of-n":
                rec = _parse_best_of_n(row)
            elif fmt == REWARDBENCH:
                rec = _parse_rewardbench(row, bf.name)
            elif fmt == REWARDBENCH_2:
                rec = _parse_rewardbench_2(row, bf.name)
            else:
                rec = _parse_pair(row, bf.stats)
        except RowError as e:
            bf.bad_record(src, e.detail(), on_bad_row)
            continue
        if rec is not None:
            rec.source = src
            bf.records.append(rec)
    if not bf.records:
        skipped = f" ({bf.stats.bad_rows_skipped} bad records skipped)" if bf.stats.bad_rows_skipped else ""
        raise DataError(f"{path}: no records to score{skipped}")
    bf.stats.rows, bf.stats.pairs = bf.rows, len(bf.records) if bf.format == "pairs" else 0
    return bf


# ------------------------------------------------------------------------------------------------ prompts and ids


def resolve_chat_template(tokenizer: Any, chat_template: str | None) -> tuple[str | None, str]:
    """(template text or None, what the report says). ``chat_template``: "none" (plain prompt + response, as
    training and ``fastrm eval`` tokenize pair files: the default), "auto" (the tokenizer's, if it has one), or a
    path to a Jinja template file."""
    choice = "none" if chat_template is None else chat_template
    if choice == "none":
        return None, "plain prompt + response text, as in training and fastrm eval (--chat-template none)"
    if choice == "auto":
        own = getattr(tokenizer, "chat_template", None)
        if own:
            return own, "chat template (the tokenizer's)"
        return None, "plain prompt + response text (the tokenizer has no chat template)"
    p = Path(choice)
    if not p.is_file():
        raise ValueError(f"--chat-template {choice!r}: expected auto, none or a Jinja template file")
    return p.read_text(encoding="utf-8"), f"chat template (file {p})"


def render_prompt(tokenizer: Any, template: str | None, prompt: str | list[dict]) -> str:
    """The text that precedes a response: the prompt itself without a template; with one, the user turn (an HH
    transcript's user/assistant turns, a message-list prompt's messages) rendered with the generation prompt, as a
    chat model sees it. A message-list prompt needs a template (as conversational rows do in training)."""
    if isinstance(prompt, list):
        if template is None:
            raise DataError(
                "message-list prompts are rendered with a chat template, and none is in use: give the tokenizer one "
                "(--chat-template FILE) or use --rendering rewardbench (FastChat's tulu template without one)"
            )
        messages = prompt
    elif template is None:
        return prompt
    else:
        messages = hh_messages(prompt) or [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)


def _texts(tokenizer: Any, template: str | None, rec: BenchRecord) -> tuple[str, list[str]]:
    """(prompt text, response texts) of a text record."""
    if rec.label.get("transcripts") and template is not None:
        # Unshared HH transcripts are full sequences with an empty shared prompt (as in training); with a template
        # each one's own prompt part is rendered in front of its response.
        out = []
        for text in rec.responses:
            p, r = split_hh_transcript(text)  # type: ignore[arg-type]
            out.append(render_prompt(tokenizer, template, p) + r)
        return "", out
    prompt = rec.label.get("messages") or rec.prompt
    return render_prompt(tokenizer, template, prompt), list(rec.responses)  # type: ignore[arg-type]


def tokenize_bench_file(
    bf: BenchFile,
    tokenizer: Any,
    template: str | None,
    *,
    rule: ScoringRule | None = None,
    max_length: int | None = None,
    append_eos: bool | None = None,
    on_bad_row: OnBadRow = "error",
) -> tuple[list[list[int]], list[list[list[int]]]]:
    """Token ids of every record of ``bf`` (records that cannot be scored are removed from ``bf.records``), by the
    model's scoring ``rule`` (:mod:`fastrm.formatting`; default training's, ``max_length`` / ``append_eos`` replace
    its values), so a pair file scores as ``fastrm eval`` scores it.

    Returns prompt_ids [G][P_g] and response_ids [G][N_g][R_gn], one group per remaining record. Counts truncated
    groups in ``bf.stats`` (``prompt_truncated``: the prompt lost tokens from its left; ``response_truncated``: a
    response alone exceeded ``max_length`` and kept its last tokens) and, for pairs, ties after truncation.
    """
    rule = rule if rule is not None else ScoringRule()
    changes = {k: v for k, v in (("max_length", max_length), ("append_eos", append_eos)) if v is not None}
    rule = dataclasses.replace(rule, **changes)
    max_length = rule.max_length
    texts = [_texts(tokenizer, template, r) if r.prompt_ids is None else None for r in bf.records]
    todo = [t for t in texts if t is not None]
    if rule.rule == "hf":  # stock transformers' rule: each prompt + response one text, cut after its pooled token
        p_ids, r_ids = [], []
        for t in todo:
            try:  # not truncated yet: the group's cut is counted below, by the same truncate_group
                (enc,) = encode_groups(dataclasses.replace(rule, max_length=1 << 62), tokenizer, [t[0]], [t[1]])
            except ValueError:
                enc = None
            p_ids.append(enc.prompt if enc else [])
            r_ids.extend(enc.responses if enc else [[] for _ in t[1]])
    else:
        p_ids = _ids(tokenizer, [t[0] for t in todo])
        r_ids = _ids(tokenizer, [r for t in todo for r in t[1]])
    eos = getattr(tokenizer, "eos_token_id", None) if rule.append_eos and rule.rule == "fastrm" else None
    prompts, responses, kept = [], [], []
    pi = ri = 0
    for rec, t in zip(bf.records, texts):
        if t is None:
            p, rs = list(rec.prompt_ids or []), [list(x) for x in rec.responses]  # type: ignore[arg-type]
        else:
            p, rs = p_ids[pi], [r_ids[ri + j] + ([eos] if eos is not None else []) for j in range(len(t[1]))]
            pi, ri = pi + 1, ri + len(t[1])
        empty = next((j for j, r in enumerate(rs) if not r), None)
        if empty is not None:
            reason = f"response {empty} tokenizes to zero tokens (and the tokenizer has no EOS to append)"
            bf.bad_record(rec.source, reason, on_bad_row)
            continue
        new_p, new_rs = truncate_group(p, rs, max_length)
        bf.stats.response_truncated += max(len(r) for r in rs) > max_length
        bf.stats.prompt_truncated += len(new_p) < len(p)
        if bf.format == "pairs" and new_rs[0] == new_rs[1]:  # identical after truncation: a tie, dropped as in eval
            bf.stats.ties_dropped += 1
            continue
        prompts.append(new_p)
        responses.append(new_rs)
        kept.append(rec)
    bf.records = kept
    if bf.format == "pairs":
        bf.stats.pairs = len(kept)
    if not kept:
        raise DataError(f"{bf.path}: no records left to score after tokenization")
    return prompts, responses


def _ids(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    return [list(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []


def read_inputs(
    names: list[str], *, rm_bench_dir=None, on_bad_row: OnBadRow = "error", limit: int | None = None
) -> list[BenchFile]:
    """Validated :class:`BenchFile` per input file (a file named twice is read once)."""
    seen, files = set(), []
    for path, bench in expand_inputs(names, rm_bench_dir):
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            files.append(read_bench_file(path, benchmark=bench, on_bad_row=on_bad_row, limit=limit))
    return files
