"""Fused LM head + token cross-entropy, forward and backward, without [N, V] logits: kernel -> launchers -> op.

For the sequence-to-sequence reward model (Zhou et al. 2024, arXiv 2409.00162) the LM head runs only at the target
positions: hidden [N, H] x W [V, H] -> sum of -log softmax(logits)[target]. With V = 151,936 a full logits tensor
is N * V * 4 bytes in fp32 (and autograd keeps it, its softmax and its gradient), far more than the model's
activations. Here the rows are processed in chunks of C rows (``default_chunk_rows``: C * V * itemsize within a
budget that follows the size of ``hidden``). Per chunk:

1. logits = h_chunk @ W^T (+ bias), torch's matmul into one reused [C, V] buffer;
2. one Triton program per row (``_lce_rows_kernel``): softcap, running max / sum of exponentials, log-sum-exp, the
   loss, argmax == target, then the row is overwritten in place with dLoss/dlogits = (softmax - onehot) * dz/dy;
3. grad_h_chunk = g @ W and grad_W += g^T @ h_chunk (accumulated in fp32), grad_b += sum of g over rows.

The gradients are computed in the forward, as Liger-Kernel's fused linear cross-entropy does, so the backward only
scales them by grad_output (skipped when that is exactly 1). The op is registered as
``fastrm::linear_cross_entropy_fwd`` (torch.library), so ``torch.compile`` of surrounding code does not graph-break.

Back ends: ``"triton"`` (CUDA, or the CPU interpreter under TRITON_INTERPRET=1) and ``"torch"``, the same chunked
algorithm with step 2 written in PyTorch, the fast path on CPU (the interpreter runs one Python program per row).
``"auto"`` picks triton for CUDA tensors and torch otherwise. ``linear_cross_entropy_ref`` is the unchunked PyTorch
reference (full logits, ``F.cross_entropy``, autograd).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from .pairwise_loss import check_triton_device

__all__ = [
    "BACKENDS",
    "LinearCrossEntropyOutput",
    "default_chunk_rows",
    "launch_lce_rows",
    "linear_cross_entropy",
    "linear_cross_entropy_ref",
]

BACKENDS = ("auto", "triton", "torch")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The [C, V] logits chunk is sized like `hidden` itself (so the op adds O(input + parameters) memory), within
# these bounds: below 64 MiB the GEMMs get too few rows to run at full speed, above 512 MiB nothing is gained.
MIN_CHUNK_BYTES = 64 << 20
MAX_CHUNK_BYTES = 512 << 20


# ----------------------------------------------------------------------------------------------------------------
# Triton kernel: one program per row of the logits chunk.
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _softcap(y, inv_cap, cap):
    """z = cap * tanh(y / cap) and dz/dy = 1 - tanh^2(y / cap), fp32, from exp alone (core Triton has no tanh and
    the interpreter no libdevice). |u| <= 0.625: the odd minimax polynomial of Cephes' tanhf (< 1e-7 relative);
    above, tanh = 1 - q with q = 2 / (e^(2|u|) + 1), which also gives 1 - tanh^2 = q (2 - q) without cancellation."""
    u = y * inv_cap
    a = tl.abs(u)
    s = u * u
    p = -5.70498872745e-3 * s + 2.06390887954e-2
    p = p * s - 5.37397155531e-2
    p = p * s + 1.33314422036e-1
    p = p * s - 3.33332819422e-1
    t_small = u + u * s * p
    q = tl.math.div_rn(2.0, tl.exp(2.0 * a) + 1.0)  # e^(2|u|) = inf for |u| > 44: q = 0, tanh = +-1
    big = a > 0.625
    t = tl.where(big, tl.where(u < 0, q - 1.0, 1.0 - q), t_small)
    dt = tl.where(big, q * (2.0 - q), 1.0 - t_small * t_small)
    return cap * t, dt


@triton.jit
def _lce_rows_kernel(
    x_ptr,  # [C, V] logits (row stride stride_x, unit column stride); overwritten with dLoss/dlogits if HAS_GRAD
    t_ptr,  # [C] int64 targets (stride stride_t), each in [0, V) or == ignore_index (checked by the launcher)
    nll_ptr,  # [C] fp32 out: -log softmax(z)[target]; 0 at ignored rows
    match_ptr,  # [C] int8 out: 1 where argmax(z) == target (first index among equal maxima); 0 at ignored rows
    V,
    stride_x,
    stride_t,
    ignore_index,
    inv_cap,
    cap,
    SOFTCAP: tl.constexpr,
    HAS_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    tgt = tl.load(t_ptr + row * stride_t)
    cols0 = tl.arange(0, BLOCK_V)
    if tgt == ignore_index:
        tl.store(nll_ptr + row, 0.0)
        tl.store(match_ptr + row, 0)
        if HAS_GRAD:
            # The buffer still holds this row's logits: an ignored row must contribute exactly zero.
            zero = tl.zeros([BLOCK_V], dtype=x_ptr.dtype.element_ty)
            for v0 in range(0, V, BLOCK_V):
                cols = v0 + cols0
                tl.store(x_row + cols, zero, mask=cols < V)
    else:
        # Pass 1: running max m, sum d of e^(z - m), and the first index of the maximum (torch.argmax's rule: a
        # later block replaces it only when strictly greater; tl.argmax breaks ties within a block to the left).
        m = float("-inf")
        d = 0.0
        best = 0
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + cols0
            cmask = cols < V
            z = tl.load(x_row + cols, mask=cmask, other=0.0).to(tl.float32)
            if SOFTCAP:
                z, _ = _softcap(z, inv_cap, cap)
            z = tl.where(cmask, z, float("-inf"))  # padding after the cap (which would map -inf to -cap)
            # NaN logits are left out of the max (the interpreter's max refuses an all-NaN block) but stay in the
            # sum below, so the row's loss is NaN, as F.cross_entropy's is.
            zm = tl.where(z == z, z, float("-inf"))
            bm = tl.max(zm, axis=0)
            bi = tl.argmax(zm, axis=0)
            best = tl.where(bm > m, v0 + bi, best)
            m_new = tl.maximum(m, bm)
            # While every logit so far is -inf (a vocabulary range masked by the bias), shift by 0, not -inf - -inf.
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            d = d * tl.exp(m - shift) + tl.sum(tl.exp(z - shift), axis=0)
            m = m_new
        lse = m + tl.log(d)
        z_t = tl.load(x_row + tgt).to(tl.float32)
        if SOFTCAP:
            z_t, _ = _softcap(z_t, inv_cap, cap)
        tl.store(nll_ptr + row, lse - z_t)
        tl.store(match_ptr + row, (best == tgt).to(tl.int8))
        if HAS_GRAD:
            # Pass 2: dLoss/dy = (softmax(z) - onehot(target)) * dz/dy, written over the logits it was computed from.
            for v0 in range(0, V, BLOCK_V):
                cols = v0 + cols0
                cmask = cols < V
                z = tl.load(x_row + cols, mask=cmask, other=0.0).to(tl.float32)
                if SOFTCAP:
                    z, dz = _softcap(z, inv_cap, cap)
                g = tl.exp(z - lse)
                g = tl.where(cols == tgt, g - 1.0, g)
                if SOFTCAP:
                    g = g * dz
                tl.store(x_row + cols, g.to(x_ptr.dtype.element_ty), mask=cmask)


# ----------------------------------------------------------------------------------------------------------------
# Launchers: the per-row step (Triton or PyTorch) and the chunk loop around it.
# ----------------------------------------------------------------------------------------------------------------
def default_chunk_rows(N: int, V: int, H: int, itemsize: int) -> int:
    """Rows C per logits chunk: C * V * itemsize ~ the size of hidden (N * H * itemsize), clamped to
    [MIN_CHUNK_BYTES, MAX_CHUNK_BYTES], at most N; then evened out so the last chunk is not a sliver."""
    budget = min(max(N * H * itemsize, MIN_CHUNK_BYTES), MAX_CHUNK_BYTES)
    rows = max(1, min(max(N, 1), budget // (V * itemsize)))
    n_chunks = triton.cdiv(max(N, 1), rows)
    return triton.cdiv(max(N, 1), n_chunks)


def _block_v(V: int, interpreted: bool) -> int:
    # GPU: 4096 values per program at 16 warps, 8 per thread. The sm_90 compile then needs 39-96 registers and no
    # stack (no spills) in every variant; 16 per thread (8 warps) needs up to 176 registers with softcap, which
    # allows one 8-warp block per SM. The interpreter pays per block, not per element: large blocks.
    return min(triton.next_power_of_2(V), 32768 if interpreted else 4096)


def launch_lce_rows(
    logits: Tensor,
    targets: Tensor,
    nll: Tensor,
    match: Tensor,
    ignore_index: int,
    softcap: float | None,
    has_grad: bool,
):
    """Run ``_lce_rows_kernel`` on logits [C, V] (unit column stride; overwritten with dLoss/dlogits when has_grad),
    targets [C] int64, nll [C] fp32 and match [C] int8 (outputs). Returns the launch's compiled-kernel handle (its
    metadata, e.g. ``n_spills``, is read by the GPU tests)."""
    C, V = logits.shape
    interpreted = logits.device.type != "cuda"
    return _lce_rows_kernel[(C,)](
        logits,
        targets,
        nll,
        match,
        V,
        logits.stride(0),
        targets.stride(0),
        ignore_index,
        1.0 / softcap if softcap is not None else 1.0,
        softcap if softcap is not None else 1.0,
        SOFTCAP=softcap is not None,
        HAS_GRAD=has_grad,
        BLOCK_V=_block_v(V, interpreted),
        num_warps=16,
    )


def _rows_torch(
    logits: Tensor,
    targets: Tensor,
    nll: Tensor,
    match: Tensor,
    ignore_index: int,
    softcap: float | None,
    has_grad: bool,
) -> None:
    """The contract of ``launch_lce_rows`` in PyTorch (the CPU back end), in place on an fp32 view of the chunk
    (torch.logsumexp would allocate a second chunk-sized temporary)."""
    z = logits.float()  # the buffer itself when fp32: it is overwritten below anyway
    th = None
    if softcap is not None:
        th = torch.tanh(z.div_(softcap))
        z = torch.mul(th, softcap, out=z)
    valid = targets != ignore_index
    safe_t = torch.where(valid, targets, 0).unsqueeze(1)
    match.copy_((z.argmax(dim=1) == targets) & valid)  # torch.argmax: first index among equal maxima
    z_t = z.gather(1, safe_t)
    m = z.amax(dim=1, keepdim=True)
    m = torch.where(m == float("-inf"), 0.0, m)  # a row of -inf so far: shift by 0, not -inf - -inf
    e = z.sub_(m).exp_()
    s = e.sum(dim=1, keepdim=True)
    nll.copy_(torch.where(valid, (m + s.log() - z_t).squeeze(1), 0.0))
    if has_grad:
        g = e.div_(s)
        g.scatter_add_(1, safe_t, torch.full_like(z_t, -1.0))
        if th is not None:
            g.mul_(th.mul_(th).neg_().add_(1.0))
        g.mul_(valid.unsqueeze(1))
        if g.data_ptr() != logits.data_ptr():
            logits.copy_(g)


def check_targets(targets: Tensor, V: int, ignore_index: int) -> None:
    """Require each target in [0, V) or == ignore_index: a ValueError on CPU naming the first bad row; on CUDA a
    device-side assert queued on the stream (no host sync), as an out-of-range F.cross_entropy target does."""
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= V))
    if targets.device.type == "cpu":
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"targets[{i}] = {int(targets[i])} is neither in [0, V={V}) nor ignore_index={ignore_index}"
            )
    else:
        torch._assert_async(~bad.any(), f"fastrm: targets must lie in [0, V={V}) or equal ignore_index")


def _accumulate_grad_weight(grad_w: Tensor, g: Tensor, h: Tensor) -> None:
    """grad_w [V, H] fp32 += g^T [V, C] @ h [C, H], accumulated in fp32."""
    if g.dtype == torch.float32:
        grad_w.addmm_(g.t(), h)
    elif g.is_cuda and torch.cuda.get_device_capability(g.device)[0] >= 8:
        torch.addmm(grad_w, g.t(), h, out_dtype=torch.float32, out=grad_w)
    else:  # no mixed-dtype GEMM on CPU (torch 2.13) or before sm_80: upcast the chunk (bounded by the budget)
        grad_w.addmm_(g.t().float(), h.float())


def _lce_forward(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None,
    softcap: float | None,
    ignore_index: int,
    chunk_rows: int,
    backend: str,
    need: tuple[bool, bool, bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    N, H = hidden.shape
    V = weight.shape[0]
    check_targets(targets, V, ignore_index)
    need_h, need_w, need_b = need
    has_grad = need_h or need_w or need_b
    C = chunk_rows if chunk_rows > 0 else default_chunk_rows(N, V, H, hidden.element_size())
    C = max(1, min(C, N))
    dev, f32 = hidden.device, torch.float32
    nll = torch.empty(N, device=dev, dtype=f32)
    match = torch.empty(N, device=dev, dtype=torch.int8)
    grad_h = torch.empty(N, H, device=dev, dtype=hidden.dtype) if need_h else hidden.new_empty(0)
    grad_w = torch.zeros(V, H, device=dev, dtype=f32) if need_w else hidden.new_empty(0, dtype=f32)
    grad_b = torch.zeros(V, device=dev, dtype=f32) if need_b else hidden.new_empty(0, dtype=f32)
    rows_step = launch_lce_rows if backend == "triton" else _rows_torch
    buf = torch.empty(C, V, device=dev, dtype=hidden.dtype)
    w_t = weight.t()
    for s in range(0, N, C):
        e = min(s + C, N)
        h = hidden[s:e]
        lg = buf[: e - s]
        if bias is None:
            torch.matmul(h, w_t, out=lg)
        else:
            torch.addmm(bias, h, w_t, out=lg)
        rows_step(lg, targets[s:e], nll[s:e], match[s:e], ignore_index, softcap, has_grad)
        if need_h:
            torch.matmul(lg, weight, out=grad_h[s:e])
        if need_w:
            _accumulate_grad_weight(grad_w, lg, h)
        if need_b:
            grad_b.add_(lg.sum(dim=0, dtype=f32))
    loss_sum = nll.sum()
    n_valid = (targets != ignore_index).sum()
    return loss_sum, n_valid, match.view(torch.bool), nll.neg(), grad_h, grad_w, grad_b


# ----------------------------------------------------------------------------------------------------------------
# torch.library op: fastrm::linear_cross_entropy_fwd (the forward computes the gradients; backward scales them).
# ----------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("fastrm::linear_cross_entropy_fwd", mutates_args=())
def _lce_op(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None,
    softcap: float | None,
    ignore_index: int,
    chunk_rows: int,
    backend: str,
    need_grad_hidden: bool,
    need_grad_weight: bool,
    need_grad_bias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss_sum [] fp32, n_valid [] int64, argmax_match [N] bool, target_logprob [N] fp32, grad_hidden [N, H]
    hidden dtype, grad_weight [V, H] fp32, grad_bias [V] fp32); a gradient not asked for is an empty [0] tensor."""
    need = (need_grad_hidden, need_grad_weight, need_grad_bias)
    # Weight and bias in hidden's dtype (fp32 master weights under bf16 autocast); autocast off for the GEMMs
    # below, which write into given buffers.
    weight = weight.to(hidden.dtype)
    bias = bias.to(hidden.dtype) if bias is not None else None
    with torch.autocast(hidden.device.type, enabled=False):
        return _lce_forward(hidden, weight, targets, bias, softcap, ignore_index, chunk_rows, backend, need)


