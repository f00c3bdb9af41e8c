"""Training objectives: what the trainer trains, behind one interface.

:class:`fastrm.trainer.RewardTrainer` owns what every objective shares: the data order (``pairs_per_step`` preference
pairs per optimizer step, rank r taking every W-th), the token-budget micro-batches, replication (single / DDP /
FSDP2 passes, zero-weight placeholder passes for a rank with fewer micro-batches), the optimizer and schedule, the
one host transfer of a step's metrics, the run folder and checkpoints. An :class:`Objective` supplies the rest:

===========================  ==================================================================================
``prepare``                  rows (files, datasets, dicts, or ready examples) -> the examples of one split, with
                             bad rows raised (``file:line: field ...``) or counted in ``trainer.load_stats``
``cost`` / ``pack``          an example's packed tokens, and examples -> one :class:`~fastrm.packing.PackedBatch`
``step_units``               what a step's loss is normalised by, counted on the host over the step's examples on
                             all ranks (pairs; target tokens): ``loss = sum of per-unit losses / units``
``begin_step``               work before the gradient passes that needs the whole step (the pairwise μ_B pass)
``forward``                  one micro-batch: ``(loss, sums, maxes)``: the loss already divided by the step
                             normaliser (so micro-batches and ranks add up to the step's loss), and the metrics
                             as sums (all-reduced by sum) and maxima (all-reduced by max), device tensors
``step_result`` / ``metrics``  the step's device results, then the host metrics from the all-reduced vectors
``evaluate``                 eval metrics of a list of examples (every rank gets the same numbers)
``save_model``               what a model folder records (an HF folder the stock loaders read, plus its JSON)
===========================  ==================================================================================

Normalisation contract: ``forward`` gets ``normalizer = units of the whole step on all ranks / world size`` and
returns ``sum over its micro-batch / normalizer``; DDP averages the ranks' gradients, so N ranks train exactly the
gradient one process computes on the whole step (tests/test_distributed.py, tests/test_seq2seq.py).

The pairwise objective below is the scalar reward model's (``objective="scalar"``); ``fastrm/seq2seq.py`` is the
second (``objective="seq2seq"``, Zhou et al. 2024).
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from fastrm import distributed as dist

if TYPE_CHECKING:
    from fastrm.packing import PackedBatch
    from fastrm.trainer import RewardTrainer


class Objective:
    """The interface (see the module docstring). Methods take the trainer, whose ``args`` they read at call time."""

    name: str = ""
    #: what one example is called in messages and logs ("pairs")
    unit_name: str = "pairs"

    # ------------------------------------------------------------------------------------------------ data
    def prepare(self, trainer: RewardTrainer, ds: Any, what: str) -> list:
        raise NotImplementedError

    def cost(self, example: Any, layout: str) -> int:
        raise NotImplementedError

    def pack(self, examples: Sequence, layout: str) -> PackedBatch:
        raise NotImplementedError

    def micro_batches(self, examples: Sequence, max_tokens: int, layout: str) -> list[PackedBatch]:
        """First-fit-decreasing micro-batches of ``examples`` under ``max_tokens`` (fastrm.packing)."""
        from fastrm.packing import plan_micro_batches

        costs = [self.cost(e, layout) for e in examples]
        bins = plan_micro_batches(costs, max_tokens, [e.source for e in examples])
        return [self.pack([examples[i] for i in b], layout) for b in bins]

    def step_units(self, examples: Sequence) -> int:
        """The step normaliser's units in ``examples`` (the trainer passes a whole step, all ranks)."""
        return len(examples)

    # ------------------------------------------------------------------------------------------------ step
    def begin_step(self, trainer: RewardTrainer, mbs: list, n_passes: int, normalizer: float) -> Any:
        return None

    def forward(self, trainer: RewardTrainer, module, mb: PackedBatch, state: Any, normalizer: float):
        raise NotImplementedError

    def step_result(self, sums: torch.Tensor, maxes: torch.Tensor, counts: torch.Tensor, state: Any, n_mbs: int):
        return {"sums": sums, "maxes": maxes, "counts": counts, "micro_batches": n_mbs}

    def sum_vector(self, r: dict) -> torch.Tensor:
        """The step's sums to all-reduce by sum (before the trainer's counts and gradient norm)."""
        return r["sums"]

    def max_vector(self, r: dict) -> torch.Tensor:
        return r["maxes"]

    def metrics(
        self, sums: list[float], maxes: list[float], counts: list[float], world: int, r: dict, common: dict
    ) -> dict:
        """The step's metrics from the all-reduced ``sums`` and ``maxes``, ``counts`` = (examples, tokens,
        micro-batches) over all ranks; ``common`` holds the trainer's own (tokens, micro_batches, lr) to include."""
        raise NotImplementedError

    #: the progress bar's postfix: shown name -> (metric, format)
    progress_fields: dict[str, tuple[str, str]] = {"loss": ("loss", ".4f")}

    # ------------------------------------------------------------------------------------------------ outputs
    def evaluate(self, trainer: RewardTrainer, examples: Sequence, out_dir) -> dict:
        raise NotImplementedError

    def save_model(self, trainer: RewardTrainer, folder, state_dict: dict | None) -> None:
        trainer.model.save_pretrained(folder, tokenizer=trainer.tokenizer, state_dict=state_dict)

    def self_test_for_run(self, trainer: RewardTrainer) -> None:
        """The construction self-test again on the trainer's device and precision (fastrm/self_test.py)."""
        from fastrm import backbones

        backbones.self_test_for_run(trainer.model, autocast=torch.bfloat16 if trainer.autocast else None)


