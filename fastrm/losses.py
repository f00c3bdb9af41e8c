"""Pairwise reward-model losses: the one owner of the loss contract.

Everything that defines *what* the loss is lives here: the loss kinds, the stats layout, argument validation, the
semantics of mu_B (internal or external, detached or not, and what the returned value means), and the PyTorch
reference (:func:`pairwise_loss`, also the CPU path). The fused Triton kernels (``fastrm_kernels``) import this
contract and compute the same function; they hold no second copy of it.

Loss kinds, on d_i = r(x, y_c,i) - r(x, y_r,i) and softplus(-z) = -log sigmoid(z):

    bt          l_i = softplus(-d_i)                                  Bradley-Terry (Ouyang et al. 2022)
    margin      l_i = softplus(-(d_i - m_i))                          m_i: per-pair margin (Touvron et al. 2023)
    batch_mean  l_i = softplus(-(d_i - mu))                           mu: mean of d over a batch
    threshold   l_i = softplus(-(d_i - mu))  if d_i - mu < 0          Qin, Feng, Yang 2024 (arXiv 2404.04932),
                l_i = softplus(-d_i)         otherwise                Eq. 6-7

plus TRL's optional centring term c * (r_c,i + r_r,i)^2 (Eisenstein et al. 2023) added to l_i.

The contract, which every path (reference, fused, micro-batches, ranks) satisfies and tests/test_losses.py checks:

* **Value.** A call returns ``sum_i l_i / normalizer`` over its own pairs, always. ``normalizer`` defaults to the
  call's pair count; the trainer passes the step's pair count (per rank: global pairs / world size), so the values of
  a step's micro-batches add up to the step loss, and the gradient does not depend on how the step is split.
* **mu_B.** Only ``batch_mean`` and ``threshold`` use it (passing ``mu`` to another kind is an error). Without
  ``mu`` it is the mean of d over the call's pairs. An external ``mu`` (0-d; e.g. the mean over the whole step and
  all ranks) is used as given. ``detach_mean=True`` (default) treats mu as a constant: without the detach, the
  ``batch_mean`` gradient sums to zero over the batch and never raises the mean margin.
* **detach_mean=False** is the exact gradient through mu = mean(d). With the internal mean autograd does it. With an
  external mu the caller must pass ``mu_grad`` (it is an error to omit it), the cross term
  ``mu_cross_term(mu_derivative_sum(d_all, loss, mu), normalizer, len(d_all))`` over all pairs d_all that mu averages;
  it is added to dL/dd_j of every pair j. It changes the gradient only, never the returned value.
* **Stats** are the fp32 sums ``STATS_FIELDS`` over the call's pairs (mu is the value used, 0 for kinds without
  it), so micro-batches and ranks add them up; :func:`stats_from_sums` turns them into fractions.
* **Non-finite inputs.** ``margin``, ``mu`` and ``mu_grad`` must be finite (a NaN margin makes every parameter
  gradient NaN). On CPU a non-finite value raises ValueError. On CUDA checking would cost a host sync, so ``margin``
  (data) is checked with an asynchronous device assert (it aborts the step with "device-side assert triggered"),
  while ``mu`` and ``mu_grad``, computed by the trainer from the model's own rewards, are not checked: they can only
  be non-finite when the rewards already are, and then the loss is NaN. The data loader rejects non-finite margins
  with a file:line error (``fastrm.data``), so training data never reaches these checks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

# The loss kinds are spelled here once: the config's type, the CLI's choices and the kernels read them from here (a
# kernel that lacks a kind falls back to the reference for it, see RewardModel.forward).
LossKind = Literal["bt", "margin", "batch_mean", "threshold"]
LOSS_KINDS: tuple[str, ...] = get_args(LossKind)
USES_MEAN: tuple[str, ...] = ("batch_mean", "threshold")
# Layout of the stats vector (reference and kernels): sums over the call's pairs, so micro-batches and ranks add up.
STATS_FIELDS: tuple[str, ...] = ("loss_sum", "n_correct", "margin_sum", "n_under", "mu")


# ----------------------------------------------------------------------------------------------------------------
# Validation (used by the reference and by every fused op)
# ----------------------------------------------------------------------------------------------------------------
def check_rewards(chosen_rewards: Tensor, rejected_rewards: Tensor) -> int:
    """Check two [B] floating reward vectors on one device; return B. Rejects the [B] vs [B, 1] shapes that silently
    broadcast into a [B, B] loss elsewhere."""
    if chosen_rewards.dim() != 1 or rejected_rewards.shape != chosen_rewards.shape:
        raise ValueError(
            "chosen_rewards and rejected_rewards must both be 1-D [B] tensors of the same shape, got "
            f"{list(chosen_rewards.shape)} and {list(rejected_rewards.shape)}"
        )
    if not (chosen_rewards.is_floating_point() and rejected_rewards.is_floating_point()):
        raise ValueError(f"rewards must be floating tensors, got {chosen_rewards.dtype} and {rejected_rewards.dtype}")
    if chosen_rewards.device != rejected_rewards.device:
        raise ValueError(f"chosen rewards are on {chosen_rewards.device}, rejected on {rejected_rewards.device}")
    return chosen_rewards.shape[0]


def check_finite(t: Tensor, name: str, *, on_device: bool) -> None:
    """Require finite values without a host sync: ValueError on CPU; on other devices an asynchronous device assert
    if ``on_device`` (nothing otherwise). Under torch.compile the CPU check is the assert too (no graph break)."""
    if t.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(torch.isfinite(t).all()):
            bad = t[~torch.isfinite(t)].flatten()[:3].tolist()
            raise ValueError(f"{name} must be finite, got {bad}")
    elif on_device or t.device.type == "cpu":
        torch._assert_async(torch.isfinite(t).all(), f"fastrm: {name} must be finite")


def check_loss_args(
    num_pairs: int,
    device: torch.device,
    loss: str,
    *,
    margin: Tensor | None,
    detach_mean: bool,
    center_rewards_coefficient: float | None,
    mu: Tensor | None,
    mu_grad: Tensor | None,
    normalizer: float | None,
) -> tuple[float, float]:
    """Validate the loss arguments of a call on ``num_pairs`` pairs whose rewards live on ``device``.

    Returns (centring coefficient, normalizer) as plain floats (0.0 = no centring; normalizer defaults to B).
    """
    if loss not in LOSS_KINDS:
        raise ValueError(f"unknown loss {loss!r}; expected one of {LOSS_KINDS}")
    if num_pairs < 1:
        raise ValueError("need at least one pair")
    if loss == "margin":
        if margin is None:
            raise ValueError("loss='margin' needs a per-pair margin tensor [B] (data column 'margin')")
        if tuple(margin.shape) != (num_pairs,):
            raise ValueError(f"margin must have shape [B]=[{num_pairs}], got {list(margin.shape)}")
        if not margin.is_floating_point():
            raise ValueError(f"margin must be a floating tensor, got {margin.dtype}")
        if margin.device != device:
            raise ValueError(f"margin is on {margin.device}, rewards on {device}")
        check_finite(margin, "margin", on_device=True)
    elif margin is not None:
        raise ValueError(f"a margin was given but loss={loss!r} does not use it (use loss='margin')")
    for name, t in (("mu", mu), ("mu_grad", mu_grad)):
        if t is None:
            continue
        if t.dim() != 0 or not t.is_floating_point():
            raise ValueError(f"{name} must be a 0-d floating tensor, got shape {list(t.shape)} dtype {t.dtype}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}, rewards on {device}")
        check_finite(t, name, on_device=False)
    if mu is not None and loss not in USES_MEAN:
        raise ValueError(f"mu was given but loss={loss!r} does not use the batch mean (only {USES_MEAN} do)")
    if mu_grad is not None:
        if mu is None:
            raise ValueError("mu_grad only applies with an external mu (and detach_mean=False)")
        if detach_mean:
            raise ValueError("mu_grad given with detach_mean=True (a detached mu has no cross term)")
    elif mu is not None and not detach_mean:
        raise ValueError(
            "an external mu with detach_mean=False needs mu_grad (the cross term, see mu_cross_term); without it the "
            "gradient through mu would be silently dropped"
        )
    center = 0.0 if center_rewards_coefficient is None else float(center_rewards_coefficient)
    if not math.isfinite(center) or center < 0:
        raise ValueError(f"center_rewards_coefficient must be finite and >= 0, got {center_rewards_coefficient}")
    norm = float(num_pairs) if normalizer is None else float(normalizer)
    if not math.isfinite(norm) or norm <= 0:
        raise ValueError(f"normalizer must be finite and > 0, got {normalizer}")
    return center, norm


# ----------------------------------------------------------------------------------------------------------------
# mu_B across micro-batches and ranks (the trainer's side of the contract)
# ----------------------------------------------------------------------------------------------------------------
def mu_derivative_sum(d: Tensor, loss: str, mu: Tensor) -> Tensor:
    """S = sum_i dl_i/dmu over the pairs ``d`` [B]: sigmoid(mu - d_i) for every pair (batch_mean) or for the pairs
    under the threshold (threshold). 0-d fp32 (fp64 for fp64 ``d``), no grad. Sum it over all pairs that mu averages
    (all micro-batches, all-reduced over ranks) before :func:`mu_cross_term`."""
    if loss not in USES_MEAN:
        raise ValueError(f"mu_derivative_sum is only defined for {USES_MEAN}, not {loss!r}")
    d = d.detach().to(_compute_dtype(d.dtype))
    mu = mu.detach().to(d.dtype)
    s = torch.sigmoid(mu - d)
    if loss == "threshold":
        s = torch.where(d - mu < 0, s, torch.zeros_like(s))
    return s.sum()


def mu_cross_term(mu_derivative_total: Tensor, normalizer: float, num_pairs_in_mu: int) -> Tensor:
    """The ``mu_grad`` argument for detach_mean=False with an external mu = mean of ``num_pairs_in_mu`` margins:
    d(sum_i l_i / normalizer)/dmu * dmu/dd_j = S / normalizer / N_mu, with S from :func:`mu_derivative_sum`.

    Use the same ``normalizer`` as the loss calls. Over W data-parallel ranks that is global pairs / W: DDP averages
    the ranks' gradients, and S / (N / W) / N averaged over W ranks is the exact S / N / N."""
    return mu_derivative_total / (normalizer * num_pairs_in_mu)


