"""fastrm_kernels.linear_cross_entropy (fused LM head + token cross-entropy) against an independent float64 reference.

The reference is written here from the formulas: full fp64 logits, log_softmax, gather, autograd. Both back ends
run the same cases: "triton" (the kernel, under TRITON_INTERPRET=1 on CPU) and "torch" (the PyTorch CPU path).
Low precision follows the house rule: the op's error against fp64 is at most twice the error of the plain PyTorch
composition (F.linear + F.cross_entropy) in the same dtype, plus one rounding of the output. Every buffer the op
allocates uninitialised starts as NaN (floats) or 1 (flags), so an unwritten element shows.
"""

import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

from fastrm_kernels.linear_cross_entropy import (
    default_chunk_rows,
    launch_lce_rows,
    linear_cross_entropy,
    linear_cross_entropy_ref,
)
from kernel_cases import DEVICE, _err, _scale, poison_empty

BACKENDS = ["triton", "torch"] if DEVICE == "cpu" else ["triton"]
IGNORE = -100
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture
def poison(monkeypatch):
    poison_empty(monkeypatch)
    empty = torch.empty

    def _flags_set(*a, **k):
        t = empty(*a, **k)
        if t.dtype in (torch.bool, torch.int8):
            t.fill_(1)
        return t

    monkeypatch.setattr(torch, "empty", _flags_set)


# ----------------------------------------------------------------------------------------------------------------
# Inputs and the float64 reference
# ----------------------------------------------------------------------------------------------------------------
def make_inputs(seed, N, H, V, *, dtype=torch.float32, bias=False, n_ignored=1, device=DEVICE):
    """Seeded random inputs, exactly representable in dtype; logits ~ N(0, 3^2) plus one leading token per row.
    Every other row's target is the row's fp64 argmax (so argmax_match has True and False values); n_ignored rows
    are ignore_index. Everything is drawn and computed on `device` (the GPU tests use full-size shapes)."""
    g = torch.Generator(device=device).manual_seed(seed)
    f64 = {"generator": g, "dtype": torch.float64, "device": device}
    h = torch.randn(N, H, **f64).to(dtype)
    w = (torch.randn(V, H, **f64) * (3.0 / math.sqrt(H))).to(dtype)
    b = (0.5 * torch.randn(V, **f64)).to(dtype) if bias else None
    # No near-ties: each row's hidden state is moved along W[k] / |W[k]|^2 so that a random token k leads the
    # row by about 2 (argmax_match is then exact in every dtype; the other logits move by ~2 / sqrt(H)).
    k = torch.randint(0, V, (N,), generator=g, device=device)
    wk = w[k].double()
    rows = torch.arange(N, device=device)
    for _ in range(4):  # the move shifts the other logits a little: repeat until k leads by 2
        z = h.double() @ w.double().T + (b.double() if bias else 0.0)
        lead = z.scatter(1, k[:, None], float("-inf")).max(-1).values - z[rows, k] + 2.0
        h = (h.double() + lead[:, None] * wk / (wk * wk).sum(-1, keepdim=True)).to(dtype)
    logits = h.double() @ w.double().T + (b.double() if bias else 0.0)
    t = torch.randint(0, V, (N,), generator=g, device=device)
    t = torch.where(rows % 2 == 0, logits.argmax(-1), t)
    t[torch.randperm(N, generator=g, device=device)[:n_ignored]] = IGNORE
    grad_scale = 0.5 + float(torch.rand((), generator=g, device=device))
    return h, w, b, t, grad_scale


