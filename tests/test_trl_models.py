"""Every model the TRL drop-in accepts trains, saves and reloads; every one it cannot train exactly or save is
refused before a step runs, with the module named.

For each accepted kind: construct, train one step (with a step checkpoint, as TRL's default save strategy writes
one), save_model(), and load both folders with transformers: the same rewards as ``trainer.model``, and the trained
head is the one the user's own object uses (a PEFT ``modules_to_save`` copy included). Plus TRL's
``model_init_kwargs`` (honoured or refused by name) and the trainer attributes TRL scripts and callbacks touch.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification  # noqa: E402

from fastrm.integrations.trl import RewardTrainer  # noqa: E402
from fastrm.loading import load_model  # noqa: E402
from fastrm.presets import resolve_config  # noqa: E402
from fastrm.synthetic import byte_tokenizer, synthetic_pairs  # noqa: E402

TEXTS = ["Say hi.\n Hi there!<|endoftext|>", "Say hi.\n Go<|endoftext|>", "Why?\n Because.<|endoftext|>"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny Llama as a causal-LM folder and as a sequence-classification folder, each with its tokenizer."""
    tok = byte_tokenizer()
    cfg = resolve_config("tiny-llama", len(tok))
    cfg.pad_token_id = tok.pad_token_id
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(root / "lm")
    cfg.num_labels = 1
    AutoModelForSequenceClassification.from_config(cfg).save_pretrained(root / "seqcls")
    for name in ("lm", "seqcls"):
        tok.save_pretrained(root / name)
    return root


def config(out, **kw):
    base = dict(
        output_dir=str(out),
        bf16=False,
        use_cpu=True,
        per_device_train_batch_size=8,
        max_steps=1,
        learning_rate=3e-3,
        save_strategy="steps",
        save_steps=1,
        report_to="none",
        disable_tqdm=True,
    )
    return trl.RewardConfig(**{**base, **kw})


def data(n=8):
    return datasets.Dataset.from_list(synthetic_pairs(n, seed=1))


