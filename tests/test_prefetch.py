"""Host work overlapped (fastrm/prefetch.py): step k+1 is packed on a background thread while step k trains, and
training is the same with and without it."""

import dataclasses
import threading

import pytest
import torch

from fastrm.config import RewardConfig
from fastrm.model import RewardModel
from fastrm.packing import PackingError, micro_batches
from fastrm.prefetch import StepPrefetcher, pin_batch
from fastrm.synthetic import byte_tokenizer, synthetic_pairs
from fastrm.tokenization import load_tokenized
from fastrm.trainer import RewardTrainer


@pytest.fixture(scope="module")
def byte_pairs():
    tok = byte_tokenizer()
    rows = synthetic_pairs(40, seed=5)
    for i, r in enumerate(rows):
        r["margin"] = (i % 3) / 2.0
    pairs, _ = load_tokenized(rows, tok, max_length=128)
    return tok, pairs


def trainer(tmp_path, pairs, tok, **cfg):
    torch.manual_seed(0)
    model = RewardModel.from_config("tiny-llama")
    fixed = dict(progress=False, seed=1, pairs_per_step=8, max_tokens_per_batch=300, num_train_epochs=2)
    args = RewardConfig(output_dir=str(tmp_path), logging_steps=1, **fixed, **cfg)
    return RewardTrainer(model, args, pairs, tokenizer=tok)


@pytest.mark.parametrize("case", [dict(loss="threshold"), dict(loss="bt", prefix_sharing=True)], ids=str)
def test_training_is_identical_with_and_without_prefetch(tmp_path, byte_pairs, case):
    """Same step metrics and bit-identical weights after 10 steps of several micro-batches each, over an epoch
    boundary (the next epoch's order is drawn on the packing thread)."""
    tok, pairs = byte_pairs
    runs = []
    for prefetch in (False, True):
        tr = trainer(tmp_path / str(prefetch), pairs, tok, prefetch=prefetch, **case)
        steps: list[dict] = []

        def record(step, m, steps=steps):
            steps.append({k: m[k] for k in ("loss", "accuracy", "tokens", "micro_batches")})

        tr.on_step_end = record
        tr.train()
        runs.append((steps, {n: p.detach().clone() for n, p in tr.model.named_parameters()}))
    (steps_a, w_a), (steps_b, w_b) = runs
    assert len(steps_a) == 10 and max(s["micro_batches"] for s in steps_a) > 1
    assert steps_a == steps_b
    changed = 0
    for n, w in w_a.items():
        assert torch.equal(w, w_b[n]), n
        changed += not torch.equal(w, trainer(tmp_path / "init", pairs, tok).model.state_dict()[n])
    assert changed > 0  # training moved the weights, so equal weights say something


def test_the_next_step_is_packed_on_another_thread_while_this_one_trains(tmp_path, byte_pairs):
    """Step k's train_step does not start until step k+1's packing has started on the fastrm-pack thread (a wait
    with a timeout: without overlap it times out), and every step after the first is packed there."""
    tok, pairs = byte_pairs
    tr = trainer(tmp_path, pairs, tok)
    packed_on: dict[int, str] = {}
    started = {k: threading.Event() for k in range(tr.total_steps + 1)}
    real_host_step, real_train_step = tr.host_step, tr.train_step

    def host_step(step):
        packed_on[step] = threading.current_thread().name
        started[step].set()
        return real_host_step(step)

    def train_step(*a, **kw):
        k = tr.step
        if k + 1 < tr.total_steps:
            assert started[k + 1].wait(timeout=30), f"step {k + 1} was not being packed while step {k} trained"
        return real_train_step(*a, **kw)

    tr.host_step, tr.train_step = host_step, train_step
    tr.train()
    assert sorted(packed_on) == list(range(tr.total_steps))  # each step packed once, none beyond the last
    assert packed_on[0] == threading.current_thread().name
    assert all(packed_on[k].startswith("fastrm-pack") for k in range(1, tr.total_steps)), packed_on


def test_a_packing_error_on_the_thread_reaches_the_caller_unchanged(tmp_path, byte_pairs):
    tok, pairs = byte_pairs
    tr = trainer(tmp_path, pairs, tok)
    real = tr.host_step

    def host_step(step):
        if step == 3:
            raise PackingError("data.jsonl line 7: field 'chosen' is 9000 tokens, over max_tokens_per_batch")
        return real(step)

    tr.host_step = host_step
    with pytest.raises(PackingError, match=r"data.jsonl line 7: field 'chosen'"):
        tr.train()
    assert tr.step == 3  # steps 0-2 trained; the error came when step 3 was taken, not lost on the thread


def test_prefetcher_disabled_runs_in_the_caller_and_close_drops_what_was_not_taken():
    names = []
    make = lambda k: (names.append(threading.current_thread().name), k * k)[1]  # noqa: E731
    with StepPrefetcher(make, enabled=False) as p:
        p.prefetch(1)
        assert p.get(1) == 1 and names == [threading.current_thread().name]
    p = StepPrefetcher(make, enabled=True)
    p.prefetch(2)
    assert p.get(2) == 4 and names[-1].startswith("fastrm-pack")
    p.prefetch(3)
    p.close()
    assert p.get(3) == 9  # after close, in the caller
    assert names[-1] == threading.current_thread().name


def _tensors(obj, path="batch"):
    """(path, tensor) of every tensor field of a (nested) dataclass."""
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, torch.Tensor):
            yield f"{path}.{f.name}", v
        elif dataclasses.is_dataclass(v):
            yield from _tensors(v, f"{path}.{f.name}")


def test_pin_batch_pins_every_tensor_of_the_batch_and_its_attention_plan(monkeypatch, byte_pairs):
    """On CPU there is no pinned memory, so pin_memory is replaced by a marking copy: every tensor field (the
    attention plan's too, and a subclass's own, as the seq2seq batch has) must come back marked and equal."""
    from fastrm.seq2seq import pack_branches

    def fake_pin(self):
        out = self.clone()
        out._pinned = True
        return out

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    tok, pairs = byte_pairs
    batches = micro_batches(pairs[:6], 100_000, "shared_prompt") + [
        pack_branches([[1, 2, 3]], [[([4, 5], [6, 7]), ([8], [9, 10, 11])]], "shared_prompt", kinds=[[0, 1]])
    ]
    for batch in batches:
        pinned = pin_batch(batch)
        got, want = dict(_tensors(pinned)), dict(_tensors(batch))
        assert got.keys() == want.keys() and len(got) >= 6
        for name, t in got.items():
            assert getattr(t, "_pinned", False), f"{name} not pinned"
            assert torch.equal(t, want[name]), name
        assert type(pinned) is type(batch) and pinned.attn.host_bounds() == batch.attn.host_bounds()


@pytest.mark.gpu
def test_on_cuda_the_prefetched_batches_are_pinned(tmp_path, byte_pairs):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA (run on the device machine)")
    tok, pairs = byte_pairs
    tr = trainer(tmp_path, pairs, tok)
    hs = tr.host_step(1)
    assert all(t.is_pinned() for b in hs.batches for _, t in _tensors(b))