def reference64(h, w, b, t, softcap=None, grad_scale=1.0):
    """Full fp64 logits, log_softmax, gather at the targets; gradients of grad_scale * loss_sum by autograd (on the
    inputs' device)."""
    h64 = h.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_() if b is not None else None
    z = h64 @ w64.T
    if b64 is not None:
        z = z + b64
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    valid = t != IGNORE
    logp_t = torch.log_softmax(z, dim=-1).gather(1, torch.where(valid, t, 0)[:, None])[:, 0]
    logp_t = torch.where(valid, logp_t, 0.0)
    loss = -logp_t.sum()
    (grad_scale * loss).backward()
    top2 = z.detach().topk(2, dim=-1).values
    return {
        "loss_sum": loss.detach(),
        "n_valid": valid.sum(),
        "match": (z.detach().argmax(-1) == t) & valid,
        "logprob": logp_t.detach(),
        "gap": top2[:, 0] - top2[:, 1],
        "grads": {"hidden": h64.grad, "weight": w64.grad, "bias": b64.grad if b64 is not None else None},
    }


def composition(h, w, b, t, softcap=None, grad_scale=1.0):
    """The plain PyTorch composition in the inputs' dtype (F.linear + F.cross_entropy), for the low-precision rule."""
    h, w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    b = b.detach().clone().requires_grad_() if b is not None else None
    z = F.linear(h, w, b)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    nll = F.cross_entropy(z, t, ignore_index=IGNORE, reduction="none")
    loss = nll.sum()
    (grad_scale * loss).backward()
    return {
        "loss_sum": loss.detach(),
        "logprob": -nll.detach(),
        "grads": {"hidden": h.grad, "weight": w.grad, "bias": b.grad if b is not None else None},
    }


def run_op(h, w, b, t, grad_scale=1.0, **kw):
    h, w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    b = b.detach().clone().requires_grad_() if b is not None else None
    out = linear_cross_entropy(h, w, t, bias=b, **kw)
    assert out.loss_sum.shape == () and out.loss_sum.dtype == torch.float32
    assert out.n_valid.shape == () and out.n_valid.dtype == torch.int64
    assert out.argmax_match.shape == t.shape and out.argmax_match.dtype == torch.bool
    assert out.target_logprob.shape == t.shape and out.target_logprob.dtype == torch.float32
    assert not out.target_logprob.requires_grad and out.loss_sum.requires_grad
    (grad_scale * out.loss_sum).backward()
    grads = {"hidden": h.grad, "weight": w.grad, "bias": b.grad if b is not None else None}
    for k, p in (("hidden", h), ("weight", w), ("bias", b)):
        if p is not None:
            assert grads[k].dtype == p.dtype and grads[k].shape == p.shape, k
    return out, grads


def _pairs(out, grads, ref):
    yield "loss_sum", out.loss_sum if hasattr(out, "loss_sum") else out["loss_sum"], ref["loss_sum"]
    yield "logprob", out.target_logprob if hasattr(out, "target_logprob") else out["logprob"], ref["logprob"]
    for k, r in ref["grads"].items():
        if r is not None:
            yield f"grad_{k}", grads[k], r


def assert_fp32_close(out, grads, ref, rtol=2e-5):
    for name, a, r in _pairs(out, grads, ref):
        assert torch.isfinite(a).all(), f"{name} has non-finite values"
        tol = rtol
        if name == "grad_hidden":
            # Each element sums V products, and CPU BLAS (MKL) accumulates some row counts sequentially (M = 1-3
            # or 5 rows: 10x the error of M = 4), where the -1 of the target absorbs the small terms: fp32 error
            # grows like eps * sqrt(V) there (4.6e-5 relative seen at V = 151,936, against 1.9e-4 allowed).
            tol = max(rtol, 4 * torch.finfo(torch.float32).eps * math.sqrt(ref["grads"]["weight"].shape[0]))
        assert _err(a, r) <= tol * _scale(r) + 1e-7, f"{name}: err {_err(a, r):.3e} vs scale {_scale(r):.3e}"