def rewards(model) -> torch.Tensor:
    tok = byte_tokenizer()
    batch = tok(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model.eval()(**batch).logits[:, 0].float()


def seq_cls(folders):
    return AutoModelForSequenceClassification.from_pretrained(folders / "seqcls", num_labels=1)


def wrapped_head(folders):
    """The head as PEFT's modules_to_save=["score"] leaves it: a ModulesToSaveWrapper whose copy is trained."""
    peft = pytest.importorskip("peft")
    m = seq_cls(folders)
    m.score = peft.utils.ModulesToSaveWrapper(m.score, "default")
    return m


KINDS = {  # name -> (build(folders) -> model argument, extra config, the user's object is the reward model)
    "causal-lm path": (lambda f: str(f / "lm"), {}, False),
    "seq-cls path": (lambda f: str(f / "seqcls"), {}, False),
    "preset name": (lambda f: "tiny-llama", {}, False),
    "bf16 weights (model_init_kwargs)": (lambda f: str(f / "lm"), {"model_init_kwargs": {"dtype": "bfloat16"}}, False),
    "seq-cls object": (seq_cls, {}, True),
    "PEFT-wrapped head": (wrapped_head, {}, True),
    "causal-lm object": (lambda f: AutoModelForCausalLM.from_pretrained(f / "lm"), {}, False),
    "fastrm RewardModel": (lambda f: load_model(f / "seqcls"), {}, False),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_model_kind_trains_one_step_saves_and_reloads(tmp_path, folders, kind):
    build, extra, user_is_reward_model = KINDS[kind]
    model = build(folders)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr = RewardTrainer(
            model, config(tmp_path / "run", **extra), train_dataset=data(), processing_class=byte_tokenizer()
        )
    if kind == "causal-lm object":  # a new head: said, not silent
        assert any("new score head" in str(w.message) and "trainer.model" in str(w.message) for w in caught)
    before = rewards(tr.model)
    head = tr.reward_model.score
    w0 = head.weight.detach().clone()
    tr.train()
    assert not torch.equal(head.weight, w0), "the head did not train"
    after = rewards(tr.model)
    assert not torch.allclose(after, before)
    tr.save_model(tmp_path / "final")
    tol = dict(rtol=2e-2, atol=2e-2) if "bf16" in kind else dict(rtol=1e-5, atol=1e-6)
    for folder in (tmp_path / "final", tmp_path / "run" / "checkpoint-1"):  # the step checkpoint as well
        saved = AutoModelForSequenceClassification.from_pretrained(folder)
        torch.testing.assert_close(rewards(saved), after, **tol)
    if user_is_reward_model:  # the user's own object scores with the trained head (issue: it kept an untrained one)
        assert tr.model is model
        torch.testing.assert_close(rewards(model), after)
    if kind == "PEFT-wrapped head":
        assert head is model.score.modules_to_save["default"]  # PEFT's trainable copy, not a new head
        torch.testing.assert_close(model.score.original_module.weight, seq_cls(folders).score.weight)  # untouched


def lora_injected(folders):
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(target_modules=["q_proj", "v_proj"], modules_to_save=["score"])
    return peft.inject_adapter_in_model(cfg, seq_cls(folders))


def peft_model(folders):
    peft = pytest.importorskip("peft")
    return peft.get_peft_model(seq_cls(folders), peft.LoraConfig(task_type="SEQ_CLS", target_modules=["q_proj"]))


def head_with_bias(folders):
    m = seq_cls(folders)
    m.score = nn.Linear(m.score.in_features, 1, bias=True)
    return m


def mlp_head(folders):
    m = seq_cls(folders)
    m.score = nn.Sequential(nn.Linear(m.score.in_features, 1, bias=False))
    return m


def no_active_copy(folders):
    m = wrapped_head(folders)
    m.score.set_adapter([])  # its forward would fail: no copy to run
    return m


REFUSED = {  # name -> (build, the message names ...)
    "LoRA injected in place": (
        lora_injected,
        r"model\.model\.layers\.0\.self_attn\.q_proj is a PEFT lora .*peft_config=LoraConfig",
    ),
    "PeftModel": (peft_model, r"PeftModelForSequenceClassification \(PEFT adapters\).*merge_and_unload"),
    "head with a bias": (head_with_bias, r"model\.score has a bias.*bias=False"),
    "non-Linear head": (mlp_head, r"model\.score is a Sequential, not the nn\.Linear"),
    "no active PEFT copy": (no_active_copy, r"ModulesToSaveWrapper with 0 active adapters"),
    "token classification": (
        lambda f: transformers.LlamaForTokenClassification.from_pretrained(f / "seqcls", num_labels=1),
        r"LlamaForTokenClassification: pass a \*ForSequenceClassification",
    ),
    "num_labels=2": (
        lambda f: AutoModelForSequenceClassification.from_config(
            transformers.AutoConfig.from_pretrained(f / "seqcls", num_labels=2)
        ),
        "num_labels=2",
    ),
}


@pytest.mark.parametrize("kind", list(REFUSED))
def test_models_fastrm_cannot_train_exactly_or_save_are_refused_before_training(tmp_path, folders, kind):
    build, message = REFUSED[kind]
    model = build(folders)
    with pytest.raises(ValueError, match=message):
        RewardTrainer(model, config(tmp_path / "run"), train_dataset=data(), processing_class=byte_tokenizer())
    assert not (tmp_path / "run").exists()  # nothing trained, nothing written


def test_peft_config_that_would_freeze_the_head_is_refused_naming_the_field(tmp_path, folders):
    """A LoraConfig without task_type='SEQ_CLS' or modules_to_save=['score'] leaves the head frozen in stock TRL +
    PEFT; fastrm trains it fully, so it refuses instead (LoRA runs: tests/test_lora.py)."""
    peft = pytest.importorskip("peft")
    with pytest.raises(ValueError, match=r"peft_config: field 'modules_to_save'=None: with task_type=None"):
        RewardTrainer(str(folders / "lm"), config(tmp_path), train_dataset=data(), peft_config=peft.LoraConfig(r=8))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"revision": "v2"}, r"revision='v2' \(the model is the local path"),
        ({"dtype": "float16"}, r"dtype=float16 \(fastrm trains float32 or bfloat16"),
        ({"dtype": "int8"}, r"dtype='int8'"),
        ({"device_map": "auto"}, r"device_map \(fastrm places the model itself"),
        ({"quantization_config": {"load_in_4bit": True}}, "quantization_config"),
        ({"num_labels": 3}, "num_labels"),
        ({"rope_scaling": {"type": "linear"}}, r"rope_scaling=\{'type': 'linear'\} \(not implemented\)"),
    ],
)
def test_model_init_kwargs_fastrm_cannot_honour_are_refused_by_name(tmp_path, folders, kwargs, message):
    with pytest.raises(ValueError, match="cannot honour these model_init_kwargs: .*" + message):
        RewardTrainer(str(folders / "lm"), config(tmp_path, model_init_kwargs=kwargs), train_dataset=data())


