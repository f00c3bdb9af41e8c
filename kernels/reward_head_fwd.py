"""Fused reward head, forward: gather the pooled rows, final norm (RMSNorm, LayerNorm or none) and the scalar head.

Kernel and launcher only; the ops and the autograd wiring are in reward_head_loss.py, the backward in
reward_head_bwd.py. Besides the rewards the forward writes the pooled rows ([N, H], hidden's dtype, saved for the
backward instead of the [T, H] activation) and four fp32 numbers per row that make the norm backward one pass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

NORM_TYPES: dict[str, int] = {"none": 0, "rms": 1, "layer": 2}


# Sizes that change with every batch (N, T) are plain runtime integers: specialising them (== 1, divisible by 16)
# would compile a new kernel for many new batch shapes (tests/test_kernel_specializations.py counts them). H and
# the row stride stay specialised: they are fixed by the model (one compilation) and divisibility by 16 lets the
# row loads vectorise.
@triton.jit(do_not_specialize=["N", "T"])
def _head_fwd_kernel(
    x_ptr,  # [T, H] hidden (row stride stride_xt, unit column stride)
    idx_ptr,  # [N] int32/int64: hidden row of each pooled slot
    w_ptr,  # [H] norm weight (HAS_W)
    b_ptr,  # [H] norm bias (HAS_B)
    hw_ptr,  # [H] head weight
    hb_ptr,  # [1] head bias (HAS_HB)
    r_ptr,  # [N] fp32 out: rewards
    xg_ptr,  # [N, H] out (hidden's dtype): the pooled rows, saved for the backward instead of hidden
    aux_ptr,  # [N, 4] fp32 out: per slot (mean, rstd, Q, P), see _head_bwd_kernel
    N,
    T,
    H,
    stride_xt,
    eps,
    NORM: tl.constexpr,  # 0 none, 1 rms, 2 layer
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_HB: tl.constexpr,
    BLOCK_R: tl.constexpr,  # slots per program (several when H is small, so a program has enough work)
    BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    slots = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    smask = slots < N
    rows = tl.load(idx_ptr + slots, mask=smask, other=0).to(tl.int64)
    # The launcher asserts 0 <= row < T (asynchronously on CUDA); the mask keeps a bad row from reading outside hidden
    # before that assert surfaces.
    rmask = smask & (rows >= 0) & (rows < T)
    x_rows = x_ptr + rows[:, None] * stride_xt
    cols0 = tl.arange(0, BLOCK_H)

    mean = tl.zeros([BLOCK_R], tl.float32)
    if NORM == 2:
        # Two-pass mean/variance: E[x^2] - E[x]^2 cancels badly on pre-norm activations with large offsets.
        xsum = tl.zeros([BLOCK_R], tl.float32)
        for h0 in range(0, H, BLOCK_H):
            cols = h0 + cols0
            x = tl.load(x_rows + cols[None, :], mask=rmask[:, None] & (cols < H)[None, :], other=0.0)
            xsum += tl.sum(x.to(tl.float32), axis=1)
        mean = xsum / H

    # r = sum_j hw_j * (w_j * xhat_j + b_j) + hb = rstd * sum_j hw_j w_j (x_j - mean) + sum_j hw_j b_j + hb,
    # so one pass accumulates the sum of squares and the weighted dot product together. Chunks reduce to per-row sums
    # at once (H <= 8192 is a single chunk) to keep register pressure low.
    sq = tl.zeros([BLOCK_R], tl.float32)
    dotv = tl.zeros([BLOCK_R], tl.float32)
    hww_sum = 0.0
    hwb_sum = 0.0
    for h0 in range(0, H, BLOCK_H):
        cols = h0 + cols0
        cmask = cols < H
        x = tl.load(x_rows + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
        tl.store(xg_ptr + slots[:, None] * H + cols[None, :], x, mask=smask[:, None] & cmask[None, :])
        hw = tl.load(hw_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        if HAS_W:
            hww = hw * tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        else:
            hww = hw
        xc = x.to(tl.float32)
        if NORM == 2:
            xc = tl.where(cmask[None, :], xc - mean[:, None], 0.0)
        if NORM != 0:
            sq += tl.sum(xc * xc, axis=1)
        dotv += tl.sum(xc * hww[None, :], axis=1)
        hww_sum += tl.sum(hww, axis=0)
        if HAS_B:
            hwb_sum += tl.sum(hw * tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32), axis=0)

    if NORM == 0:
        rstd = tl.full([BLOCK_R], 1.0, tl.float32)
    else:
        rstd = 1.0 / tl.sqrt_rn(sq / H + eps)
    r = rstd * dotv + hwb_sum
    if HAS_HB:
        r += tl.load(hb_ptr).to(tl.float32)
    tl.store(r_ptr + slots, r, mask=smask)
    # Q = mean_j(hw_j w_j xhat_j) and P = mean_j(hw_j w_j) turn the per-row norm backward into one elementwise pass.
    aux = aux_ptr + slots * 4
    tl.store(aux + 0, mean, mask=smask)
    tl.store(aux + 1, rstd, mask=smask)
    tl.store(aux + 2, rstd * dotv / H, mask=smask)
    tl.store(aux + 3, tl.zeros([BLOCK_R], tl.float32) + hww_sum / H, mask=smask)


def check_pool_index(pool_index: Tensor, T: int) -> None:
    """Require 0 <= pool_index < T without a host sync.

    On CPU (the interpreter, tests) a ValueError now. On CUDA a device-side assert queued on the stream
    (``torch._assert_async``): a bad index aborts with "device-side assert triggered" at the next synchronisation,
    as an out-of-range ``index_select`` does. Cost: one aminmax over the 2B indices and three one-element kernels,
    no host round trip (benchmarks/bench_kernels.py::test_input_checks times it; tests/test_kernel_reward_head_loss.py
    checks the assert and the absence of a sync on a GPU). Under ``TRITON_INTERPRET`` the tensors are on the CPU.
    """
    if pool_index.device.type == "cpu":
        lo, hi = (int(v) for v in torch.aminmax(pool_index))
        if lo < 0 or hi >= T:
            raise ValueError(f"pool_index values must lie in [0, T={T}), got range [{lo}, {hi}]")
    else:
        lo, hi = torch.aminmax(pool_index)
        torch._assert_async((lo >= 0) & (hi < T), f"fastrm: pool_index values must lie in [0, T={T})")


def _num_warps(tile: int) -> int:
    return 16 if tile >= 8192 else 8 if tile >= 2048 else 4


def launch_head_fwd(
    hidden: Tensor,
    pool_index: Tensor,
    nw: Tensor | None,
    nb: Tensor | None,
    hw: Tensor,
    hb: Tensor | None,
    norm_type: str,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """rewards [N] fp32, pooled rows xg [N, H] (hidden dtype), aux [N, 4] fp32. Arguments must be validated, except
    the values of pool_index, which are checked here (inside the op, so eager and compiled calls both check)."""
    T, H = hidden.shape
    check_pool_index(pool_index, T)
    N = pool_index.shape[0]
    # A whole row per block up to H = 8192 (register-resident); larger H loops over chunks. Block sizes depend on H
    # only (the kernel masks any N), so every batch of a model reuses one compiled kernel.
    BLOCK_H = min(triton.next_power_of_2(H), 8192)
    BLOCK_R = max(1, min(64, 4096 // BLOCK_H))
    r = torch.empty(N, device=hidden.device, dtype=torch.float32)
    xg = torch.empty(N, H, device=hidden.device, dtype=hidden.dtype)
    aux = torch.empty(N, 4, device=hidden.device, dtype=torch.float32)
    _head_fwd_kernel[(triton.cdiv(N, BLOCK_R),)](
        hidden,
        pool_index,
        nw if nw is not None else hw,
        nb if nb is not None else hw,
        hw,
        hb if hb is not None else hw,
        r,
        xg,
        aux,
        N,
        T,
        H,
        hidden.stride(0),
        eps,
        NORM=NORM_TYPES[norm_type],
        HAS_W=nw is not None,
        HAS_B=nb is not None,
        HAS_HB=hb is not None,
        BLOCK_R=BLOCK_R,
        BLOCK_H=BLOCK_H,
        num_warps=_num_warps(BLOCK_R * BLOCK_H),
    )
    return r, xg, aux