def assert_exact_parts(out, grads, ref, t, gap_min):
    """n_valid exact; argmax_match exact on rows whose fp64 top-2 gap exceeds the dtype's logit error; ignored rows
    have logprob 0, match False and exactly zero hidden gradient."""
    assert int(out.n_valid) == int(ref["n_valid"])
    clear = (ref["gap"] > gap_min).cpu()
    assert clear.sum() >= len(clear) - 1, "inputs have near-ties; pick another seed"
    assert torch.equal(out.argmax_match.cpu()[clear], ref["match"].cpu()[clear])
    ignored = (t == IGNORE).cpu()
    assert not out.argmax_match.cpu()[ignored].any()
    assert (out.target_logprob.cpu()[ignored] == 0).all()
    assert (grads["hidden"].cpu()[ignored] == 0).all()


# ----------------------------------------------------------------------------------------------------------------
# fp32 against fp64: vocabularies of Qwen2 (151,936), 49,152 and a prime; softcap, bias, chunking, layouts
# ----------------------------------------------------------------------------------------------------------------
FP32_CASES = [
    # N, H, V, softcap, bias, chunk_rows, layout
    (5, 32, 151936, None, False, 2, "contiguous"),
    (6, 32, 151936, 30.0, True, None, "contiguous"),
    (8, 48, 49152, None, True, 5, "rows"),
    (7, 64, 49152, 10.0, False, 2, "cols"),
    (8, 40, 65521, 15.0, True, 3, "contiguous"),  # prime: a partial last block everywhere
    (5, 64, 1009, None, False, None, "contiguous"),  # prime, smaller than one block
]


