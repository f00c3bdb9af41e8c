"""The fused head + loss op compiled for real on a GPU, in bf16 and fp16, on the batches training feeds it: HH-RLHF
packs (the committed lengths, benchmarks/data/hh_rlhf_lengths.json) at the default token budget, in both layouts,
at pythia-410m and pythia-1.4b widths, eager and under torch.compile (inductor). The device runbook's correctness
block runs these first (`pytest -m gpu tests/test_gpu_hh_packs.py`); they skip without CUDA (the CPU tests of the
same op run under the Triton interpreter in tests/test_kernel_reward_head_loss.py).

References are kernel_cases' float64 composition; low precision follows the repo's rule (error at most twice the
plain PyTorch composition's in the same dtype)."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch
from kernel_cases import EPS, _err, _leaves, _scale, assert_lowp_rule, compose, make_case, run_fused

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import hh_lengths  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
BUDGET = 32768


def hh_pack(layout: str, seed: int = 0):
    """The first micro-batch of a 128-pair HH-length step, packed as the trainer packs it."""
    from fastrm.packing import micro_batches

    return micro_batches(hh_lengths.hh_like_pairs(128, seed=seed, vocab=100), BUDGET, layout)[0]


def hh_case(seed: int, layout: str, H: int, dtype, loss_kind: str = "bt", mu_mode: str = "internal"):
    mb = hh_pack(layout, seed)
    case = make_case(
        seed,
        T=mb.num_tokens,
        H=H,
        B=mb.num_pairs,
        norm_type="layer",
        loss_kind=loss_kind,
        mu_mode=mu_mode,
        dtype=dtype,
        param_dtype=torch.float32,  # fp32 master weights under bf16/fp16 activations, as in autocast training
        device="cuda",
    )
    return dataclasses.replace(case, idx=mb.pool_index.to("cuda"))


@pytest.mark.parametrize("layout", ["separate", "shared_prompt"])
@pytest.mark.parametrize("H", [1024, 2048])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_fused_op_on_hh_pack(dtype, H, layout):
    case = hh_case(2000 + H, layout, H, dtype, loss_kind="threshold", mu_mode="external")
    assert case.T > 8192 and case.B > 16  # a real pack, not a toy
    out = run_fused(case)
    assert_lowp_rule(out, compose(case, torch.float64), compose(case, dtype))
    unpooled = torch.ones(case.T, dtype=torch.bool, device="cuda")
    unpooled[case.idx] = False
    assert (out["grads"]["hidden"][unpooled] == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_fused_op_compiled_inductor_on_hh_pack(dtype):
    from fastrm_kernels.reward_head_loss import reward_head_loss

    case = hh_case(2100, "separate", 1024, dtype)

    def step(h, idx, nw, nb, hw, hb):
        loss, _, _ = reward_head_loss(h, idx, nw, nb, hw, hb, norm_type="layer", eps=EPS["layer"])
        return loss * case.grad_scale

    leaf, p = _leaves(case)
    torch.compile(step, fullgraph=True)(leaf, case.idx, *p.values()).backward()
    ref, plain = compose(case, torch.float64), compose(case, dtype)
    for name in ("hidden", "norm_weight", "head_weight"):
        got = leaf.grad if name == "hidden" else p[name].grad
        floor = torch.finfo(dtype).eps * _scale(ref["grads"][name])
        assert _err(got, ref["grads"][name]) <= 2 * _err(plain["grads"][name], ref["grads"][name]) + floor, name
