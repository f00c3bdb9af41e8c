"""RewardConfig: every training knob, documented once, grouped by what it controls.

The fields are flat (``RewardConfig(loss="threshold", learning_rate=9e-6)``), named as in TRL's ``RewardConfig`` /
transformers' ``TrainingArguments`` where those have the same knob, and sectioned by ``SECTIONS``: each field's
metadata carries its section and help text, which ``fastrm train --help`` shows as argument groups. Types are
real: ``Literal[...]`` for choices, ``bool | None`` where None means "decide from the device".

Defaults that differ from TRL's (so a TRL user is not surprised):

* ``learning_rate`` 9e-6 and ``lr_scheduler_type`` cosine with 3% warmup (the margin paper's recipe; TRL: 1e-4 linear
  for LoRA-style runs), ``num_train_epochs`` 1;
* ``pairs_per_step`` 128 replaces ``per_device_train_batch_size`` x accumulation x devices: the loss is a mean over
  the pairs of an optimizer step, however the step is split into micro-batches and ranks;
* ``max_length`` 2048 with prompts cut from the left (TRL drops over-long rows);
* ``append_eos``: the tokenizer's EOS is appended to every response and is the pooled token.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from fastrm.losses import LossKind

SECTIONS = {
    "loss": "loss (Qin et al. 2024 margins)",
    "optimization": "optimization and schedule",
    "data": "data and packing",
    "model": "model and kernels",
    "lora": "LoRA adapters (PEFT; lora_r > 0)",
    "output": "output, logging and checkpoints",
    "seq2seq": "objective and sequence-to-sequence reward models (Zhou et al. 2024; docs/seq2seq.md)",
}
# Keys a config file may hold besides the fields: what to train on (the CLI and Ray entry points read them).
INPUT_KEYS = ("data", "eval_data", "model", "tokenizer")


def _f(section: str, default: Any, help: str) -> Any:
    return field(default=default, metadata={"section": section, "help": help})


@dataclass
class RewardConfig:
    """Training arguments (see the module docstring; every field's help is in its metadata and in ``--help``)."""

    # ------------------------------------------------------------------------------------------------ loss
    loss: LossKind = _f("loss", "bt", "pairwise loss: bt, margin, batch_mean, threshold (Qin et al. 2024's method)")
    margin_scope: Literal["step", "micro"] = _f(
        "loss",
        "step",
        "what mu_B averages over: 'step' (all pairs of an optimizer step on all ranks; one extra no-grad forward "
        "when a step has several micro-batches, unless mu_keep_graphs) or 'micro' (each micro-batch alone)",
    )
    mu_keep_graphs: bool | None = _f(
        "loss",
        None,
        "step-wide mu_B without the extra no-grad forward: every micro-batch's forward runs first and keeps its graph, "
        "then mu_B, then the backwards (unset: with gradient checkpointing, or on CUDA when the step's graphs fit "
        "80 percent of free memory; single process only, DDP/FSDP keep the extra forward)",
    )
    detach_mean: bool = _f(
        "loss", True, "treat mu_B as a stop-gradient target (the paper's intent); false differentiates through it"
    )
    center_rewards_coefficient: float | None = _f("loss", None, "TRL's c in c*mean((r_c + r_r)^2); unset disables")
    # ---------------------------------------------------------------------------------------- optimization
    learning_rate: float = _f("optimization", 9e-6, "AdamW peak learning rate (paper: 9e-6)")
    weight_decay: float = _f("optimization", 0.0, "AdamW weight decay (not applied to norms and biases)")
    adam_beta1: float = _f("optimization", 0.9, "AdamW beta1")
    adam_beta2: float = _f("optimization", 0.999, "AdamW beta2")
    adam_epsilon: float = _f("optimization", 1e-8, "AdamW epsilon")
    lr_scheduler_type: Literal["cosine", "linear", "constant"] = _f(
        "optimization", "cosine", "learning-rate schedule after warmup"
    )
    warmup_ratio: float = _f("optimization", 0.03, "fraction of the steps with linear warmup")
    max_grad_norm: float = _f("optimization", 1.0, "gradient clipping norm (0 disables)")
    num_train_epochs: int = _f("optimization", 1, "epochs over the training pairs (paper: 1)")
    max_steps: int = _f("optimization", -1, "stop after this many optimizer steps (-1: the epochs decide)")
    pairs_per_step: int = _f("optimization", 128, "preference pairs per optimizer step, over all ranks (paper: 128)")
    seed: int = _f("optimization", 42, "seed for the head's initialisation, the data order and dropout")
    # ------------------------------------------------------------------------------------------------ data
    max_length: int = _f("data", 2048, "max tokens of one prompt+response sequence; prompts are cut from the left")
    max_tokens_per_batch: int = _f("data", 16384, "token budget of one packed micro-batch (per device)")
    prefetch: bool = _f(
        "data", True, "pack the next optimizer step on a background thread while this one runs (pinned on CUDA)"
    )
    prefix_sharing: bool = _f(
        "data", False, "pack each pair as [prompt | chosen | rejected] so the prompt is computed once"
    )
    append_eos: bool = _f("data", True, "append the tokenizer's EOS to each response (the pooled token is then EOS)")
    on_bad_row: Literal["error", "skip"] = _f(
        "data", "error", "bad input rows: 'error' stops naming file:line and field; 'skip' drops and reports them"
    )
    eval_fraction: float = _f("data", 0.0, "hold out this seeded fraction of the training data when no eval data")
    # ----------------------------------------------------------------------------------------------- model
    attn_backend: Literal["auto", "flash", "torch_varlen", "exact", "flex"] = _f(
        "model", "auto", "attention back end (auto: flash-attn, else torch varlen_attn on CUDA, else exact)"
    )
    fused_head: bool | None = _f(
        "model", None, "fused Triton pooling+norm+head+loss (unset: on CUDA when the final norm is supported)"
    )
    bf16: bool | None = _f("model", None, "bf16 autocast (unset: on CUDA)")
    gradient_checkpointing: bool = _f("model", False, "recompute activations in backward to save memory")
    # ------------------------------------------------------------------------------------------------ lora
    lora_r: int = _f(
        "lora", 0, "LoRA rank: train PEFT adapters of this rank and the score head, the base weights frozen (0: all)"
    )
    lora_alpha: float = _f("lora", 16.0, "LoRA alpha: the adapters' update is scaled by lora_alpha / lora_r")
    lora_dropout: float = _f("lora", 0.0, "dropout on the adapters' input in training (PEFT's lora_dropout)")
    lora_target_modules: list[str] | None = _f(
        "lora",
        None,
        "modules that get adapters, by name as PEFT matches them (q_proj,v_proj) or all-linear (unset: the "
        "attention and MLP projections of every decoder layer)",
    )
    # ---------------------------------------------------------------------------------------------- output
    output_dir: str = _f("output", "runs/fastrm", "folder for the model, checkpoints, metrics.jsonl, eval results")
    logging_steps: int = _f("output", 1, "append train metrics to metrics.jsonl every N steps")
    eval_steps: int = _f("output", 0, "evaluate every N steps (0: only at the end)")
    save_steps: int = _f("output", 0, "write a checkpoint every N steps (0: only the final model)")
    save_total_limit: int = _f("output", 2, "keep at most this many step checkpoints (0: keep all)")
    save_final: bool = _f("output", True, "save the final model to output_dir")
    merge_lora: bool = _f(
        "output", False, "LoRA: also write output_dir/merged, the adapters merged into the base (a plain HF folder)"
    )
    resume_from_checkpoint: str | None = _f(
        "output", None, "checkpoint folder to resume from, or 'latest' (the newest complete one in output_dir)"
    )
    progress: bool = _f("output", True, "show progress bars")
    # --------------------------------------------------------------------------------------------- seq2seq
    objective: Literal["scalar", "seq2seq"] = _f(
        "seq2seq",
        "scalar",
        "what is trained: 'scalar' (a score head and a pairwise loss) or 'seq2seq' (a causal LM learns (x, rejected)"
        " -> chosen and (x, chosen) -> chosen by token cross-entropy; token rewards from its greedy agreement)",
    )
    seq2seq_template: Literal["plain", "chat"] = _f(
        "seq2seq",
        "plain",
        "seq2seq input template: 'plain' (x, the input marker, y_in, the output marker, y_target, EOS) or 'chat' "
        "(the tokenizer's chat template: user x, assistant y_in, user asks for a rewrite, assistant y_target)",
    )
    seq2seq_mix: str = _f(
        "seq2seq", "1:1", "identity:correction mix: the chance each pair trains each mapping is its share of the max"
    )
    seq2seq_reward_rule: Literal["after_zero", "match_positive"] = _f(
        "seq2seq",
        "after_zero",
        "token rewards: 'after_zero' (+ before the first divergence, - for mismatches, 0 for matches after it) or "
        "'match_positive' (+ for every match, - for every mismatch)",
    )
    seq2seq_positive: float = _f("seq2seq", 1.0, "token reward of a token the RM agrees with")
    seq2seq_negative: float = _f("seq2seq", 1.0, "minus the token reward of a token the RM would not output")
    seq2seq_sequence_score: Literal["mean", "sum"] = _f(
        "seq2seq", "mean", "sequence score of a response from its token rewards (what /get_reward and bench use)"
    )

    def __post_init__(self) -> None:
        # Every field, however it was given (Python, --flag, YAML/JSON), typed and in range (conflicts with the
        # inputs: check_eval_source). A string that spells a number is one: PyYAML reads `1e-5` as a string.
        types = field_types()
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(f.name, getattr(self, f.name), types[f.name]))
            rule = RANGES.get(f.name)
            value = getattr(self, f.name)
            if rule is not None and value is not None and not rule[0](value):
                raise ConfigError(f.name, f"expected {rule[1]}, got {value!r}")
        if self.lora_r == 0:  # a LoRA setting without a rank would be silently ignored
            for name in ("lora_target_modules", "lora_dropout", "lora_alpha", "merge_lora"):
                if getattr(self, name) != RewardConfig.__dataclass_fields__[name].default:
                    raise ConfigError(name, f"{getattr(self, name)!r} is set but lora_r is 0 (full fine-tuning)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> RewardConfig:
        """Read a YAML or JSON config file; ``overrides`` (e.g. from the command line) win. A bad value names the
        file and the line of its key (``my.yaml:3: field 'learning_rate': expected a number, got 'fast'``)."""
        data, lines = _read_config(path)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known - set(INPUT_KEYS))
        if unknown:
            close = difflib.get_close_matches(unknown[0], sorted(known | set(INPUT_KEYS)), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            where = f"{path}:{lines[unknown[0]]}" if unknown[0] in lines else str(path)
            raise ValueError(f"{where}: unknown config keys {unknown}{hint} (see `fastrm train --help`)")
        check_inputs({k: data[k] for k in INPUT_KEYS if k in data}, where=str(path), lines=lines)
        fields = {k: v for k, v in data.items() if k in known}
        try:
            return cls(**{**fields, **overrides})
        except ConfigError as e:
            if e.field in overrides or e.field not in fields:
                raise
            where = f"{path}:{lines[e.field]}" if e.field in lines else str(path)
            raise ConfigError(e.field, e.detail, where=where) from None


class ConfigError(ValueError):
    """A config field with a bad value; the message names the field (and the file and line when it came from one)."""

    def __init__(self, field_name: str, detail: str, where: str | None = None):
        self.field, self.detail, self.where = field_name, detail, where
        super().__init__(f"{where + ': ' if where else ''}field '{field_name}': {detail}")


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _mix_ok(v: str) -> bool:
    try:
        a, b = (float(x) for x in v.split(":"))
    except ValueError:
        return False
    return math.isfinite(a) and math.isfinite(b) and a >= 0 and b >= 0 and a + b > 0


# The shortest max_length (and token budget) accepted: below it prompts are always cut away (the issue: 2 was taken).
MIN_LENGTH = 16
# Allowed values of the numeric fields: (test, what the error says was expected). Types are checked first.
RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "learning_rate": (lambda v: v > 0, "a number > 0"),
    "weight_decay": (lambda v: v >= 0, "a number >= 0"),
    "adam_beta1": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "adam_beta2": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "adam_epsilon": (lambda v: v > 0, "a number > 0"),
    "warmup_ratio": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "max_grad_norm": (lambda v: v >= 0, "a number >= 0 (0 disables clipping)"),
    "center_rewards_coefficient": (lambda v: v >= 0, "a number >= 0 (or unset)"),
    "num_train_epochs": (lambda v: v >= 1, "an integer >= 1"),
    "max_steps": (lambda v: v >= 1 or v == -1, "an integer >= 1, or -1 (the epochs decide)"),
    "pairs_per_step": (lambda v: v >= 1, "an integer >= 1"),
    "seed": (lambda v: 0 <= v < 2**63, "an integer >= 0"),
    "seq2seq_mix": (_mix_ok, "'identity:correction': two numbers >= 0, not both 0 (e.g. '1:1', '1:3', '0:1')"),
    "seq2seq_positive": (lambda v: v >= 0, "a number >= 0"),
    "seq2seq_negative": (lambda v: v >= 0, "a number >= 0"),
    "max_length": (lambda v: v >= MIN_LENGTH, f"an integer >= {MIN_LENGTH} (a prompt and a response must fit)"),
    "max_tokens_per_batch": (lambda v: v >= MIN_LENGTH, f"an integer >= {MIN_LENGTH}"),
    "eval_fraction": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "logging_steps": (lambda v: v >= 0, "an integer >= 0 (0: no train rows in metrics.jsonl)"),
    "eval_steps": (lambda v: v >= 0, "an integer >= 0 (0: only at the end)"),
    "save_steps": (lambda v: v >= 0, "an integer >= 0 (0: only the final model)"),
    "save_total_limit": (lambda v: v >= 0, "an integer >= 0 (0: keep all)"),
    "output_dir": (lambda v: v.strip() != "", "a folder path"),
    "resume_from_checkpoint": (lambda v: v.strip() != "", "a checkpoint folder or 'latest'"),
    "lora_r": (lambda v: v >= 0, "an integer >= 0 (0: full fine-tuning)"),
    "lora_alpha": (lambda v: v > 0, "a number > 0"),
    "lora_dropout": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "lora_target_modules": (lambda v: len(v) > 0, "module names (e.g. q_proj,v_proj), all-linear, or unset"),
}


