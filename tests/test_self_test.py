"""The construction self-test (fastrm/self_test.py) catches what it exists for: each bug below is planted with a
monkeypatch, must be refused, and is gone again after the test. Tiny configs of tests/backbone_families.py."""

import dataclasses

import pytest
import torch
from backbone_families import FAMILIES, GQA, family_config

from fastrm import attention, backbones, packing
from fastrm.backbones import UnsupportedBackbone
from fastrm.model import RewardModel
from fastrm.self_test import plan_lengths


def build(model_type, kwargs, seed=0, **kw):
    torch.manual_seed(seed)
    return RewardModel.from_config(family_config(model_type, kwargs), **kw)


def wrap_varlen(monkeypatch, change):
    """Plant a bug in the packed attention only: ``change(q, kwargs)`` edits the keyword arguments of
    attention.varlen_attention (eager attention never calls it)."""
    orig = attention.varlen_attention

    def planted(q, k, v, plan, **kw):
        change(q, kw)
        return orig(q, k, v, plan, **kw)

    monkeypatch.setattr(attention, "varlen_attention", planted)


def scale_by(factor, q, kw):
    kw["scale"] = factor * (q.shape[-1] ** -0.5 if kw.get("scale") is None else kw["scale"])


# ---------------------------------------------------------------- inputs from the config
def test_inputs_go_past_every_window_and_shrink_large_ones():
    assert plan_lengths(build("mistral", dict(GQA, sliding_window=16), self_test=False)) == (19, {})
    assert plan_lengths(build("llama", GQA, self_test=False)) == (16, {})  # nothing length-dependent: 16 tokens
    longest, shrink = plan_lengths(build("mistral", dict(GQA, sliding_window=4096), self_test=False))
    assert shrink == {4096: 8} and longest == 16  # a real checkpoint's window costs what a small one does
    assert plan_lengths(build(*FAMILIES_KW("phi3-longrope"), self_test=False))[0] == 27  # past the original 24
    gpt2 = build("gpt2", dict(n_embd=32, n_layer=2, n_head=4, vocab_size=97, n_positions=12), self_test=False)
    assert plan_lengths(gpt2)[0] == 12  # learned positions end there


def FAMILIES_KW(name):
    return FAMILIES[name].model_type, FAMILIES[name].kwargs


def test_a_shrunk_window_is_tested_through_the_same_code_and_restored(monkeypatch):
    """Window 4096 runs as 8 in the test; an off-by-one there is caught; the config and layers get 4096 back."""
    model = build("qwen2", dict(GQA, use_sliding_window=True, sliding_window=4096, max_window_layers=1))
    report = backbones.self_test(model)
    assert report["windows_shrunk"] == {4096: 8} and report["longest"] == 16
    assert model.backbone.config.sliding_window == 4096
    assert {m.sliding_window for m in model.backbone.modules() if hasattr(m, "sliding_window")} == {4096, None}
    orig = attention._layer_window
    monkeypatch.setattr(attention, "_layer_window", lambda *a: (w := orig(*a)) and w + 1)
    with pytest.raises(UnsupportedBackbone, match=r"qwen2.*windows 4096 -> 8 for the test"):
        backbones.self_test(model)


# ---------------------------------------------------------------- the planted bugs of issues 29 and 33
def test_window_off_by_one_at_16_on_mistral_is_refused(monkeypatch):
    build("mistral", dict(GQA, sliding_window=16))  # exact as it is
    orig = attention._layer_window
    monkeypatch.setattr(attention, "_layer_window", lambda *a: 17 if orig(*a) == 16 else orig(*a))
    with pytest.raises(UnsupportedBackbone, match=r"mistral.*scoring pass.*differs from its eager attention"):
        build("mistral", dict(GQA, sliding_window=16))


