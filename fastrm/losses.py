"""Pairwise reward-model losses (reference path, pure PyTorch).

The losses of the reward-margin paper (Qin, Feng, Yang 2024, "Towards Comprehensive Preference Data
Collection for Reward Modeling" / arXiv 2404.04932, Eq. 6-7), on d = r(x, y_c) - r(x, y_r):

    bt          l = -log sigmoid(d)                                  (Bradley-Terry)
    margin      l = -log sigmoid(d - m)                              (m: per-pair margin from the data)
    batch_mean  l = -log sigmoid(d - mu_B)                           (mu_B: mean of d over the batch)
    threshold   l = -log sigmoid(d - mu_B)  if d - mu_B < 0          (the paper's method)
                l = -log sigmoid(d)         otherwise

plus TRL's optional centring term c * (r_c + r_r)^2. The loss is sum(l) / normalizer; the normalizer is the
number of pairs of the *optimizer step* (over all micro-batches and ranks), so that the gradient does not depend
on how a step is split (see trainer.py).

mu_B is a stop-gradient target by default (``detach_mean=True``): without the detach, the gradient of
``batch_mean`` sums to zero over the batch and never raises the mean margin. ``detach_mean=False`` is exact:
with an internal mu autograd differentiates mean(d); with an external mu (step or global scope) the caller passes
``mu_grad``, the cross term sum_i dl_i/dmu / normalizer / N_mu, added to dL/dd_j of every pair (see
:func:`mu_cross_term`).

The fused Triton kernel (``fastrm_kernels.reward_head_loss``) computes the same function; this module is its
reference and the CPU path.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

LossKind = Literal["bt", "margin", "batch_mean", "threshold"]
LOSS_KINDS = ("bt", "margin", "batch_mean", "threshold")
USES_MEAN = ("batch_mean", "threshold")
# Layout of the stats vector shared with the kernel: sums, so micro-batches and ranks can be added up.
STATS_FIELDS = ("loss_sum", "n_correct", "margin_sum", "n_under", "mu")


def check_loss_args(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    loss: str,
    margin: torch.Tensor | None,
    mu: torch.Tensor | None,
    mu_grad: torch.Tensor | None,
    detach_mean: bool,
) -> None:
    """Reject the shape and argument mistakes that silently broadcast in peers (a [B] margin against [B, 1])."""
    if loss not in LOSS_KINDS:
        raise ValueError(f"unknown loss {loss!r}; expected one of {LOSS_KINDS}")
    if chosen_rewards.dim() != 1 or rejected_rewards.shape != chosen_rewards.shape:
        raise ValueError(
            f"chosen_rewards and rejected_rewards must both be 1-D [B] tensors of the same shape, got "
            f"{tuple(chosen_rewards.shape)} and {tuple(rejected_rewards.shape)}"
        )
    if loss == "margin":
        if margin is None:
            raise ValueError("loss='margin' needs a per-pair margin tensor [B] (data column 'margin')")
        if margin.shape != chosen_rewards.shape:
            raise ValueError(f"margin must have shape {tuple(chosen_rewards.shape)}, got {tuple(margin.shape)}")
    elif margin is not None:
        raise ValueError(f"a margin was given but loss={loss!r} does not use it (use loss='margin')")
    if mu is not None and loss not in USES_MEAN:
        raise ValueError(f"mu was given but loss={loss!r} does not use the batch mean")
    if mu_grad is not None and (mu is None or detach_mean):
        raise ValueError("mu_grad only applies with an external mu and detach_mean=False")


def per_pair_loss(d: torch.Tensor, loss: str, margin: torch.Tensor | None, mu: torch.Tensor | None) -> torch.Tensor:
    """l_i for each pair, fp32 [B]. ``mu`` is used as given (detach it before calling for a stop-gradient)."""
    if loss == "bt":
        return F.softplus(-d)
    if loss == "margin":
        return F.softplus(-(d - margin))
    if loss == "batch_mean":
        return F.softplus(-(d - mu))
    # threshold: the branch is chosen by value; the chosen branch is differentiated.
    shifted = d - mu
    return torch.where(shifted.detach() < 0, F.softplus(-shifted), F.softplus(-d))


def mu_derivative_sum(d: torch.Tensor, loss: str, mu: torch.Tensor) -> torch.Tensor:
    """sum_i dl_i/dmu (fp32 0-d): sigmoid(mu - d_i) over the pairs that use mu (all for batch_mean, the ones under
    the threshold for threshold). Needed for the exact gradient of ``detach_mean=False`` with an external mu."""
    d = d.detach().float()
    s = torch.sigmoid(mu - d)
    if loss == "threshold":
        s = torch.where(d - mu < 0, s, torch.zeros_like(s))
    return s.sum()


def mu_cross_term(mu_derivative_total: torch.Tensor, normalizer: float, num_pairs_in_mu: int) -> torch.Tensor:
    """The ``mu_grad`` argument: d(sum_i l_i / normalizer)/dmu * dmu/dd_j = S / normalizer / N_mu."""
    return mu_derivative_total / (normalizer * num_pairs_in_mu)


def pairwise_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    loss: LossKind = "bt",
    margin: torch.Tensor | None = None,
    detach_mean: bool = True,
    center_rewards_coefficient: float | None = None,
    *,
    mu: torch.Tensor | None = None,
    mu_grad: torch.Tensor | None = None,
    normalizer: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Pairwise reward-model loss (reference implementation).

    Args:
        chosen_rewards: [B] rewards r(x, y_c), any float dtype (computed in fp32).
        rejected_rewards: [B] rewards r(x, y_r).
        loss: "bt" | "margin" | "batch_mean" | "threshold" (formulas in the module docstring).
        margin: [B] per-pair margin, only for loss="margin".
        detach_mean: treat mu_B as a constant (default, the paper's intent) or differentiate through it.
        center_rewards_coefficient: c in c * mean((r_c + r_r)^2) (TRL's name); None disables it.
        mu: 0-d external batch mean (e.g. over the whole optimizer step or all ranks); default mean(d) here.
        mu_grad: 0-d cross term for detach_mean=False with an external mu (see :func:`mu_cross_term`).
        normalizer: divide the summed per-pair loss by this (default B).

    Returns:
        (loss 0-d fp32, stats) where stats has accuracy, mean_margin, mu, frac_under_threshold (fractions of
        this call's pairs) and ``sums``: the fp32 [5] vector of STATS_FIELDS for aggregation.
    """
    check_loss_args(chosen_rewards, rejected_rewards, loss, margin, mu, mu_grad, detach_mean)
    rc, rr = chosen_rewards.float(), rejected_rewards.float()
    d = rc - rr
    B = d.numel()
    norm = float(B if normalizer is None else normalizer)
    mu_used = None
    if loss in USES_MEAN:
        if mu is None:
            mu_used = d.mean()
            if detach_mean:
                mu_used = mu_used.detach()
        else:
            mu_used = mu.float().reshape(())
    l_pair = per_pair_loss(d, loss, None if margin is None else margin.float(), mu_used)
    if center_rewards_coefficient:
        l_pair = l_pair + center_rewards_coefficient * (rc + rr) ** 2
    total = l_pair.sum() / norm
    if mu_grad is not None:
        # d(total)/d(d_j) gains mu_grad for every pair: the exact chain rule through an external mean.
        total = total + (mu_grad.detach().float() * d).sum()
    with torch.no_grad():
        under = (d - mu_used < 0).float().sum() if mu_used is not None else d.new_zeros(())
        sums = torch.stack(
            [
                l_pair.detach().sum(),
                (d > 0).float().sum(),
                d.sum(),
                under,
                mu_used.detach() if mu_used is not None else d.new_zeros(()),
            ]
        )
    return total, stats_from_sums(sums, B)


def stats_from_sums(sums: torch.Tensor, num_pairs: int) -> dict:
    """Turn the [5] sums vector into user-facing fractions (``sums`` is kept for aggregation)."""
    s = sums.detach().float().cpu().tolist()
    n = max(num_pairs, 1)
    return {
        "loss": s[0] / n,
        "accuracy": s[1] / n,
        "mean_margin": s[2] / n,
        "frac_under_threshold": s[3] / n,
        "mu": s[4],
        "num_pairs": num_pairs,
        "sums": sums.detach(),
    }
