"""A drop-in ``trl.RewardTrainer``: a TRL reward script trains with fastrm by changing one import.

    from trl import RewardConfig
    from fastrm.integrations.trl import RewardTrainer      # was: from trl import RewardTrainer

    trainer = RewardTrainer(model=model, args=RewardConfig(...), train_dataset=ds["train"],
                            eval_dataset=ds["test"], processing_class=tokenizer)
    trainer.train(); trainer.save_model()

TRL's own ``trl/scripts/reward.py`` runs to the end with that line added (``tests/test_trl_script.py``).

What stays as in TRL: the arguments (``model`` as a ``*ForSequenceClassification`` model, a causal LM or a path
with ``args.model_init_kwargs``, see :mod:`~fastrm.integrations.trl_model`; ``args`` a ``trl.RewardConfig``), the
datasets (standard, conversational or tokenized; the token ids are TRL's, see :mod:`~fastrm.integrations.trl_data`),
the loss (Bradley-Terry, minus the ``margin`` column when there is one, plus ``center_rewards_coefficient``), the
logged names (``loss``, ``grad_norm``, ``learning_rate``, ``num_tokens``, ``min_reward``/``mean_reward``/
``max_reward``, ``accuracy``, ``margin``, ``epoch``; ``eval_*`` on evaluation) in ``trainer.state.log_history``,
``report_to`` and ``output_dir/metrics.jsonl``, the checkpoints (``checkpoint-N`` and ``save_model()`` folders that
``AutoModelForSequenceClassification`` and TRL load), and the attributes scripts and callbacks use (``state``,
``log``, ``save_model``, ``is_world_process_zero``, ``end``, and an ``accelerator`` with what they call on it).

What differs: training runs on fastrm's packed batches (no padding), the config's options fastrm does not implement
raise instead of being ignored (:mod:`~fastrm.integrations.trl_config`), a model fastrm cannot train exactly or save
is refused before training (PEFT adapters already in the model among them), the data order is fastrm's own seeded
permutation, ``push_to_hub`` and custom callbacks/collators/metrics are refused, and fastrm's own settings come in
through ``fastrm_config``. ``peft_config`` (a ``peft.LoraConfig``) trains LoRA adapters as stock TRL + PEFT do, and
``save_model()`` then writes an adapter folder (:mod:`fastrm.lora`; options fastrm cannot honour are refused)::

    RewardTrainer(..., fastrm_config={"loss": "threshold", "prefix_sharing": True, "max_tokens_per_batch": 32768})
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

try:
    import trl
    from transformers import PreTrainedModel, TrainerControl, TrainerState
    from transformers.trainer_pt_utils import log_metrics, metrics_format, save_metrics, save_state
    from transformers.trainer_utils import TrainOutput
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("fastrm.integrations.trl needs TRL: pip install 'fastrm[trl]'") from e

from fastrm import distributed as dist
from fastrm.evaluation import compute_pair_rewards, json_safe
from fastrm.formatting import trl_rule
from fastrm.integrations.trl_config import build_fastrm_config, check_fastrm_overrides, unsupported_options
from fastrm.integrations.trl_data import tokenize_like_trl
from fastrm.integrations.trl_model import Forms, fields_from_peft_config, reward_model
from fastrm.loading import PACKAGED, LoadError, hub_allowed, load_model, load_tokenizer
from fastrm.presets import PRESETS
from fastrm.trainer import RewardTrainer as FastRewardTrainer

__all__ = ["RewardTrainer"]

# Trainer arguments of trl.RewardTrainer that fastrm does not implement: refused when given.
_REFUSED_ARGS = {
    "data_collator": "fastrm packs pairs itself",
    "compute_metrics": "evaluate() reports TRL's reward metrics",
    "callbacks": "use report_to for dashboards; training-loop callbacks are not supported",
    "optimizers": "fastrm builds AdamW and the schedule from the config",
    "optimizer_cls_and_kwargs": "fastrm builds AdamW and the schedule from the config",
    "preprocess_logits_for_metrics": "evaluate() reports TRL's reward metrics",
    "quantization_config": "fastrm trains full-precision weights",
}


class TrainerAccelerator:
    """``trainer.accelerator`` for TRL scripts and callbacks: the parts of ``accelerate.Accelerator`` they call
    (``print``, ``is_main_process``, ``wait_for_everyone``, ``unwrap_model``, ``end_training``, ...), answered from
    the process group fastrm trains in. fastrm runs no Accelerator (it places, wraps and steps the model itself), so
    any other attribute is an error that says so."""

    def __init__(self, device: torch.device):
        self.device = device

    @property
    def is_main_process(self) -> bool:
        return dist.is_main()

    @property
    def local_process_index(self) -> int:
        return int(os.environ.get("LOCAL_RANK", "0"))

    @property
    def is_local_main_process(self) -> bool:
        return self.local_process_index == 0

    @property
    def process_index(self) -> int:
        return dist.rank()

    @property
    def num_processes(self) -> int:
        return dist.world_size()

    def print(self, *args: Any, **kwargs: Any) -> None:
        """``print`` on the local main process only, as accelerate does."""
        if self.is_local_main_process:
            print(*args, **kwargs)

    def wait_for_everyone(self) -> None:
        dist.barrier()

    def unwrap_model(self, model: nn.Module, keep_fp32_wrapper: bool = True, keep_torch_compile: bool = True):
        return model  # trainer.model is never wrapped: fastrm's DDP/FSDP wrapping stays inside its trainer

    @contextmanager
    def main_process_first(self) -> Iterator[None]:
        if not self.is_main_process:
            dist.barrier()
        yield
        if self.is_main_process:
            dist.barrier()

    def end_training(self) -> None:
        """What ``Trainer.end()`` runs: the trackers were finished at the end of train(); the process group (if
        any) is destroyed, as accelerate does."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(
            f"trainer.accelerator.{name}: fastrm's RewardTrainer runs no accelerate.Accelerator; its accelerator "
            "offers print, is_main_process, is_local_main_process, process_index, local_process_index, "
            "num_processes, device, wait_for_everyone, unwrap_model, main_process_first and end_training"
        )


