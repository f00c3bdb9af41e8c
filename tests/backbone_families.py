"""The backbone families the tests try, and the per-version facts about them: the one table a dependency bump edits.

Each family is a tiny config of one transformers model type. ``refused`` maps a range of transformers versions to
the reason fastrm gives there (a regex its ``UnsupportedBackbone`` message must match); outside every range the
family must run exactly (packed rewards and gradients equal stock HF, tests/test_backbones.py). The tests check the
rules behind the refusals against the installed transformers (tests/test_backbones.py: attention outside
``AttentionInterface``, keyword arguments that never reach attention, token mixing outside attention), so a family
that becomes supported in a new release passes (with a warning that this table is out of date) and only a family
that *loses* support fails. ``.ci/latest`` lists both.
"""

from __future__ import annotations

import random
import types
from dataclasses import dataclass, field

import pytest

_T = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=97)
_GQA = dict(_T, num_key_value_heads=2)
_MOE = dict(num_local_experts=4, num_experts_per_tok=2)
_MLA = dict(
    _T,
    num_key_value_heads=4,
    kv_lora_rank=16,
    q_lora_rank=16,
    qk_rope_head_dim=4,
    qk_nope_head_dim=8,
    v_head_dim=6,
    n_routed_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=16,
    first_k_dense_replace=1,
    n_group=1,
    topk_group=1,
)
LONGROPE = dict(
    _GQA,
    pad_token_id=None,
    max_position_embeddings=64,
    original_max_position_embeddings=24,
    rope_parameters={
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "short_factor": [1.0, 1.5, 2.0, 2.5],
        "long_factor": [3.0, 4.0, 5.0, 6.0],
        "original_max_position_embeddings": 24,
    },
)
GQA = _GQA
ALL_VERSIONS = ">=0"


@dataclass(frozen=True)
class Family:
    """One model type with a tiny config; ``refused``: transformers version range -> reason regex there."""

    model_type: str
    kwargs: dict
    refused: dict[str, str] = field(default_factory=dict)

    def refusal(self, transformers_version: str) -> str | None:
        """The reason regex fastrm's refusal must match on this transformers version, or None (must be exact)."""
        from packaging.specifiers import SpecifierSet
        from packaging.version import Version

        v = Version(transformers_version)
        hits = [why for spec, why in self.refused.items() if v in SpecifierSet(spec, prereleases=True)]
        return hits[0] if hits else None