@_lce_op.register_fake
def _(hidden, weight, targets, bias, softcap, ignore_index, chunk_rows, backend, need_h, need_w, need_b):
    (N, H), V = hidden.shape, weight.shape[0]
    f32 = torch.float32
    return (
        hidden.new_empty((), dtype=f32),
        hidden.new_empty((), dtype=torch.int64),
        hidden.new_empty(N, dtype=torch.bool),
        hidden.new_empty(N, dtype=f32),
        hidden.new_empty((N, H) if need_h else (0,)),
        hidden.new_empty((V, H) if need_w else (0,), dtype=f32),
        hidden.new_empty((V,) if need_b else (0,), dtype=f32),
    )


def _lce_setup(ctx, inputs, output) -> None:
    hidden, weight, _targets, bias, _softcap, _ii, _chunk, _backend, need_h, need_w, need_b = inputs
    _loss, n_valid, match, logprob, grad_h, grad_w, grad_b = output
    ctx.mark_non_differentiable(n_valid, match, logprob, grad_h, grad_w, grad_b)
    # Only loss_sum is differentiable: the other outputs' gradients stay None instead of zero-filled tensors.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(grad_h, grad_w, grad_b)
    ctx.need = (need_h, need_w, need_b)
    ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
    ctx.consumed = False


