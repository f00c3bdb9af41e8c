"""Sequence-to-sequence reward models (fastrm/seq2seq.py, fastrm/seq2seq_model.py) against stock transformers.

The references here are written from the method, not from fastrm's code: each (x, y_in, y_target) is tokenized from
its text with the template's strings, run through a stock ``AutoModelForCausalLM`` (eager attention) one sequence
at a time, and the target tokens' cross-entropy summed; token rewards come from stock ``generate`` (greedy) until
the first divergence from y, then teacher forcing, as the paper describes reward extraction."""

from __future__ import annotations

import copy
import json
import os
import sys

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from fastrm.config import ConfigError, RewardConfig
from fastrm.presets import resolve_config
from fastrm.rows import DataError
from fastrm.seq2seq import PLAIN_INPUT_PREFIX, PLAIN_OUTPUT_PREFIX
from fastrm.seq2seq_model import Seq2SeqRewardModel
from fastrm.seq2seq_rewards import rewards_from_decisions, token_rewards
from fastrm.synthetic import byte_tokenizer, synthetic_pairs
from fastrm.trainer import RewardTrainer

TOK = byte_tokenizer()


def stock_lm(preset: str, dtype=torch.float32, seed: int = 0):
    torch.manual_seed(seed)
    cfg = resolve_config(preset, vocab_size=len(TOK))
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").to(dtype)


def enc(text: str) -> list[int]:
    return TOK(text, add_special_tokens=False)["input_ids"] if text else []


def trainer_for(lm, out, rows, **cfg) -> RewardTrainer:
    model = Seq2SeqRewardModel(copy.deepcopy(lm), self_test=False, attn_backend="exact")
    args = RewardConfig(output_dir=str(out), objective="seq2seq", progress=False, save_final=False, **cfg)
    return RewardTrainer(model, args, rows, tokenizer=TOK)


def reference_loss(lm, rows) -> tuple[torch.Tensor, int]:
    """Summed target cross-entropy of every branch of ``rows``, each sequence alone, and the target token count."""
    total, n = 0.0, 0
    pre, post = enc(PLAIN_INPUT_PREFIX), enc(PLAIN_OUTPUT_PREFIX)
    for row in rows:
        x, yw, yl = enc(row["prompt"]), enc(row["chosen"]), enc(row["rejected"])
        target = yw + [TOK.eos_token_id]
        for y_in in (yl, yw):  # correction, identity
            inp = pre + y_in + post
            ids = torch.tensor([x + inp + target])
            logits = lm(input_ids=ids).logits[0]
            start = len(x) + len(inp) - 1  # the row that predicts target[0]
            total = total + F.cross_entropy(logits[start : start + len(target)], torch.tensor(target), reduction="sum")
            n += len(target)
    return total, n


def lm_grads(model: Seq2SeqRewardModel, lm) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """fastrm parameter name -> (its grad, the stock LM's grad of the same weight)."""
    theirs = dict(lm.named_parameters())
    out = {}
    for key, hf_key in model.hf_key_map().items():
        p = dict(model.named_parameters()).get(key)
        if p is not None and hf_key in theirs:
            out[key] = (p.grad, theirs[hf_key].grad)
    return out


CASES = [
    ("tiny-llama", torch.float64, True),
    ("tiny-llama", torch.float64, False),
    ("tiny-llama", torch.float32, True),
    ("tiny-neox", torch.float32, False),
]


