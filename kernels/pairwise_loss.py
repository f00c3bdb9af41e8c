"""Fused pairwise reward-model loss as one Triton program: kernel -> launcher -> torch.library op.

The loss itself (kinds, mu_B semantics, stats layout, validation, the PyTorch reference) is defined once in
``fastrm/losses.py``; this file only computes it. The forward computes the loss, the stats and dLoss/d(reward) in one
pass (as Liger-Kernel's fused cross-entropy does), so the backward is one multiply by grad_output. The op is
registered as ``fastrm::pairwise_loss_fwd`` so that ``torch.compile`` of surrounding code does not graph-break on it;
``kernels/reward_head_loss.py`` runs the same launcher after the fused head.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastrm.losses import LOSS_KINDS, USES_MEAN, check_loss_args, check_rewards

# Compile-time ids of the loss kinds this kernel implements (it tests KIND >= 2 for the kinds that use mu).
KIND_IDS: dict[str, int] = {"bt": 0, "margin": 1, "batch_mean": 2, "threshold": 3}
# The kinds the fused path may run: implemented here, defined in fastrm.losses, and with the same mu semantics. A kind
# fastrm.losses defines and this kernel lacks is not an error: RewardModel.forward runs the PyTorch loss for it.
FUSED_KINDS: frozenset[str] = frozenset(
    k for k, i in KIND_IDS.items() if k in LOSS_KINDS and (i >= 2) == (k in USES_MEAN)
)
# Mu modes of the kernel: no mu (bt / margin), mean computed in-kernel, mean given by the caller.
_MU_NONE, _MU_INTERNAL, _MU_EXTERNAL = 0, 1, 2


@triton.jit
def _log1p_unit(e):
    """log(1 + e) for e in [0, 1], within ~2 ulp of fp32 from arithmetic alone. Portable: the interpreter has no
    libdevice log1p, and log(1 + e) loses the bits of e that 1 + e rounds away (0.05% error at e = 1e-4)."""
    # log1p(e) = 2 atanh(s) with s = e / (2 + e) <= 1/3: t + t * s^2 * (1/3 + s^2/5 + ... + s^14/17), t = 2s; the
    # series in s^2 <= 1/9 is below fp32 rounding after s^16. div_rn: '/' may lower to an approximate division.
    t = tl.math.div_rn(2.0 * e, 2.0 + e)
    s2 = 0.25 * t * t
    p = 1.0 / 17.0
    p = p * s2 + 1.0 / 15.0
    p = p * s2 + 1.0 / 13.0
    p = p * s2 + 1.0 / 11.0
    p = p * s2 + 1.0 / 9.0
    p = p * s2 + 1.0 / 7.0
    p = p * s2 + 1.0 / 5.0
    p = p * s2 + 1.0 / 3.0
    return t + t * (s2 * p)


@triton.jit
def _softplus(x):
    # log(1 + e^x) = max(x, 0) + log1p(e^-|x|): e^-|x| lies in (0, 1], so nothing overflows for any finite x.
    return tl.maximum(x, 0.0) + _log1p_unit(tl.exp(-tl.abs(x)))


@triton.jit
def _sigmoid(x):
    # e^-|x| lies in (0, 1], so neither branch overflows.
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _pair_terms(rc, rr, m, mu, KIND: tl.constexpr):
    """Per-pair loss l, dl/dd with mu held fixed (gd), dl/dmu (gmu) and the 'under the mean' flag."""
    d = rc - rr
    if KIND == 1:
        z = d - m
    elif KIND >= 2:
        z = d - mu
    else:
        z = d
    s = _sigmoid(-z)
    loss = _softplus(-z)
    gd = -s
    gmu = s
    under = z < 0
    if KIND == 3:
        # Above the batch mean the plain BT term applies, which does not depend on mu.
        loss = tl.where(under, loss, _softplus(-d))
        gd = tl.where(under, gd, -_sigmoid(-d))
        gmu = tl.where(under, gmu, 0.0)
    return d, loss, gd, gmu, under


# B is a plain runtime integer and BLOCK_B is fixed (the loops mask any B), and no pointer is specialised on its
# alignment (the rejected halves r[B:] start at an offset that depends on B; the loads are scalar-strided anyway),
# so every batch reuses one compilation per loss configuration (tests/test_kernel_specializations.py counts them).
@triton.jit(
    do_not_specialize=["B"],
    do_not_specialize_on_alignment=["rc_ptr", "rr_ptr", "m_ptr", "mu_ptr", "mu_grad_ptr", "gc_ptr", "gr_ptr"],
)
def _pairwise_loss_kernel(
    rc_ptr,  # [B] chosen rewards (any float dtype), stride rc_stride
    rr_ptr,  # [B] rejected rewards, stride rr_stride
    m_ptr,  # [B] per-pair margins (KIND == margin only), stride m_stride
    mu_ptr,  # [] externally supplied batch mean (MU_MODE == external only)
    mu_grad_ptr,  # [] externally supplied cross-term gradient added to every dLoss/dd_j (HAS_MU_GRAD only)
    loss_ptr,  # [] fp32 out: sum_i l_i / normalizer
    stats_ptr,  # [5] fp32 out: fastrm.losses.STATS_FIELDS
    gc_ptr,  # [B] fp32 out: dLoss/d r_c (for grad_output = 1)
    gr_ptr,  # [B] fp32 out: dLoss/d r_r
    B,
    rc_stride,
    rr_stride,
    m_stride,
    inv_norm,
    center,
    KIND: tl.constexpr,
    MU_MODE: tl.constexpr,
    NEED_CROSS: tl.constexpr,  # detach_mean=False with in-kernel mu: add sum_i dl_i/dmu / B to each dl/dd_j
    HAS_CENTER: tl.constexpr,
    HAS_MU_GRAD: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    # One program loops over blocks of pairs: mu is a reduction over all pairs, and B <= a few thousand, so a
    # single program beats a multi-program launch plus a second reduction kernel.
    offs0 = tl.arange(0, BLOCK_B).to(tl.int64)

    # Pass A: the batch mean.
    if MU_MODE == 1:
        dsum = tl.zeros([BLOCK_B], tl.float32)
        for b0 in range(0, B, BLOCK_B):
            offs = b0 + offs0
            bm = offs < B
            rc = tl.load(rc_ptr + offs * rc_stride, mask=bm, other=0.0).to(tl.float32)
            rr = tl.load(rr_ptr + offs * rr_stride, mask=bm, other=0.0).to(tl.float32)
            dsum += rc - rr
        mu = tl.sum(dsum, axis=0) / B
    elif MU_MODE == 2:
        mu = tl.load(mu_ptr).to(tl.float32)
    else:
        mu = 0.0
    if HAS_MU_GRAD:
        mu_grad = tl.load(mu_grad_ptr).to(tl.float32)
    else:
        mu_grad = 0.0

    # Pass B: losses, statistics, and (unless the cross term is still unknown) the reward gradients.
    l_acc = tl.zeros([BLOCK_B], tl.float32)
    c_acc = tl.zeros([BLOCK_B], tl.float32)
    d_acc = tl.zeros([BLOCK_B], tl.float32)
    u_acc = tl.zeros([BLOCK_B], tl.float32)
    gmu_acc = tl.zeros([BLOCK_B], tl.float32)
    for b0 in range(0, B, BLOCK_B):
        offs = b0 + offs0
        bm = offs < B
        rc = tl.load(rc_ptr + offs * rc_stride, mask=bm, other=0.0).to(tl.float32)
        rr = tl.load(rr_ptr + offs * rr_stride, mask=bm, other=0.0).to(tl.float32)
        if KIND == 1:
            m = tl.load(m_ptr + offs * m_stride, mask=bm, other=0.0).to(tl.float32)
        else:
            m = rc  # unused
        d, loss, gd, gmu, under = _pair_terms(rc, rr, m, mu, KIND)
        if HAS_CENTER:
            s = rc + rr
            loss += center * s * s
        l_acc += tl.where(bm, loss, 0.0)
        c_acc += tl.where(bm & (d > 0), 1.0, 0.0)
        d_acc += tl.where(bm, d, 0.0)
        if KIND >= 2:
            u_acc += tl.where(bm & under, 1.0, 0.0)
            gmu_acc += tl.where(bm, gmu, 0.0)
        if not NEED_CROSS:
            g = gd * inv_norm + mu_grad
            gc = g
            gr = -g
            if HAS_CENTER:
                gs = 2.0 * center * inv_norm * s
                gc += gs
                gr += gs
            tl.store(gc_ptr + offs, gc, mask=bm)
            tl.store(gr_ptr + offs, gr, mask=bm)

    # Pass C (detach_mean=False, mu = mean(d)): dmu/dd_j = 1/B, so every pair gets sum_i dl_i/dmu / B.
    if NEED_CROSS:
        cross = tl.sum(gmu_acc, axis=0) / B
        for b0 in range(0, B, BLOCK_B):
            offs = b0 + offs0
            bm = offs < B
            rc = tl.load(rc_ptr + offs * rc_stride, mask=bm, other=0.0).to(tl.float32)
            rr = tl.load(rr_ptr + offs * rr_stride, mask=bm, other=0.0).to(tl.float32)
            d, loss, gd, gmu, under = _pair_terms(rc, rr, rc, mu, KIND)
            g = (gd + cross) * inv_norm
            gc = g
            gr = -g
            if HAS_CENTER:
                gs = 2.0 * center * inv_norm * (rc + rr)
                gc += gs
                gr += gs
            tl.store(gc_ptr + offs, gc, mask=bm)
            tl.store(gr_ptr + offs, gr, mask=bm)

    l_sum = tl.sum(l_acc, axis=0)
    tl.store(loss_ptr, l_sum * inv_norm)
    tl.store(stats_ptr + 0, l_sum)
    tl.store(stats_ptr + 1, tl.sum(c_acc, axis=0))
    tl.store(stats_ptr + 2, tl.sum(d_acc, axis=0))
    tl.store(stats_ptr + 3, tl.sum(u_acc, axis=0))
    if KIND >= 2:
        tl.store(stats_ptr + 4, mu)
    else:
        tl.store(stats_ptr + 4, 0.0)


def check_triton_device(t: Tensor) -> None:
    """Triton kernels need CUDA, or the CPU interpreter (TRITON_INTERPRET=1 set before triton is imported)."""
    if t.device.type != "cuda" and type(_pairwise_loss_kernel).__name__ != "InterpretedFunction":
        raise RuntimeError(
            f"fastrm Triton kernels need CUDA tensors (got device {t.device}); on CPU set TRITON_INTERPRET=1 before "
            "importing triton, or use the PyTorch path (fastrm.losses.pairwise_loss)."
        )


# Pairs per loop iteration of the one-program loss kernel (fixed: a block size from B would compile per batch).
_LOSS_BLOCK = 1024


def launch_pairwise_loss(
    rc: Tensor,
    rr: Tensor,
    gc: Tensor,
    gr: Tensor,
    margin: Tensor | None,
    mu: Tensor | None,
    mu_grad: Tensor | None,
    loss_kind: str,
    detach_mean: bool,
    center: float,
    normalizer: float,
) -> tuple[Tensor, Tensor]:
    """Run the loss kernel on rewards rc/rr [B] (any strides); write dLoss/dr into gc/gr ([B] fp32, unit stride).

    Returns (loss [] fp32, stats [5] fp32). Arguments must already be validated (fastrm.losses.check_loss_args).
    """
    B = rc.shape[0]
    if loss_kind not in FUSED_KINDS:
        raise ValueError(f"the fused pairwise loss implements {sorted(FUSED_KINDS)}, not {loss_kind!r}")
    kind = KIND_IDS[loss_kind]
    if loss_kind in USES_MEAN:
        mu_mode = _MU_EXTERNAL if mu is not None else _MU_INTERNAL
    else:
        mu_mode = _MU_NONE
    loss = torch.empty((), device=rc.device, dtype=torch.float32)
    stats = torch.empty(5, device=rc.device, dtype=torch.float32)
    dummy = gc
    _pairwise_loss_kernel[(1,)](
        rc,
        rr,
        margin if margin is not None else dummy,
        mu if mu is not None else dummy,
        mu_grad if mu_grad is not None else dummy,
        loss,
        stats,
        gc,
        gr,
        B,
        rc.stride(0),
        rr.stride(0),
        margin.stride(0) if margin is not None else 0,
        1.0 / normalizer,
        center,
        KIND=kind,
        MU_MODE=mu_mode,
        NEED_CROSS=(mu_mode == _MU_INTERNAL and not detach_mean),
        HAS_CENTER=center != 0.0,
        HAS_MU_GRAD=mu_grad is not None,
        BLOCK_B=_LOSS_BLOCK,
        num_warps=4,
    )
    return loss, stats


# ----------------------------------------------------------------------------------------------------------------
# torch.library op: fastrm::pairwise_loss_fwd (forward computes the reward gradients; backward scales them).
# ----------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("fastrm::pairwise_loss_fwd", mutates_args=())
def _pairwise_loss_op(
    chosen: Tensor,
    rejected: Tensor,
    margin: Tensor | None,
    mu: Tensor | None,
    mu_grad: Tensor | None,
    loss_kind: str,
    detach_mean: bool,
    center: float,
    normalizer: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss [], stats [5], dLoss/dchosen [B] fp32, dLoss/drejected [B] fp32)."""
    B = chosen.shape[0]
    gc = torch.empty(B, device=chosen.device, dtype=torch.float32)
    gr = torch.empty(B, device=chosen.device, dtype=torch.float32)
    loss, stats = launch_pairwise_loss(
        chosen, rejected, gc, gr, margin, mu, mu_grad, loss_kind, detach_mean, center, normalizer
    )
    return loss, stats, gc, gr