def _scaled(g: Tensor, d: Tensor | None, dtype: torch.dtype, in_place: bool) -> Tensor:
    """grad_output * g in the input's dtype; d None means grad_output is exactly 1 (no multiply)."""
    if d is None:
        return g if g.dtype == dtype else g.to(dtype)
    if g.dtype == dtype and in_place:
        return g.mul_(d)
    return torch.mul(g, d, out=torch.empty(g.shape, device=g.device, dtype=dtype))


def _lce_backward(ctx, d_loss, _d_n, _d_match, _d_logprob, _d_gh, _d_gw, _d_gb):
    if d_loss is None:
        return (None,) * 11
    # Under AOTAutograd's trace (torch.compile) the gradients are functional tensors: no in-place, no reads.
    traced = torch.compiler.is_compiling() or type(d_loss) is not Tensor
    if not traced:
        # Eager: the saved gradients are scaled in place (no second [V, H] buffer) and handed to autograd, so they
        # serve one backward; a second one (retain_graph) would see them scaled already, hence the error.
        if ctx.consumed:
            raise RuntimeError(
                "fastrm linear_cross_entropy: backward ran twice through one forward (retain_graph=True); its "
                "gradients are computed in the forward and used up by the first backward. Run the forward again."
            )
        ctx.consumed = True
    # grad_output is checked against 1 only on the CPU, where reading it costs no device sync.
    d = None if not traced and d_loss.device.type == "cpu" and float(d_loss) == 1.0 else d_loss
    saved = ctx.saved_tensors
    out = [_scaled(g, d, dt, not traced) if n else None for g, n, dt in zip(saved, ctx.need, ctx.dtypes)]
    return out[0], out[1], None, out[2], *((None,) * 7)