@pytest.mark.parametrize("preset,dtype,shared", CASES, ids=lambda c: str(c).replace("torch.", ""))
def test_packed_training_equals_stock_causal_lm(tmp_path, preset, dtype, shared):
    """Loss and every gradient of a step split over several micro-batches equal stock HF eager on each sequence
    alone: fp64 (the plain head) and fp32 (the fused linear + cross-entropy op), both layouts. (Stock eager attention
    takes its softmax in fp32 even for fp64 weights, which bounds the fp64 agreement at about 1e-8.)"""
    rows = synthetic_pairs(10, seed=7)
    lm = stock_lm(preset, dtype)
    tr = trainer_for(lm, tmp_path, rows, prefix_sharing=shared, max_tokens_per_batch=300, pairs_per_step=10)
    ex = tr.train_pairs
    n = tr.objective.step_units(ex)
    r = tr.accumulate_gradients(ex, n)
    assert r["micro_batches"] >= 3
    ref, n_ref = reference_loss(lm, rows)
    assert n == n_ref
    (ref / n_ref).backward()
    tol = dict(rtol=1e-6, atol=1e-8) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-6)
    assert float(r["sums"][0].detach()) == pytest.approx(float(ref.detach()), rel=1e-5)  # the metrics sums are fp32
    grads = lm_grads(tr.model, lm)
    assert {"lm_head.weight", "final_norm.weight"} <= set(grads) and len(grads) > 10
    for name, (got, want) in grads.items():
        torch.testing.assert_close(got, want, **tol, msg=name)


def test_the_step_gradient_does_not_depend_on_the_token_budget(tmp_path):
    rows = synthetic_pairs(12, seed=2)
    lm = stock_lm("tiny-llama")
    grads = []
    for budget in (100_000, 260):
        tr = trainer_for(lm, tmp_path, rows, prefix_sharing=True, max_tokens_per_batch=budget, pairs_per_step=12)
        r = tr.accumulate_gradients(tr.train_pairs, tr.objective.step_units(tr.train_pairs))
        grads.append((r["micro_batches"], {k: p.grad.clone() for k, p in tr.model.named_parameters()}))
    (one, g1), (many, g2) = grads
    assert one == 1 and many > 3
    for k in g1:
        torch.testing.assert_close(g2[k], g1[k], rtol=1e-5, atol=1e-7, msg=k)


def test_shared_prompt_rows_and_labels_match_the_sequences():
    """The shared layout [x | in_l tgt | in_w tgt]: x once, the target rows predict the target tokens, and the
    packed tokens are fewer than two separate sequences."""
    from fastrm.seq2seq import pack_branches

    x, a, b, t = [1, 2, 3], [4, 5], [6, 7, 8], [9, 10, 11]
    shared = pack_branches([x], [[(a, t), (b, t)]], "shared_prompt")
    assert shared.input_ids.tolist() == x + a + t + b + t
    assert shared.target_index.tolist() == [4, 5, 6, 10, 11, 12]
    assert shared.targets.tolist() == t + t
    sep = pack_branches([x], [[(a, t), (b, t)]], "separate")
    assert sep.input_ids.tolist() == x + a + t + x + b + t
    assert sep.target_index.tolist() == [4, 5, 6, 13, 14, 15]
    assert shared.num_tokens < sep.num_tokens


