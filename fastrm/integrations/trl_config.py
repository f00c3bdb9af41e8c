"""``trl.RewardConfig`` -> :class:`fastrm.RewardConfig`: what maps, what has no effect, and what is refused.

Every field of TRL's config (and of the ``TrainingArguments`` it extends) is in exactly one of three groups:

* mapped (:data:`MAPPED`): turned into fastrm's settings by :func:`build_fastrm_config` or used by the drop-in trainer
  itself (logging, evaluation, saving, report_to, tokenization);
* no effect (:data:`NO_EFFECT`): fields that do not change what stock TRL computes either (``do_train``, data
  loader workers, eval batch size: fastrm packs by tokens) or are read only by the ``report_to`` integrations,
  which receive the config as they would from ``transformers.Trainer``;
* everything else: fastrm does not implement it, and a value other than ``trl.RewardConfig()``'s default is an
  error naming the option (:func:`unsupported_options`), never silently ignored.

fastrm-only settings (loss kind, margin scope, prefix sharing, ...) come through the trainer's ``fastrm_config``
keyword, limited to :data:`FASTRM_ONLY`: a field that TRL's config already carries is set there, in one place.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

from fastrm.config import RewardConfig

# TRL / TrainingArguments fields the drop-in reads (the mapping is in build_fastrm_config and the trainer).
MAPPED = frozenset(
    {
        "output_dir",
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "num_train_epochs",
        "max_steps",
        "learning_rate",
        "lr_scheduler_type",
        "warmup_steps",
        "warmup_ratio",  # transformers < 5 (a separate field there; warmup_steps < 1 is the ratio since 5.0)
        "weight_decay",
        "adam_beta1",
        "adam_beta2",
        "adam_epsilon",
        "optim",
        "max_grad_norm",
        "seed",
        "bf16",
        "fp16",
        "use_cpu",
        "gradient_checkpointing",
        "gradient_checkpointing_kwargs",
        "activation_checkpointing",
        "activation_checkpointing_kwargs",
        "logging_strategy",
        "logging_steps",
        "logging_first_step",
        "eval_strategy",
        "eval_steps",
        "eval_delay",
        "save_strategy",
        "save_steps",
        "save_total_limit",
        "disable_tqdm",
        "report_to",
        "max_length",
        "center_rewards_coefficient",
        "disable_dropout",
        "eos_token",
        "pad_token",
        "chat_template_path",
        "local_rank",  # set by the launcher; fastrm reads the process group torch.distributed holds
        "model_init_kwargs",  # for a model path: honoured or refused by name (trl_model.init_kwargs)
        "trust_remote_code",  # the default of model_init_kwargs' trust_remote_code, as in TRL
    }
)

# Fields that change nothing fastrm (or stock TRL) computes, with the reason; accepted with any value.
NO_EFFECT = {
    "do_train": "read by example scripts only, not by Trainer",
    "do_eval": "read by example scripts only, not by Trainer",
    "do_predict": "read by example scripts only, not by Trainer",
    "resume_from_checkpoint": "read by example scripts only; pass train(resume_from_checkpoint=...)",
    "per_device_eval_batch_size": "fastrm packs eval pairs by tokens (max_tokens_per_batch); rewards are the same",
    "pad_to_multiple_of": "fastrm packs without padding; padding never changes the rewards",
    "dataset_num_proc": "tokenization runs in this process; the token ids are the same",
    "dataloader_num_workers": "fastrm packs in this process",
    "dataloader_pin_memory": "fastrm packs in this process",
    "dataloader_persistent_workers": "fastrm packs in this process",
    "dataloader_prefetch_factor": "fastrm packs in this process",
    "remove_unused_columns": "fastrm reads only the columns it needs",
    "log_level": "Python logging verbosity",
    "log_level_replica": "Python logging verbosity",
    "log_on_each_node": "Python logging verbosity",
    "skip_memory_metrics": "memory metrics are not reported",
    "run_name": "read by the report_to integrations",
    "project": "read by the report_to integrations",
    "trackio_space_id": "read by the report_to integrations",
    "trackio_bucket_id": "read by the report_to integrations",
    "trackio_static_space_id": "read by the report_to integrations",
    "logging_dir": "read by the report_to integrations",
    "hub_token": "only used with push_to_hub, which is refused",
    "hub_model_id": "only used with push_to_hub, which is refused",
    "hub_private_repo": "only used with push_to_hub, which is refused",
    "hub_strategy": "only used with push_to_hub, which is refused",
    "hub_always_push": "only used with push_to_hub, which is refused",
    "hub_revision": "only used with push_to_hub, which is refused",
}

# Why some unimplemented options are refused, for the error message.
REFUSED_BECAUSE = {
    "push_to_hub": "fastrm uploads nothing to a model hub: save_model() writes output_dir, a folder you can upload",
    "use_liger_kernel": "fastrm runs its own fused kernels",
}

# fastrm settings a TRL config has no field for: the only keys ``fastrm_config`` accepts.
FASTRM_ONLY = (
    "loss",
    "margin_scope",
    "detach_mean",
    "prefix_sharing",
    "max_tokens_per_batch",
    "attn_backend",
    "fused_head",
    "on_bad_row",
)

_SCHEDULES = {"linear": "linear", "cosine": "cosine", "constant": "constant", "constant_with_warmup": "constant"}
_OPTIMIZERS = ("adamw_torch", "adamw_torch_fused")  # fastrm's optimizer is torch AdamW (fused on CUDA)


def _value(v: Any) -> Any:
    """Enum fields (IntervalStrategy, SchedulerType, OptimizerNames) as their string values."""
    return getattr(v, "value", v)


@functools.lru_cache(maxsize=1)
def trl_defaults() -> dict[str, Any]:
    """``trl.RewardConfig()``'s field values after its ``__post_init__``. Built with ``bf16=False`` because the
    default bf16=True is refused on a machine without a bf16 GPU; bf16 is a mapped field, so it is never compared."""
    import trl

    cfg = trl.RewardConfig(bf16=False)
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def unsupported_options(args: Any) -> list[str]:
    """``name=value`` for each field of ``args`` that fastrm does not implement and that differs from TRL's default."""
    defaults = trl_defaults()
    out = []
    for f in dataclasses.fields(args):
        name = f.name
        if name in MAPPED or name in NO_EFFECT or name.startswith("_") or name not in defaults:
            continue
        value = getattr(args, name)
        if _value(value) != _value(defaults[name]):
            why = f" ({REFUSED_BECAUSE[name]})" if name in REFUSED_BECAUSE else ""
            out.append(f"{name}={_value(value)!r}{why}")
    return out