_lce_op.register_autograd(_lce_backward, setup_context=_lce_setup)


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------
class LinearCrossEntropyOutput(NamedTuple):
    """What ``linear_cross_entropy`` returns (N = hidden rows)."""

    loss_sum: Tensor  # [] fp32: sum over non-ignored rows of -log softmax(logits)[target]; differentiable
    n_valid: Tensor  # [] int64: rows whose target is not ignore_index
    argmax_match: Tensor  # [N] bool: argmax(logits) == target (first index among equal maxima); False if ignored
    target_logprob: Tensor  # [N] fp32: log softmax(logits)[target] (0 at ignored rows); no gradient


def _check_args(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None,
    softcap: float | None,
    ignore_index: int,
) -> None:
    if hidden.dim() != 2 or hidden.dtype not in _DTYPES:
        raise ValueError(f"hidden must be [N, H] fp32/bf16/fp16, got {list(hidden.shape)} {hidden.dtype}")
    N, H = hidden.shape
    if H < 1:
        raise ValueError(f"hidden has no columns: {list(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != H or weight.shape[0] < 1:
        raise ValueError(f"weight must be [V, H] with H={H} (the LM head's nn.Linear.weight), got {list(weight.shape)}")
    if weight.dtype not in _DTYPES:
        raise ValueError(f"weight must be fp32/bf16/fp16, got {weight.dtype}")
    V = weight.shape[0]
    if bias is not None and (tuple(bias.shape) != (V,) or bias.dtype not in _DTYPES):
        raise ValueError(f"bias must be [V]=[{V}] fp32/bf16/fp16, got {list(bias.shape)} {bias.dtype}")
    if targets.dim() != 1 or targets.shape[0] != N or targets.dtype != torch.int64:
        raise ValueError(f"targets must be [N]=[{N}] int64, got {list(targets.shape)} {targets.dtype}")
    for name, t in (("weight", weight), ("targets", targets), ("bias", bias)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device}, hidden on {hidden.device}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0 (Gemma2's final_logit_softcapping) or None, got {softcap}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Tensor | None = None,
    softcap: float | None = None,
    ignore_index: int = -100,
    backend: str = "auto",
    chunk_rows: int | None = None,
) -> LinearCrossEntropyOutput:
    """Token cross-entropy of an LM head, summed over rows, without materialising the [N, V] logits.

    logits = hidden @ weight^T (+ bias), computed in hidden's dtype as ``F.linear`` does (weight and bias are cast to
    it, the copy autocast would make; under ``torch.autocast`` hidden is first cast to the autocast dtype, as
    ``F.linear``'s inputs are); with ``softcap`` c the
    logits are z = c * tanh(logits / c) (Gemma2's ``final_logit_softcapping``), in fp32. Then
    loss_sum = sum_{i: targets_i != ignore_index} (logsumexp_v z_iv - z_i,targets_i), computed in fp32.

    Args:
        hidden: [N, H] fp32/bf16/fp16, any strides (the hidden states at the target positions only).
        weight: [V, H] the LM head's ``nn.Linear.weight`` (tied embeddings included); fp32 master weights are fine.
        targets: [N] int64 in [0, V) or == ignore_index. Out of range: ValueError on CPU, a device-side assert on CUDA.
        bias: [V] or None. softcap: c > 0 or None.
        backend: "triton" (CUDA, or the CPU interpreter), "torch" (the same chunked algorithm in PyTorch: the fast
            CPU path), "auto" (triton for CUDA tensors, else torch).
        chunk_rows: rows per logits chunk (default ``default_chunk_rows``); results do not depend on it beyond
            rounding.

    Returns:
        ``LinearCrossEntropyOutput(loss_sum, n_valid, argmax_match, target_logprob)``; only loss_sum carries a
        gradient (w.r.t. hidden, weight and bias; grad_weight and grad_bias accumulate in fp32 and are returned in
        their parameter's own dtype, so fp32 master weights get the fp32 sums, not a bf16 rounding of them).
        The gradients are computed in the forward whenever grad mode is on and an input requires grad (they are
        held until backward: [N, H] + [V, H] fp32 + [V] fp32); one backward per forward.

    >>> out = linear_cross_entropy(h[target_rows], lm_head.weight, labels)  # doctest: +SKIP
    >>> (out.loss_sum / n_target_tokens).backward()  # doctest: +SKIP
    """
    _check_args(hidden, weight, targets, bias, softcap, ignore_index)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1):
        raise ValueError(f"chunk_rows must be a positive int or None, got {chunk_rows!r}")
    if backend == "auto":
        backend = "triton" if hidden.is_cuda else "torch"
    if backend == "triton":
        check_triton_device(hidden)
    if torch.is_autocast_enabled(hidden.device.type):
        hidden = hidden.to(torch.get_autocast_dtype(hidden.device.type))
    grad_on = torch.is_grad_enabled()
    need = (
        grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
    )
    loss, n_valid, match, logprob, _, _, _ = _lce_op(
        hidden,
        weight,
        targets,
        bias,
        None if softcap is None else float(softcap),
        ignore_index,
        chunk_rows or 0,
        backend,
        *need,
    )
    return LinearCrossEntropyOutput(loss, n_valid, match, logprob)


def linear_cross_entropy_ref(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Tensor | None = None,
    softcap: float | None = None,
    ignore_index: int = -100,
) -> LinearCrossEntropyOutput:
    """Pure PyTorch ``linear_cross_entropy`` (full [N, V] logits, ``F.cross_entropy``, autograd): same arguments
    (no back end or chunking) and results."""
    _check_args(hidden, weight, targets, bias, softcap, ignore_index)
    z = F.linear(hidden, weight, bias).float()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    nll = F.cross_entropy(z, targets, ignore_index=ignore_index, reduction="none")
    valid = targets != ignore_index
    match = (z.detach().argmax(dim=-1) == targets) & valid
    return LinearCrossEntropyOutput(nll.sum(), valid.sum(), match, -nll.detach())
