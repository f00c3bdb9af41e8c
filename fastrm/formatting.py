"""How a (prompt, response) becomes token ids for one model: the scoring rule, saved with every checkpoint.

A reward is a function of token ids, so every way of scoring (training's eval, ``fastrm eval``, ``score``, ``serve``,
``bench``, ``bon-eval``, Ray best-of-N, ``fastrm.score``) must turn texts into ids the way the model was trained.
This module owns that: a :class:`ScoringRule`, written as ``fastrm_scoring.json`` beside every checkpoint fastrm
writes (:func:`write_rule`, called by ``RewardModel.save_pretrained``, so the final model, ``checkpoint-N``, the TRL
drop-in's save and Ray Train checkpoints all carry it), read back by the loader (:func:`read_rule`) and applied by
:func:`encode_groups`. Two rules:

* ``fastrm`` (training's rule): prompt and response tokenized separately with no special tokens, the tokenizer's
  EOS appended to each response (``append_eos``), and the last token (that EOS) pooled. Over-long sequences lose
  prompt tokens from the left (:func:`fastrm.tokenization.truncate_group`).
* ``hf`` (stock transformers' ``*ForSequenceClassification``): the text ``prompt + response`` tokenized by the
  tokenizer's default call (its BOS where it adds one), nothing appended, and the pooled token is the last one that
  is not ``config.pad_token_id`` (with pad == eos: the token before a trailing EOS run). fastrm drops the tokens
  after the pooled one (causal attention: they cannot change its reward) and scores the last token left, which is
  exactly the reward stock transformers gives. A group's responses share the longest common run of leading ids.

A checkpoint without a record (another library's reward model) is scored by ``hf`` unless asked otherwise
(``--scoring-rule fastrm``); an explicit flag that disagrees with a record is honoured with a one-line warning.
Other savers (LoRA adapters, the seq2seq objective) call :func:`write_rule` / :func:`read_rule` on their folders.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

RULE_FILE = "fastrm_scoring.json"
RULE_FORMAT = "fastrm-scoring"
RULE_VERSION = 1
RULE_CHOICES = ("auto", "fastrm", "hf")
RuleName = Literal["fastrm", "hf"]
DEFAULT_MAX_LENGTH = 2048  # training's default (RewardConfig.max_length)


class ScoringRuleWarning(UserWarning):
    """An explicit setting that disagrees with the checkpoint's scoring record (it is honoured)."""


@dataclass(frozen=True)
class ScoringRule:
    """How texts become the token ids a reward is read from (see the module docstring).

    Fields (all saved): ``rule`` "fastrm" | "hf"; ``append_eos`` (fastrm: the EOS id appended to every response;
    hf: the EOS text appended to the joined text unless it ends with it, as the TRL drop-in trains);
    ``add_special_tokens`` (hf: the tokenizer's default call, BOS included where it adds one; fastrm: false);
    ``max_length`` tokens of one prompt + response and ``truncation_side`` "left" (the prompt loses tokens from its
    left, the pooled end is kept); ``prompt_format`` "plain" (prompt + response text as given; conversational rows
    are rendered with the tokenizer's chat template, whose sha256 is ``chat_template_sha256``); ``pool`` "last"
    (fastrm) | "last_non_pad" (hf, skipping trailing ``pad_token_id``); ``eos_token_id`` the EOS id appended.
    ``origin`` (not saved) says where the rule came from: "record", "trainer", "stock", "default" or "flag".
    """

    rule: RuleName = "fastrm"
    append_eos: bool = True
    add_special_tokens: bool = False
    max_length: int = DEFAULT_MAX_LENGTH
    truncation_side: Literal["left"] = "left"
    prompt_format: Literal["plain"] = "plain"
    pool: Literal["last", "last_non_pad"] = "last"
    pad_token_id: int | None = None
    eos_token_id: int | None = None
    chat_template_sha256: str | None = None
    origin: str = field(default="default", compare=False)

    def __post_init__(self) -> None:
        if self.rule not in ("fastrm", "hf"):
            raise ValueError(f"scoring rule must be 'fastrm' or 'hf', got {self.rule!r}")
        if not isinstance(self.max_length, int) or self.max_length < 1:
            raise ValueError(f"max_length must be an integer >= 1, got {self.max_length!r}")
        if self.truncation_side != "left":
            raise ValueError(f"truncation_side {self.truncation_side!r}: only 'left' (prompt cut first) is supported")
        if self.prompt_format != "plain":
            raise ValueError(f"prompt_format {self.prompt_format!r}: only 'plain' is supported")
        want = "last" if self.rule == "fastrm" else "last_non_pad"
        if self.pool != want:
            raise ValueError(f"the {self.rule} rule pools {want!r}, got pool={self.pool!r}")
        if self.rule == "fastrm" and self.add_special_tokens:
            raise ValueError("the fastrm rule tokenizes prompt and response without special tokens")

    def describe(self) -> str:
        """One line for reports, /health and logs."""
        if self.rule == "fastrm":
            eos = "EOS appended and pooled" if self.append_eos else "no EOS appended, last token pooled"
            how = "prompt and response tokenized separately"
            return f"fastrm (training's rule: {how}, {eos}; max_length {self.max_length})"
        bos = "the tokenizer's default special tokens" if self.add_special_tokens else "no special tokens"
        eos = ", EOS text appended" if self.append_eos else ""
        return (
            f"hf (stock transformers: prompt + response tokenized as one text with {bos}{eos}, last token that is "
            f"not pad id {self.pad_token_id} pooled; max_length {self.max_length})"
        )

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in dataclasses.asdict(self).items() if k != "origin"}
        return {"format": RULE_FORMAT, "version": RULE_VERSION, **d}