def check_fastrm_overrides(overrides: Any) -> dict[str, Any]:
    """``fastrm_config`` (a dict, or a :class:`fastrm.RewardConfig` whose non-default fields are taken) checked
    against :data:`FASTRM_ONLY`."""
    if overrides is None:
        return {}
    if isinstance(overrides, RewardConfig):
        base = RewardConfig().to_dict()
        overrides = {k: v for k, v in overrides.to_dict().items() if v != base[k]}
    if not isinstance(overrides, dict):
        raise TypeError(f"fastrm_config must be a dict or a fastrm.RewardConfig, got {type(overrides).__name__}")
    bad = sorted(set(overrides) - set(FASTRM_ONLY))
    if bad:
        raise ValueError(
            f"fastrm_config accepts only fastrm's own settings ({', '.join(FASTRM_ONLY)}); {', '.join(bad)} "
            "must be set in the trl.RewardConfig (or fastrm has no such setting)"
        )
    return dict(overrides)


def _steps(value: float, total: int) -> int:
    """An HF interval: a step count, or a fraction (< 1) of the total steps, rounded up as Trainer does."""
    return math.ceil(total * value) if 0 < value < 1 else int(value)


@dataclasses.dataclass
class Schedule:
    """When the drop-in logs and evaluates (HF's flow rules); fastrm's own trainer saves."""

    total_steps: int
    steps_per_epoch: int
    log_every: int  # 0: never
    log_first: bool
    eval_every: int  # 0: never
    eval_delay: float

    def should_log(self, step: int) -> bool:
        return (self.log_every > 0 and step % self.log_every == 0) or (self.log_first and step == 1)

    def should_eval(self, step: int) -> bool:
        if self.eval_every <= 0 or step < self.eval_delay:
            return False
        return step % self.eval_every == 0 or step == self.total_steps