# ----------------------------------------------------------------------------------------------------------------
# Reference implementation
# ----------------------------------------------------------------------------------------------------------------
def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp32 as in training (rewards are upcast); fp64 inputs stay fp64, which makes this a float64 reference.
    return torch.float64 if dtype == torch.float64 else torch.float32


def pairwise_loss_sums(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    loss: LossKind = "bt",
    margin: Tensor | None = None,
    detach_mean: bool = True,
    center_rewards_coefficient: float | None = None,
    *,
    mu: Tensor | None = None,
    mu_grad: Tensor | None = None,
    normalizer: float | None = None,
) -> tuple[Tensor, Tensor]:
    """:func:`pairwise_loss` returning the raw stats: (loss 0-d, sums [5] in ``STATS_FIELDS`` order), both fp32
    (fp64 for fp64 rewards), with no host sync. This is what ``RewardModel.forward`` and the kernels' references
    call; the fused op ``fastrm_kernels.pairwise_loss_fused`` has the same signature and returns the same pair."""
    B = check_rewards(chosen_rewards, rejected_rewards)
    center, norm = check_loss_args(
        B,
        chosen_rewards.device,
        loss,
        margin=margin,
        detach_mean=detach_mean,
        center_rewards_coefficient=center_rewards_coefficient,
        mu=mu,
        mu_grad=mu_grad,
        normalizer=normalizer,
    )
    dt = _compute_dtype(torch.promote_types(chosen_rewards.dtype, rejected_rewards.dtype))
    rc, rr = chosen_rewards.to(dt), rejected_rewards.to(dt)
    d = rc - rr
    mu_used = None
    if loss in USES_MEAN:
        if mu is None:
            mu_used = d.mean().detach() if detach_mean else d.mean()
        else:
            mu_used = mu.detach().to(dt)
    if loss == "bt":
        l_pair = F.softplus(-d)
    elif loss == "margin":
        l_pair = F.softplus(-(d - margin.to(dt)))
    elif loss == "batch_mean":
        l_pair = F.softplus(-(d - mu_used))
    else:  # threshold: the branch is chosen by value; the chosen branch is differentiated.
        z = d - mu_used
        l_pair = torch.where(z.detach() < 0, F.softplus(-z), F.softplus(-d))
    if center:
        l_pair = l_pair + center * (rc + rr) ** 2
    value = l_pair.sum() / norm
    if mu_grad is not None:
        # Value-neutral surrogate (x - x.detach() is exactly 0): adds mu_grad to dL/dd_j for every pair, the chain
        # rule through the external mean, without changing the returned loss value.
        cross = mu_grad.detach().to(dt) * d.sum()
        value = value + (cross - cross.detach())
    with torch.no_grad():
        zero = d.new_zeros(())
        sums = torch.stack(
            [
                l_pair.sum(),
                (d > 0).sum().to(dt),
                d.sum(),
                (d - mu_used < 0).sum().to(dt) if mu_used is not None else zero,
                mu_used if mu_used is not None else zero,
            ]
        )
    return value, sums.detach()