class RewardTrainer:
    """``trl.RewardTrainer``'s constructor and methods, training with fastrm (see the module docstring).

    Args:
        model: a ``*ForSequenceClassification`` model (``num_labels=1``; its own head is trained), a causal LM (its
            backbone gets a new score head), a path/preset name (:func:`fastrm.load_model`, with
            ``args.model_init_kwargs``), or a :class:`fastrm.RewardModel` (:mod:`~fastrm.integrations.trl_model`).
        args: a ``trl.RewardConfig``; unsupported options raise (:mod:`fastrm.integrations.trl_config`).
        train_dataset, eval_dataset: ``datasets.Dataset`` (or a list of dicts / file path) in TRL's standard,
            conversational or tokenized preference format; ``eval_dataset`` may be a dict of them.
        processing_class: the tokenizer (default: the one saved with a model path).
        fastrm_config: fastrm-only settings (``loss``, ``margin_scope``, ``detach_mean``, ``prefix_sharing``,
            ``max_tokens_per_batch``, ``attn_backend``, ``fused_head``, ``on_bad_row``), a dict or a
            :class:`fastrm.RewardConfig`.
        data_collator, compute_metrics, callbacks, optimizers, optimizer_cls_and_kwargs,
            preprocess_logits_for_metrics, quantization_config: accepted for signature compatibility; anything but
            their default raises.
        peft_config: a ``peft.LoraConfig``: LoRA adapters and the score head are trained, the base frozen
            (:func:`fastrm.lora.fields_from_peft_config` says what is honoured; the rest is refused by name).
    """

    def __init__(
        self,
        model: Any,
        args: Any = None,
        data_collator: Any = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        compute_metrics: Any = None,
        callbacks: Any = None,
        optimizers: tuple = (None, None),
        optimizer_cls_and_kwargs: Any = None,
        preprocess_logits_for_metrics: Any = None,
        quantization_config: Any = None,
        peft_config: Any = None,
        *,
        fastrm_config: Any = None,
    ):
        given = dict(
            data_collator=data_collator,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=None if tuple(optimizers) == (None, None) else optimizers,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
            quantization_config=quantization_config,
        )
        refused = [f"{k} ({_REFUSED_ARGS[k]})" for k, v in given.items() if v is not None]
        if refused:
            raise ValueError("fastrm's RewardTrainer does not support " + "; ".join(refused))
        if args is None:  # TRL's default config, named after the model
            name = Path(str(model if isinstance(model, (str, os.PathLike)) else "model")).name
            args = trl.RewardConfig(output_dir=f"{name}-Reward")
        unsupported = unsupported_options(args)
        if unsupported:
            raise ValueError(
                f"fastrm's RewardTrainer does not implement these TRL options: {', '.join(unsupported)}. Leave them "
                "at TRL's default, or train with trl.RewardTrainer (see fastrm.integrations.trl_config)"
            )
        if train_dataset is None:
            raise ValueError("train_dataset is required")
        overrides = check_fastrm_overrides(fastrm_config)
        self.args = args
        from transformers import set_seed

        set_seed(args.seed)  # before the model is built: a new score head is drawn from the global RNG, as in TRL
        self.processing_class = tok = self._tokenizer(model, processing_class, args)
        self.reward_model, self._hf_model, hf_attn = reward_model(model, tok, args)
        for cfg in {id(c): c for c in (self.reward_model.backbone.config, self._hf_model.config)}.values():
            cfg.pad_token_id = tok.pad_token_id  # sequence-classification models score the last non-pad token
        if args.disable_dropout:
            for m in self.reward_model.modules():
                if isinstance(m, nn.Dropout):
                    m.p = 0.0
        self._on_bad_row = overrides.get("on_bad_row", "error")
        self.data_stats: dict[str, dict] = {}
        train_pairs, self._trl_tokens = self._load(train_dataset, "train")
        self._eval_sets = self._eval_sets_of(eval_dataset)
        strategy = getattr(args.eval_strategy, "value", args.eval_strategy)
        if not self._eval_sets and strategy != "no":
            raise ValueError(f"eval_strategy={strategy!r} needs an eval_dataset (as in transformers.Trainer)")
        has_margin = train_pairs[0].margin is not None
        if peft_config is not None:  # LoRA: fastrm injects PEFT's layers itself (fastrm/lora.py)
            overrides = {
                **overrides,
                **fields_from_peft_config(peft_config, self.reward_model, disable_dropout=args.disable_dropout),
            }
        cfg, self.schedule = build_fastrm_config(args, len(train_pairs), dist.world_size(), overrides, has_margin)
        device = torch.device("cpu") if args.use_cpu else None
        self._forms = Forms(self.reward_model, hf_attn)
        with self._forms.fastrm():
            self._trainer = FastRewardTrainer(  # run_folder=False: output_dir follows transformers.Trainer's rules
                self.reward_model,
                cfg,
                train_pairs,
                None,
                tok,
                on_step_end=self._on_step_end,
                device=device,
                run_folder=False,
            )
        # The ids are TRL's (text + EOS text, special tokens, last non-pad pooled): its saves record that rule.
        self.reward_model.scoring_rule = trl_rule(tok, max_length=args.max_length)
        self.accelerator = TrainerAccelerator(self._trainer.device)
        self.state = TrainerState(
            max_steps=self.schedule.total_steps,
            num_train_epochs=math.ceil(self.schedule.total_steps / self.schedule.steps_per_epoch),
            train_batch_size=args.per_device_train_batch_size,
            logging_steps=self.schedule.log_every,
            eval_steps=self.schedule.eval_every,
            save_steps=cfg.save_steps,
            is_world_process_zero=dist.is_main(),
            is_local_process_zero=self.accelerator.is_local_main_process,
        )
        self.control = TrainerControl()
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self.hub_model_id = args.hub_model_id
        self._reporters = self._report_to(args.report_to)
        self._window: dict[str, list[float]] = defaultdict(list)
        self._total_train_tokens = self._tokens_processed = self._pairs_trained = 0
        self._train_losses: list[float] = []

    # ------------------------------------------------------------------ setup helpers
    @staticmethod
    def _tokenizer(model: Any, tok: Any, args: Any) -> Any:
        if tok is None and getattr(model, "tokenizer", None) is not None:  # a fastrm.RewardModel that carries one
            tok = model.tokenizer
        if tok is None:
            config = getattr(model, "config", None)
            name = model if isinstance(model, (str, os.PathLike)) else getattr(config, "_name_or_path", "")
            if not name:
                raise ValueError(
                    "processing_class is required: the model was not loaded from a folder with a tokenizer"
                )
            named = isinstance(model, str) and (model in PRESETS or model in PACKAGED)
            if isinstance(model, (str, os.PathLike)) and not named and not Path(model).exists() and not hub_allowed():
                load_model(model)  # a missing path: the loader's own error names it (and the hub setting)
            try:
                tok = load_tokenizer(None, model_spec=name)  # local only
            except LoadError:
                raise LoadError(
                    f"processing_class is required: the model {str(name)!r} holds no tokenizer (a folder with "
                    "tokenizer.json or tokenizer_config.json)"
                ) from None
        if args.eos_token is not None:
            if args.eos_token not in tok.get_vocab():
                raise ValueError(f"eos_token {args.eos_token!r} is not in the tokenizer's vocabulary")
            tok.eos_token = args.eos_token
        if args.chat_template_path is not None:
            if not str(args.chat_template_path).endswith((".jinja", ".j2")):
                raise ValueError("chat_template_path: fastrm reads a .jinja/.j2 template file (no template cloning)")
            tok.chat_template = Path(args.chat_template_path).read_text(encoding="utf-8")
        pad = args.pad_token or tok.pad_token or tok.eos_token  # TRL's rule
        if pad not in tok.get_vocab():
            raise ValueError(f"pad token {pad!r} is not in the tokenizer's vocabulary")
        tok.pad_token = pad
        return tok

    def _load(self, source: Any, split: str) -> tuple[list, list[int]]:
        pairs, trl_tokens, stats, too_long = tokenize_like_trl(
            source, self.processing_class, max_length=self.args.max_length, on_bad_row=self._on_bad_row
        )
        self.data_stats[split] = {"summary": stats.summary(), "longer_than_max_length": too_long}
        if too_long:  # TRL drops these without a word; say how many
            warnings.warn(
                f"{split}: {too_long} rows longer than max_length={self.args.max_length} dropped", stacklevel=3
            )
        return pairs, trl_tokens

    def _eval_sets_of(self, eval_dataset: Any, prefix: str = "eval") -> dict[str, list]:
        """{metric prefix: pairs}; a dict of datasets is evaluated per name, as in Trainer (``eval_<name>_loss``)."""
        if eval_dataset is None:
            return {}
        if isinstance(eval_dataset, dict):
            return {f"{prefix}_{k}": self._load(v, f"{prefix}_{k}")[0] for k, v in eval_dataset.items()}
        return {prefix: self._load(eval_dataset, prefix)[0]}

    def _report_to(self, report_to: Any) -> list:
        """transformers' integration callbacks (tensorboard, wandb, trackio, ...), fed on_log as Trainer feeds them."""
        from transformers.integrations import get_reporting_integration_callbacks
        from transformers.integrations.integration_utils import default_logdir

        callbacks = [cls() for cls in get_reporting_integration_callbacks(report_to)] if dist.is_main() else []
        for cb in callbacks:
            # TensorBoard picks its folder in on_train_begin; an evaluate() logged before train() would otherwise
            # open a writer in the current directory (./runs/...) instead of output_dir/runs/...
            if hasattr(cb, "logging_dir") and cb.logging_dir is None:
                cb.logging_dir = os.path.join(self.args.output_dir, default_logdir())
        return callbacks

    # ------------------------------------------------------------------ TRL-facing attributes
    @property
    def model(self) -> PreTrainedModel:
        """The Hugging Face sequence-classification model being trained (shares its weights with fastrm's)."""
        return self._hf_model

    @property
    def train_pairs(self) -> list:
        return self._trainer.train_pairs

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self._trainer.optimizer

    @property
    def lr_scheduler(self) -> Any:
        return self._trainer.scheduler

    def is_world_process_zero(self) -> bool:
        return dist.is_main()

    def is_local_process_zero(self) -> bool:
        return self.accelerator.is_local_main_process

    metrics_format = metrics_format
    log_metrics = log_metrics
    save_metrics = save_metrics
    save_state = save_state

    # ------------------------------------------------------------------ logging
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Record ``logs`` as Trainer does: ``state.log_history``, the report_to integrations, and (fastrm)
        ``output_dir/metrics.jsonl``."""
        if self.state.epoch is not None:
            logs = {**logs, "epoch": self.state.epoch}
        self.state.log_history.append({**logs, "step": self.state.global_step})
        for cb in self._reporters:
            cb.on_log(self.args, self.state, self.control, logs=logs, model=self.model)
        if dist.is_main():
            out = Path(self.args.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(json_safe({"step": self.state.global_step, **logs}), allow_nan=False) + "\n")

    def _on_step_end(self, step: int, m: dict) -> None:
        """fastrm's per-step metrics -> TRL's names, logged and evaluated on Trainer's schedule."""
        idx = self._trainer.step_indices(step - 1)
        self._total_train_tokens += sum(self._trl_tokens[i] for i in idx)
        self._tokens_processed += m["tokens"]
        self._train_losses.append(m["loss"])
        self._pairs_trained += len(idx)
        self.state.global_step = step
        self.state.num_input_tokens_seen = self._total_train_tokens
        self.state.epoch = step / self.schedule.steps_per_epoch  # Trainer's fractional epoch
        w = self._window
        for key, name in (
            ("loss", "loss"),
            ("min_reward", "reward_min"),
            ("mean_reward", "reward_mean"),
            ("max_reward", "reward_max"),
            ("accuracy", "accuracy"),
            ("margin", "mean_margin"),
        ):
            w[key].append(m[name])
        if self.schedule.should_log(step):
            logs = {"loss": float(np.mean(w.pop("loss")))}
            if "grad_norm" in m:
                logs["grad_norm"] = m["grad_norm"]
            sched = self._trainer.scheduler  # Trainer logs the rate the step used, before the schedule advanced
            logs["learning_rate"] = sched.base_lrs[0] * sched.lr_lambdas[0](step - 1)
            logs["num_tokens"] = float(self._total_train_tokens)
            logs.update({k: float(np.mean(v)) for k, v in w.items()})
            logs["fastrm/tokens_processed"] = float(self._tokens_processed)  # what the model ran: no padding
            logs["fastrm/tokens_per_s"] = m["tokens_per_s"]
            w.clear()
            self.log(logs)
        if self.schedule.should_eval(step) and self._eval_sets:
            self.evaluate()

    # ------------------------------------------------------------------ train / evaluate / save
    def train(self, resume_from_checkpoint: str | bool | None = None, trial: Any = None, **kwargs: Any) -> TrainOutput:
        """Train to the configured number of steps; returns ``TrainOutput(global_step, training_loss, metrics)``.

        ``resume_from_checkpoint``: a fastrm ``checkpoint-N`` folder, or True for the newest one in output_dir.
        """
        if trial is not None or kwargs:
            raise ValueError(f"train() does not support {'trial' if trial is not None else ', '.join(kwargs)}")
        if resume_from_checkpoint:
            self._trainer.args.resume_from_checkpoint = (
                "latest" if resume_from_checkpoint is True else str(resume_from_checkpoint)
            )
        self._train_losses, self._pairs_trained = [], 0
        for cb in self._reporters:
            cb.on_train_begin(self.args, self.state, self.control, model=self.model)
        t0 = time.perf_counter()
        with self._forms.fastrm():
            self._trainer.train()
        runtime = time.perf_counter() - t0
        losses = self._train_losses
        metrics = {
            "train_runtime": runtime,
            "train_samples_per_second": self._pairs_trained / runtime,
            "train_steps_per_second": len(losses) / runtime,
            "total_flos": 0.0,  # not counted
            "train_loss": float(np.mean(losses)) if losses else float("nan"),
        }
        self.log(metrics)
        for cb in self._reporters:
            cb.on_train_end(self.args, self.state, self.control, model=self.model)
        return TrainOutput(self.state.global_step, metrics["train_loss"], {**metrics, "epoch": self.state.epoch})

    def evaluate(self, eval_dataset: Any = None, ignore_keys: Any = None, metric_key_prefix: str = "eval") -> dict:
        """TRL's eval metrics over the whole eval set: ``eval_loss`` (TRL's loss: Bradley-Terry minus the margin
        column, plus the centring term), ``eval_accuracy``, ``eval_margin``, ``eval_min/mean/max_reward``,
        ``eval_num_tokens`` (training tokens so far, as TRL reports it) and the runtime."""
        if eval_dataset is not None:
            sets = self._eval_sets_of(eval_dataset, metric_key_prefix)
        else:
            sets = self._eval_sets if metric_key_prefix == "eval" else {}
        if not sets:
            raise ValueError("evaluate() needs an eval_dataset (none was given to the trainer)")
        out: dict[str, float] = {}
        for prefix, pairs in sets.items():
            out.update(self._evaluate_pairs(pairs, prefix))
        return out

    def _evaluate_pairs(self, pairs: list, prefix: str) -> dict:
        t0 = time.perf_counter()
        cfg = self._trainer.args
        with self._forms.fastrm():
            rc, rr = compute_pair_rewards(
                self.reward_model,
                pairs,
                max_tokens_per_batch=cfg.max_tokens_per_batch,
                layout=self._trainer.layout,
                autocast=self._trainer.autocast,
            )
        d = rc - rr
        shift = np.array([p.margin for p in pairs]) if pairs[0].margin is not None else 0.0
        loss = np.logaddexp(0.0, -(d - shift))  # -log sigmoid(d - m), computed stably
        if self.args.center_rewards_coefficient is not None:
            loss = loss + self.args.center_rewards_coefficient * (rc + rr) ** 2
        rewards = np.concatenate([rc, rr])
        runtime = time.perf_counter() - t0
        metrics = {
            "loss": float(loss.mean()),
            "runtime": runtime,
            "samples_per_second": len(pairs) / runtime,
            "steps_per_second": math.ceil(len(pairs) / self.args.per_device_eval_batch_size) / runtime,
            "num_tokens": float(self._total_train_tokens),
            "min_reward": float(rewards.min()),
            "mean_reward": float(rewards.mean()),
            "max_reward": float(rewards.max()),
            "accuracy": float((d > 0).mean()),
            "margin": float(d.mean()),
        }
        metrics = {f"{prefix}_{k}": v for k, v in metrics.items()}
        self.log(metrics)
        for cb in self._reporters:
            cb.on_evaluate(self.args, self.state, self.control, metrics=metrics, model=self.model)
        return {**metrics, "epoch": self.state.epoch} if self.state.epoch is not None else metrics

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Write an HF sequence-classification folder (weights, config with ``pad_token_id``, tokenizer) that
        ``AutoModelForSequenceClassification.from_pretrained`` and ``trl.RewardTrainer`` load."""
        out = output_dir or self.args.output_dir
        full, _ = self._trainer.replication.full_state()  # collective when sharded
        if dist.is_main():
            with self._forms.fastrm():
                self.reward_model.save_pretrained(out, tokenizer=self.processing_class, state_dict=full)
        dist.barrier()

    def push_to_hub(self, *args: Any, **kwargs: Any) -> None:
        """Refused: fastrm runs offline and uploads nothing (``push_to_hub=True`` in the config is refused too)."""
        raise NotImplementedError(
            f"fastrm does not push to a model hub: save_model() wrote the model to a folder ({self.args.output_dir} "
            "unless you named another); upload that folder yourself (e.g. `hf upload <repo> <folder>`)"
        )

    def end(self) -> None:
        """Finish: what ``transformers.Trainer.end()`` does (TRL's scripts call it last)."""
        self.accelerator.end_training()
