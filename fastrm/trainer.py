"""RewardTrainer: optimizer steps over packed micro-batches, with the paper's batch semantics.

A step takes ``pairs_per_step`` pairs (over all ranks; rank r takes every W-th), packs its share into micro-batches
under ``max_tokens_per_batch`` and accumulates gradients. What is trained is the config's objective
(fastrm/objectives.py: how rows become examples, what a micro-batch computes, the loss and its step normaliser, the
metrics as sums); the trainer owns the step, replication, the optimizer and checkpoints. The loss is normalised by
the step's global count of the objective's units (pairs for the scalar objective, target tokens for seq2seq), so
the gradient does not depend on the token budget or the number of ranks. With ``margin_scope="step"`` and a
loss that uses the batch mean, mu_B is the mean margin over the whole step on all ranks: one no-grad forward over
the step's micro-batches computes it (all-reduced), then the gradient passes use it as a constant (or, with
``detach_mean=False``, with the exact cross term). That extra forward costs about a third of a step; it is skipped
when the step is a single micro-batch on a single rank, where the micro-batch mean is the step mean.

Host syncs: the gradient passes run without any; a step ends with one transfer of its metrics (FSDP adds one to
agree on the number of passes).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from fastrm import checkpoint as ckpt_io
from fastrm import distributed as dist
from fastrm import formatting, lora, run_dir, saved_tokenizer
from fastrm.config import RewardConfig, check_eval_source
from fastrm.evaluation import json_safe
from fastrm.model import LossConfig, RewardModel
from fastrm.objectives import check_margins, margin_policy  # noqa: F401  (re-exported)
from fastrm.packing import PackedBatch
from fastrm.prefetch import HostStep, StepPrefetcher, pin_batch

latest_checkpoint = ckpt_io.latest_checkpoint  # re-exported: callers look for it next to the trainer


def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class RewardTrainer:
    """Train a :class:`RewardModel` on preference pairs (or, with ``objective="seq2seq"``, a
    :class:`fastrm.seq2seq.Seq2SeqRewardModel`).

    Args:
        model: the reward model (on CPU; the trainer moves it to the device).
        args: a :class:`RewardConfig`.
        train_dataset: tokenized pairs (``fastrm.data.TokenizedPair``), or anything
            ``fastrm.tokenization.load_tokenized``
            reads (a path, a list of paths, a ``datasets.Dataset``, a list of dicts) together with ``tokenizer``.
        eval_dataset: the same kinds, optional.
        tokenizer: any Hugging Face tokenizer (needed for text data, and saved with the model).
        on_step_end: optional callback(step, metrics) (Ray Train reports through it).
        device: default CUDA if available, else CPU.
        fsdp: shard with FSDP2 instead of replicating with DDP (only when a process group is initialised).
        run_inputs: the data/eval_data/model/tokenizer as the user named them, recorded in the run folder's identity
            (the CLI passes its flags; see fastrm/run_dir.py).
        overwrite: remove the files of another training in ``output_dir`` first, instead of refusing the folder.
        run_folder: give ``output_dir`` a run identity (same training resumes, another is refused); False keeps
            transformers.Trainer's rules (the TRL drop-in).
    """

    def __init__(
        self,
        model: RewardModel,
        args: RewardConfig,
        train_dataset: Any,
        eval_dataset: Any = None,
        tokenizer=None,
        on_step_end: Callable[[int, dict], None] | None = None,
        device: torch.device | None = None,
        fsdp: bool = False,
        run_inputs: dict | None = None,
        overwrite: bool = False,
        run_folder: bool = True,
    ):
        from fastrm.tokenization import model_vocab_size

        self.args = args
        self.objective = get_objective(getattr(args, "objective", "scalar"))
        self.tokenizer = tokenizer if tokenizer is not None else model.tokenizer
        if self.tokenizer is not None and (args.save_steps or args.save_final):  # before training, not at a save
            saved_tokenizer.check_savable(self.tokenizer, model.backbone.config)
        self.device = device or default_device()
        self.load_stats: dict = {}  # split -> fastrm.data.LoadStats, for data loaded here
        check_eval_source(args, eval_dataset is not None)
        self.vocab_size = model_vocab_size(model)  # token ids at or above it are bad rows
        self.model = model  # the objective's prepare reads it; moved to the device below
        self.train_pairs = self._prepare(train_dataset, "train")
        self.eval_pairs = self._prepare(eval_dataset, "eval") if eval_dataset is not None else None
        if self.eval_pairs is None and args.eval_fraction > 0:
            from fastrm.tokenization import train_eval_split

            self.train_pairs, self.eval_pairs = train_eval_split(self.train_pairs, args.eval_fraction, args.seed)
        if not self.train_pairs:
            raise ValueError("no training pairs")
        lora.prepare(model, args, self.tokenizer)  # lora_r > 0: adapters injected, base frozen, before the move
        model.fused = "auto" if args.fused_head is None else args.fused_head
        model.attn_backend = args.attn_backend
        # What every checkpoint of this run records as its scoring rule (fastrm/formatting.py): training's rule.
        model.scoring_rule = formatting.training_rule(
            self.tokenizer, append_eos=args.append_eos, max_length=args.max_length
        )
        self.model = model.to(self.device)
        if args.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        self.autocast = args.bf16 if args.bf16 is not None else self.device.type == "cuda"
        # The construction self-test ran where the model was built (usually the CPU, fp32): again on this device's
        # back end and precision, before wrapping (a no-op when already tested so, or built with self_test=False).
        self.objective.self_test_for_run(self)
        self.replication = dist.Replication(self.model, self.model.decoder_layers, self.device, fsdp=fsdp)
        self.loss_cfg = LossConfig(args.loss, args.detach_mean, args.center_rewards_coefficient)
        self.layout = "shared_prompt" if args.prefix_sharing else "separate"
        self.on_step_end = on_step_end
        self.out = Path(args.output_dir)
        self.run = run_dir.RunFolder(self.out, specs=run_inputs, overwrite=overwrite, enabled=run_folder)
        self.steps_per_epoch = math.ceil(len(self.train_pairs) / args.pairs_per_step)
        self.total_steps = args.max_steps if args.max_steps > 0 else self.steps_per_epoch * args.num_train_epochs
        self.optimizer = self._make_optimizer()
        self.scheduler = self._make_scheduler()
        self.step = 0
        self._perm_cache: dict[int, list[int]] = {}
        self._placeholder: PackedBatch | None = None
        self._graph_bytes_per_token: float | None = None  # a kept forward graph's memory (CUDA), see _keep_graphs

    # ---------------------------------------------------------------- setup
    def _prepare(self, ds, what: str):
        """Rows -> this objective's examples (bad rows raised or counted in ``load_stats``)."""
        if ds is None:
            return None
        return self.objective.prepare(self, ds, what)

    def _make_optimizer(self) -> torch.optim.Optimizer:
        a = self.args
        decay, no_decay = [], []
        for p in self.model.parameters():
            if p.requires_grad:
                (no_decay if p.dim() < 2 else decay).append(p)
        groups = [{"params": decay, "weight_decay": a.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(
            groups,
            lr=a.learning_rate,
            betas=(a.adam_beta1, a.adam_beta2),
            eps=a.adam_epsilon,
            fused=self.device.type == "cuda",
        )

    def _make_scheduler(self):
        from transformers import get_scheduler

        name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[self.args.lr_scheduler_type]
        warmup = int(round(self.args.warmup_ratio * self.total_steps))
        return get_scheduler(name, self.optimizer, num_warmup_steps=warmup, num_training_steps=self.total_steps)

    # ---------------------------------------------------------------- data order
    def _epoch_order(self, epoch: int) -> list[int]:
        cache = self._perm_cache  # one read: the prefetch thread may replace it meanwhile (fastrm.prefetch)
        if epoch not in cache:
            g = torch.Generator().manual_seed(self.args.seed * 1000003 + epoch)
            cache = self._perm_cache = {epoch: torch.randperm(len(self.train_pairs), generator=g).tolist()}
        return cache[epoch]

    def step_indices(self, step: int) -> list[int]:
        """Global pair indices of an optimizer step (identical on every rank)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        order = self._epoch_order(epoch)
        return order[k * self.args.pairs_per_step : (k + 1) * self.args.pairs_per_step]

    # ---------------------------------------------------------------- one optimizer step
    def _forward(self, module, batch, **kw):
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return module(batch, **kw)

    def _pass_batch(self, mbs: list[PackedBatch], i: int) -> tuple[PackedBatch, bool]:
        """Micro-batch i, or a zero-weight placeholder when this rank runs more passes than it has micro-batches
        (DDP: a rank without pairs still joins the gradient all-reduce; FSDP: ranks all-gather equally often)."""
        if i < len(mbs):
            return mbs[i], True
        if self._placeholder is None:
            self._placeholder = self.objective.pack([self.train_pairs[0]], self.layout).to(self.device)
        return self._placeholder, False

    def accumulate_gradients(self, pairs: Sequence, n_global: int, host_batches: list | None = None) -> dict:
        """Forward/backward over this rank's share of a step (gradients accumulate in ``.grad``).

        ``n_global``: the step's normaliser over all ranks (``objective.step_units`` of the whole step: its pair
        count for the scalar objective). ``host_batches``: ``pairs`` already packed on the host (by the prefetch
        thread, fastrm.prefetch), else they are packed here. Returns device tensors (no host sync), as the
        objective's ``step_result`` arranges them, with ``counts`` [3] = (examples, tokens, micro-batches) and
        ``micro_batches``. The scalar objective's: ``sums`` [5] (see fastrm.losses.STATS_FIELDS) over this rank's
        real pairs, ``mu`` (the step mu when ``step_mu``, else the sum of the micro-batch mus over ``counts[2]``
        micro-batches), ``reward_extrema`` [2] = (-min, max) and ``reward_sum`` [1] of the rewards.
        """
        obj = self.objective
        if host_batches is None:
            host_batches = obj.micro_batches(pairs, self.args.max_tokens_per_batch, self.layout)
        mbs = [mb.to(self.device) for mb in host_batches]
        normalizer = n_global / dist.world_size()  # each rank's loss is summed by the gradient all-reduce
        n_passes = self.replication.num_passes(len(mbs))
        state = obj.begin_step(self, mbs, n_passes, normalizer)
        sums = maxes = None
        for i in range(n_passes):
            mb, real = self._pass_batch(mbs, i)
            with self.replication.gradient_pass(last=i == n_passes - 1):
                loss, s, m = obj.forward(self, self.replication.module, mb, state, normalizer)
                (loss if real else loss * 0.0).backward()
            if sums is None:
                sums, maxes = torch.zeros_like(s), torch.full_like(m, -math.inf)
            if real:
                sums += s
                maxes = torch.maximum(maxes, m)
        counts = torch.tensor([len(pairs), sum(mb.num_tokens for mb in mbs), len(mbs)], device=self.device)
        return obj.step_result(sums, maxes, counts.float(), state, len(mbs))

    def optimizer_update(self) -> torch.Tensor | None:
        """Clip, step the optimizer and the schedule, zero the gradients; returns the pre-clip gradient norm (a
        device tensor, or None without clipping)."""
        norm = None
        if self.args.max_grad_norm and self.args.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.args.max_grad_norm)
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a DTensor
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def train_step(self, pairs: Sequence, n_global: int, host_batches: list | None = None) -> dict:
        """One optimizer step on this rank's share of a step's pairs; returns the step's metrics (all ranks).

        The step's numbers reach the host once, as one all-reduced vector, after the optimizer update."""
        r = self.accumulate_gradients(pairs, n_global, host_batches)
        norm = self.optimizer_update()
        norm_vec = torch.full((1,), float("nan"), device=self.device) if norm is None else norm.reshape(1)
        obj = self.objective
        sums = obj.sum_vector(r)
        vec = torch.cat([sums, r["counts"], norm_vec])
        host = torch.cat([dist.all_reduce_sum(vec.float()), dist.all_reduce_max(obj.max_vector(r))]).tolist()
        W, k = dist.world_size(), sums.numel()
        counts = host[k : k + 3]
        common = dict(tokens=int(counts[1]), micro_batches=int(counts[2]), lr=self.scheduler.get_last_lr()[0])
        m = obj.metrics(host[:k], host[k + 4 :], counts, W, r, common)
        if norm is not None:
            m["grad_norm"] = host[k + 3] / W  # equal on every rank (summed W times)
        return m

    # ---------------------------------------------------------------- loop
    def train(self) -> dict:
        """Run training to ``total_steps``; returns the final metrics (eval metrics too if there is eval data).

        The run folder decides where it starts (fastrm/run_dir.py): this training's last complete checkpoint when
        the folder holds it (a finished run returns its recorded result), ``resume_from_checkpoint`` when given."""
        try:
            return self._train()
        finally:
            self.run.release()

    def _train(self) -> dict:
        from tqdm.auto import tqdm

        a = self.args
        seed_everything(a.seed)
        resume, finished = self.run.start(self)
        if finished is not None:
            return finished
        if resume is not None:
            self.load_checkpoint(resume)
        self.run.begin(self)
        self.model.train()
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc="train",
            unit="step",
            disable=not (a.progress and dist.is_main()),
        )
        last: dict = {}
        t_start, pairs_seen = time.perf_counter(), 0
        with StepPrefetcher(self.host_step, enabled=a.prefetch) as prefetcher:
            while self.step < self.total_steps:
                t0 = time.perf_counter()
                hs = prefetcher.get(self.step)
                if self.step + 1 < self.total_steps:
                    prefetcher.prefetch(self.step + 1)  # packed on the host while this step runs on the device
                m = self.train_step(hs.pairs, hs.n_global, hs.batches)
                dt = time.perf_counter() - t0  # the metrics' host transfer ended the step: dt is its real duration
                self.step += 1
                pairs_seen += hs.n_examples
                last = m
                self._after_step(m, dt, hs.n_examples, bar)
        bar.close()
        elapsed = time.perf_counter() - t_start
        result = {"train": last, "train_runtime_s": elapsed, "train_pairs_per_s": pairs_seen / max(elapsed, 1e-9)}
        if a.save_steps:
            self.save_checkpoint()
        if a.save_final:
            self.save_final_model()
        if self.eval_pairs:
            result["eval"] = self.evaluate()
            self._log({"split": "eval", "step": self.step, **result["eval"]})
        self.run.finish(result, self.step)
        return result

    def host_step(self, step: int) -> HostStep:
        """Optimizer step ``step``'s host work: its pairs (this rank's share), normaliser and packed micro-batches
        (pinned on CUDA). Runs on the prefetch thread (fastrm.prefetch); reads the pairs, never the model."""
        idx = self.step_indices(step)
        pairs = [self.train_pairs[i] for i in idx[dist.rank() :: dist.world_size()]]
        n_global = self.objective.step_units([self.train_pairs[i] for i in idx])  # on the host, all ranks
        batches = self.objective.micro_batches(pairs, self.args.max_tokens_per_batch, self.layout)
        if self.device.type == "cuda":
            batches = [pin_batch(b) for b in batches]
        return HostStep(pairs, n_global, batches, len(idx))

    def _after_step(self, m: dict, dt: float, n_examples: int, bar) -> None:
        """A finished step's metrics, progress bar, log, callback, periodic eval and checkpoint."""
        a = self.args
        m.update(
            step=self.step,
            epoch=(self.step - 1) // self.steps_per_epoch,
            step_time=dt,
            tokens_per_s=m["tokens"] / dt,
            pairs_per_s=n_examples / dt,
        )
        bar.update(1)
        bar.set_postfix(
            **{shown: format(m[k], f) for shown, (k, f) in self.objective.progress_fields.items()},
            tok_s=f"{m['tokens_per_s']:.0f}",
        )
        if a.logging_steps and self.step % a.logging_steps == 0:
            self._log({"split": "train", **m})
        if self.on_step_end is not None:
            self.on_step_end(self.step, m)
        if a.eval_steps and self.step % a.eval_steps == 0 and self.eval_pairs:
            self._log({"split": "eval", "step": self.step, **self.evaluate(plot=False)})
            self.model.train()
        if a.save_steps and self.step % a.save_steps == 0 and self.step < self.total_steps:
            self.save_checkpoint()

    def evaluate(self, pairs=None, plot: bool = True) -> dict:
        """The objective's eval metrics on ``pairs`` (default the eval set): accuracy and margin statistics for the
        scalar objective, which writes eval_metrics.json and the margin histogram PNG to output_dir (main rank
        only)."""
        pairs = pairs if pairs is not None else self.eval_pairs
        if not pairs:
            raise ValueError("no eval pairs")
        out = self.out if (plot and dist.is_main()) else None
        return self.objective.evaluate(self, pairs, out)

    def _log(self, record: dict) -> None:
        if not dist.is_main():
            return
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / run_dir.METRICS_FILE, "a") as f:
            rec = {k: v for k, v in record.items() if not isinstance(v, (torch.Tensor, list))}
            f.write(json.dumps(json_safe(rec), allow_nan=False) + "\n")

    # ---------------------------------------------------------------- checkpoints
    def save_checkpoint(self, path: str | os.PathLike | None = None) -> Path:
        """Write ``checkpoint-N`` atomically: an HF-loadable model folder plus trainer_state.pt (optimizer,
        scheduler, RNG, step, config)."""
        final = Path(path) if path is not None else self.out / f"{ckpt_io.PREFIX}{self.step}"
        model_sd, optim_sd = self.replication.full_state(self.optimizer)  # collective when sharded
        error = None
        if dist.is_main():
            state = {
                "step": self.step,
                "optimizer": optim_sd if self.replication.sharded else self.optimizer.state_dict(),
                "fsdp": self.replication.sharded,
                "scheduler": self.scheduler.state_dict(),
                "rng": ckpt_io.rng_state(),
                "config": self.args.to_dict(),
            }

            def write(tmp: Path) -> None:
                self.objective.save_model(self, tmp, model_sd)
                ckpt_io.save_trainer_state(tmp, state)
                run_dir.save_history(self.out, tmp)  # a resume continues this metrics.jsonl exactly

            own = model_sd if model_sd is not None else self.model.state_dict()
            needed = ckpt_io.save_size(self.tokenizer, own, state["optimizer"])
            try:
                ckpt_io.save_guarded(final, write, needed=needed, what=final.name, run_dir=self._run_of(final))
            except ckpt_io.SaveError as e:
                error = e
            if error is None and ckpt_io.checkpoint_step(final) is not None and final.parent == self.out:
                ckpt_io.prune(self.out, self.args.save_total_limit, protect=final)
        ckpt_io.agree(error)  # every rank raises a failed save (and waits for the save, as a barrier did)
        return final

    def save_final_model(self) -> None:
        """Write the trained model into output_dir (an HF sequence-classification folder), checked and atomic."""
        full, _ = self.replication.full_state()  # collective when sharded
        error = None
        if dist.is_main():
            staging = self.out / ckpt_io.FINAL_STAGING
            needed = ckpt_io.save_size(self.tokenizer, full if full is not None else self.model.state_dict())
            try:
                ckpt_io.save_guarded(
                    staging,
                    lambda tmp: self.objective.save_model(self, tmp, full),
                    needed=needed,
                    what="the final model",
                    run_dir=self.out,
                )
            except ckpt_io.SaveError as e:
                error = e
            else:
                self.run.add_final_files([f.name for f in staging.iterdir()])
                _move_contents(staging, self.out)
                if self.args.merge_lora:  # the adapters merged into the base: a plain HF folder beside them
                    from fastrm.lora_merge import write_merged

                    try:
                        write_merged(self.model, self.out / lora.MERGED_DIR, self.tokenizer, run_dir=self.out)
                    except ckpt_io.SaveError as e:
                        error = e
        ckpt_io.agree(error)

    def _run_of(self, folder: Path) -> Path | None:
        return self.out if folder.parent == self.out else None

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Restore model weights, optimizer, scheduler, RNG, step and the metrics history up to that step; training
        then continues identically.

        ``"latest"`` takes the newest complete checkpoint in output_dir (an error if there is none). The
        checkpoint's training config must equal this run's in every field that changes what is trained."""
        if str(path) == "latest":
            path = ckpt_io.latest_checkpoint(self.out)
            if path is None:
                raise run_dir.RunFolderError(f"{self.out}: no complete checkpoint to resume from")
        path = Path(path)
        state = ckpt_io.load_trainer_state(path)
        check_resumable(state.get("config", {}), self.args, path)
        if state.get("fsdp", False) != self.replication.sharded:
            how = "with" if state.get("fsdp") else "without"
            raise ValueError(f"{path}: optimizer state saved {how} FSDP; resume the same way")
        if self.replication.sharded:
            weights = self.model.read_weights(path)
            partial = getattr(self.model, "lora", None) is not None  # adapters and head only: the base is frozen
            missing = sorted(n for n, p in self.model.named_parameters() if p.requires_grad and n not in weights)
            if missing:
                raise ValueError(f"{path}: no saved weights for trained parameters {', '.join(missing[:3])}")
            self.replication.load_full_state(weights, self.optimizer, state["optimizer"], strict=not partial)
        else:
            self.model.load_weights(path)
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        ckpt_io.set_rng_state(state["rng"])
        self.step = int(state["step"])
        if dist.is_main():
            run_dir.restore_history(path, self.out, self.step)


# Re-exported: the Ray entry point and older callers import them from here; fastrm/run_dir.py owns them.
FRESH_START_HINT = run_dir.FRESH_START_HINT
check_resumable = run_dir.check_resumable


def get_objective(name: str):
    """The objective named by ``RewardConfig.objective`` (fastrm/objectives.py, fastrm/seq2seq.py)."""
    from fastrm.objectives import OBJECTIVES, PairwiseObjective

    if name == "scalar":
        return PairwiseObjective()
    if name == "seq2seq":
        from fastrm.seq2seq import Seq2SeqObjective

        return Seq2SeqObjective()
    raise ValueError(f"unknown objective {name!r}; expected one of {OBJECTIVES}")


def _move_contents(src: Path, dst: Path) -> None:
    """Move the files of a completed model folder into ``dst`` (replacing same-named files), then drop ``src``."""
    for f in src.iterdir():
        os.replace(f, dst / f.name)
    src.rmdir()
