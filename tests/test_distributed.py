"""The trainer on 2 gloo ranks (no Ray): mu_B and the gradient equal one process's, also when a rank holds no pair
of the step (its placeholder pass must not enter mu_B), and the gradient passes run without host syncs."""

import os
import sys

import pytest
import torch
import torch.multiprocessing as mp

from fastrm.config import RewardConfig
from fastrm.model import RewardModel
from fastrm.synthetic import byte_tokenizer, synthetic_pairs
from fastrm.tokenization import load_tokenized
from fastrm.trainer import RewardTrainer

# fastrm's own source files (not "/fastrm/" in a path: a clone named fastrm holds its .venv, torch included)
FASTRM_DIR = os.path.join(os.path.dirname(os.path.abspath(__import__("fastrm").__file__)), "")
CFG = dict(loss="threshold", margin_scope="step", pairs_per_step=4, max_tokens_per_batch=100, progress=False)
STEP_SIZES = (1, 2, 3)


def _pairs():
    tok = byte_tokenizer()
    pairs, _ = load_tokenized(synthetic_pairs(8, seed=4), tok, max_length=48)
    return tok, pairs


def _trainer(out, **kw):
    torch.manual_seed(0)
    tok, pairs = _pairs()
    args = RewardConfig(output_dir=str(out), **{**CFG, **kw})
    tr = RewardTrainer(RewardModel.from_config("tiny-llama"), args, pairs, tokenizer=tok)
    with torch.no_grad():  # LoRA: B != 0, so the adapters' A matrices get gradients too
        for n, p in tr.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(n)))
    return tr


def _step(tr, n: int, rank: int, world: int) -> dict:
    """One step of the last n pairs: this rank's share is every world-th pair (rank 1 of 2 gets none for n=1)."""
    tr.optimizer.zero_grad(set_to_none=True)
    share = tr.train_pairs[-n:][rank::world]  # the last n: the placeholder (pair 0) is never one of them
    r = tr.accumulate_gradients(share, n)
    grads = {k: p.grad.clone() for k, p in tr.model.named_parameters() if p.requires_grad}
    return {"mu": float(r["mu"]), "grads": grads}


def _worker(rank: int, world: int, store: str, out: str, lora_r: int) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        tr = _trainer(os.path.join(out, f"rank{rank}"), lora_r=lora_r)
        results = {n: _step(tr, n, rank, world) for n in STEP_SIZES}
        if rank == 0:
            torch.save(results, os.path.join(out, "ranks.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.skipif(sys.platform != "linux", reason="file:// rendezvous and fork start method")
@pytest.mark.parametrize("lora_r", [0, 4])  # 4: LoRA adapters under DDP (frozen base, adapters and head trained)
def test_two_ranks_equal_one_process_with_empty_ranks(tmp_path, lora_r):
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), str(tmp_path), lora_r), nprocs=2, join=True)
    got = torch.load(tmp_path / "ranks.pt")
    tr = _trainer(tmp_path / "single", lora_r=lora_r)
    assert any("lora_A" in k for k in got[1]["grads"]) == bool(lora_r)
    for n in STEP_SIZES:
        want = _step(tr, n, 0, 1)
        rc, rr = _rewards(tr, n)
        assert want["mu"] == pytest.approx(float((rc - rr).mean()), abs=1e-5)  # mu_B is the mean over real pairs
        assert got[n]["mu"] == pytest.approx(want["mu"], abs=1e-5), f"{n} pairs: a placeholder entered mu_B"
        for k, g in want["grads"].items():
            torch.testing.assert_close(got[n]["grads"][k], g, rtol=1e-4, atol=1e-6, msg=f"{n} pairs: {k}")


@torch.no_grad()
def _rewards(tr, n):
    from fastrm.packing import pack_pairs

    r = tr.model(pack_pairs(tr.train_pairs[-n:]))
    return r[:n], r[n:]


def test_gradient_passes_make_no_host_sync(tmp_path, monkeypatch):
    """accumulate_gradients (step mu over several micro-batches, the loss, backward) never moves a tensor's value to
    the host from fastrm's code; train_step does exactly once (its metrics vector). Counted by wrapping the ways a
    value reaches Python: .item(), .tolist(), float()/int()/bool(), .cpu(), .numpy().

    transformers' own mask preprocessing checks the position ids for packed sequences with one ``bool(tensor)`` per
    forward (masking_utils.find_packed_sequence_indices); that one is outside fastrm and counted separately. The
    input checks that raise a ValueError on CPU tensors (finite margins/mu, pool_index range) are device-side
    asserts on CUDA (fastrm/losses.py check_finite, kernels' check_pool_index), so their CPU branch is not counted."""
    cpu_only = ("check_finite", "check_pool_index")
    import traceback

    tr = _trainer(tmp_path, max_tokens_per_batch=200)
    tr.model.attn_backend = "exact"
    pairs = tr.train_pairs[:4]
    ours, theirs = [], []
    for name in ("item", "tolist", "__float__", "__int__", "__bool__", "cpu", "numpy"):
        real = getattr(torch.Tensor, name)

        def wrapped(self, *a, _real=real, _name=name, **k):
            stack = traceback.extract_stack()[:-1]
            if any(f.name in cpu_only for f in stack):
                pass
            elif any("transformers/masking_utils" in f.filename for f in stack):
                theirs.append(_name)
            else:
                ours.append((_name, stack[-1].filename.startswith(FASTRM_DIR)))
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapped)
    r = tr.accumulate_gradients(pairs, len(pairs))
    n_forwards = 2 * r["micro_batches"]  # the step-mu pass and the gradient pass
    assert r["micro_batches"] > 1 and r["step_mu"]  # the step-mu pass ran
    assert ours == [], f"host syncs in the gradient passes: {ours}"
    assert len(theirs) <= n_forwards, theirs
    # train_step: the one transfer of the step's metrics. (Counted from fastrm's own frames only: torch's CPU AdamW
    # reads its step counters with .item(); the fused CUDA AdamW the trainer uses on GPUs does not.)
    tr.optimizer.zero_grad()
    ours.clear()
    tr.train_step(pairs, len(pairs))
    from_fastrm = [c for c in ours if c[1]]
    assert [c[0] for c in from_fastrm] == ["tolist"], from_fastrm
