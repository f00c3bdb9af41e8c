"""A training step through the fused Triton head+loss op equals the reference (PyTorch) step.

On CPU the kernels run in the Triton interpreter (conftest sets TRITON_INTERPRET=1); on a GPU the same test runs
on CUDA (the trainer picks the device)."""

import pytest
import torch

from fastrm.config import RewardConfig
from fastrm.model import RewardModel
from fastrm.synthetic import byte_tokenizer, synthetic_pairs
from fastrm.tokenization import load_tokenized
from fastrm.trainer import RewardTrainer


@pytest.fixture(scope="module")
def data():
    tok = byte_tokenizer()
    rows = synthetic_pairs(24, seed=5)
    for i, r in enumerate(rows):
        r["margin"] = (i % 3) / 2.0
    return tok, load_tokenized(rows, tok, max_length=96)[0]


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-neox"])  # RMSNorm and LayerNorm with bias
@pytest.mark.parametrize(
    "case",
    [
        dict(loss="bt"),
        dict(loss="margin"),
        dict(loss="threshold"),
        dict(loss="batch_mean", detach_mean=False),
        dict(loss="threshold", detach_mean=False, center_rewards_coefficient=0.05),
    ],
    ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()),
)
def test_fused_step_equals_reference_step(data, preset, case, tmp_path, monkeypatch):
    import fastrm_kernels.reward_head_loss as K

    calls = []
    real = K.reward_head_loss
    monkeypatch.setattr(K, "reward_head_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    tok, pairs = data
    grads, metrics = {}, {}
    for fused in ("false", "true"):
        torch.manual_seed(0)
        model = RewardModel.from_config(preset)
        args = RewardConfig(
            output_dir=str(tmp_path),
            progress=False,
            pairs_per_step=24,
            max_tokens_per_batch=600,
            fused_head=fused,
            **case,
        )
        tr = RewardTrainer(model, args, pairs, tokenizer=tok)
        r = tr.accumulate_gradients(pairs, len(pairs))
        assert r["micro_batches"] > 1  # the step-scope mu and normalisation cross micro-batches
        assert (len(calls) > 0) == (fused == "true")  # the fused run really went through the kernel
        grads[fused] = {n: p.grad.clone() for n, p in model.named_parameters()}
        metrics[fused] = r["sums"]
    torch.testing.assert_close(metrics["true"], metrics["false"], rtol=1e-5, atol=1e-5)
    for n, g in grads["false"].items():
        torch.testing.assert_close(grads["true"][n], g, rtol=1e-4, atol=1e-6, msg=n)


def test_kind_the_kernel_lacks_falls_back_to_the_pytorch_loss(data, tmp_path, monkeypatch):
    """A loss kind that fastrm.losses defines and the fused kernel does not implement trains through the PyTorch loss
    (same gradients as fused=False, one warning for the run), instead of failing on a GPU."""
    import warnings

    import fastrm_kernels.pairwise_loss as P
    import fastrm_kernels.reward_head_loss as K

    import fastrm.model as M

    monkeypatch.setattr(P, "FUSED_KINDS", P.FUSED_KINDS - {"threshold"})  # as if the kernel lacked the paper's rule
    monkeypatch.setattr(M, "_WARNED_UNFUSED", set())
    calls = []
    real = K.reward_head_loss
    monkeypatch.setattr(K, "reward_head_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    tok, pairs = data
    grads, warned = {}, {}
    for fused in ("false", "true"):
        torch.manual_seed(0)
        model = RewardModel.from_config("tiny-llama")
        args = RewardConfig(
            output_dir=str(tmp_path),
            progress=False,
            pairs_per_step=24,
            max_tokens_per_batch=600,
            loss="threshold",
            fused_head=fused,
        )
        tr = RewardTrainer(model, args, pairs, tokenizer=tok)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            tr.accumulate_gradients(pairs, len(pairs))
            grads[fused] = {n: p.grad.clone() for n, p in model.named_parameters()}
            tr.accumulate_gradients(pairs, len(pairs))  # the warning is given once, not per micro-batch or step
        warned[fused] = [str(w.message) for w in seen if "lacks loss" in str(w.message)]
    assert calls == [], "the kernel ran for a kind it lacks"
    assert warned == {"false": [], "true": [warned["true"][0]]} and "'threshold'" in warned["true"][0], warned
    for n, g in grads["false"].items():
        torch.testing.assert_close(grads["true"][n], g, rtol=1e-6, atol=1e-7, msg=n)


def test_a_new_loss_kind_is_no_import_error():
    """fastrm.losses gaining a kind before the kernel does must not stop the kernels from importing."""
    import subprocess
    import sys

    code = (
        "import fastrm.losses as L; L.LOSS_KINDS = (*L.LOSS_KINDS, 'new_kind');"
        "import fastrm_kernels.pairwise_loss as P; assert 'new_kind' not in P.FUSED_KINDS, P.FUSED_KINDS;"
        "assert P.FUSED_KINDS == {'bt', 'margin', 'batch_mean', 'threshold'}, P.FUSED_KINDS"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**__import__("os").environ, "TRITON_INTERPRET": "1"})