def test_model_init_kwargs_are_honoured(tmp_path, folders):
    # what TRL's reward script always passes, at its defaults, plus the attention trainer.model runs between calls
    kwargs = {"revision": "main", "trust_remote_code": False, "attn_implementation": "eager", "dtype": "float32"}
    tr = RewardTrainer(str(folders / "lm"), config(tmp_path, model_init_kwargs=kwargs), train_dataset=data())
    assert tr.model.config._attn_implementation == "eager" and tr.model.dtype == torch.float32
    tr = RewardTrainer(
        "tiny-llama",
        config(tmp_path, model_init_kwargs={"dtype": "bfloat16"}),
        train_dataset=data(),
        processing_class=byte_tokenizer(),
    )
    assert {p.dtype for p in tr.reward_model.parameters()} == {torch.bfloat16}  # a random init is cast
    with pytest.warns(UserWarning, match="model_init_kwargs are ignored: the model is already instantiated"):
        RewardTrainer(seq_cls(folders), config(tmp_path, model_init_kwargs={"dtype": "bfloat16"}), train_dataset=data())


def test_trainer_attributes_scripts_and_callbacks_use(tmp_path, folders, capsys):
    tr = RewardTrainer(str(folders / "seqcls"), config(tmp_path, save_strategy="no"), train_dataset=data())
    acc = tr.accelerator
    assert acc.is_main_process and acc.is_local_main_process and (acc.process_index, acc.num_processes) == (0, 1)
    assert acc.unwrap_model(tr.model) is tr.model and acc.device.type == "cpu"
    acc.wait_for_everyone()
    with acc.main_process_first():
        acc.print("printed once")
    assert capsys.readouterr().out == "printed once\n"
    with pytest.raises(AttributeError, match="runs no accelerate.Accelerator"):
        acc.gather_for_metrics()
    tr.train()
    assert (tr.state.global_step, tr.state.max_steps, tr.state.train_batch_size) == (1, 1, 8)
    assert tr.state.is_world_process_zero and tr.is_world_process_zero() and tr.is_local_process_zero()
    assert tr.state.num_input_tokens_seen > 0 and tr.optimizer is tr._trainer.optimizer and tr.lr_scheduler
    tr.log({"custom": 1.5})
    assert tr.state.log_history[-1]["custom"] == 1.5
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["custom"] == 1.5
    tr.save_state()
    assert json.loads((tmp_path / "trainer_state.json").read_text())["global_step"] == 1
    with pytest.raises(NotImplementedError, match="does not push to a model hub.*upload that folder"):
        tr.push_to_hub(dataset_name="data")
    tr.end()  # what TRL's scripts call last
    with pytest.raises(ValueError, match=r"push_to_hub=True \(fastrm uploads nothing to a model hub"):
        RewardTrainer(str(folders / "seqcls"), config(tmp_path, push_to_hub=True), train_dataset=data())


def test_a_missing_model_or_tokenizer_is_named(tmp_path):
    with pytest.raises(ValueError, match="model 'some-org/missing': no such file or folder"):
        RewardTrainer("some-org/missing", config(tmp_path), train_dataset=data())
    with pytest.raises(ValueError, match="processing_class is required: the model 'tiny-llama' holds no tokenizer"):
        RewardTrainer("tiny-llama", config(tmp_path), train_dataset=data())