@_pairwise_loss_op.register_fake
def _(chosen, rejected, margin, mu, mu_grad, loss_kind, detach_mean, center, normalizer):
    B = chosen.shape[0]
    f32 = {"device": chosen.device, "dtype": torch.float32}
    return (
        chosen.new_empty((), **f32),
        chosen.new_empty(5, **f32),
        chosen.new_empty(B, **f32),
        chosen.new_empty(B, **f32),
    )


def _pairwise_setup(ctx, inputs, output) -> None:
    chosen, rejected, *_ = inputs
    _loss, stats, g_chosen, g_rejected = output
    ctx.mark_non_differentiable(stats, g_chosen, g_rejected)
    # Only the loss is differentiable: leave the other outputs' gradients as None instead of zero-filled tensors.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(g_chosen, g_rejected)
    ctx.dtypes = (chosen.dtype, rejected.dtype)


def _pairwise_backward(ctx, d_loss, _d_stats, _d_gc, _d_gr):
    # margin, mu and mu_grad get no gradient: the cross term for an external mu arrives through mu_grad.
    if d_loss is None:
        return (None,) * 9
    g_chosen, g_rejected = ctx.saved_tensors
    return (d_loss * g_chosen).to(ctx.dtypes[0]), (d_loss * g_rejected).to(ctx.dtypes[1]), *((None,) * 7)


