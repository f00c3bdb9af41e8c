"""How many Triton compilations a training run costs on a GPU, counted on the CPU.

Triton compiles a kernel once per *specialisation*: the constexpr values, the dtypes, and for every integer argument
whether it equals 1 or is divisible by 16, for every pointer whether it is 16-byte aligned (unless the kernel lists
the argument in ``do_not_specialize`` / ``do_not_specialize_on_alignment``), plus the launch options. Block sizes
derived from the batch (N = 2B pooled rows, B pairs, T tokens) and sizes passed as specialised integers make a new
compilation for many new batch shapes: before the launchers were bounded, HH-RLHF lengths at the default token
budget gave 52 distinct compilations in 100 steps, some inside a benchmark's timed steps.

Under ``TRITON_INTERPRET`` nothing is compiled, so the recorder below computes, for each launch, the key Triton's
``JITFunction.run`` computes on a GPU (``create_function_from_signature``'s binder, the same specialisation code),
and does not run the kernel (only the launch arguments matter). The batches are the trainer's: 100 steps of 128
pairs with the committed HH lengths, packed by ``fastrm.packing.micro_batches`` under the default budget, both
layouts, then the fused op's forward and backward as ``RewardModel.forward`` calls it.
"""

from __future__ import annotations

import sys
import types
from collections import defaultdict
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import hh_lengths  # noqa: E402

STEPS, PAIRS_PER_STEP, BUDGET, WARMUP = 100, 128, 32768, 2


class SpecializationRecorder:
    """Replace each kernel's launch by a recorder of the compilation key Triton would use on a GPU."""

    def __init__(self, monkeypatch, kernels: dict):
        from triton.backends.compiler import BaseBackend
        from triton.runtime.jit import JITFunction, create_function_from_signature

        self.keys: dict[str, dict[str, int]] = defaultdict(dict)  # kernel -> key -> step first seen
        self.step = 0
        for name, kernel in kernels.items():
            if type(kernel).__name__ != "InterpretedFunction":
                pytest.skip("counts specialisations under TRITON_INTERPRET (a GPU compiles for real)")
            jf = JITFunction(kernel.fn, **{k: v for k, v in kernel.kwargs.items() if v is not None})
            binder = create_function_from_signature(jf.signature, jf.params, BaseBackend)
            monkeypatch.setattr(kernel, "run", self._recorder(name, binder))

    def _recorder(self, name, binder):
        def run(*args, grid, warmup, **kwargs):
            _bound, specialization, options = binder(*args, **kwargs)
            key = f"{specialization} {sorted(options.items())}"
            self.keys[name].setdefault(key, self.step)

        return run

    def counts(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.keys.items()}

    def after(self, step: int) -> int:
        """Compilations first needed at or after ``step``."""
        return sum(s >= step for v in self.keys.values() for s in v.values())


def hh_steps(steps: int, pairs_per_step: int, seed: int = 0) -> list[list]:
    """Steps of pairs with real HH lengths (ids irrelevant: no kernel runs), shuffled as a training run draws."""
    import random

    lengths = hh_lengths.hh_lengths()
    rng = random.Random(seed)
    out = []
    for s in range(steps):
        pick = rng.sample(lengths, pairs_per_step)
        out.append(
            [
                types.SimpleNamespace(
                    prompt_ids=[1] * P, chosen_ids=[2] * C, rejected_ids=[3] * R, margin=None, source=f"s{s}p{i}"
                )
                for i, (P, C, R) in enumerate(pick)
            ]
        )
    return out


def kernels():
    from fastrm_kernels import pairwise_loss, reward_head_bwd, reward_head_fwd

    return {
        "head_fwd": reward_head_fwd._head_fwd_kernel,
        "pairwise_loss": pairwise_loss._pairwise_loss_kernel,
        "head_bwd": reward_head_bwd._head_bwd_kernel,
        "head_param_grad": reward_head_bwd._head_param_grad_kernel,
    }


def run_training_launches(rec: SpecializationRecorder, layout: str, loss_kind: str, H: int = 1024) -> int:
    """The fused op's launches over STEPS steps, as the trainer makes them; returns the micro-batches seen."""
    from fastrm_kernels.reward_head_loss import reward_head_loss

    from fastrm.packing import micro_batches

    # pythia-410m's head: LayerNorm with bias, nn.Linear(H, 1) with bias; fp32 parameters, bf16 activations.
    nw, nb, hw, hb = (torch.randn(n, requires_grad=True) for n in (H, H, H, 1))
    n_mb = 0
    for step, pairs in enumerate(hh_steps(STEPS, PAIRS_PER_STEP)):
        rec.step = step
        mbs = micro_batches(pairs, BUDGET, layout)
        # loss kinds that use the mean get the step-wide mu from the trainer (several micro-batches per step)
        mu = torch.zeros(()) if loss_kind in ("threshold", "batch_mean") else None
        for mb in mbs:
            hidden = torch.empty(mb.num_tokens, H, dtype=torch.bfloat16, requires_grad=True)
            loss, _, _ = reward_head_loss(
                hidden,
                mb.pool_index,
                nw,
                nb,
                hw,
                hb,
                norm_type="layer",
                eps=1e-5,
                loss_kind=loss_kind,
                mu=mu,
                normalizer=float(PAIRS_PER_STEP),
            )
            loss.backward()
            n_mb += 1
    return n_mb


@pytest.mark.parametrize("layout, loss_kind", [("separate", "bt"), ("shared_prompt", "threshold")])
def test_hh_training_compiles_each_kernel_once(monkeypatch, layout, loss_kind):
    """100 steps of HH-length packs: one compilation per kernel for a given model and loss, none after warm-up."""
    rec = SpecializationRecorder(monkeypatch, kernels())
    n_mb = run_training_launches(rec, layout, loss_kind)
    counts = rec.counts()
    print(f"{layout}/{loss_kind}: {n_mb} micro-batches, compilations {counts}")
    assert n_mb > STEPS, "several micro-batches per step expected at HH lengths and the default budget"
    assert set(counts) == set(kernels()), counts
    assert counts == dict.fromkeys(kernels(), 1), counts
    assert rec.after(WARMUP) == 0


def test_recorder_sees_specialisation():
    """The recorder is not blind: the same kernel with an integer argument divisible by 16 and one that is not, and
    an aligned pointer and an offset one, are distinct keys where the kernel specialises them."""
    import triton
    import triton.language as tl

    @triton.jit
    def k(x_ptr, n, BLOCK: tl.constexpr):
        pass

    @triton.jit(do_not_specialize=["n"], do_not_specialize_on_alignment=["x_ptr"])
    def k_bounded(x_ptr, n, BLOCK: tl.constexpr):
        pass

    x = torch.zeros(64)
    mp = pytest.MonkeyPatch()
    try:
        rec = SpecializationRecorder(mp, {"k": k, "k_bounded": k_bounded})
        for kern in (k, k_bounded):
            for args in ((x, 16), (x, 17), (x[1:], 16), (x, 1)):
                kern[(1,)](*args, BLOCK=16)
            kern[(1,)](x, 16, BLOCK=32)  # a new constexpr is a new compilation for both
        assert rec.counts() == {"k": 5, "k_bounded": 2}
    finally:
        mp.undo()