class PairwiseObjective(Objective):
    """The scalar reward model: a pairwise loss on the rewards of each pair's chosen and rejected response
    (fastrm/losses.py; Qin et al. 2024's margins), normalised by the step's pairs. Sums are
    ``STATS_FIELDS + (reward_sum,)``, maxima ``(-min reward, max reward)``."""

    name = "scalar"

    def prepare(self, trainer: RewardTrainer, ds: Any, what: str) -> list:
        from fastrm.data import TokenizedPair
        from fastrm.tokenization import check_token_ids, load_tokenized

        if isinstance(ds, (list, tuple)) and ds and all(isinstance(p, TokenizedPair) for p in ds):
            check_token_ids(ds, trainer.vocab_size)
            return check_margins(list(ds), trainer.args.loss)
        if trainer.tokenizer is None:
            raise ValueError(f"{what} data is not tokenized: pass tokenizer=...")
        a = trainer.args
        pairs, stats = load_tokenized(
            ds,
            trainer.tokenizer,
            max_length=a.max_length,
            append_eos=a.append_eos,
            on_bad_row=a.on_bad_row,
            margins=margin_policy(a.loss),
            vocab_size=trainer.vocab_size,
        )
        trainer.load_stats[what] = stats
        return pairs

    def cost(self, example, layout: str) -> int:
        from fastrm.packing import pair_cost

        return pair_cost(example, layout)

    def pack(self, examples, layout: str):
        from fastrm.packing import pack_pairs

        return pack_pairs(examples, layout)

    def micro_batches(self, examples, max_tokens: int, layout: str):
        from fastrm.packing import micro_batches

        return micro_batches(examples, max_tokens, layout)

    # ------------------------------------------------------------------------------------------------ step
    def _loss_cfg(self, trainer: RewardTrainer):
        from fastrm.model import LossConfig

        a = trainer.args
        return LossConfig(a.loss, a.detach_mean, a.center_rewards_coefficient)

    def begin_step(self, trainer: RewardTrainer, mbs: list, n_passes: int, normalizer: float):
        """(mu, mu_grad): the step-wide mu_B when the loss uses it and the step spans micro-batches or ranks."""
        from fastrm.losses import USES_MEAN

        a = trainer.args
        needed = a.loss in USES_MEAN and a.margin_scope == "step" and (len(mbs) > 1 or dist.world_size() > 1)
        if not needed:
            return None, None, None
        if self._keep_graphs(trainer, mbs):
            return self._kept_forwards(trainer, mbs, normalizer)
        return (*self._step_mu(trainer, mbs, n_passes, normalizer), None)

    def _keep_graphs(self, trainer: RewardTrainer, mbs: list) -> bool:
        """Whether this step computes mu_B from kept forward graphs instead of an extra no-grad forward.

        Single process only: under DDP a forward outside ``no_sync`` arms the gradient all-reduce for the next
        backward, and FSDP reshards after each forward, so both keep the extra pass. Unset, on with gradient
        checkpointing (a kept graph holds one [T, H] input per layer), else on CUDA when the step's graphs fit
        80% of free memory, at the activation bytes per token measured on the first step that keeps them."""
        choice = trainer.args.mu_keep_graphs
        if trainer.replication.kind != "single" or choice is False:
            return False
        if choice or trainer.args.gradient_checkpointing:
            return True
        if trainer.device.type != "cuda":
            return False  # no cheap measure of activation memory on the CPU
        if trainer._graph_bytes_per_token is None:
            return True  # measured by this step's first forward (_kept_forwards)
        free, _ = torch.cuda.mem_get_info(trainer.device)
        return trainer._graph_bytes_per_token * sum(mb.num_tokens for mb in mbs) <= 0.8 * free

    def _kept_forwards(self, trainer: RewardTrainer, mbs: list, normalizer: float):
        """Every micro-batch's backbone forward with its graph kept, then mu_B (and the detach_mean=False cross term)
        from their pooled rewards: the step's mu_B at the FLOPs of a margin_scope='micro' step. Returns
        (mu, mu_grad, {id(micro-batch): hidden [T_i, H]}); the same numbers as :meth:`_step_mu` (tested)."""
        from fastrm.losses import mu_cross_term, mu_derivative_sum

        kept, ds = {}, []
        model, cuda = trainer.model, trainer.device.type == "cuda"
        for mb in mbs:
            before = torch.cuda.memory_allocated(trainer.device) if cuda else 0
            with torch.autocast(trainer.device.type, dtype=torch.bfloat16, enabled=trainer.autocast):
                h = model.hidden_states(mb)
                with torch.no_grad():
                    r = model.head(h.detach().index_select(0, mb.pool_index))
            if cuda and trainer._graph_bytes_per_token is None:
                trainer._graph_bytes_per_token = (torch.cuda.memory_allocated(trainer.device) - before) / mb.num_tokens
            kept[id(mb)] = h
            ds.append(r[: mb.num_pairs].float() - r[mb.num_pairs :].float())
        # The arithmetic of _step_mu, in its order, so both give the same bits.
        d_sum = torch.zeros((), device=trainer.device)
        n = torch.zeros((), device=trainer.device)
        for d in ds:
            d_sum += d.sum()
            n += d.numel()
        mu = d_sum / n
        mu_grad = None
        if not trainer.args.detach_mean:
            mu_grad = mu_cross_term(mu_derivative_sum(torch.cat(ds), trainer.args.loss, mu), normalizer, n)
        return mu, mu_grad, kept

    @torch.no_grad()
    def _step_mu(self, trainer: RewardTrainer, mbs: list, n_passes: int, normalizer: float):
        """mu_B over the real pairs of the whole step on all ranks (placeholders excluded), and the cross term for
        detach_mean=False. Runs on the unwrapped (or FSDP-sharded) model: a no-grad pass needs no DDP."""
        from fastrm.losses import mu_cross_term, mu_derivative_sum

        d_sum = torch.zeros((), device=trainer.device)
        n = torch.zeros((), device=trainer.device)
        ds = []
        for i in range(n_passes):
            mb, real = trainer._pass_batch(mbs, i)
            r = trainer._forward(trainer.model, mb)
            if real:
                d = r[: mb.num_pairs].float() - r[mb.num_pairs :].float()
                ds.append(d)
                d_sum += d.sum()
                n += d.numel()
        tot = dist.all_reduce_sum(torch.stack([d_sum, n]))
        mu = tot[0] / tot[1]
        mu_grad = None
        if not trainer.args.detach_mean:
            d = torch.cat(ds) if ds else torch.zeros(0, device=trainer.device)
            s = dist.all_reduce_sum(mu_derivative_sum(d, trainer.args.loss, mu).reshape(1))[0]
            mu_grad = mu_cross_term(s, normalizer, tot[1])
        return mu, mu_grad

    def forward(self, trainer: RewardTrainer, module, mb, state, normalizer: float):
        mu, mu_grad, kept = state
        # A kept graph is used once: popping it drops the last reference, so its backward frees it.
        hidden = {} if kept is None else {"hidden": kept.pop(id(mb))}
        loss, rewards, s = trainer._forward(
            module, mb, loss=self._loss_cfg(trainer), mu=mu, mu_grad=mu_grad, normalizer=normalizer, **hidden
        )
        rewards = rewards.detach().float()
        # [-min, max] and the sum of the rewards: TRL logs min/mean/max reward, and dashboards plot them.
        return loss, torch.cat([s.float(), rewards.sum().reshape(1)]), torch.stack([-rewards.min(), rewards.max()])

    def step_result(self, sums, maxes, counts, state, n_mbs: int) -> dict:
        mu = state[0]
        return {
            "sums": sums[:5],
            "counts": counts,
            "mu": mu if mu is not None else sums[4],
            "step_mu": mu is not None,
            "micro_batches": n_mbs,
            "reward_extrema": maxes,
            "reward_sum": sums[5:],
        }

    def sum_vector(self, r: dict) -> torch.Tensor:
        return torch.cat([r["sums"], r["mu"].reshape(1).float(), r["reward_sum"]])

    def max_vector(self, r: dict) -> torch.Tensor:
        return r["reward_extrema"]

    def metrics(self, sums, maxes, counts, world, r, common) -> dict:
        from fastrm.losses import stats_from_sums

        n_pairs, _tokens, n_mbs = counts
        # A step mu is equal on every rank (summed W times); micro-batch mus add up.
        mu = sums[5] / world if r["step_mu"] else sums[5] / max(n_mbs, 1.0)
        m = stats_from_sums(sums[:5], int(n_pairs))
        m.pop("sums")
        m.update(mu=mu, **common)
        m.update(reward_mean=sums[6] / max(2 * n_pairs, 1.0), reward_min=-maxes[0], reward_max=maxes[1])
        return m

    progress_fields = {"loss": ("loss", ".4f"), "acc": ("accuracy", ".3f")}

    # ------------------------------------------------------------------------------------------------ outputs
    def evaluate(self, trainer: RewardTrainer, pairs, out_dir) -> dict:
        """Accuracy and margin statistics (fastrm/evaluation.py). Under DDP each rank scores every W-th pair and the
        margins are gathered back into input order, so every rank gets the statistics one process computes (exact,
        not averaged). FSDP keeps the full eval on every rank: its forwards are collectives, and shares of
        different sizes would run different numbers of them."""
        from fastrm.evaluation import compute_pair_rewards, evaluate_pairs, margin_report

        a = trainer.args
        kw = dict(max_tokens_per_batch=a.max_tokens_per_batch, layout=trainer.layout, autocast=trainer.autocast)
        if trainer.replication.kind != "ddp":
            return evaluate_pairs(trainer.model, pairs, out_dir=out_dir, progress=a.progress and dist.is_main(), **kw)
        W, rk = dist.world_size(), dist.rank()
        rc, rr = compute_pair_rewards(trainer.model, pairs[rk::W], progress=a.progress and dist.is_main(), **kw)
        d = np.empty(len(pairs))
        for k, part in enumerate(dist.all_gather_objects(rc - rr)):
            d[k::W] = part
        return margin_report(d, out_dir=out_dir)


OBJECTIVES = ("scalar", "seq2seq")


def nan_if_empty(total: float, n: float) -> float:
    return total / n if n else math.nan


def margin_policy(loss: str) -> str:
    """What loading does with a 'margin' column: required for loss='margin', ignored (and counted) otherwise."""
    return "require" if loss == "margin" else "ignore"


def check_margins(pairs: list, loss: str) -> list:
    """Tokenized pairs given directly: loss='margin' needs a margin on each; other losses do not read them."""
    if loss == "margin":
        missing = [p.source for p in pairs if p.margin is None]
        if missing:
            raise ValueError(
                f"loss='margin' needs a margin on every pair; {len(missing)} have none (first: {missing[0] or '?'})"
            )
        return pairs
    return [p if p.margin is None else dataclasses.replace(p, margin=None) for p in pairs]