def _coerce(name: str, value: Any, t: Any) -> Any:
    """``value`` as field type ``t`` (int, float, bool, str, ``X | None``, Literal), or a :class:`ConfigError`."""
    args = typing.get_args(t)
    if typing.get_origin(t) is Literal:
        if value not in args:
            raise ConfigError(name, f"expected one of {', '.join(args)}, got {value!r}")
        return value
    if t == (bool | None):
        try:
            return parse_optional_bool(value)
        except ValueError:
            raise ConfigError(name, f"expected true, false or auto, got {value!r}") from None
    if type(None) in args:
        if value is None:
            return None
        t = next(a for a in args if a is not type(None))
    if t == list[str]:  # a list, or one comma-separated string (a --flag or a YAML scalar)
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) and v.strip() for v in items):
            raise ConfigError(name, f"expected a list of names (or one comma-separated string), got {value!r}")
        return [v.strip() for v in items]
    if t is bool:
        try:
            v = parse_optional_bool(value) if isinstance(value, (bool, str)) else None
        except ValueError:
            v = None
        if v is None:
            raise ConfigError(name, f"expected true or false, got {value!r}")
        return v
    if t is int:
        if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            return int(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if not _int(value):
            raise ConfigError(name, f"expected an integer, got {value!r}")
        return value
    if t is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(name, f"expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(name, f"expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(name, f"expected a finite number, got {value!r}")
        return float(value)
    if t is str:
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if not isinstance(value, str):
            raise ConfigError(name, f"expected a string, got {value!r}")
        return value
    return value


def check_inputs(inputs: dict[str, Any], where: str | None = None, lines: dict[str, int] | None = None) -> None:
    """The input keys of a config file (data, eval_data, model, tokenizer): a path, or a list of paths for data."""
    for key, value in inputs.items():
        paths = isinstance(value, list) and value and all(isinstance(v, str) for v in value)
        ok = isinstance(value, (str, os.PathLike)) or (key in ("data", "eval_data") and paths)
        if not ok:
            what = "a path or a list of paths" if key in ("data", "eval_data") else "a name or a path"
            at = f"{where}:{lines[key]}" if where and lines and key in lines else where
            raise ConfigError(key, f"expected {what}, got {value!r}", where=at)


def check_eval_source(args: RewardConfig, has_eval_data: bool) -> None:
    """Fields that conflict with the inputs: an eval fraction beside eval data, periodic evals without eval data."""
    if has_eval_data and args.eval_fraction > 0:
        raise ConfigError(
            "eval_fraction",
            f"{args.eval_fraction} would hold out training pairs for evaluation, but eval data is also given "
            "(--eval-data / eval_data / eval_dataset), and the fraction would be ignored: set one of them",
        )
    if args.eval_steps and not has_eval_data and args.eval_fraction == 0:
        raise ConfigError(
            "eval_steps",
            f"{args.eval_steps} asks for an evaluation every {args.eval_steps} steps, but there is no eval data: "
            "give eval data (--eval-data) or an eval_fraction, or set eval_steps to 0",
        )


# Fields that do not change what is trained: a run may resume with other values for these.
NON_TRAINING_FIELDS = frozenset(
    {
        "output_dir",
        "logging_steps",
        "eval_steps",
        "save_steps",
        "save_total_limit",
        "save_final",
        "resume_from_checkpoint",
        "progress",
        "merge_lora",
        "attn_backend",
        "fused_head",
        "gradient_checkpointing",
        "mu_keep_graphs",  # the same mu_B and gradients either way (tested)
        "max_tokens_per_batch",  # the step gradient does not depend on the token budget (tested)
        "prefetch",  # the same batches, packed on another thread (tested)
        # seq2seq reward extraction: recorded in fastrm_seq2seq.json, not trained
        "seq2seq_reward_rule",
        "seq2seq_positive",
        "seq2seq_negative",
        "seq2seq_sequence_score",
    }
)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML (.yaml/.yml) or JSON config file; a syntax error names the file, line and column."""
    return _read_config(path)[0]


def _read_config(path: str | Path) -> tuple[dict[str, Any], dict[str, int]]:
    """``(mapping, {key: line of the key})`` of a config file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"--config {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--config {path}: cannot read it ({e})") from None
    if str(path).endswith((".yaml", ".yml")):
        import yaml

        try:
            data = yaml.safe_load(text) or {}
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            at = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
            raise ValueError(f"{at}: invalid YAML: {e.problem or e.context}") from None
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: invalid YAML: {e}") from None
        lines = _yaml_key_lines(text) if isinstance(data, dict) else {}
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
        lines = {}
        if isinstance(data, dict):
            for key in data:
                m = re.search(rf'"{re.escape(str(key))}"\s*:', text)
                if m:
                    lines[key] = text.count("\n", 0, m.start()) + 1
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file holds a mapping of field names to values")
    return data, lines


def _yaml_key_lines(text: str) -> dict[str, int]:
    import yaml

    node = yaml.compose(text)
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {k.value: k.start_mark.line + 1 for k, _ in node.value if isinstance(k, yaml.ScalarNode)}


def parse_optional_bool(value: Any, name: str = "value") -> bool | None:
    """True/False/None from a bool, None, or the spellings true/false/auto (and yes/no/on/off/1/0)."""
    if value is None or isinstance(value, bool):
        return value
    s = str(value).strip().lower()
    if s in ("auto", "none", ""):
        return None
    if s in ("true", "yes", "on", "1"):
        return True
    if s in ("false", "no", "off", "0"):
        return False
    raise ValueError(f"{name}={value!r}: expected true, false or auto")


@functools.cache
def field_types() -> dict[str, Any]:
    """Resolved type of every RewardConfig field (annotations are strings under ``from __future__``)."""
    return typing.get_type_hints(RewardConfig)


def literal_choices(f: dataclasses.Field) -> tuple[str, ...] | None:
    t = field_types()[f.name]
    return typing.get_args(t) if typing.get_origin(t) is Literal else None