def template_sha256(tokenizer: Any) -> str | None:
    t = getattr(tokenizer, "chat_template", None)
    return hashlib.sha256(t.encode()).hexdigest() if isinstance(t, str) and t else None


def training_rule(tokenizer: Any, *, append_eos: bool = True, max_length: int = DEFAULT_MAX_LENGTH) -> ScoringRule:
    """The rule training tokenizes with (:mod:`fastrm.tokenization`), as the trainer records it."""
    eos = getattr(tokenizer, "eos_token_id", None) if append_eos else None
    return ScoringRule(
        "fastrm",
        append_eos=append_eos,
        max_length=max_length,
        eos_token_id=eos,
        chat_template_sha256=template_sha256(tokenizer),
        origin="trainer",
    )


def trl_rule(tokenizer: Any, *, max_length: int | None = None) -> ScoringRule:
    """The TRL drop-in's rule (:mod:`fastrm.integrations.trl_data`): TRL's tokenization of ``prompt + response`` +
    EOS text with special tokens, pooled at the last token that is not the training tokenizer's pad id."""
    return ScoringRule(
        "hf",
        append_eos=True,
        add_special_tokens=True,
        max_length=max_length or DEFAULT_MAX_LENGTH,
        pool="last_non_pad",
        pad_token_id=getattr(tokenizer, "pad_token_id", None),
        eos_token_id=getattr(tokenizer, "eos_token_id", None),
        chat_template_sha256=template_sha256(tokenizer),
        origin="trainer",
    )