def _dist_worker(rank: int, world: int, store: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        res = _dist_steps(os.path.join(out, f"rank{rank}"), rank, world)
        if rank == 0:
            torch.save(res, os.path.join(out, "ranks.pt"))
    finally:
        torch.distributed.destroy_process_group()


def _dist_steps(out, rank, world) -> dict:
    lm = stock_lm("tiny-llama")
    tr = trainer_for(lm, out, synthetic_pairs(6, seed=4), prefix_sharing=True, max_tokens_per_batch=260)
    res = {}
    for n in (1, 3, 6):  # with 1 pair, rank 1 holds none: its placeholder pass must weigh nothing
        tr.optimizer.zero_grad(set_to_none=True)
        step = tr.train_pairs[:n]
        tr.accumulate_gradients(step[rank::world], tr.objective.step_units(step))
        res[n] = {k: p.grad.clone() for k, p in tr.model.named_parameters()}
    return res


@pytest.mark.skipif(sys.platform != "linux", reason="file:// rendezvous and fork start method")
def test_two_gloo_ranks_train_what_one_process_trains(tmp_path):
    mp.spawn(_dist_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    got = torch.load(tmp_path / "ranks.pt")
    want = _dist_steps(tmp_path / "single", 0, 1)
    for n, grads in want.items():
        for k, g in grads.items():
            torch.testing.assert_close(got[n][k], g, rtol=1e-4, atol=1e-7, msg=f"{n} pairs: {k}")


# ------------------------------------------------------------------------------------------------ token rewards
def reference_decisions(lm, prompt: str, response: str) -> list[bool]:
    """The paper's procedure with stock HF: greedy ``generate`` from [x | input(y)] compared with y until the first
    divergence, then y fed token by token (teacher forcing), comparing each greedy prediction with y_t."""
    y = enc(response)
    ctx = enc(prompt) + enc(PLAIN_INPUT_PREFIX) + y + enc(PLAIN_OUTPUT_PREFIX)
    ids = torch.tensor([ctx])
    gen = lm.generate(ids, max_new_tokens=len(y), min_new_tokens=len(y), do_sample=False, pad_token_id=0)
    gen = gen[0, len(ctx) :].tolist()
    k = next((t for t in range(len(y)) if gen[t] != y[t]), len(y))  # the first divergence
    decisions = [True] * k
    for t in range(k, len(y)):
        with torch.no_grad():
            pred = int(lm(input_ids=torch.tensor([ctx + y[:t]])).logits[0, -1].argmax())
        decisions.append(pred == y[t])
    return decisions


def self_consistent_response(lm, prompt: str, n: int, seed: int) -> str:
    """A response the random model partly agrees with: its own greedy output given a seed response, with one
    character changed (so decisions have runs of agreement, a divergence, and agreement after it)."""
    import random

    rng = random.Random(seed)
    y = "".join(rng.choice("abcdefgh ") for _ in range(n))
    for _ in range(2):
        ctx = enc(prompt) + enc(PLAIN_INPUT_PREFIX) + enc(y) + enc(PLAIN_OUTPUT_PREFIX)
        out = lm.generate(torch.tensor([ctx]), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        y = TOK.decode(out[0, len(ctx) :])
    if len(enc(y)) != n or not y.strip():
        return y
    i = rng.randrange(n // 3, n)
    return y[:i] + ("x" if y[i] != "x" else "y") + y[i + 1 :]


def test_token_rewards_equal_greedy_decoding_then_teacher_forcing():
    """Random small models (two families, three seeds), both rules; over all of them the comparison covers
    agreement before a divergence and agreement after one (the cases where the two readings differ)."""
    saw_prefix = saw_after = False
    for preset, seed in (("tiny-llama", 0), ("tiny-neox", 1), ("tiny-llama", 2)):
        lm = stock_lm(preset, seed=seed).eval()
        model = Seq2SeqRewardModel(copy.deepcopy(lm), attn_backend="exact", self_test=seed == 0)
        prompt = "Say something about Ada.\n"
        responses = [self_consistent_response(lm, prompt, 12, seed * 10 + j) for j in range(4)]
        responses = [r for r in responses if r.strip()] + [" Ada is kind."]
        got = token_rewards(model, prompt, responses, tokenizer=TOK)
        for r, rewards in zip(responses, got):
            want = reference_decisions(lm, prompt, r)
            assert len(rewards) == len(enc(r))
            assert rewards == rewards_from_decisions(want, model.settings), (preset, seed, r)
            k = want.index(False) if False in want else len(want)
            saw_prefix |= k > 0
            saw_after |= any(want[k + 1 :])
            model.settings.reward_rule = "match_positive"
            assert token_rewards(model, prompt, [r], tokenizer=TOK)[0] == [1.0 if m else -1.0 for m in want]
            model.settings.reward_rule = "after_zero"
    assert saw_prefix and saw_after


def test_reward_rules():
    from fastrm.seq2seq import Seq2SeqSettings

    s = Seq2SeqSettings(positive=2.0, negative=0.5)
    m = [True, True, False, True, False, True]
    assert rewards_from_decisions(m, s) == [2.0, 2.0, -0.5, 0.0, -0.5, 0.0]
    assert rewards_from_decisions(m, s, "match_positive") == [2.0, 2.0, -0.5, 2.0, -0.5, 2.0]


# ------------------------------------------------------------------------------------------------ checkpoints
def test_checkpoint_is_a_causal_lm_folder_that_generates_and_loads_back(tmp_path):
    from fastrm.loading import load_model

    rows = synthetic_pairs(8, seed=1)
    lm = stock_lm("tiny-llama")
    tr = trainer_for(lm, tmp_path / "run", rows, max_steps=2, pairs_per_step=4, seq2seq_reward_rule="match_positive")
    tr.args.save_final = True
    tr.train()
    folder = tmp_path / "run"
    record = json.loads((folder / "fastrm_seq2seq.json").read_text())
    assert record["format"] == "fastrm-seq2seq" and record["reward_rule"] == "match_positive"
    assert record["template"]["input_prefix"] == PLAIN_INPUT_PREFIX
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    for key, hf_key in tr.model.hf_key_map().items():
        torch.testing.assert_close(hf.state_dict()[hf_key], tr.model.state_dict()[key], rtol=0, atol=0)
    ids = torch.tensor([enc("Say something about Bob.\n" + PLAIN_INPUT_PREFIX + " Bob is rude." + PLAIN_OUTPUT_PREFIX)])
    out = hf.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > ids.shape[1]
    loaded = load_model(folder)
    assert isinstance(loaded, Seq2SeqRewardModel) and loaded.settings.reward_rule == "match_positive"
    resp = [" Bob is kind.", " Bob is rude and lazy."]
    assert token_rewards(loaded, "Say something about Bob.\n", resp) == token_rewards(
        tr.model.cpu(), "Say something about Bob.\n", resp, tokenizer=TOK
    )


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_rows_name_file_line_and_field(tmp_path):
    lm = stock_lm("tiny-llama")
    path = tmp_path / "rows.jsonl"
    rows = synthetic_pairs(3, seed=0)
    rows[1]["rejected"] = "   "
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"rows.jsonl:2: field 'rejected'"):
        trainer_for(lm, tmp_path / "a", str(path))
    long = dict(rows[0], chosen=" " + "x" * 80)
    path.write_text("".join(json.dumps(r) + "\n" for r in [rows[0], long, rows[2]]))
    with pytest.raises(DataError, match=r"rows.jsonl:2: field 'chosen': the target needs 82 tokens"):
        trainer_for(lm, tmp_path / "b", str(path), max_length=100)
    tr = trainer_for(lm, tmp_path / "c", str(path), max_length=100, on_bad_row="skip")
    stats = tr.load_stats["train"]
    assert len(tr.train_pairs) == 2 and stats.bad_rows_skipped == 1 and "rows.jsonl:2" in stats.skipped_examples[0]


def test_prompt_then_input_are_cut_from_the_left_never_the_target(tmp_path):
    lm = stock_lm("tiny-llama")
    row = {"prompt": "P" * 40, "chosen": " " + "c" * 10, "rejected": " " + "r" * 30}
    tr = trainer_for(lm, tmp_path, [row], max_length=80)
    (ex,) = tr.train_pairs
    target = enc(row["chosen"]) + [TOK.eos_token_id]
    pre, post = enc(PLAIN_INPUT_PREFIX), enc(PLAIN_OUTPUT_PREFIX)
    for inp, tgt, _ in ex.branches:
        assert tgt == target and inp[: len(pre)] == pre and inp[-len(post) :] == post
        assert len(ex.prompt_ids) + len(inp) + len(tgt) <= 80
    corr = ex.branches[0][0][len(pre) : -len(post)]
    assert corr == enc(row["rejected"])[-len(corr) :] and len(corr) < 31  # the input response lost its left end
    assert ex.prompt_ids == [] and tr.load_stats["train"].response_truncated == 1


def test_config_fields_and_refusals(tmp_path):
    with pytest.raises(ConfigError, match="seq2seq_mix"):
        RewardConfig(seq2seq_mix="2")
    with pytest.raises(ConfigError, match="objective"):
        RewardConfig(objective="dpo")
    lm = stock_lm("tiny-llama")
    with pytest.raises(ConfigError, match="loss"):
        trainer_for(lm, tmp_path, synthetic_pairs(2), loss="threshold")
    only_corr = trainer_for(lm, tmp_path, synthetic_pairs(20), seq2seq_mix="0:1")
    assert all([k for _, _, k in e.branches] == [0] for e in only_corr.train_pairs)
    half = trainer_for(lm, tmp_path, synthetic_pairs(200), seq2seq_mix="1:2")
    n_id = sum(k == 1 for e in half.train_pairs for _, _, k in e.branches)
    assert 70 < n_id < 130  # identity in about half of the pairs, correction in all


def test_cli_trains_and_scores_with_token_rewards(tmp_path):
    from fastrm.cli import main
    from fastrm.synthetic import synthetic_candidates

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in synthetic_pairs(12, seed=3)))
    out = tmp_path / "run"
    argv = ["train", "--objective", "seq2seq", "--data", str(data), "--model", "tiny-llama", "--tokenizer", "byte"]
    argv += ["--max-steps", "2", "--pairs-per-step", "6", "--prefix-sharing", "--progress", "false"]
    assert main(argv + ["--output-dir", str(out), "--max-length", "256"]) == 0
    assert (out / "fastrm_seq2seq.json").exists() and (out / "config.json").exists()
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in synthetic_candidates(2, k=3, seed=1)))
    scored = tmp_path / "scored.jsonl"
    assert main(["score", "--model", str(out), "--input", str(rows), "--output", str(scored), "--token-rewards"]) == 0
    recs = [json.loads(line) for line in scored.read_text().splitlines()]
    assert len(recs) == 2 and all(len(r["scores"]) == 3 for r in recs)
    for r in recs:
        for toks, rewards, resp in zip(r["tokens"], r["token_rewards"], r["responses"]):
            assert len(toks) == len(rewards) == len(enc(resp)) and set(rewards) <= {1.0, 0.0, -1.0}


