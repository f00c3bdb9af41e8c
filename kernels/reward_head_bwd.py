"""Fused reward head, backward: grad_hidden [T, H] in one pass and the norm / head parameter gradients.

Pooled rows get the norm + head backward, every other row of grad_hidden is written with zeros by the same kernel
(no memset + scatter); a row pooled twice gets the sum of both slots' gradients. The incoming dLoss/dreward comes
from the loss kernel's forward (kernels/pairwise_loss.py) and grad_output is read through a pointer, so nothing
syncs. Kernels -> launcher -> the ``fastrm::reward_head_bwd`` op (its autograd use is in reward_head_loss.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .reward_head_fwd import NORM_TYPES

# Backward grid targets (tests lower them to exercise the multi-tile loops at small shapes).
_BWD_SLOT_PROGRAMS = 128  # parameter-gradient programs per column block: enough to fill the GPU, few partial rows
_BWD_ROW_PROGRAMS = 1024  # grad_hidden programs (a few per SM) before a program takes several tiles


@triton.jit
def _bwd_param_partials(
    pid,
    cols,
    cmask,
    scale,
    xg_ptr,
    g_ptr,
    aux_ptr,
    part_ptr,
    N,
    H,
    slot_iters,
    NORM: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """part[pid, cols] = sum over this program's slots k of dr_k * xhat_k[cols]."""
    acc = tl.zeros([BLOCK_S, BLOCK_H], tl.float32)
    for it in range(slot_iters):
        slots = (pid * slot_iters + it) * BLOCK_S + tl.arange(0, BLOCK_S)
        smask = slots < N
        x = tl.load(xg_ptr + slots[:, None] * H + cols[None, :], mask=smask[:, None] & cmask[None, :], other=0.0)
        xhat = x.to(tl.float32)
        if NORM != 0:
            mean = tl.load(aux_ptr + slots * 4 + 0, mask=smask, other=0.0)
            rstd = tl.load(aux_ptr + slots * 4 + 1, mask=smask, other=0.0)
            xhat = (xhat - mean[:, None]) * rstd[:, None]
        dr = tl.load(g_ptr + slots, mask=smask, other=0.0) * scale
        acc += dr[:, None] * xhat
    tl.store(part_ptr + pid * H + cols, tl.sum(acc, axis=0), mask=cmask)