def stock_rule(config: Any, *, max_length: int = DEFAULT_MAX_LENGTH, origin: str = "stock") -> ScoringRule:
    """Stock transformers' rule for a model config (its text config's ``pad_token_id`` is what HF skips)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    pad = getattr(text, "pad_token_id", None)
    pad = pad[0] if isinstance(pad, list) and pad else pad
    return ScoringRule(
        "hf",
        append_eos=False,
        add_special_tokens=True,
        max_length=max_length,
        pool="last_non_pad",
        pad_token_id=pad,
        origin=origin,
    )


def truncate_group(prompt: list[int], responses: list[list[int]], max_length: int) -> tuple[list[int], list[list[int]]]:
    """Fit prompt + each response into ``max_length``, keeping response ends (where the reward is pooled): cut the
    shared prompt from its left so the longest response fits; if a response alone is longer than ``max_length``,
    drop the prompt and keep the last ``max_length`` tokens of each response. Pairs and best-of-N groups share it."""
    longest = max(len(r) for r in responses)
    if longest > max_length:
        return [], [r[-max_length:] for r in responses]
    room = max_length - longest
    # left truncation: the turns nearest the response matter most
    return (prompt[len(prompt) - room :] if len(prompt) > room else prompt), responses


# ------------------------------------------------------------------------------------------------ the record


def write_rule(folder: str | os.PathLike, rule: ScoringRule) -> Path:
    """Write ``fastrm_scoring.json`` into ``folder`` (beside a checkpoint's config.json); returns its path."""
    path = Path(folder) / RULE_FILE
    path.write_text(json.dumps(rule.to_dict(), indent=2) + "\n", encoding="utf-8")
    return path


def read_rule(folder: str | os.PathLike) -> ScoringRule | None:
    """The rule saved in ``folder``, or None when it has no ``fastrm_scoring.json``; a record fastrm cannot read is
    a ValueError naming the file and the field."""
    path = Path(folder) / RULE_FILE
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable scoring record ({e})") from None
    if not isinstance(raw, dict) or raw.get("format") != RULE_FORMAT:
        raise ValueError(f'{path}: not a fastrm scoring record (expected "format": "{RULE_FORMAT}")')
    if raw.get("version") != RULE_VERSION:
        raise ValueError(f"{path}: scoring record version {raw.get('version')!r}; this fastrm reads {RULE_VERSION}")
    names = {f.name for f in dataclasses.fields(ScoringRule)} - {"origin"}
    unknown = sorted(set(raw) - names - {"format", "version"})
    if unknown:
        raise ValueError(f"{path}: unknown field(s) {unknown} (written by a newer fastrm?)")
    try:
        return ScoringRule(**{k: v for k, v in raw.items() if k in names}, origin="record")
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None


def legacy_rule(folder: str | os.PathLike, tokenizer: Any) -> ScoringRule | None:
    """Training's rule for a fastrm run folder (or one of its ``checkpoint-N``) written before records existed: its
    ``training_config.json`` (append_eos, max_length), else None."""
    for d in (Path(folder), Path(folder).parent):
        cfg = d / "training_config.json"
        if cfg.is_file() and (d / "fastrm_run.json").is_file():
            try:
                raw = json.loads(cfg.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return None
            rule = training_rule(
                tokenizer,
                append_eos=bool(raw.get("append_eos", True)),
                max_length=int(raw.get("max_length", DEFAULT_MAX_LENGTH)),
            )
            return dataclasses.replace(rule, origin="record")
    return None


def model_rule(model: Any) -> ScoringRule | None:
    """The rule a model carries (set by the loader from the record, or by the trainer), or None."""
    return getattr(model, "scoring_rule", None)


def refuse_rule_settings(scoring_rule: Any = "auto", max_length: int | None = None, append_eos: bool | None = None):
    """A seq2seq reward model scores with its checkpoint's template and max_length (fastrm_seq2seq.json), not by a
    scoring rule: a ValueError naming whichever rule setting was given (every inference path calls this for one)."""
    given = [n for n, v in (("max_length", max_length), ("append_eos", append_eos)) if v is not None]
    given += [] if scoring_rule in ("auto", None) else ["scoring_rule"]
    if given:
        raise ValueError(
            f"{', '.join(given)} (--{given[0].replace('_', '-')}): a seq2seq reward model scores with its "
            "checkpoint's template and max_length (fastrm_seq2seq.json); scoring-rule settings are for scalar ones"
        )


def resolve_rule(
    model: Any = None,
    tokenizer: Any = None,
    choice: str | None = "auto",
    *,
    max_length: int | None = None,
    append_eos: bool | None = None,
) -> ScoringRule:
    """The rule to score with: the model's own (its checkpoint's record, training's, or stock transformers' for a
    checkpoint without a record), or the one ``choice`` names; ``max_length`` / ``append_eos`` given explicitly
    override it, with a one-line :class:`ScoringRuleWarning` when they disagree with a saved record.

    ``choice``: "auto" (the model's rule; fastrm's training defaults for a model built in this process), "fastrm"
    (the model's rule if it is one, else training's defaults), "hf" (stock transformers')."""
    choice = choice or "auto"
    if choice not in RULE_CHOICES:
        raise ValueError(f"scoring rule {choice!r}: expected one of {', '.join(RULE_CHOICES)}")
    own = model_rule(model)
    if choice == "auto":
        rule = own if own is not None else ScoringRule(eos_token_id=getattr(tokenizer, "eos_token_id", None))
    elif choice == "fastrm":
        keep = own.max_length if own is not None else DEFAULT_MAX_LENGTH
        rule = own if own is not None and own.rule == "fastrm" else ScoringRule(max_length=keep, origin="flag")
        if own is not None and own.rule != "fastrm":
            _disagree("--scoring-rule fastrm", own, "rule", "hf")
    else:
        config = getattr(getattr(model, "backbone", None), "config", None) or getattr(model, "config", None)
        if config is None:
            raise ValueError("--scoring-rule hf needs the model's config (its pad_token_id)")
        keep = own.max_length if own is not None else DEFAULT_MAX_LENGTH
        rule = own if own is not None and own.rule == "hf" else stock_rule(config, max_length=keep, origin="flag")
        if own is not None and own.rule != "hf":
            _disagree("--scoring-rule hf", own, "rule", "fastrm")
    if max_length is not None and max_length != rule.max_length:
        _disagree(f"--max-length {max_length}", rule, "max_length", rule.max_length)
        rule = dataclasses.replace(rule, max_length=max_length)
    if append_eos is not None and append_eos != rule.append_eos:
        _disagree(f"--append-eos {str(append_eos).lower()}", rule, "append_eos", rule.append_eos)
        rule = dataclasses.replace(rule, append_eos=append_eos)
    check_tokenizer(rule, tokenizer)
    return rule


def _disagree(flag: str, rule: ScoringRule, name: str, saved: Any) -> None:
    if rule.origin == "record":
        warnings.warn(
            f"{flag} differs from the checkpoint's scoring record ({RULE_FILE}: {name}={saved!r}); using {flag}",
            ScoringRuleWarning,
            stacklevel=3,
        )


def check_tokenizer(rule: ScoringRule, tokenizer: Any) -> None:
    """A warning when the tokenizer is not the one the record was written with (another EOS id or chat template)."""
    if tokenizer is None or rule.origin != "record":
        return
    eos = getattr(tokenizer, "eos_token_id", None)
    if rule.append_eos and rule.eos_token_id is not None and eos != rule.eos_token_id:
        warnings.warn(
            f"the tokenizer's EOS id {eos} is not the {rule.eos_token_id} the model was trained to end responses with "
            f"({RULE_FILE}); scores read at the wrong token",
            ScoringRuleWarning,
            stacklevel=3,
        )
    if rule.chat_template_sha256 is not None and template_sha256(tokenizer) not in (None, rule.chat_template_sha256):
        warnings.warn(
            f"the tokenizer's chat template is not the one the model was trained with ({RULE_FILE}: "
            "chat_template_sha256); conversational rows render differently",
            ScoringRuleWarning,
            stacklevel=3,
        )


def add_rule_flags(p: Any) -> None:
    """``--scoring-rule``, ``--max-length`` and ``--append-eos`` on an argparse parser (every inference command)."""
    p.add_argument(
        "--scoring-rule",
        choices=RULE_CHOICES,
        default="auto",
        help="how texts become token ids: auto (the checkpoint's fastrm_scoring.json; stock transformers' rule for a "
        "checkpoint without one), fastrm (training's: EOS appended and pooled), hf (stock transformers': the "
        "tokenizer's default call, last non-pad token pooled) (default: auto)",
    )
    p.add_argument(
        "--max-length",
        type=int,
        default=None,
        help=f"max tokens per sequence, prompt cut from the left (default: the checkpoint's record, else "
        f"{DEFAULT_MAX_LENGTH})",
    )
    p.add_argument(
        "--append-eos",
        type=_bool,
        default=None,
        metavar="{true,false}",
        help="append the tokenizer's EOS to each response (default: the checkpoint's record)",
    )


def _bool(s: str) -> bool:
    v = s.strip().lower()
    if v not in ("true", "false", "1", "0", "yes", "no"):
        import argparse

        raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")
    return v in ("true", "1", "yes")


def rule_from_args(a: Any, model: Any, tokenizer: Any) -> ScoringRule:
    """:func:`resolve_rule` from the flags of :func:`add_rule_flags`."""
    return resolve_rule(model, tokenizer, a.scoring_rule, max_length=a.max_length, append_eos=a.append_eos)


# ------------------------------------------------------------------------------------------------ encoding


@dataclass
class Encoded:
    """One scoring group's ids: prompt [P], responses [N][R_n] (each pooled at its last id), and per response whether
    its sequence lost tokens to ``max_length``."""

    prompt: list[int]
    responses: list[list[int]]
    truncated: list[bool]


def encode_groups(
    rule: ScoringRule, tokenizer: Any, prompts: Sequence[str], responses: Sequence[Sequence[str]]
) -> list[Encoded]:
    """Token ids of every (prompt, responses) group under ``rule`` (batched tokenizer calls), truncated to
    ``rule.max_length``. A response with nothing to score is a ValueError naming ``prompt g, response j``."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} response lists")
    if rule.rule == "hf":
        return _encode_joined(rule, tokenizer, prompts, responses)
    p_ids = _ids(tokenizer, list(prompts), False)
    r_ids = _ids(tokenizer, [r for rs in responses for r in rs], False)
    eos = getattr(tokenizer, "eos_token_id", None) if rule.append_eos else None
    out, k = [], 0
    for g, rs in enumerate(responses):
        if not rs:
            raise ValueError(f"prompt {g}: no responses")
        group = []
        for j in range(len(rs)):
            ids = r_ids[k] + ([eos] if eos is not None else [])
            k += 1
            if not ids:
                raise ValueError(f"prompt {g}, response {j}: empty response (nothing to score)")
            group.append(ids)
        p, cut = truncate_group(p_ids[g], group, rule.max_length)
        lost = len(p) < len(p_ids[g])
        out.append(Encoded(p, cut, [lost or len(a) < len(b) for a, b in zip(cut, group)]))
    return out


def _encode_joined(rule: ScoringRule, tokenizer: Any, prompts, responses) -> list[Encoded]:
    eos = (getattr(tokenizer, "eos_token", None) or "") if rule.append_eos else ""
    texts = [p + r for p, rs in zip(prompts, responses) for r in rs]
    texts = [t if t.endswith(eos) else t + eos for t in texts]  # TRL's training tokenization appends the EOS text
    flat = _ids(tokenizer, texts, rule.add_special_tokens)
    out, k = [], 0
    for g, rs in enumerate(responses):
        if not rs:
            raise ValueError(f"prompt {g}: no responses")
        seqs = []
        for j in range(len(rs)):
            ids = pooled_prefix(flat[k], rule.pad_token_id)
            k += 1
            if not ids:
                raise ValueError(f"prompt {g}, response {j}: the text tokenizes to no tokens (nothing to score)")
            seqs.append(ids)
        n = min(common_prefix(seqs), min(len(s) for s in seqs) - 1)  # every response keeps its pooled token
        group = [s[n:] for s in seqs]
        p, cut = truncate_group(seqs[0][:n], group, rule.max_length)  # the one truncation rule, as for fastrm
        lost = len(p) < n
        out.append(Encoded(p, cut, [lost or len(a) < len(b) for a, b in zip(cut, group)]))
    return out


def pooled_prefix(ids: Sequence[int], pad_token_id: int | None) -> list[int]:
    """The ids up to and including the token stock transformers pools: the last one that is not ``pad_token_id``
    (the first token when all are pad, as HF's argmax gives; the last token without a pad id)."""
    ids = list(ids)
    if pad_token_id is None:
        return ids
    end = len(ids)
    while end > 0 and ids[end - 1] == pad_token_id:
        end -= 1
    return ids[: max(end, 1)]


def common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the leading run of ids shared by every sequence."""
    first, n = seqs[0], min(len(s) for s in seqs)
    i = 0
    while i < n and all(s[i] == first[i] for s in seqs):
        i += 1
    return i


def _ids(tokenizer: Any, texts: list[str], special: bool) -> list[list[int]]:
    return [list(x) for x in tokenizer(texts, add_special_tokens=special)["input_ids"]] if texts else []
