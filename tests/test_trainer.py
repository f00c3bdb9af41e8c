"""Trainer: step semantics (gradient invariance to the token budget), learning on real HH pairs, resume."""

import json

import pytest
import torch

from fastrm.config import RewardConfig
from fastrm.model import RewardModel
from fastrm.synthetic import byte_tokenizer, synthetic_pairs
from fastrm.tokenization import load_tokenized
from fastrm.trainer import RewardTrainer


def tiny_trainer(tmp_path, pairs, tok, preset="tiny-llama", seed=0, init_seed=None, **cfg):
    torch.manual_seed(seed if init_seed is None else init_seed)
    model = RewardModel.from_config(preset)
    args = RewardConfig(output_dir=str(tmp_path), progress=False, seed=seed, **cfg)
    return RewardTrainer(model, args, pairs, tokenizer=tok)


@pytest.fixture(scope="module")
def byte_pairs():
    tok = byte_tokenizer()
    rows = synthetic_pairs(48, seed=3)
    for i, r in enumerate(rows):
        r["margin"] = (i % 5) / 4.0
    pairs, _ = load_tokenized(rows, tok, max_length=128)
    return tok, pairs


CASES = [
    dict(loss="bt"),
    dict(loss="margin"),
    dict(loss="batch_mean"),
    dict(loss="threshold"),
    dict(loss="threshold", detach_mean=False),
    dict(loss="batch_mean", detach_mean=False),
    dict(loss="bt", center_rewards_coefficient=0.1),
    dict(loss="threshold", prefix_sharing=True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_step_gradient_does_not_depend_on_the_token_budget(tmp_path, byte_pairs, case):
    """One micro-batch vs many: the same step gradient (fp32, 1e-5), since the loss is normalised per step pair
    and mu_B spans the step (margin_scope='step')."""
    tok, pairs = byte_pairs
    grads = []
    for budget in (100_000, 160):
        tr = tiny_trainer(tmp_path, pairs, tok, pairs_per_step=48, max_tokens_per_batch=budget, **case)
        r = tr.accumulate_gradients(pairs, len(pairs))
        grads.append((r["micro_batches"], {n: p.grad.clone() for n, p in tr.model.named_parameters()}))
    (n_one, g_one), (n_many, g_many) = grads
    assert n_one == 1 and n_many > 3
    for n, g in g_one.items():
        torch.testing.assert_close(g_many[n], g, rtol=1e-5, atol=1e-6, msg=n)  # fp32 summation order
    assert max(g.abs().max().item() for g in g_one.values()) > 0


def test_micro_scope_is_different_from_step_scope(tmp_path, byte_pairs):
    """The control for the test above: with mu per micro-batch the gradient does depend on the split."""
    tok, pairs = byte_pairs
    tr = tiny_trainer(
        tmp_path, pairs, tok, pairs_per_step=48, max_tokens_per_batch=160, loss="threshold", margin_scope="micro"
    )
    tr.accumulate_gradients(pairs, len(pairs))
    g_micro = tr.model.score.weight.grad.clone()
    tr.optimizer.zero_grad()
    tr.args.margin_scope = "step"
    tr.accumulate_gradients(pairs, len(pairs))
    assert not torch.allclose(g_micro, tr.model.score.weight.grad, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize(
    "case",
    [
        dict(loss="threshold"),
        dict(loss="batch_mean", detach_mean=False),
        dict(loss="threshold", detach_mean=False, prefix_sharing=True),
        dict(loss="threshold", gradient_checkpointing=True),
    ],
    ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()),
)
def test_kept_graphs_give_the_extra_forward_step_with_one_forward_per_micro_batch(tmp_path, byte_pairs, case):
    """Step-wide mu_B from the kept forward graphs equals the extra no-grad pass (mu, loss sums, gradients), and runs
    the backbone once per micro-batch instead of twice."""
    tok, pairs = byte_pairs
    got = {}
    for keep in (False, True):
        tr = tiny_trainer(
            tmp_path, pairs, tok, pairs_per_step=48, max_tokens_per_batch=300, mu_keep_graphs=keep, **case
        )
        calls = []
        real = tr.model._backbone_hidden
        tr.model._backbone_hidden = lambda b, calls=calls, real=real: calls.append(1) or real(b)
        r = tr.accumulate_gradients(pairs, len(pairs))
        assert r["step_mu"] and r["micro_batches"] > 2
        assert len(calls) == r["micro_batches"] * (1 if keep else 2), (keep, len(calls))
        got[keep] = (r["mu"], r["sums"], {n: p.grad.clone() for n, p in tr.model.named_parameters()})
    # Bit for bit in the separate layout; the shared-prompt attention computes with and without grad in another
    # order, so there the two agree to fp32 rounding (rewards differ by ~1e-8).
    tol = dict(rtol=1e-5, atol=1e-7) if case.get("prefix_sharing") else dict(rtol=0, atol=0)
    torch.testing.assert_close(got[True][0], got[False][0], **tol)
    torch.testing.assert_close(got[True][1], got[False][1], **tol)
    for n, g in got[False][2].items():
        torch.testing.assert_close(got[True][2][n], g, **tol, msg=n)


def test_kept_graphs_default_follows_gradient_checkpointing(tmp_path, byte_pairs):
    tok, pairs = byte_pairs
    for ckpt in (False, True):
        tr = tiny_trainer(tmp_path, pairs, tok, loss="threshold", gradient_checkpointing=ckpt)
        assert (
            tr.objective._keep_graphs(tr, []) is ckpt
        )  # CPU, unset: only with checkpointing (no measure of activations here)


def test_training_on_hh_pairs_lowers_loss_and_raises_accuracy(tmp_path, neox_tokenizer, shared_data):
    path = shared_data / "hh-rlhf" / "helpful-base_test.jsonl.gz"
    pairs, stats = load_tokenized(path, neox_tokenizer, max_length=256, on_bad_row="skip")
    assert stats.ties_dropped == 2
    pairs = pairs[:48]
    tr = tiny_trainer(
        tmp_path,
        pairs,
        neox_tokenizer,
        preset="tiny-neox",
        loss="threshold",
        pairs_per_step=16,
        learning_rate=2e-3,
        num_train_epochs=5,
        max_tokens_per_batch=8192,
        warmup_ratio=0.0,
        lr_scheduler_type="constant",
        max_length=256,
    )
    before = tr.evaluate(pairs, plot=False)
    result = tr.train()
    after = tr.evaluate(pairs, plot=False)
    assert after["accuracy"] > before["accuracy"] + 0.2
    assert after["margin_mean"] > before["margin_mean"] + 0.5
    assert after["bt_loss"] < before["bt_loss"] - 0.1  # the threshold loss's own value is no measure of fit
    log = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["split"] == "train"] == list(range(1, 16))
    assert all(r["accuracy"] >= 0 and r["tokens"] > 0 for r in log)
    assert result["train"]["tokens"] > 0


def test_resume_from_checkpoint_reaches_the_same_parameters(tmp_path, byte_pairs):
    tok, pairs = byte_pairs
    common = dict(
        loss="threshold",
        pairs_per_step=12,
        max_tokens_per_batch=400,
        learning_rate=1e-3,
        num_train_epochs=2,
        save_final=False,
    )
    straight = tiny_trainer(tmp_path / "a", pairs, tok, **common)
    straight.train()
    want = {n: p.detach().clone() for n, p in straight.model.named_parameters()}

    first = tiny_trainer(tmp_path / "b", pairs, tok, **common)
    while first.step < 3:  # the same run, stopped early as a crash would
        idx = first.step_indices(first.step)
        first.train_step([pairs[i] for i in idx], len(idx))
        first.step += 1
    ckpt = first.save_checkpoint()
    assert (ckpt / "model.safetensors").exists() and (ckpt / "trainer_state.pt").exists()

    # different initial weights: everything must come from the checkpoint
    resumed = tiny_trainer(tmp_path / "c", pairs, tok, init_seed=123, resume_from_checkpoint=str(ckpt), **common)
    resumed.train()
    assert resumed.step == straight.step == 8
    for n, p in resumed.model.named_parameters():
        torch.testing.assert_close(p.detach(), want[n], rtol=0, atol=1e-6, msg=n)


def test_resume_with_another_seed_is_refused(tmp_path, byte_pairs):
    tok, pairs = byte_pairs
    tr = tiny_trainer(tmp_path / "a", pairs, tok, pairs_per_step=12, save_final=False)
    ckpt = tr.save_checkpoint()
    other = tiny_trainer(tmp_path / "b", pairs, tok, seed=5, pairs_per_step=12, resume_from_checkpoint=str(ckpt))
    with pytest.raises(ValueError, match="seed: checkpoint 0, this run 5"):
        other.train()


@pytest.mark.parametrize("change", [dict(loss="bt"), dict(learning_rate=1e-4), dict(max_steps=7)])
def test_resume_refuses_a_checkpoint_of_another_training(tmp_path, byte_pairs, change):
    """Any field that changes what is trained must match (the issue: runs with another loss or learning rate
    silently resumed each other); fields that do not (output_dir, logging, budget) may differ."""
    tok, pairs = byte_pairs
    base = dict(loss="threshold", pairs_per_step=12, save_final=False)
    ckpt = tiny_trainer(tmp_path / "a", pairs, tok, **base).save_checkpoint()
    ok = tiny_trainer(
        tmp_path / "b", pairs, tok, **base, max_tokens_per_batch=999, logging_steps=5, resume_from_checkpoint=str(ckpt)
    )
    ok.load_checkpoint(ckpt)
    field = next(iter(change))
    bad = tiny_trainer(tmp_path / "c", pairs, tok, **{**base, **change}, resume_from_checkpoint=str(ckpt))
    with pytest.raises(ValueError, match=f"cannot resume.*{field}: checkpoint"):
        bad.load_checkpoint(ckpt)


def test_an_interrupted_save_leaves_no_checkpoint_behind(tmp_path, byte_pairs, monkeypatch):
    """Checkpoints are built in a temporary folder and renamed when complete: a crash mid-write (here inside the
    model write) leaves the previous checkpoint as the latest one, and no checkpoint-N folder for the new step."""
    from fastrm.checkpoint import latest_checkpoint

    tok, pairs = byte_pairs
    tr = tiny_trainer(tmp_path, pairs, tok, pairs_per_step=12, save_final=False, save_total_limit=0)
    first = tr.save_checkpoint()
    tr.step = 5
    real = tr.model.save_pretrained

    def crash(folder, **kw):
        real(folder, **kw)  # the model files are written, then the process dies before the trainer state
        raise KeyboardInterrupt

    monkeypatch.setattr(tr.model, "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        tr.save_checkpoint()
    assert latest_checkpoint(tmp_path) == first
    assert not (tmp_path / "checkpoint-5").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("checkpoint", ".checkpoint"))) == [
        "checkpoint-0"
    ]


def test_trainer_state_is_loaded_without_unpickling_code(tmp_path, byte_pairs):
    """trainer_state.pt holds tensors and plain data (weights_only=True round trip); a state that would run code
    when unpickled is refused instead of executed."""

    from fastrm.checkpoint import STATE_FILE, load_trainer_state

    tok, pairs = byte_pairs
    tr = tiny_trainer(tmp_path, pairs, tok, pairs_per_step=12, save_final=False)
    ckpt = tr.save_checkpoint()
    state = load_trainer_state(ckpt)
    assert state["step"] == 0 and state["config"]["pairs_per_step"] == 12

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"step": 1, "x": Evil()}, ckpt / STATE_FILE)
    with pytest.raises(ValueError, match="cannot|safely"):
        load_trainer_state(ckpt)


def test_config_rejects_unknown_choices():
    with pytest.raises(ValueError, match="field 'loss': expected one of bt, margin, batch_mean, threshold, got"):
        RewardConfig(loss="hinge")
