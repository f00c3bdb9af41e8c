"""LoRA for the seq2seq reward model (issue 23 item 1): PEFT adapters in the causal LM, nothing else trained (the LM
head and final norm frozen); loss and adapter gradients equal stock transformers + PEFT (CAUSAL_LM) per sequence;
the adapter folder loads in stock PEFT and in fastrm; merge-lora and resume."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from test_seq2seq import TOK, reference_loss, stock_lm, trainer_for

from fastrm.loading import load_model
from fastrm.seq2seq import pack_branches
from fastrm.seq2seq_rewards import scoring_branches, token_rewards
from fastrm.synthetic import synthetic_pairs

peft = pytest.importorskip("peft")
LORA = dict(lora_r=4, lora_alpha=8, lora_dropout=0.0)


def _peft_key(key: str) -> str:
    """fastrm's adapter key -> the key in a stock PeftModelForCausalLM of the same LM."""
    return "base_model.model.model." + key.removeprefix("backbone.")


def _stock_peft(lm, tr):
    """Stock PEFT on the same LM, with fastrm's adapter weights (their B made non-zero first, in both models, so that
    every adapter has a gradient)."""
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in tr.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    cfg = peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=tr.model.lora.config.target_modules)
    ref = peft.get_peft_model(copy.deepcopy(lm), cfg)
    theirs = dict(ref.named_parameters())
    with torch.no_grad():
        for name, p in tr.model.named_parameters():
            if ".lora_" in name:
                theirs[_peft_key(name)].copy_(p)
    return ref


@pytest.mark.parametrize("dtype,shared", [(torch.float64, True), (torch.float32, False), (torch.float32, True)])
def test_lora_loss_and_adapter_gradients_equal_stock_peft(tmp_path, dtype, shared):
    rows = synthetic_pairs(8, seed=4)
    lm = stock_lm("tiny-llama", dtype)
    tr = trainer_for(lm, tmp_path, rows, prefix_sharing=shared, max_tokens_per_batch=300, pairs_per_step=8, **LORA)
    trainable = [n for n, p in tr.model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)  # nothing but the adapters: no head, no norm
    ref = _stock_peft(lm, tr)
    r = tr.accumulate_gradients(tr.train_pairs, tr.objective.step_units(tr.train_pairs))
    assert r["micro_batches"] >= 2
    loss, n = reference_loss(ref, rows)
    (loss / n).backward()
    assert float(r["sums"][0]) == pytest.approx(float(loss.detach()), rel=1e-5)
    theirs = dict(ref.named_parameters())
    tol = dict(rtol=1e-6, atol=1e-8) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-6)
    for name in trainable:
        got, want = dict(tr.model.named_parameters())[name].grad, theirs[_peft_key(name)].grad
        assert want is not None and float(want.abs().max()) > 0, name
        torch.testing.assert_close(got, want, **tol, msg=name)
    assert tr.model.lm_head.weight.grad is None


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A LoRA seq2seq run of 4 steps with a checkpoint at step 2: (trainer, its folder)."""
    out = tmp_path_factory.mktemp("s2s-lora") / "run"
    lm = stock_lm("tiny-llama")
    head = lm.lm_head.weight.detach().clone()
    tr = trainer_for(
        lm, out, synthetic_pairs(32, seed=2), max_steps=4, pairs_per_step=8, save_steps=2, learning_rate=3e-3, **LORA
    )
    tr.args.save_final = True
    tr.train()
    assert torch.equal(tr.model.lm_head.weight.detach().cpu(), head)  # the LM head never moved
    return tr, out


def test_the_adapter_folder_loads_in_stock_peft_and_in_fastrm(trained):
    from transformers import AutoModelForCausalLM

    tr, out = trained
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["task_type"] == "CAUSAL_LM" and not cfg.get("modules_to_save")
    assert (out / "fastrm_seq2seq.json").is_file() and (out / "lora_base" / "config.json").is_file()
    stock = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(cfg["base_model_name_or_path"]), out)
    stock.eval()
    model = tr.model.cpu().eval()
    prompt, responses = "Say something about Bob.\n", [" Bob is kind.", " Bob is rude and lazy."]
    p_ids, branches = scoring_branches(model, TOK, prompt, responses)
    _, logp = model.predictions(pack_branches([p_ids], [branches], "shared_prompt"))
    k = 0
    for inp, y in branches:  # each branch alone through stock transformers + PEFT: the target log-probs
        ids = torch.tensor([p_ids + inp + y])
        with torch.no_grad():
            lp = torch.log_softmax(stock(input_ids=ids).logits[0].float(), -1)
        start = len(p_ids) + len(inp) - 1
        want = lp[torch.arange(start, start + len(y)), torch.tensor(y)]
        torch.testing.assert_close(logp[k : k + len(y)].float(), want, rtol=1e-4, atol=1e-5)
        k += len(y)
    loaded = load_model(str(out))
    assert loaded.lora is not None and token_rewards(loaded, prompt, responses) == token_rewards(
        model, prompt, responses, tokenizer=TOK
    )


def test_merge_lora_writes_a_plain_seq2seq_folder_with_the_same_rewards(trained, tmp_path):
    from transformers import AutoModelForCausalLM

    from fastrm.cli import main

    tr, out = trained
    merged = tmp_path / "merged"
    assert main(["merge-lora", str(out), str(merged)]) == 0
    assert not (merged / "adapter_config.json").exists() and (merged / "fastrm_seq2seq.json").is_file()
    AutoModelForCausalLM.from_pretrained(merged)  # a plain causal LM
    prompt, responses = "What do you think of Ada?\n", [" Ada is kind.", " Ada is rude."]
    got = token_rewards(load_model(str(merged)), prompt, responses)
    assert got == token_rewards(load_model(str(out)), prompt, responses)


def test_resume_from_a_step_checkpoint_restores_the_adapters_exactly(trained, tmp_path):
    tr, out = trained
    again = trainer_for(
        stock_lm("tiny-llama"),
        tmp_path / "again",
        synthetic_pairs(32, seed=2),
        max_steps=4,
        pairs_per_step=8,
        learning_rate=3e-3,
        **LORA,
    )
    again.args.resume_from_checkpoint = str(out / "checkpoint-2")
    again.train()
    want = {k: v for k, v in tr.model.state_dict().items() if ".lora_" in k}
    got = again.model.state_dict()
    for k, v in want.items():
        torch.testing.assert_close(got[k].cpu(), v.cpu(), rtol=0, atol=1e-7, msg=k)
