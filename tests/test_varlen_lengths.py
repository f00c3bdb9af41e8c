"""Packed varlen attention at the lengths that matter: HH-RLHF lengths and sequences of exactly max_length (2048).

CPU (exact back end, fp32) runs in CI; the `gpu` tests run the FlashAttention back ends in bf16 on a device:
`python -m pytest -m gpu tests/test_varlen_lengths.py`."""

import random
import sys
import types
from pathlib import Path

import pytest
import torch

from fastrm.model import RewardModel
from fastrm.packing import pack_pairs, pack_prompt_responses

ROOT = Path(__file__).resolve().parents[1]


def pairs_with_lengths(lengths, vocab, seed):
    """Pairs (prompt, chosen, rejected) with the given (P, C, R) lengths."""
    rng = random.Random(seed)
    tok = lambda k: [rng.randrange(vocab) for _ in range(k)]  # noqa: E731
    return [
        types.SimpleNamespace(prompt_ids=tok(P), chosen_ids=tok(C), rejected_ids=tok(R), margin=None, source=f"p{i}")
        for i, (P, C, R) in enumerate(lengths)
    ]


def hh_lengths(n):
    """(P, C, R) of n helpful-base pairs: the longest half plus a spread. From the committed lengths file
    (benchmarks/data/hh_rlhf_lengths.json), so the device, which gets the repo and not ../shared, runs this too."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import hh_lengths as lengths_file

    content = lengths_file.load()
    lengths = sorted(
        map(tuple, content["splits"]["helpful-base_test"]["pairs"]), key=lambda t: -(2 * t[0] + t[1] + t[2])
    )
    pick = lengths[: n // 2] + lengths[:: max(1, len(lengths) // (n - n // 2))][: n - n // 2]
    return pick, content["vocab_size"]


def per_sequence_rewards(model, pairs):
    out = []
    for field in ("chosen_ids", "rejected_ids"):
        for p in pairs:
            out.append(model(pack_prompt_responses([p.prompt_ids], [[getattr(p, field)]], "separate"))[0])
    return torch.stack(out)


def test_sequences_of_exactly_2048_tokens_cpu():
    torch.manual_seed(0)
    model = RewardModel.from_config("tiny-llama").eval()
    pairs = pairs_with_lengths([(1024, 1024, 1), (0, 2048, 2048), (2047, 1, 1)], 500, 0)
    with torch.no_grad():
        want = per_sequence_rewards(model, pairs)
        for layout in ("separate", "shared_prompt"):
            b = pack_pairs(pairs, layout)
            assert int(b.position_ids.max()) == 2047
            torch.testing.assert_close(model(b), want, rtol=1e-4, atol=1e-4)


GPU_SHAPES = {  # reduced depth, real widths and head layouts
    "llama": (
        "llama",
        dict(
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=2,
            num_attention_heads=32,
            num_key_value_heads=4,
            max_position_embeddings=2048,
        ),
    ),
    "qwen2": (
        "qwen2",
        dict(
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=2,
            num_attention_heads=14,
            num_key_value_heads=2,
            max_position_embeddings=2048,
        ),
    ),
    "gpt_neox": (
        "gpt_neox",
        dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=2,
            num_attention_heads=16,
            rotary_pct=0.25,
            max_position_embeddings=2048,
        ),
    ),
}


@pytest.mark.gpu
@pytest.mark.parametrize("family", list(GPU_SHAPES))
@pytest.mark.parametrize("backend", ["auto", "torch_varlen", "flex"])
def test_bf16_varlen_matches_per_sequence_on_gpu(family, backend):
    from transformers import AutoConfig

    from fastrm.attention import has_flash_attn

    if backend == "auto" and not has_flash_attn():
        backend = "torch_varlen"
    model_type, kw = GPU_SHAPES[family]
    lengths, vocab = hh_lengths(16)
    cfg = AutoConfig.for_model(model_type, vocab_size=vocab, **kw)
    torch.manual_seed(0)
    model = RewardModel.from_config(cfg, attn_backend=backend).cuda().to(torch.bfloat16)
    lengths += [(0, 2048, 2048), (1024, 1024, 1)]
    pairs = pairs_with_lengths(lengths, cfg.vocab_size, 1)
    for layout in ("separate", "shared_prompt"):
        model.zero_grad()
        r = model(pack_pairs(pairs, layout).to("cuda"))
        r.float().sum().backward()
        g = model.score.weight.grad.float().clone()
        model.zero_grad()
        model.attn_backend = "exact"
        want = torch.stack(
            [
                model(pack_prompt_responses([p.prompt_ids], [[getattr(p, f)]], "separate").to("cuda"))[0]
                for f in ("chosen_ids", "rejected_ids")
                for p in pairs
            ]
        )
        want.float().sum().backward()
        g_want = model.score.weight.grad.float()
        model.attn_backend = backend
        err = (r.float() - want.float()).abs().max().item()
        scale = want.float().abs().max().item()
        assert err <= 2e-2 * max(scale, 1.0), (layout, err, scale)
        assert (g - g_want).norm() / g_want.norm() < 2e-2, layout