def pairwise_loss(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    loss: LossKind = "bt",
    margin: Tensor | None = None,
    detach_mean: bool = True,
    center_rewards_coefficient: float | None = None,
    *,
    mu: Tensor | None = None,
    mu_grad: Tensor | None = None,
    normalizer: float | None = None,
) -> tuple[Tensor, dict]:
    """Pairwise reward-model loss (PyTorch reference; formulas and contract in the module docstring).

    Args:
        chosen_rewards: [B] rewards r(x, y_c), any float dtype (computed in fp32, or fp64 for fp64 inputs).
        rejected_rewards: [B] rewards r(x, y_r).
        loss: "bt" | "margin" | "batch_mean" | "threshold".
        margin: [B] finite per-pair margins m_i, only (and required) for loss="margin"; no gradient flows into it.
        detach_mean: treat mu as a constant (default, the paper's intent) or differentiate through it.
        center_rewards_coefficient: c >= 0 in c * (r_c,i + r_r,i)^2 (TRL's name); None or 0 disables it.
        mu: 0-d external batch mean (e.g. over the whole optimizer step on all ranks); default: mean(d) here.
        mu_grad: 0-d cross term, required with an external mu and detach_mean=False (see :func:`mu_cross_term`).
        normalizer: the loss is sum_i l_i / normalizer (default B).

    Returns:
        (loss, stats): loss is 0-d, differentiable w.r.t. both reward vectors, and its value is always
        sum_i l_i / normalizer (mu_grad changes the gradient only). stats has the fractions ``loss``, ``accuracy``,
        ``mean_margin``, ``frac_under_threshold`` over this call's pairs, ``mu``, ``num_pairs`` and ``sums``, the
        [5] vector of ``STATS_FIELDS`` for aggregation (this dict costs a host sync; :func:`pairwise_loss_sums` not).

    >>> import torch
    >>> loss, stats = pairwise_loss(torch.tensor([2.0, 0.5]), torch.tensor([0.0, 1.0]), "bt")
    >>> round(loss.item(), 4), stats["accuracy"]
    (0.5505, 0.5)
    """
    value, sums = pairwise_loss_sums(
        chosen_rewards,
        rejected_rewards,
        loss,
        margin,
        detach_mean,
        center_rewards_coefficient,
        mu=mu,
        mu_grad=mu_grad,
        normalizer=normalizer,
    )
    return value, stats_from_sums(sums, chosen_rewards.shape[0])


def stats_from_sums(sums: Tensor | Sequence[float], num_pairs: int) -> dict:
    """Turn a [5] sums vector (``STATS_FIELDS``, possibly added over micro-batches and ranks) into user-facing
    fractions over ``num_pairs`` pairs; ``sums`` is kept for aggregation. A tensor is read on the host (a sync);
    a list of floats (already on the host) is used as it is."""
    s = sums.detach().float().cpu().tolist() if isinstance(sums, Tensor) else [float(x) for x in sums]
    n = max(num_pairs, 1)
    return {
        "loss": s[0] / n,
        "accuracy": s[1] / n,
        "mean_margin": s[2] / n,
        "frac_under_threshold": s[3] / n,
        "mu": s[4],
        "num_pairs": num_pairs,
        "sums": sums.detach() if isinstance(sums, Tensor) else s,
    }