@triton.jit
def _bwd_hidden_tile(
    rblk,
    cols,
    cmask,
    scale,
    hw,
    hww,
    xg_ptr,
    g_ptr,
    aux_ptr,
    dx_ptr,
    order_ptr,
    start_ptr,
    T,
    H,
    stride_dxt,
    NORM: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Write grad_hidden[rows of tile rblk, cols] once: the norm backward for pooled rows, zeros for the others."""
    rows = rblk * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = rows < T
    lo = tl.load(start_ptr + rows, mask=tmask, other=0)
    cnt = tl.load(start_ptr + rows + 1, mask=tmask, other=0) - lo
    acc = tl.zeros([BLOCK_T, BLOCK_H], tl.float32)
    # Pass `dup` adds the dup-th slot pooling each row: most tiles pool no row (zero passes, a pure zero store),
    # a row listed twice gets the exact sum of both slots' gradients. Masked lanes load zeros and add nothing.
    for dup in range(tl.max(cnt, axis=0)):
        live = dup < cnt
        k = tl.load(order_ptr + lo + dup, mask=live, other=0).to(tl.int64)
        dr = tl.load(g_ptr + k, mask=live, other=0.0) * scale
        if NORM == 0:
            acc += dr[:, None] * hw[None, :]
        else:
            x = tl.load(xg_ptr + k[:, None] * H + cols[None, :], mask=live[:, None] & cmask[None, :], other=0.0)
            mean = tl.load(aux_ptr + k * 4 + 0, mask=live, other=0.0)
            rstd = tl.load(aux_ptr + k * 4 + 1, mask=live, other=0.0)
            q = tl.load(aux_ptr + k * 4 + 2, mask=live, other=0.0)
            xhat = (x.to(tl.float32) - mean[:, None]) * rstd[:, None]
            # RMSNorm: dx = rstd * (g - xhat * mean(g * xhat)), g = dr * hw * w; LayerNorm also subtracts mean(g).
            gx = hww[None, :] - xhat * q[:, None]
            if NORM == 2:
                gx -= tl.load(aux_ptr + k * 4 + 3, mask=live, other=0.0)[:, None]
            acc += (dr * rstd)[:, None] * gx
    tl.store(
        dx_ptr + rows[:, None] * stride_dxt + cols[None, :],
        acc.to(dx_ptr.dtype.element_ty),
        mask=tmask[:, None] & cmask[None, :],
    )


# Batch-dependent sizes and loop counts (N, T, the program split) are plain runtime integers and the block sizes
# depend on H only, so a model's batches share one compilation (tests/test_kernel_specializations.py counts them);
# H and the row stride stay specialised (fixed per model; divisibility by 16 vectorises the [T, H] stores).
@triton.jit(do_not_specialize=["N", "T", "NUM_SLOT_PROGS", "slot_iters", "row_iters"])
def _head_bwd_kernel(
    xg_ptr,  # [N, H] pooled rows saved by the forward (contiguous)
    g_ptr,  # [N] fp32: dLoss/d(reward) per slot, before the grad_output scale
    scale_ptr,  # [] grad_output (HAS_SCALE)
    aux_ptr,  # [N, 4] fp32 (mean, rstd, Q, P) from the forward
    w_ptr,  # [H] norm weight (HAS_W)
    hw_ptr,  # [H] head weight
    dx_ptr,  # [T, H] out: grad of hidden (row stride stride_dxt)
    part_ptr,  # [NUM_SLOT_PROGS, H] fp32 out: per program sum_k dr_k * xhat_k (for the parameter gradients)
    order_ptr,  # [N] int64: slots sorted by their row
    start_ptr,  # [T + 1] int32: start[t] = number of slots whose row < t (slots of row t: order[start[t]:start[t+1]])
    N,
    T,
    H,
    stride_dxt,
    NUM_SLOT_PROGS,
    slot_iters,  # slot blocks per parameter-gradient program
    row_iters,  # grad_hidden tiles per row program
    NORM: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    # Two roles in one launch (saves a launch on small batches). Programs [0, NUM_SLOT_PROGS) reduce the parameter
    # gradient partials over blocks of slots; they come first so the longer-running reductions start early. The
    # remaining programs each own a [BLOCK_T, BLOCK_H] tile of grad_hidden and write all of it once (no separate
    # memset + scatter). The roles live in separate functions: a runtime if/else must not rebind a name to a new type.
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    cmask = cols < H
    if HAS_SCALE:
        scale = tl.load(scale_ptr).to(tl.float32)
    else:
        scale = 1.0
    if pid < NUM_SLOT_PROGS:
        _bwd_param_partials(
            pid, cols, cmask, scale, xg_ptr, g_ptr, aux_ptr, part_ptr, N, H, slot_iters, NORM, BLOCK_S, BLOCK_H
        )
    else:
        hw = tl.load(hw_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        if HAS_W:
            hww = hw * tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        else:
            hww = hw
        # Several tiles per program: at T = 256k one tile per program would be ~10^5 tiny CTAs.
        for it in range(row_iters):
            _bwd_hidden_tile(
                (pid - NUM_SLOT_PROGS) * row_iters + it,
                cols,
                cmask,
                scale,
                hw,
                hww,
                xg_ptr,
                g_ptr,
                aux_ptr,
                dx_ptr,
                order_ptr,
                start_ptr,
                T,
                H,
                stride_dxt,
                NORM,
                BLOCK_T,
                BLOCK_H,
            )


@triton.jit(do_not_specialize=["P", "N"])
def _head_param_grad_kernel(
    part_ptr,  # [P, H] fp32 partial sums of dr_k * xhat_k
    g_ptr,  # [N] fp32 dLoss/d(reward)
    scale_ptr,  # [] grad_output (HAS_SCALE)
    w_ptr,  # [H] norm weight (HAS_W)
    b_ptr,  # [H] norm bias (HAS_B)
    hw_ptr,  # [H] head weight
    dw_ptr,  # [H] out: grad norm weight (HAS_W), norm weight's dtype
    db_ptr,  # [H] out: grad norm bias (HAS_B)
    dhw_ptr,  # [H] out: grad head weight
    dhb_ptr,  # [1] out: grad head bias (HAS_HB)
    P,
    N,
    H,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_HB: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    # With S = sum_k dr_k xhat_k and D = sum_k dr_k: dw = hw * S, db = hw * D, dhw = w * S + b * D, dhb = D.
    pid = tl.program_id(0).to(tl.int64)
    cols = pid * BLOCK_H + tl.arange(0, BLOCK_H)
    cmask = cols < H
    s_acc = tl.zeros([BLOCK_P, BLOCK_H], tl.float32)
    for p0 in range(0, P, BLOCK_P):
        prow = p0 + tl.arange(0, BLOCK_P)
        s_acc += tl.load(
            part_ptr + prow[:, None] * H + cols[None, :], mask=(prow < P)[:, None] & cmask[None, :], other=0.0
        )
    S = tl.sum(s_acc, axis=0)
    d_acc = tl.zeros([BLOCK_N], tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        d_acc += tl.load(g_ptr + offs, mask=offs < N, other=0.0)
    D = tl.sum(d_acc, axis=0)
    if HAS_SCALE:
        D = D * tl.load(scale_ptr).to(tl.float32)
    hw = tl.load(hw_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    dhw = S
    if HAS_W:
        dhw = S * tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        tl.store(dw_ptr + cols, (hw * S).to(dw_ptr.dtype.element_ty), mask=cmask)
    if HAS_B:
        dhw += D * tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        tl.store(db_ptr + cols, (hw * D).to(db_ptr.dtype.element_ty), mask=cmask)
    tl.store(dhw_ptr + cols, dhw.to(dhw_ptr.dtype.element_ty), mask=cmask)
    if HAS_HB:  # noqa: SIM102 (constexpr guard kept separate from the runtime test)
        if pid == 0:
            tl.store(dhb_ptr, D.to(dhb_ptr.dtype.element_ty))


def launch_head_bwd(
    grad_scale: Tensor | None,
    g: Tensor,
    aux: Tensor,
    xg: Tensor,
    pool_index: Tensor,
    T: int,
    nw: Tensor | None,
    nb: Tensor | None,
    hw: Tensor,
    hb: Tensor | None,
    norm_type: str,
    need_dx: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(grad hidden [T, H] or [0], grad nw [H] or [0], grad nb [H] or [0], grad hw [H], grad hb [1] or [0])."""
    N, H = xg.shape
    dev = xg.device
    # [4096]-element tiles: larger ones spill registers (the row role holds acc, x, xhat and the update at once).
    # Block sizes depend on H only (the kernels mask any N and T); the loop counts are runtime arguments.
    BLOCK_H = min(triton.next_power_of_2(H), 1024)
    n_hb = triton.cdiv(H, BLOCK_H)
    BLOCK_S = max(1, 4096 // BLOCK_H)
    slots_per_prog = max(BLOCK_S, triton.next_power_of_2(triton.cdiv(N, _BWD_SLOT_PROGRAMS)))
    n_slot = triton.cdiv(N, slots_per_prog)
    BLOCK_T = max(1, 4096 // BLOCK_H)
    n_tiles = triton.cdiv(T, BLOCK_T)
    row_iters = min(16, max(1, triton.next_power_of_2(n_tiles * n_hb // _BWD_ROW_PROGRAMS + 1) // 2))
    n_rowprog = triton.cdiv(n_tiles, row_iters) if need_dx else 0
    part = torch.empty(n_slot, H, device=dev, dtype=torch.float32)
    if need_dx:
        dx = torch.empty(T, H, device=dev, dtype=xg.dtype)
        # Row -> slots map without a host sync: sort the slots by row, starts[t] = first sorted position with row >= t.
        srow, order = torch.sort(pool_index, stable=True)
        starts = torch.searchsorted(srow, torch.arange(T + 1, device=dev, dtype=srow.dtype), out_int32=True)
    else:
        dx = xg.new_empty(0)
        order, starts = pool_index, pool_index  # unused
    f32 = torch.float32
    dw = torch.empty(H, device=dev, dtype=nw.dtype) if nw is not None else xg.new_empty(0, dtype=f32)
    db = torch.empty(H, device=dev, dtype=nb.dtype) if nb is not None else xg.new_empty(0, dtype=f32)
    dhw = torch.empty(H, device=dev, dtype=hw.dtype)
    dhb = torch.empty(1, device=dev, dtype=hb.dtype) if hb is not None else xg.new_empty(0, dtype=f32)
    scale = grad_scale if grad_scale is not None else g
    _head_bwd_kernel[(n_slot + n_rowprog, n_hb)](
        xg,
        g,
        scale,
        aux,
        nw if nw is not None else hw,
        hw,
        dx,
        part,
        order,
        starts,
        N,
        T,
        H,
        dx.stride(0) if need_dx else 0,
        n_slot,
        slots_per_prog // BLOCK_S,
        row_iters,
        NORM=NORM_TYPES[norm_type],
        HAS_W=nw is not None,
        HAS_SCALE=grad_scale is not None,
        BLOCK_S=BLOCK_S,
        BLOCK_T=BLOCK_T,
        BLOCK_H=BLOCK_H,
        num_warps=8,
    )
    BLOCK_HF = min(triton.next_power_of_2(H), 1024)
    BLOCK_P = 8  # fixed (masked loops over P and N): no new compilation per batch size
    _head_param_grad_kernel[(triton.cdiv(H, BLOCK_HF),)](
        part,
        g,
        scale,
        nw if nw is not None else hw,
        nb if nb is not None else hw,
        hw,
        dw,
        db,
        dhw,
        dhb,
        n_slot,
        N,
        H,
        HAS_W=nw is not None and norm_type != "none",
        HAS_B=nb is not None,
        HAS_HB=hb is not None,
        HAS_SCALE=grad_scale is not None,
        BLOCK_P=BLOCK_P,
        BLOCK_N=1024,
        BLOCK_H=BLOCK_HF,
        num_warps=4,
    )
    return dx, dw, db, dhw, dhb


# ----------------------------------------------------------------------------------------------------------------
# torch.library op (no autograd formula: it is the backward of reward_head_loss_fwd / pooled_rewards_fwd)
# ----------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("fastrm::reward_head_bwd", mutates_args=())
def _head_bwd_op(
    grad_scale: Tensor | None,
    g: Tensor,
    aux: Tensor,
    xg: Tensor,
    pool_index: Tensor,
    T: int,
    norm_weight: Tensor | None,
    norm_bias: Tensor | None,
    head_weight: Tensor,
    head_bias: Tensor | None,
    norm_type: str,
    need_dx: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(grad hidden [T, H] or [0], grad norm weight, grad norm bias, grad head weight [H], grad head bias)."""
    return launch_head_bwd(
        grad_scale, g, aux, xg, pool_index, T, norm_weight, norm_bias, head_weight, head_bias, norm_type, need_dx
    )


@_head_bwd_op.register_fake
def _(grad_scale, g, aux, xg, pool_index, T, norm_weight, norm_bias, head_weight, head_bias, norm_type, need_dx):
    H = xg.shape[1]
    f32 = torch.float32
    return (
        xg.new_empty(T, H) if need_dx else xg.new_empty(0),
        xg.new_empty(H, dtype=norm_weight.dtype) if norm_weight is not None else xg.new_empty(0, dtype=f32),
        xg.new_empty(H, dtype=norm_bias.dtype) if norm_bias is not None else xg.new_empty(0, dtype=f32),
        xg.new_empty(H, dtype=head_weight.dtype),
        xg.new_empty(1, dtype=head_bias.dtype) if head_bias is not None else xg.new_empty(0, dtype=f32),
    )
