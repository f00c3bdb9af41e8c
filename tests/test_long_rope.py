"""RoPE that picks its frequencies from the longest sequence of a call (dynamic, longrope): a sequence past the
original length runs alone, exactly as stock transformers computes it alone, and its batch neighbours are not
changed (fastrm/long_rope.py). Checked against AutoModelForSequenceClassification loaded from fastrm's checkpoint,
a fresh model per sequence (dynamic RoPE keeps grown frequencies between calls)."""

import types

import pytest
import torch
from backbone_families import GQA, LONGROPE, family_config

from fastrm.backbones import batch_parts
from fastrm.model import RewardModel
from fastrm.packing import pack_pairs, pack_prompt_responses

DYNAMIC = dict(GQA, max_position_embeddings=32, rope_parameters={"rope_type": "dynamic", "factor": 2.0})
CASES = {"longrope": ("phi3", LONGROPE, 24), "dynamic": ("llama", DYNAMIC, 32)}


def pair(prompt, chosen, rejected, seed):
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(0, 97, (n,), generator=g).tolist()  # noqa: E731
    return types.SimpleNamespace(
        prompt_ids=ids(prompt), chosen_ids=ids(chosen), rejected_ids=ids(rejected), margin=None, source=f"s{seed}"
    )


def stock(tmp_path, seqs, weights, names):
    """Rewards [S] and gradients of sum w_i r_i (HF names) of each sequence alone, a fresh HF model each."""
    from transformers import AutoModelForSequenceClassification

    rewards, grads = [], {}
    for s, w in zip(seqs, weights):
        hf = AutoModelForSequenceClassification.from_pretrained(tmp_path, attn_implementation="eager").eval()
        r = hf(input_ids=torch.tensor([s])).logits[0, 0]
        (r * w).backward()
        rewards.append(r.detach())
        for n, p in hf.named_parameters():
            if n in names:
                grads[n] = grads.get(n, 0) + p.grad
    return torch.stack(rewards), grads


@pytest.mark.filterwarnings("ignore:the saved checkpoint has pad_token_id=null")
@pytest.mark.parametrize("rope", list(CASES))
@pytest.mark.parametrize("layout", ["separate", "shared_prompt"])
def test_long_sequences_run_alone_as_stock_transformers_computes_them(rope, layout, tmp_path):
    model_type, kwargs, limit = CASES[rope]
    torch.manual_seed(0)
    model = RewardModel.from_config(family_config(model_type, kwargs)).eval()
    assert model.backbone_info.position_limit == limit
    # Pair 0: a chosen response past the limit and a short rejected one sharing its prompt; pair 1: both short;
    # pair 2: both past the limit, of different lengths (dynamic RoPE gives each its own frequencies).
    pairs = [pair(limit - 6, 12, 3, 0), pair(5, 4, 6, 1), pair(limit - 2, 9, 5, 2)]
    batch = pack_pairs(pairs, layout)
    assert batch.attn.max_k > limit and len(batch_parts(model.backbone_info, batch)) == 1 + 3
    seqs = [p.prompt_ids + p.chosen_ids for p in pairs] + [p.prompt_ids + p.rejected_ids for p in pairs]
    weights = torch.linspace(-1.0, 2.0, len(seqs))
    model.save_pretrained(tmp_path)
    keys = model.hf_key_map()
    probe = [n for n in keys if "layers.0.self_attn" in n or n == "score.weight"]
    want_r, want_g = stock(tmp_path, seqs, weights, {keys[n] for n in probe})
    model.zero_grad()
    r = model(batch)
    (r * weights).sum().backward()
    torch.testing.assert_close(r.detach(), want_r, rtol=1e-5, atol=1e-5)
    for n in probe:
        torch.testing.assert_close(dict(model.named_parameters())[n].grad, want_g[keys[n]], rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # the scoring path too, and again: no state carried over from the previous call
        torch.testing.assert_close(model(batch), want_r, rtol=1e-5, atol=1e-5)


def test_batches_within_the_limit_and_a_lone_long_sequence_run_as_one_call():
    torch.manual_seed(0)
    model = RewardModel.from_config(family_config("phi3", LONGROPE), self_test=False)
    info = model.backbone_info
    assert batch_parts(info, pack_pairs([pair(10, 14, 3, 0), pair(4, 4, 4, 1)], "shared_prompt")) is None  # 24
    assert batch_parts(info, pack_prompt_responses([list(range(30))], [[[1, 2]]], "shared_prompt")) is None
    parts = batch_parts(info, pack_prompt_responses([list(range(30))], [[[1, 2], [3]]], "shared_prompt"))
    assert [p.num_tokens for p, _ in parts] == [32, 31]  # each response with its prompt, alone
    with torch.no_grad():  # a 40-token text alone: what a long-context reward model must be able to score
        assert torch.isfinite(model(pack_prompt_responses([list(range(30))], [[list(range(10))]]))).all()