FAMILIES: dict[str, Family] = {
    # ---------------------------------------------------------------- exact on every tested version
    "llama": Family("llama", _GQA),
    "qwen2": Family("qwen2", _GQA),
    "qwen2-window": Family("qwen2", dict(_GQA, use_sliding_window=True, sliding_window=5, max_window_layers=1)),
    "qwen3": Family("qwen3", dict(_GQA, head_dim=8)),
    "mistral": Family("mistral", dict(_GQA, sliding_window=None)),
    "mistral-window": Family("mistral", dict(_GQA, sliding_window=4)),
    "gemma": Family("gemma", dict(_GQA, head_dim=8)),
    "gemma2": Family("gemma2", dict(_GQA, head_dim=8, sliding_window=4, attn_logit_softcapping=2.0)),
    "gemma3": Family("gemma3_text", dict(_GQA, head_dim=8, sliding_window=4, sliding_window_pattern=2)),
    "gemma3-multimodal": Family(  # text-only inputs through the multimodal model (vision tower unused)
        "gemma3",
        dict(
            text_config=dict(_GQA, vocab_size=300, head_dim=8, sliding_window=4, sliding_window_pattern=2),
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4),
            mm_tokens_per_image=4,
            image_token_index=299,
            boi_token_index=297,
            eoi_token_index=298,
        ),
    ),
    "phi3": Family("phi3", dict(_GQA, pad_token_id=None)),
    "phi3-longrope": Family("phi3", LONGROPE),
    "olmo2": Family("olmo2", _GQA),
    "gpt_neox": Family("gpt_neox", dict(_T, rotary_pct=0.5)),
    "gpt2": Family("gpt2", dict(n_embd=32, n_layer=2, n_head=4, vocab_size=97)),
    "opt": Family("opt", dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=97)),
    "opt-350m-style": Family(
        "opt",
        dict(
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=97,
            word_embed_proj_dim=16,
            do_layer_norm_before=False,
        ),
    ),
    "mixtral-window": Family("mixtral", dict(_GQA, **_MOE, sliding_window=6)),
    "deepseek_v3-mla": Family("deepseek_v3", _MLA),
    "gpt_oss": Family("gpt_oss", dict(_GQA, **_MOE, head_dim=8, sliding_window=4)),
    "qwen2_moe-mask-only-window": Family(
        "qwen2_moe",
        dict(
            _GQA,
            use_sliding_window=True,
            sliding_window=4,
            max_window_layers=2,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=16,
        ),
    ),
    "phimoe-mask-only-window": Family("phimoe", dict(_GQA, **_MOE, sliding_window=5)),
    "starcoder2-window": Family("starcoder2", dict(_GQA, sliding_window=4)),
    # ---------------------------------------------------------------- refused on some or all versions
    # GPT-J's attention goes through AttentionInterface from transformers 5.24 on (exact there, both layouts).
    "gptj": Family(
        "gptj", dict(n_embd=32, n_layer=2, n_head=4, vocab_size=97, rotary_dim=4), {"<5.24": "AttentionInterface"}
    ),
    "bloom": Family(
        "bloom", dict(hidden_size=32, n_layer=2, n_head=4, vocab_size=97), {ALL_VERSIONS: "AttentionInterface"}
    ),
    "falcon": Family(
        "falcon",
        dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=97),
        {ALL_VERSIONS: "itself"},
    ),
    "gpt_neo": Family(
        "gpt_neo",
        dict(hidden_size=32, num_layers=2, num_heads=4, vocab_size=97, attention_types=[[["global", "local"], 1]]),
        {ALL_VERSIONS: "AttentionInterface"},
    ),
    "mpt": Family("mpt", dict(d_model=32, n_layers=2, n_heads=4, vocab_size=97), {ALL_VERSIONS: "AttentionInterface"}),
    "codegen": Family(
        "codegen", dict(n_embd=32, n_layer=2, n_head=4, vocab_size=97, rotary_dim=4), {ALL_VERSIONS: "sequence-class"}
    ),
    "stablelm": Family("stablelm", _GQA, {ALL_VERSIONS: "keyword arguments"}),
    "nemotron": Family("nemotron", _GQA, {ALL_VERSIONS: "keyword arguments"}),
    "qwen3_next": Family("qwen3_next", dict(_GQA, head_dim=8), {ALL_VERSIONS: "linear_attention"}),
    "jamba": Family("jamba", _GQA, {ALL_VERSIONS: "outside attention"}),
    "minimax": Family("minimax", _GQA, {ALL_VERSIONS: "linear_attention"}),
    "lfm2": Family("lfm2", dict(_GQA, layer_types=["conv", "full_attention"]), {ALL_VERSIONS: "conv"}),
    "llama4_text": Family(
        "llama4_text",
        dict(_GQA, head_dim=8, num_local_experts=2, intermediate_size_mlp=64, no_rope_layers=[1, 0]),
        {ALL_VERSIONS: "temperature tuning.*no sequence-classification class"},
    ),
    "granite": Family("granite", _GQA, {ALL_VERSIONS: "sequence-classification"}),
}


def family_config(model_type: str, kwargs: dict, init: float = 0.2):
    """A transformers config of ``model_type``; weights drawn wider than HF's default (``init``) so attention is
    peaked enough for a lost mask to show."""
    from transformers import CONFIG_MAPPING, AutoConfig

    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"the installed transformers has no model type {model_type!r}")
    kwargs = dict(kwargs, initializer_range=init)
    if "text_config" in kwargs:
        kwargs["text_config"] = dict(kwargs["text_config"], initializer_range=init)
    return AutoConfig.for_model(model_type, **kwargs)


def rand_pairs(n, seed, vocab=97, plen=(3, 9), rlen=(4, 11)):
    rng = random.Random(seed)
    ids = lambda k: [rng.randrange(vocab) for _ in range(k)]  # noqa: E731
    return [
        types.SimpleNamespace(
            prompt_ids=ids(rng.randint(*plen)),
            chosen_ids=ids(rng.randint(*rlen)),
            rejected_ids=ids(rng.randint(*rlen)),
            margin=None,
            source=f"pair{i}",
        )
        for i in range(n)
    ]