_pairwise_loss_op.register_autograd(_pairwise_backward, setup_context=_pairwise_setup)


def pairwise_loss_fused(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    *,
    loss_kind: str,
    margin: Tensor | None = None,
    detach_mean: bool = True,
    center_rewards_coefficient: float | None = None,
    mu: Tensor | None = None,
    mu_grad: Tensor | None = None,
    normalizer: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Pairwise reward loss as one Triton kernel, differentiable w.r.t. both reward vectors.

    The fused form of ``fastrm.losses.pairwise_loss_sums`` (formulas, mu semantics, validation and the meaning of the
    returned value are defined there): chosen_rewards / rejected_rewards [B] any float dtype (computed in fp32),
    ``loss_kind`` is that function's ``loss``, the other arguments are the same.

    Returns:
        (loss [] fp32 = sum_i l_i / normalizer, stats [5] fp32 sums in ``fastrm.losses.STATS_FIELDS`` order).

    >>> loss, stats = pairwise_loss_fused(r_chosen, r_rejected, loss_kind="threshold")  # doctest: +SKIP
    """
    B = check_rewards(chosen_rewards, rejected_rewards)
    center, norm = check_loss_args(
        B,
        chosen_rewards.device,
        loss_kind,
        margin=margin,
        detach_mean=detach_mean,
        center_rewards_coefficient=center_rewards_coefficient,
        mu=mu,
        mu_grad=mu_grad,
        normalizer=normalizer,
    )
    check_triton_device(chosen_rewards)
    loss, stats, _, _ = _pairwise_loss_op(
        chosen_rewards, rejected_rewards, margin, mu, mu_grad, loss_kind, bool(detach_mean), center, norm
    )
    return loss, stats