def test_a_mask_error_only_in_the_training_path_is_refused(monkeypatch):
    """The masked path (shared prompts with gradients on the CPU) lets each query see one key ahead; scoring takes
    other kernels and stays exact, so only the training pass can see it."""
    from fastrm.packing import pack_prompt_responses

    model = build("llama", GQA)
    batch = pack_prompt_responses([[5, 6, 7], [8]], [[[9, 10, 11], [12]], [[13, 14]]], "shared_prompt")
    with torch.no_grad():
        want = model(batch)
    orig = attention._keep
    monkeypatch.setattr(attention, "_keep", lambda Q, K, w, d: orig(Q, K, w, d) | orig(Q, K, w, d).roll(1, dims=1))
    with torch.no_grad():
        torch.testing.assert_close(model(batch), want, rtol=0, atol=0)  # scoring does not see the planted bug
    with pytest.raises(UnsupportedBackbone, match=r"llama.*training pass \(shared_prompt layout"):
        backbones.self_test(model)


def test_a_5_percent_attention_scale_error_in_bf16_is_refused(monkeypatch):
    """Only bf16 attention is scaled wrong, so the fp32 pass cannot see it: the calibrated bf16 tolerance must."""
    model = build("llama", GQA).to(torch.bfloat16)
    report = backbones.self_test(model)  # correct bf16 passes its calibrated tolerances
    assert report["calibrated"] and report["fp32_pass"]

    wrap_varlen(monkeypatch, lambda q, kw: q.dtype == torch.bfloat16 and scale_by(1.05, q, kw))
    with pytest.raises(UnsupportedBackbone, match=r"llama.*bfloat16.*x eager's own error"):
        backbones.self_test(model)


def test_a_pooled_row_one_token_early_is_refused(monkeypatch):
    """Issue 33: the packer pools the token before each sequence's last."""
    orig = packing._pack_groups

    def early(*a):
        batch, pooled = orig(*a)
        return dataclasses.replace(batch, pool_index=batch.pool_index - 1), [[r - 1 for r in rs] for rs in pooled]

    monkeypatch.setattr(packing, "_pack_groups", early)
    with pytest.raises(UnsupportedBackbone, match=r"llama.*pools rows \[14, 24,.* end at rows \[15, 25,"):
        build("llama", GQA)


def test_rewards_are_checked_at_the_pooled_rows_through_the_models_own_forward(monkeypatch):
    """A forward that pools one row early, or skips the final norm, on a correct batch: only the rewards show it."""
    orig = RewardModel.forward
    shifted = lambda self, b, *a, **k: orig(self, dataclasses.replace(b, pool_index=b.pool_index - 1), *a, **k)  # noqa: E731
    monkeypatch.setattr(RewardModel, "forward", shifted)
    with pytest.raises(UnsupportedBackbone, match=r"llama.*gives reward .* where final norm \+ head on its last"):
        build("llama", GQA)
    monkeypatch.setattr(RewardModel, "forward", orig)
    monkeypatch.setattr(RewardModel, "head", lambda self, pooled: self.score(pooled).squeeze(-1).float())
    with pytest.raises(UnsupportedBackbone, match=r"llama.*gives reward"):
        build("llama", GQA)


@pytest.mark.parametrize("name", ["gpt2", "llama-attention-dropout"])
def test_a_config_with_dropout_runs_the_training_pass_in_train_mode(name, monkeypatch):
    """GPT-2's default dropout (0.1 everywhere) and Llama's attention dropout: the training pass runs in train mode
    with fixed dropout masks and is exact; packed attention that drops the dropout in training is refused."""
    if name == "gpt2":
        cfg = ("gpt2", dict(n_embd=32, n_layer=2, n_head=4, vocab_size=97))
    else:
        cfg = ("llama", dict(GQA, attention_dropout=0.3))
    report = backbones.self_test(build(*cfg, self_test=False))
    assert report["train_mode"]
    wrap_varlen(monkeypatch, lambda q, kw: kw.update(dropout_p=0.0))
    with pytest.raises(UnsupportedBackbone, match=r"training pass in train mode, fixed dropout masks"):
        build(*cfg)


def test_train_mode_randomness_besides_dropout_falls_back_to_eval_mode():
    """Mixtral's router jitter draws random numbers in train mode: no two runs agree, so the training pass runs in
    eval mode (and passes) instead of refusing an exact backbone."""
    jitter = dict(GQA, num_local_experts=4, num_experts_per_tok=2, router_jitter_noise=0.5, attention_dropout=0.1)
    model = build("mixtral", jitter, self_test=False)
    assert backbones.self_test(model)["train_mode"] is False