def build_fastrm_config(
    args: Any, num_pairs: int, world_size: int, overrides: dict[str, Any], has_margin: bool
) -> tuple[RewardConfig, Schedule]:
    """The fastrm config and the logging/eval schedule for a TRL config over ``num_pairs`` training pairs.

    ``pairs_per_step`` = per_device_train_batch_size x gradient_accumulation_steps x world size (the pairs of one
    optimizer step in TRL). Steps, warmup and intervals follow ``transformers.Trainer``'s rules.
    """
    errors = []
    schedule = _value(args.lr_scheduler_type)
    if schedule not in _SCHEDULES:
        errors.append(f"lr_scheduler_type={schedule!r} (fastrm: {', '.join(_SCHEDULES)})")
    if _value(args.optim) not in _OPTIMIZERS:
        errors.append(f"optim={_value(args.optim)!r} (fastrm: {', '.join(_OPTIMIZERS)})")
    if args.fp16:
        errors.append("fp16=True (fastrm trains in fp32 or bf16 autocast: use bf16=True)")
    gc_kwargs = getattr(args, "activation_checkpointing_kwargs", None) or args.gradient_checkpointing_kwargs or {}
    if any(k != "use_reentrant" for k in gc_kwargs) or gc_kwargs.get("use_reentrant", False):
        errors.append(f"gradient_checkpointing_kwargs={gc_kwargs!r} (fastrm: non-reentrant checkpointing only)")
    if _value(args.save_strategy) == "best":
        errors.append("save_strategy='best' (no metric_for_best_model in fastrm)")
    for name in ("logging_strategy", "eval_strategy", "save_strategy"):
        if _value(getattr(args, name)) not in ("no", "steps", "epoch", "best"):
            errors.append(f"{name}={_value(getattr(args, name))!r}")
    if errors:
        raise ValueError("fastrm's RewardTrainer does not support " + "; ".join(errors))

    pairs_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * world_size
    steps_per_epoch = math.ceil(num_pairs / pairs_per_step)
    epochs = float(args.num_train_epochs)
    if args.max_steps > 0:
        total, max_steps, n_epochs = args.max_steps, args.max_steps, 1
    elif epochs.is_integer() and epochs >= 1:
        total, max_steps, n_epochs = steps_per_epoch * int(epochs), -1, int(epochs)
    else:  # fractional epochs: Trainer runs ceil(epochs * steps_per_epoch) steps
        total = max(math.ceil(epochs * steps_per_epoch), 1)
        max_steps, n_epochs = total, 1
    warmup = 0 if schedule == "constant" else args.get_warmup_steps(total)

    def interval(strategy: str, steps: float | None) -> int:
        strategy = _value(strategy)
        if strategy == "epoch":
            return steps_per_epoch
        return _steps(steps, total) if strategy == "steps" and steps else 0

    checkpointing = getattr(args, "activation_checkpointing", None)
    cfg = RewardConfig(
        **{
            "loss": "margin" if has_margin else "bt",
            **overrides,
            "center_rewards_coefficient": args.center_rewards_coefficient,
            "learning_rate": args.learning_rate,
            "weight_decay": args.weight_decay,
            "adam_beta1": args.adam_beta1,
            "adam_beta2": args.adam_beta2,
            "adam_epsilon": args.adam_epsilon,
            "lr_scheduler_type": _SCHEDULES[schedule],
            "warmup_ratio": warmup / total,  # fastrm rounds ratio * total_steps back to `warmup`
            "max_grad_norm": args.max_grad_norm or 0.0,
            "num_train_epochs": n_epochs,
            "max_steps": max_steps,
            "pairs_per_step": pairs_per_step,
            "seed": args.seed,
            # TRL drops over-long rows before fastrm sees them, so fastrm's left truncation never cuts anything
            "max_length": 1 << 30,
            "append_eos": False,  # the ids are tokenized as TRL does (EOS text for standard rows, none for chat)
            "bf16": bool(args.bf16),
            "gradient_checkpointing": bool(args.gradient_checkpointing if checkpointing is None else checkpointing),
            "output_dir": args.output_dir,
            "logging_steps": 0,  # the drop-in logs with TRL's names (metrics.jsonl, log_history, report_to)
            "save_steps": interval(args.save_strategy, args.save_steps),
            "save_total_limit": args.save_total_limit or 0,
            "save_final": False,  # as in TRL: the final model is written by save_model()
            "progress": not args.disable_tqdm,
        }
    )
    if has_margin != (cfg.loss == "margin"):
        raise ValueError(
            f"fastrm_config loss={cfg.loss!r} with a dataset that has a 'margin' column (TRL subtracts it in the "
            "loss): drop the column, or use loss='margin'"
            if has_margin
            else "fastrm_config loss='margin' needs a 'margin' column in the dataset"
        )
    eval_every = interval(args.eval_strategy, args.eval_steps)
    epoch_eval = _value(args.eval_strategy) == "epoch"
    sched = Schedule(
        total_steps=total,
        steps_per_epoch=steps_per_epoch,
        log_every=interval(args.logging_strategy, args.logging_steps),
        log_first=bool(args.logging_first_step),
        eval_every=eval_every,
        # Trainer compares eval_delay with the epoch under the epoch strategy, with the step otherwise
        eval_delay=float(args.eval_delay or 0) * (steps_per_epoch if epoch_eval else 1),
    )
    return cfg, sched