def test_chat_template_renders_the_four_turns(tmp_path):
    """seq2seq_template='chat': prompt + input + target of a branch is the chat template's rendering of
    [user: x, assistant: y_in, user: the instruction, assistant: y_target], split at y_in and y_target."""
    from fastrm.seq2seq import CHAT_INSTRUCTION

    tok = byte_tokenizer()
    tok.chat_template = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    row = {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}
    model = Seq2SeqRewardModel(stock_lm("tiny-llama"), self_test=False, attn_backend="exact")
    args = RewardConfig(output_dir=str(tmp_path), objective="seq2seq", seq2seq_template="chat", progress=False)
    tr = RewardTrainer(model, args, [row], tokenizer=tok)
    (ex,) = tr.train_pairs
    (corr_in, target, _), (ident_in, _, _) = ex.branches
    text = tok.decode(ex.prompt_ids + corr_in + target)
    assert text == f"<|user|>Hi\n<|assistant|>Go away.\n<|user|>{CHAT_INSTRUCTION}\n<|assistant|>Hello!<|endoftext|>"
    ident = tok.decode(ex.prompt_ids + ident_in)
    assert ident.endswith(f"<|assistant|>Hello!\n<|user|>{CHAT_INSTRUCTION}\n<|assistant|>")


# ------------------------------------------------------------------------------------------------ the demo
def test_the_demo_learns_the_rewrite_and_rewards_are_negative_exactly_on_the_rude_words(tmp_path, capsys):
    """``fastrm demo --objective seq2seq`` as the README runs it (default epochs, about a minute on a CPU): stock
    ``generate`` writes the kind sentence, and in each printed token-reward line a word is -1 iff it is rude."""
    from fastrm.cli import cmd_demo
    from fastrm.seq2seq_demo import RUDE

    assert cmd_demo(["--objective", "seq2seq", "--output-dir", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "rewrite (AutoModelForCausalLM.generate): ' Ada is helpful and kind.'" in out, out
    lines = out.split("token rewards (fastrm.token_rewards):\n", 1)[1].strip().split("\n\n")[0].splitlines()
    rude = set(RUDE.values())
    assert len(lines) == 3
    for line in lines:
        pairs = [item.rsplit(":", 1) for item in line.split()]
        for word, reward in pairs:
            assert (float(reward) < 0) == (word in rude), line