# ---------------------------------------------------------------- behaviour kept from the first self-test
def test_self_test_refuses_a_lost_window_and_can_be_turned_off(monkeypatch):
    model_type, kw = FAMILIES_KW("mistral-window")
    monkeypatch.setattr(attention, "_layer_window", lambda *a: None)
    with pytest.raises(UnsupportedBackbone, match=r"mistral.*differs from its eager attention.*tolerance"):
        RewardModel.from_config(family_config(model_type, kw))
    RewardModel.from_config(family_config(model_type, kw), self_test=False)  # the caller's risk


def test_self_test_refuses_layers_that_drop_the_plan(monkeypatch):
    """A family whose layers drop **kwargs (known ones are refused by name) is caught by the self-test too."""
    monkeypatch.setattr(backbones, "_DROPS_KWARGS", set())
    with pytest.raises(UnsupportedBackbone, match="nemotron.*do not pass keyword arguments"):
        RewardModel.from_config(family_config("nemotron", GQA))


def test_self_test_of_a_model_built_on_cpu_for_a_cuda_backend():
    """A back end named for later (the model moves to CUDA after construction) does not fail the CPU self-test."""
    model = RewardModel.from_config(family_config(*FAMILIES_KW("llama")), attn_backend="flash")
    assert model.attn_backend == "flash"


def test_self_test_restores_mode_attention_and_weights_and_leaves_the_rng_alone():
    model = RewardModel.from_config(family_config(*FAMILIES_KW("gemma2")), self_test=False).train()
    model.score.eval()
    model = model.to(torch.bfloat16)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(5)
    rng = torch.get_rng_state()
    assert backbones.self_test(model)["fp32_pass"]
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.backbone.training and not model.score.training
    assert model.backbone.config._attn_implementation == attention.ATTN_NAME
    for k, v in model.state_dict().items():  # bf16 -> fp32 -> bf16 for the reference is lossless
        assert v.dtype == state[k].dtype and torch.equal(v, state[k]), k
    assert torch.nn.functional.dropout.__module__ == "torch.nn.functional"


def test_the_run_is_tested_again_only_for_a_new_back_end_or_precision(monkeypatch):
    from fastrm import self_test as st

    calls = []
    orig = st.self_test
    monkeypatch.setattr(st, "self_test", lambda m, **kw: calls.append(kw) or orig(m, **kw))
    model = build("llama", GQA)
    backbones.self_test_for_run(model)  # fp32 on the CPU: tested at construction
    assert calls == []
    backbones.self_test_for_run(model, autocast=torch.bfloat16)  # what `--bf16 true` trains in
    backbones.self_test_for_run(model, autocast=torch.bfloat16)
    assert calls == [{"autocast": torch.bfloat16}]
    backbones.self_test_for_run(build("llama", GQA, self_test=False), autocast=torch.bfloat16)  # the caller's risk
    assert len(calls) == 1


# ---------------------------------------------------------------- on the device (what the trainer runs there)
@pytest.mark.gpu
@pytest.mark.parametrize("name", ["llama", "mistral-window", "gemma2", "gpt_oss", "qwen2_moe-mask-only-window"])
def test_on_cuda_the_self_test_passes_under_bf16_autocast(name):
    """The trainer's self_test_for_run on a GPU: the auto back end (flash / torch_varlen where exact), autocast."""
    model = build(*FAMILIES_KW(name)).cuda()
    report = backbones.self_test(model, autocast=torch.bfloat16)
    assert report["calibrated"] and "cuda" in report["precision"], report


@pytest.mark.gpu
def test_on_cuda_a_5_percent_attention_scale_error_under_autocast_is_refused(monkeypatch):
    model = build("llama", GQA).cuda()
    wrap_varlen(monkeypatch, lambda q, kw: scale_by(1.05, q, kw))
    with pytest.raises(UnsupportedBackbone, match=r"llama.*bfloat16 autocast.*x eager's own error"):
        backbones.self_test(model, autocast=torch.bfloat16)