def _layout(h, t, layout):
    """Strided hidden / targets: rows (every other row of a wider buffer) or cols (a transposed buffer)."""
    if layout == "rows":
        wide = torch.full((2 * h.shape[0], h.shape[1] + 3), float("nan"), dtype=h.dtype, device=h.device)
        wide[::2, 1 : 1 + h.shape[1]] = h
        tt = torch.full((2 * t.shape[0],), 7, dtype=t.dtype, device=t.device)
        tt[::2] = t
        return wide[::2, 1 : 1 + h.shape[1]], tt[::2]
    if layout == "cols":
        return h.t().contiguous().t(), t
    return h, t


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("N, H, V, softcap, bias, chunk_rows, layout", FP32_CASES)
def test_fp32_matches_fp64_reference(poison, backend, N, H, V, softcap, bias, chunk_rows, layout):
    h, w, b, t, gs = make_inputs(N * 1000 + H + V % 997, N, H, V, bias=bias, n_ignored=1)
    ref = reference64(h, w, b, t, softcap, gs)
    hl, tl_ = _layout(h, t, layout)
    out, grads = run_op(hl, w, b, tl_, gs, softcap=softcap, backend=backend, chunk_rows=chunk_rows)
    assert_fp32_close(out, grads, ref)
    assert_exact_parts(out, grads, ref, t, gap_min=1e-3)
    assert ref["match"].any() and (~ref["match"]).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_row(poison, backend):
    h, w, b, t, gs = make_inputs(11, 1, 64, 65521, bias=True, n_ignored=0)
    ref = reference64(h, w, b, t, 20.0, gs)
    out, grads = run_op(h, w, b, t, gs, softcap=20.0, backend=backend)
    assert_fp32_close(out, grads, ref)
    assert_exact_parts(out, grads, ref, t, gap_min=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_targets_ignored(poison, backend):
    h, w, b, t, gs = make_inputs(12, 6, 32, 49152, bias=True, n_ignored=6)
    out, grads = run_op(h, w, b, t, gs, softcap=30.0, backend=backend, chunk_rows=4)
    assert out.loss_sum.item() == 0 and out.n_valid.item() == 0
    assert not out.argmax_match.any() and (out.target_logprob == 0).all()
    for k, g in grads.items():
        assert torch.isfinite(g).all() and (g == 0).all(), k


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_output_one_and_ref_function(poison, backend):
    """grad_output exactly 1 (the scale is skipped on CPU) and the module's own unchunked reference both agree with
    the float64 reference."""
    h, w, b, t, _ = make_inputs(13, 8, 32, 49152, bias=True)
    ref = reference64(h, w, b, t, 30.0, 1.0)
    out, grads = run_op(h, w, b, t, 1.0, softcap=30.0, backend=backend, chunk_rows=3)
    assert_fp32_close(out, grads, ref)
    hr, wr, br = (x.detach().clone().requires_grad_() for x in (h, w, b))
    mod = linear_cross_entropy_ref(hr, wr, t, bias=br, softcap=30.0)
    mod.loss_sum.backward()
    assert_fp32_close(mod, {"hidden": hr.grad, "weight": wr.grad, "bias": br.grad}, ref)
    assert torch.equal(mod.argmax_match, out.argmax_match) and int(mod.n_valid) == int(out.n_valid)


# ----------------------------------------------------------------------------------------------------------------
# bf16 / fp16: at most twice the error of the same-dtype PyTorch composition
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("softcap, bias", [(None, True), (30.0, False)])
def test_low_precision_rule(poison, backend, dtype, softcap, bias):
    h, w, b, t, gs = make_inputs(14 + bias, 8, 64, 49152, dtype=dtype, bias=bias)
    ref = reference64(h, w, b, t, softcap, gs)
    torch_out = composition(h, w, b, t, softcap, gs)
    out, grads = run_op(h, w, b, t, gs, softcap=softcap, backend=backend, chunk_rows=3)
    assert_lowp_rule(out, grads, ref, torch_out)
    # The logits themselves are rounded to the dtype (as F.linear's are): argmax is exact away from that rounding.
    assert_exact_parts(out, grads, ref, t, gap_min=0.5)


def assert_lowp_rule(out, grads, ref, torch_out):
    """Each vector output's max error <= 2 x the same-dtype composition's + one rounding of the output dtype.
    loss_sum is a sum of the per-row values, whose signed errors cancel by luck in a single scalar: it must equal
    -sum(target_logprob) (fp32) and stay within 2 x the composition's summed per-row errors."""
    lp_c = (torch_out["logprob"].double() - ref["logprob"]).abs().sum().item()
    assert abs(out.loss_sum.item() - ref["loss_sum"].item()) <= 2 * lp_c + 1e-6 * _scale(ref["loss_sum"])
    assert out.loss_sum.item() == pytest.approx(-out.target_logprob.double().sum().item(), rel=1e-6)
    pairs = zip(_pairs(out, grads, ref), _pairs(torch_out, torch_out["grads"], ref))
    for (name, a, r), (_, c, _) in list(pairs)[1:]:
        assert torch.isfinite(a).all(), f"{name} has non-finite values"
        floor = torch.finfo(a.dtype).eps * _scale(r) + 1e-7
        assert _err(a, r) <= 2 * _err(c, r) + floor, (
            f"{name}: op err {_err(a, r):.3e} > 2 x torch {c.dtype} err {_err(c, r):.3e} + {floor:.1e}"
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_with_fp32_master_weights(poison, backend):
    """Under bf16 autocast (the trainer's mode) with fp32 hidden and fp32 master weights, the op computes what
    autocast's F.linear computes (both inputs rounded to bf16) and returns fp32 gradients from its fp32 sums:
    within 2x the error of autocast's F.linear + F.cross_entropy, against fp64 on the bf16-rounded inputs."""
    h, w, b, t, gs = make_inputs(17, 8, 64, 49152, bias=True)
    bf = torch.bfloat16
    ref = reference64(h.to(bf), w.to(bf), b.to(bf), t, None, gs)
    with torch.autocast(h.device.type, dtype=bf):
        torch_out = composition(h, w, b, t, None, gs)
        out, grads = run_op(h, w, b, t, gs, backend=backend, chunk_rows=3)
    assert all(g.dtype == torch.float32 for g in grads.values())
    plain = linear_cross_entropy(h.to(bf), w, t, bias=b, backend=backend, chunk_rows=3)  # mixed dtypes, no autocast
    assert (
        torch.equal(plain.loss_sum, out.loss_sum.detach())
        and plain.loss_sum != linear_cross_entropy(h, w, t, bias=b, backend=backend).loss_sum
    )
    assert_lowp_rule(out, grads, ref, torch_out)
    assert_exact_parts(out, grads, ref, t, gap_min=0.5)


# ----------------------------------------------------------------------------------------------------------------
# argmax ties, non-finite logits, no-grad and frozen-head paths
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_argmax_ties_take_the_first_index(poison, backend):
    """Exactly equal maximal logits (duplicated head rows, within one block and across blocks, and values that the
    softcap saturates to the same fp32 number): argmax is the first index, as torch.argmax documents."""
    V, H = 40000, 16
    g = torch.Generator().manual_seed(21)
    w = torch.randn(V, H, generator=g) * 0.1
    h = torch.randn(6, H, generator=g)
    pairs = [(100, 39000), (200, 38000), (7, 8), (9, 10), (33000, 33001), (3, 39999)]
    for i, (j, k) in enumerate(pairs):
        w[k] = w[j] = 4.0 * h[i] / h[i].norm()  # both rows give the row's largest logit, exactly equal
    t = torch.tensor([j if i % 2 == 0 else k for i, (j, k) in enumerate(pairs)])
    z = h @ w.T
    assert all(z[i, j] == z[i, k] == z[i].max() for i, (j, k) in enumerate(pairs))
    want = z.argmax(-1) == t
    assert want.tolist() == [True, False, True, False, True, False]
    out = linear_cross_entropy(h.to(DEVICE), w.to(DEVICE), t.to(DEVICE), backend=backend)
    assert out.argmax_match.cpu().tolist() == want.tolist()
    # softcap 1: logits 20 and 30 both become 1.0 in fp32 (tanh saturates): a tie the raw logits do not have.
    hs = torch.ones(1, 1)
    ws = torch.zeros(300, 1)
    ws[5], ws[250] = 20.0, 30.0
    for target, want_match in ((5, True), (250, False)):
        tt = torch.tensor([target])
        out = linear_cross_entropy(hs.to(DEVICE), ws.to(DEVICE), tt.to(DEVICE), softcap=1.0, backend=backend)
        assert out.argmax_match.item() is want_match


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_input_propagates(backend):
    """A NaN in one hidden row makes that row's loss NaN (and so loss_sum), never a finite number; other rows stay
    exact. A vocabulary range masked with a -inf bias is ignored by the softmax, not turned into NaN."""
    h, w, b, t, _ = make_inputs(31, 4, 32, 49152, bias=True, n_ignored=0)
    h[1, 3] = float("nan")
    out = linear_cross_entropy(h, w, t, bias=b, backend=backend)
    assert torch.isnan(out.loss_sum) and torch.isnan(out.target_logprob[1])
    keep = torch.tensor([0, 2, 3])
    ref = reference64(h[keep], w, b, t[keep])
    assert _err(out.target_logprob[keep], ref["logprob"]) <= 2e-5 * _scale(ref["logprob"])
    h, w, b, t, _ = make_inputs(32, 4, 32, 49152, bias=True, n_ignored=0)
    b[:40000] = float("-inf")  # the first blocks of every row are all -inf
    t = torch.tensor([40001, 45000, 49151, 40000], device=t.device)
    out = linear_cross_entropy(h, w, t, bias=b, backend=backend)
    ref = reference64(h, w[40000:], b[40000:], t - 40000)
    assert _err(out.target_logprob, ref["logprob"]) <= 2e-5 * _scale(ref["logprob"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_and_frozen_head(poison, backend):
    """Without grad mode nothing is differentiated (no gradient buffers); a frozen head (weight without grad) still
    gives grad_hidden and leaves weight.grad None; forward results are the same in all three."""
    h, w, b, t, _ = make_inputs(41, 8, 32, 49152, bias=True)
    full = linear_cross_entropy(h.requires_grad_(), w.requires_grad_(), t, bias=b.requires_grad_(), backend=backend)
    with torch.no_grad():
        ng = linear_cross_entropy(h, w, t, bias=b, backend=backend)
    assert ng.loss_sum.grad_fn is None and not ng.loss_sum.requires_grad
    w.requires_grad_(False)
    b.requires_grad_(False)
    frozen = linear_cross_entropy(h, w, t, bias=b, backend=backend)
    frozen.loss_sum.backward()
    assert w.grad is None and b.grad is None and torch.isfinite(h.grad).all()
    ref = reference64(h, w, b, t)
    assert _err(h.grad, ref["grads"]["hidden"]) <= 2e-5 * _scale(ref["grads"]["hidden"])
    for o in (ng, frozen):
        assert torch.equal(o.loss_sum, full.loss_sum.detach()) and torch.equal(o.argmax_match, full.argmax_match)


def test_second_backward_is_refused():
    """The gradients are computed in the forward and scaled in place by the backward: a second backward through the
    same forward (retain_graph) is an error, not a gradient scaled twice."""
    h, w, _, t, _ = make_inputs(51, 4, 16, 1009)
    out = linear_cross_entropy(h.requires_grad_(), w, t, backend="torch")
    (2.0 * out.loss_sum).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        (2.0 * out.loss_sum).backward()


def test_never_materialises_full_logits():
    """The largest single allocation of a loss step (forward + backward) stays far below one [N, V] fp32 tensor,
    and the chunk rule keeps C * V * itemsize within its budget."""
    N, H, V = 256, 32, 49152
    h, w, _, t, _ = make_inputs(61, N, H, V, n_ignored=3, device="cpu")  # the profiler sees CPU allocations
    h.requires_grad_(), w.requires_grad_()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        linear_cross_entropy(h, w, t, backend="torch", chunk_rows=32).loss_sum.backward()
    biggest = max(e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0)
    assert biggest >= 32 * V * 4  # the profiler does see the chunk
    assert biggest < N * V * 4 / 4, f"an allocation of {biggest} bytes: the full logits are {N * V * 4}"
    for n, v, hh, size in [(1, 151936, 4096, 2), (8192, 151936, 4096, 2), (100000, 49152, 2048, 4), (7, 1009, 64, 4)]:
        c = default_chunk_rows(n, v, hh, size)
        assert 1 <= c <= n and c * v * size <= max(64 << 20, v * size) * 8
        assert math.ceil(n / c) * c - n < math.ceil(n / c)  # chunks are even: the last one is not a sliver


# ----------------------------------------------------------------------------------------------------------------
# torch.library registration (fake tensors, autograd, torch.compile) and input validation
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_and_compile(backend):
    h, w, b, t, gs = make_inputs(71, 5, 16, 1009, bias=True)
    op = torch.ops.fastrm.linear_cross_entropy_fwd
    torch.library.opcheck(
        op, (h.requires_grad_(), w.requires_grad_(), t, b, 3.0, IGNORE, 2, backend, True, True, False)
    )

    def step(h, w, b, t):
        out = linear_cross_entropy(h, w, t, bias=b, softcap=3.0, backend=backend, chunk_rows=2)
        return out.loss_sum * gs, out.argmax_match

    leaves = [x.detach().clone().requires_grad_() for x in (h, w, b)]
    loss, match = torch.compile(step, backend="aot_eager", fullgraph=True)(*leaves, t)
    loss.backward()
    ref = reference64(h, w, b, t, 3.0, gs)
    assert_fp32_close(
        {"loss_sum": loss / gs, "logprob": ref["logprob"]},
        dict(zip(("hidden", "weight", "bias"), (x.grad for x in leaves))),
        ref,
    )
    assert torch.equal(match, ref["match"])


def test_validation_messages():
    h, w, b, t, _ = make_inputs(81, 4, 16, 1009, bias=True)
    cases = [
        ((h[0], w, t), {}, r"hidden must be \[N, H\]"),
        ((h, w[:, :8], t), {}, r"weight must be \[V, H\] with H=16"),
        ((h, w.double(), t), {}, "weight must be fp32/bf16/fp16"),
        ((h, w, t[:3]), {}, r"targets must be \[N\]=\[4\] int64"),
        ((h, w, t.int()), {}, "int64"),
        ((h, w, t), {"bias": b[:5]}, r"bias must be \[V\]=\[1009\]"),
        ((h, w, t), {"bias": b.int()}, r"bias must be .* fp32/bf16/fp16"),
        ((h, w, t), {"softcap": 0.0}, "softcap must be > 0"),
        ((h, w, t), {"backend": "cuda"}, "backend must be one of"),
        ((h, w, t), {"chunk_rows": 0}, "chunk_rows must be a positive int"),
    ]
    if DEVICE == "cpu":  # on CUDA an out-of-range target is a device-side assert (no host sync)
        cases += [
            ((h, w, torch.tensor([1, 2, 1009, 3])), {}, r"targets\[2\] = 1009 is neither in \[0, V=1009\)"),
            ((h, w, torch.tensor([1, -1, 0, 3])), {}, r"targets\[1\] = -1 is neither .* nor ignore_index=-100"),
            ((h, w, torch.tensor([1, -2, 0, 3])), {"ignore_index": -1}, r"targets\[1\] = -2 .* ignore_index=-1$"),
        ]
    for args, kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            linear_cross_entropy(*args, backend=kw.pop("backend", "torch"), **kw)


def _sm90_resource_usage(xdtype: str, softcap: bool, has_grad: bool, aligned: bool) -> str:
    """Compile the row kernel for sm_90 ahead of time (no GPU needed) and return cuobjdump's 'REG:n STACK:n'.

    In a child process without TRITON_INTERPRET: once it is set, triton's own ``@jit`` standard library (tl.max,
    tl.sum, ...) is made of interpreted functions, and the code generator calls them as Python, which patches the
    language for the interpreter and breaks the compile (triton 3.9)."""
    import triton

    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    if not (tools / "cuobjdump").exists():
        pytest.skip("triton's bundled CUDA tools are not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    child = subprocess.run(
        [sys.executable, "-c", _SM90_CHILD, xdtype, str(softcap), str(has_grad), str(aligned)], env=env, **_TEXT
    )
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "k.cubin").write_bytes(bytes.fromhex(child.stdout.strip().splitlines()[-1]))
        out = subprocess.run([str(tools / "cuobjdump"), "--dump-resource-usage", str(Path(d) / "k.cubin")], **_TEXT)
    return re.search(r"REG:\d+ STACK:\d+", out.stdout).group(0)


# Prints the sm_90 cubin (hex) of the row kernel; argv: xdtype softcap has_grad aligned.
_SM90_CHILD = """
import sys
import triton
import fastrm_kernels.linear_cross_entropy as lce
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

xdtype, softcap, has_grad, aligned = sys.argv[1], *(a == "True" for a in sys.argv[2:])
sig = {"x_ptr": f"*{xdtype}", "t_ptr": "*i64", "nll_ptr": "*fp32", "match_ptr": "*i8"}
sig.update(dict.fromkeys(["V", "stride_x", "stride_t", "ignore_index"], "i32"), inv_cap="fp32", cap="fp32")
sig.update(dict.fromkeys(["SOFTCAP", "HAS_GRAD", "BLOCK_V"], "constexpr"))
# aligned: what a launch on torch's own buffers specialises (16-byte pointers, V and stride % 16 == 0)
attrs = {(i,): [["tt.divisibility", 16]] for i in range(6)} if aligned else None
constexprs = {"SOFTCAP": softcap, "HAS_GRAD": has_grad, "BLOCK_V": lce._block_v(151936, interpreted=False)}
src = ASTSource(fn=lce._lce_rows_kernel, signature=sig, constexprs=constexprs, attrs=attrs)
print(triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 16}).asm["cubin"].hex())
"""


_TEXT = {"capture_output": True, "text": True, "check": True}


@pytest.mark.parametrize("xdtype", ["bf16", "fp32"])
def test_sm90_compile_keeps_registers(xdtype):
    """The heaviest variant (softcap + gradient) compiled for sm_90 by triton's own pipeline and ptxas, here on the
    CPU: no stack frame, so no spills, aligned or not (the GPU test below reads n_spills from a real launch)."""
    for aligned in (False, True):
        usage = _sm90_resource_usage(xdtype, softcap=True, has_grad=True, aligned=aligned)
        assert usage.endswith("STACK:0") and int(usage.split()[0][4:]) <= 128, usage


def test_bench_memory_measurement_runs():
    """benchmarks/bench_linear_ce.py's per-process measurement, in this process at a tiny shape (the benchmark runs
    it in fresh processes; its numbers are not checked here)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import bench_linear_ce
    finally:
        sys.path.pop(0)
    for variant in ("eager", "fastrm_torch"):
        row = bench_linear_ce.child_measure(variant, 64, 16, 4096, "float32")
        assert row["peak_step_bytes"] >= 0 and row["step_seconds"] > 0 and math.isfinite(row["loss"]), row


# ----------------------------------------------------------------------------------------------------------------
# GPU: the compiled kernel (bf16 at full size, no register spills on sm_90, inductor)
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("N, H, V, softcap, bias", [(2048, 2048, 151936, 30.0, False), (3000, 4096, 49152, None, True)])
def test_gpu_bf16_large(N, H, V, softcap, bias):
    h, w, b, t, gs = make_inputs(91 + V, N, H, V, dtype=torch.bfloat16, bias=bias, n_ignored=N // 10, device="cuda")
    ref = reference64(h, w, b, t, softcap, gs)
    torch_out = composition(h, w, b, t, softcap, gs)
    out, grads = run_op(h, w, b, t, gs, softcap=softcap, backend="triton")
    assert_lowp_rule(out, grads, ref, torch_out)
    assert_exact_parts(out, grads, ref, t, gap_min=0.5)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("has_grad", [True, False])
def test_gpu_no_register_spills(dtype, softcap, has_grad):
    """The sm_90 compile of every variant of the row kernel keeps its values in registers (n_spills == 0)."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the spill check is for sm_90 (H100 / H200)")
    logits = torch.randn(64, 151936, device="cuda").to(dtype)
    t = torch.randint(0, 151936, (64,), device="cuda")
    nll = torch.empty(64, device="cuda")
    match = torch.empty(64, device="cuda", dtype=torch.int8)
    kernel = launch_lce_rows(logits, t, nll, match, IGNORE, softcap, has_grad)
    if getattr(kernel, "n_spills", None) is None:
        kernel._init_handles()
    assert kernel.n_spills == 0, f"{kernel.n_spills} spills ({kernel.n_regs} registers)"


@pytest.mark.gpu
@gpu
def test_gpu_compile_inductor():
    h, w, b, t, gs = make_inputs(95, 1024, 1024, 49152, dtype=torch.bfloat16, bias=True, device="cuda")

    def step(h, w, b):
        return linear_cross_entropy(h, w, t, bias=b, softcap=30.0).loss_sum * gs

    leaves = [x.detach().clone().requires_grad_() for x in (h, w, b)]
    torch.compile(step, fullgraph=True)(*leaves).backward()
    ref = reference64(h, w, b, t, 30.0, gs)
    torch_out = composition(h, w, b, t, 30.0, gs)
    for k, leaf in zip(("hidden", "weight", "bias"), leaves):
        r = ref["grads"][k]
        assert _err(leaf.grad, r) <= 2 * _err(torch_out["grads"][k], r) + torch.finfo(leaf.dtype).eps * _scale(r)
