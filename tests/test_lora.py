"""LoRA reward models (fastrm/lora.py) against stock transformers + PEFT.

The reference is written here: an ``AutoModelForSequenceClassification`` loaded from the same base weights, wrapped
by ``peft.get_peft_model`` with an explicit ``LoraConfig``, run in eager attention one sequence at a time. Adapters
and head are drawn at random on the reference and copied into fastrm's model by name (so B != 0 and every adapter
matters). Checked: rewards and the gradients of every trainable parameter (adapters and head) in both layouts,
dropout masks in train mode, which modules get adapters by default, the adapter folder through stock
``PeftModel.from_pretrained`` on padded batches, PEFT's merge and fastrm's, resume, and the refusals.
"""

from __future__ import annotations

import json

import pytest
import torch

peft = pytest.importorskip("peft")

from backbone_families import FAMILIES, family_config, rand_pairs  # noqa: E402
from transformers import AutoModelForSequenceClassification  # noqa: E402

from fastrm import lora  # noqa: E402
from fastrm.config import RewardConfig  # noqa: E402
from fastrm.model import RewardModel  # noqa: E402
from fastrm.packing import pack_pairs, pack_prompt_responses  # noqa: E402
from fastrm.synthetic import byte_tokenizer, synthetic_pairs  # noqa: E402
from fastrm.tokenization import load_tokenized  # noqa: E402
from fastrm.trainer import RewardTrainer  # noqa: E402

# The attention and MLP projections by family, as a user would list them (the default must find exactly these).
PROJECTIONS = {
    "tiny-llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "tiny-gpt2": ["c_attn", "c_proj", "c_fc"],
    "tiny-neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
}
LAYOUTS = ("separate", "shared_prompt")


def base_model(preset_or_config, tmp_path, seed=0):
    """A fastrm model and the same weights saved as a plain HF folder (the base both sides load)."""
    torch.manual_seed(seed)
    m = RewardModel.from_config(preset_or_config).eval()
    m.save_plain(tmp_path / "base")
    return m, tmp_path / "base"


def stock(base_dir, targets, r=4, alpha=8, dropout=0.0):
    hf = AutoModelForSequenceClassification.from_pretrained(base_dir, attn_implementation="eager")
    cfg = peft.LoraConfig(task_type="SEQ_CLS", r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets)
    return peft.get_peft_model(hf, cfg).eval()


def tie(ours, ref, seed=1, scale=0.3):
    """Random adapters and head on ``ref``, the same values in ``ours``; returns our name -> reference name. Both
    must have the same trainable parameters (the same modules adapted, the head, nothing else)."""
    prefix = ours.backbone.base_model_prefix
    names = {}
    for n, p in ours.named_parameters():
        if p.requires_grad:
            names[n] = (
                "base_model.model.score.modules_to_save.default.weight"
                if n == "score.weight"
                else f"base_model.model.{prefix}.{n[len('backbone.') :]}"
            )
    ref_trainable = {n for n, p in ref.named_parameters() if p.requires_grad}
    assert set(names.values()) == ref_trainable
    ours_p, ref_p = dict(ours.named_parameters()), dict(ref.named_parameters())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, rn in names.items():
            v = torch.randn(ref_p[rn].shape, generator=g) * scale
            ref_p[rn].copy_(v)
            ours_p[n].copy_(v)
    return names


def sequences(pairs):
    """Every (prompt + response) of ``pairs`` in pool order: chosen ones, then rejected ones."""
    return [p.prompt_ids + getattr(p, f) for f in ("chosen_ids", "rejected_ids") for p in pairs]


@pytest.mark.parametrize("preset", list(PROJECTIONS))
def test_rewards_and_gradients_equal_stock_peft_one_sequence_at_a_time(preset, tmp_path):
    """Default targets == the projections named by hand; packed rewards and the gradients of adapters and head
    equal stock HF + PEFT eager per sequence, fp32, both layouts, prompts of length 0 and 1 included."""
    ours, base = base_model(preset, tmp_path)
    lora.apply(ours, lora.LoraSettings(4, 8.0, 0.0, None), seed=0)
    ref = stock(base, PROJECTIONS[preset])
    names = tie(ours, ref)
    frozen = [p for n, p in ours.named_parameters() if n.startswith(("final_norm", "backbone.")) and ".lora_" not in n]
    assert frozen and not any(p.requires_grad for p in frozen)  # every base weight, the lifted-out norm too
    pairs = rand_pairs(5, seed=2, vocab=90, plen=(0, 6), rlen=(1, 6))
    pairs[1].prompt_ids = [3]
    seqs = sequences(pairs)
    w = torch.linspace(-1.0, 2.0, len(seqs))
    for s, wi in zip(seqs, w):
        (ref(input_ids=torch.tensor([s])).logits[0, 0] * wi).backward()
    want_r = torch.stack([ref(input_ids=torch.tensor([s])).logits[0, 0] for s in seqs]).detach()
    ref_p = dict(ref.named_parameters())
    for layout in LAYOUTS:
        ours.zero_grad()
        r = ours(pack_pairs(pairs, layout))
        torch.testing.assert_close(r.detach(), want_r, rtol=1e-5, atol=1e-5, msg=layout)
        (r * w).sum().backward()
        for n, rn in names.items():
            g, want = dict(ours.named_parameters())[n].grad, ref_p[rn].grad
            # fp32 summation order: within 1e-5 of the tensor's largest entry (seen: 2e-6)
            torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-5 * want.abs().max().item(), msg=f"{layout} {n}")
        assert max(p.grad.abs().max().item() for n, p in ours.named_parameters() if "lora_A" in n) > 0


def test_gradient_checkpointing_and_micro_batches_give_the_same_step_gradient(tmp_path):
    """The trainer's path with adapters: the step gradient of a threshold loss (step-wide mu_B) with one
    micro-batch equals many micro-batches with gradient checkpointing on."""
    tok = byte_tokenizer()
    pairs, _ = load_tokenized(synthetic_pairs(24, seed=3), tok, max_length=128)
    grads = []
    for budget, ckpt in ((100_000, False), (160, True)):
        torch.manual_seed(0)
        m = RewardModel.from_config("tiny-llama")
        args = RewardConfig(
            output_dir=str(tmp_path),
            progress=False,
            loss="threshold",
            pairs_per_step=24,
            lora_r=4,
            max_tokens_per_batch=budget,
            gradient_checkpointing=ckpt,
        )
        tr = RewardTrainer(m, args, pairs, tokenizer=tok)
        with torch.no_grad():
            for n, p in tr.model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(n)))
        r = tr.accumulate_gradients(pairs, len(pairs))
        grads.append(
            (r["micro_batches"], {n: p.grad.clone() for n, p in tr.model.named_parameters() if p.requires_grad})
        )
    (n_one, g_one), (n_many, g_many) = grads
    assert n_one == 1 and n_many > 3
    for n, g in g_one.items():
        torch.testing.assert_close(g_many[n], g, rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-neox"])  # RMSNorm; LayerNorm with bias (both frozen)
def test_fused_head_step_equals_the_reference_step_with_adapters(preset, tmp_path):
    """The fused Triton head+loss op (the interpreter on CPU) under a frozen final norm: the same step gradient of
    every adapter and the head as the PyTorch head, and no gradient for the frozen norm."""
    tok = byte_tokenizer()
    pairs, _ = load_tokenized(synthetic_pairs(12, seed=5), tok, max_length=96)
    grads = {}
    for fused in (False, True):
        torch.manual_seed(0)
        args = RewardConfig(
            output_dir=str(tmp_path), progress=False, pairs_per_step=12, loss="threshold", lora_r=4, fused_head=fused
        )
        tr = RewardTrainer(RewardModel.from_config(preset), args, pairs, tokenizer=tok)
        with torch.no_grad():
            for n, p in tr.model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(n)))
        tr.accumulate_gradients(pairs, len(pairs))
        assert tr.model.use_fused(torch.device("cpu")) is fused
        assert all(p.grad is None for p in tr.model.final_norm.parameters())
        grads[fused] = {n: p.grad.clone() for n, p in tr.model.named_parameters() if p.requires_grad}
    for n, g in grads[False].items():
        torch.testing.assert_close(grads[True][n], g, rtol=1e-4, atol=1e-6, msg=n)


def test_dropout_draws_the_masks_peft_draws_in_train_mode(tmp_path):
    """lora_dropout: the same masks as stock PEFT's train mode from the same seed (dropout on the adapters' input
    only), none in eval mode."""
    ours, base = base_model("tiny-llama", tmp_path)
    lora.apply(ours, lora.LoraSettings(4, 8.0, 0.5, ("q_proj", "v_proj")), seed=0)
    ref = stock(base, ["q_proj", "v_proj"], dropout=0.5)
    tie(ours, ref)
    p = rand_pairs(1, seed=4, vocab=90)[0]
    one = pack_prompt_responses([p.prompt_ids], [[p.chosen_ids]], "separate")
    ids = torch.tensor([p.prompt_ids + p.chosen_ids])
    ours.train()
    ref.train()
    seen = set()
    for seed in (1, 2, 3):
        torch.manual_seed(seed)
        a = ours(one)[0]
        torch.manual_seed(seed)
        b = ref(input_ids=ids).logits[0, 0]
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        seen.add(round(a.item(), 6))
    assert len(seen) == 3  # the masks differ from seed to seed: dropout is on
    ours.eval()
    ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(one)[0], ref(input_ids=ids).logits[0, 0], rtol=1e-5, atol=1e-6)


SUPPORTED = [k for k, f in FAMILIES.items() if not f.refused]


@pytest.mark.parametrize("family", SUPPORTED)
def test_default_targets_are_the_projections_of_every_family(family, tmp_path):
    """Every supported family: the default adapters sit on the Linear projections of the decoder layers (no MoE
    router, nothing outside the layers, e.g. a vision tower), and the rewards equal stock HF + PEFT given that same
    list of modules (fully named, so nothing else can match)."""
    fam = FAMILIES[family]
    ours, base = base_model(family_config(fam.model_type, fam.kwargs), tmp_path)
    lora.apply(ours, lora.LoraSettings(2, 4.0, 0.0, None), seed=0)
    adapted = [n for n, _ in ours.backbone.named_modules() if n.endswith(".lora_A")]
    assert adapted and not any(w in n for n in adapted for w in ("router", "shared_expert_gate", "vision"))
    prefix = ours.backbone.base_model_prefix
    ref = stock(base, [f"{prefix}.{n[: -len('.lora_A')]}" for n in adapted], r=2, alpha=4)
    tie(ours, ref)
    pairs = rand_pairs(3, seed=5)
    with torch.no_grad():
        want = torch.stack([ref(input_ids=torch.tensor([s])).logits[0, 0] for s in sequences(pairs)])
        torch.testing.assert_close(ours(pack_pairs(pairs, "shared_prompt")), want, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------- folders


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A LoRA run (tiny-llama, random-init base: written to lora_base/) with merge_lora, and its eval pairs."""
    out = tmp_path_factory.mktemp("lora-run")
    tok = byte_tokenizer()
    torch.manual_seed(0)
    model = RewardModel.from_config("tiny-llama")
    args = RewardConfig(
        output_dir=str(out),
        progress=False,
        lora_r=4,
        lora_alpha=8,
        pairs_per_step=16,
        max_steps=12,
        save_steps=6,
        learning_rate=5e-3,
        warmup_ratio=0.0,
        merge_lora=True,
    )
    tr = RewardTrainer(model, args, synthetic_pairs(192, seed=1), synthetic_pairs(32, seed=2, flip=0.0), tokenizer=tok)
    before = tr.evaluate(plot=False)
    result = tr.train()
    return tr, out, {**result, "before": before}


def padded(seqs, pad_id, left=False):
    n = max(map(len, seqs))
    ids = [([pad_id] * (n - len(s)) + s) if left else (s + [pad_id] * (n - len(s))) for s in seqs]
    mask = [([0] * (n - len(s)) + [1] * len(s)) if left else ([1] * len(s) + [0] * (n - len(s))) for s in seqs]
    return torch.tensor(ids), torch.tensor(mask)


def hf_rewards(model, seqs, pad_id):
    """Rewards of a stock HF/PEFT model on right- and left-padded batches of ``seqs`` (both must agree)."""
    with torch.no_grad():
        right = model(*padded(seqs, pad_id)).logits[:, 0]
        left = model(*padded(seqs, pad_id, left=True)).logits[:, 0]
    torch.testing.assert_close(left, right, rtol=1e-5, atol=1e-5)
    return right


def test_training_learns_and_changes_only_the_adapters_and_the_head(trained):
    tr, out, result = trained
    before, after = result["before"], result["eval"]  # the synthetic task is learned through rank-4 adapters
    assert after["accuracy"] >= before["accuracy"] + 0.15 and after["bt_loss"] < before["bt_loss"] - 0.02
    base = RewardModel.from_pretrained(out / lora.BASE_DIR)  # the base as written at the first save
    own = tr.model.state_dict()
    for key, value in base.state_dict().items():
        if key.startswith("score."):
            assert not torch.equal(own[key], value)  # the head trained
            continue
        ours = own.get(key, own.get(key.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")))
        assert torch.equal(ours, value), key  # every base weight as it was
    trainable = sum(p.numel() for p in tr.model.parameters() if p.requires_grad)
    state = tr.optimizer.state_dict()["state"]
    assert sum(v["exp_avg"].numel() for v in state.values()) == trainable  # optimizer state for those only


def test_adapter_folder_loads_in_stock_peft_merges_and_reloads_with_the_same_rewards(trained, tmp_path):
    """save -> PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base)) -> merge ->
    reload: the rewards fastrm computes, on padded batches (right and left), at every stage; fastrm's own merges
    (train --merge-lora, fastrm merge-lora) and load_model of the adapter folder too."""
    from transformers import AutoTokenizer

    from fastrm.cli import main
    from fastrm.loading import load_model
    from fastrm.lora_merge import merged_state

    tr, out, _ = trained
    pairs = tr.eval_pairs[:6]
    tr.model.eval()
    with torch.no_grad():
        want = tr.model(pack_pairs(pairs, "separate"))
    seqs = sequences(pairs)
    cfg = json.loads((out / lora.ADAPTER_CONFIG).read_text())
    assert cfg["task_type"] == "SEQ_CLS" and cfg["modules_to_save"] == ["score"] and cfg["peft_type"] == "LORA"
    base = cfg["base_model_name_or_path"]
    assert base == str((out / lora.BASE_DIR).absolute())  # a local path, never a hub id
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.pad_token_id != tok.eos_token_id
    stock_model = peft.PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base), out)
    torch.testing.assert_close(hf_rewards(stock_model.eval(), seqs, tok.pad_token_id), want, rtol=1e-5, atol=1e-5)
    stock_model.merge_and_unload().save_pretrained(tmp_path / "peft-merged")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "peft-merged").eval()
    torch.testing.assert_close(hf_rewards(reloaded, seqs, tok.pad_token_id), want, rtol=1e-5, atol=1e-5)
    assert main(["merge-lora", str(out), str(tmp_path / "cli-merged")]) == 0
    for folder in (out / lora.MERGED_DIR, tmp_path / "cli-merged"):
        assert not (folder / lora.ADAPTER_CONFIG).exists()
        plain = AutoModelForSequenceClassification.from_pretrained(folder).eval()
        torch.testing.assert_close(hf_rewards(plain, seqs, tok.pad_token_id), want, rtol=1e-5, atol=1e-5)
        fastrm_plain = load_model(folder).eval()
        assert fastrm_plain.lora is None
    back = load_model(out).eval()
    assert back.lora is not None and back.tokenizer is not None
    with torch.no_grad():
        torch.testing.assert_close(back(pack_pairs(pairs, "shared_prompt")), want, rtol=1e-5, atol=1e-5)
    assert set(merged_state(back)) == set(fastrm_plain.state_dict())
    ckpt = load_model(out / "checkpoint-6").eval()  # step checkpoints are adapter folders of the same base
    assert ckpt.lora.base.folder == (out / lora.BASE_DIR).absolute()


def test_eval_and_score_commands_take_an_adapter_folder(trained, tmp_path):
    from fastrm.cli import main

    _, out, _ = trained
    rows = synthetic_pairs(8, seed=7)
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "bon.jsonl").write_text(json.dumps({"prompt": "Q:", "responses": [" kind", " rude"]}) + "\n")
    assert (
        main(["eval", "--model", str(out), "--data", str(tmp_path / "pairs.jsonl"), "--output-dir", str(tmp_path)]) == 0
    )
    assert json.loads((tmp_path / "eval_metrics.json").read_text())["num_pairs"] == 8
    args = ["score", "--model", str(out), "--input", str(tmp_path / "bon.jsonl"), "--output", str(tmp_path / "s.jsonl")]
    assert main(args) == 0
    assert len(json.loads((tmp_path / "s.jsonl").read_text())["scores"]) == 2


def test_resume_restores_adapters_and_optimizer_state_exactly(tmp_path):
    tok = byte_tokenizer()
    pairs, _ = load_tokenized(synthetic_pairs(48, seed=3), tok, max_length=128)
    common = dict(
        lora_r=4,
        loss="threshold",
        pairs_per_step=12,
        max_tokens_per_batch=400,
        learning_rate=1e-2,
        num_train_epochs=2,
        save_final=False,
        progress=False,
    )

    def trainer(out, **kw):
        torch.manual_seed(0)  # the same base weights: the base is the model given, not the checkpoint
        return RewardTrainer(
            RewardModel.from_config("tiny-llama"),
            RewardConfig(output_dir=str(out), **common, **kw),
            pairs,
            tokenizer=tok,
        )

    straight = trainer(tmp_path / "a")
    straight.train()
    first = trainer(tmp_path / "b")
    while first.step < 3:
        idx = first.step_indices(first.step)
        first.train_step([pairs[i] for i in idx], len(idx))
        first.step += 1
    ckpt = first.save_checkpoint()
    assert (ckpt / lora.ADAPTER_WEIGHTS).exists() and not (ckpt / "model.safetensors").exists()
    resumed = trainer(tmp_path / "c", resume_from_checkpoint=str(ckpt))
    with torch.no_grad():  # everything trained must come from the checkpoint
        for p in resumed.model.parameters():
            if p.requires_grad:
                p.normal_()
    resumed.train()
    assert resumed.step == straight.step == 8
    want = dict(straight.model.named_parameters())
    for n, p in resumed.model.named_parameters():
        torch.testing.assert_close(p.detach(), want[n].detach(), rtol=0, atol=1e-6, msg=n)
    a, b = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert a.keys() == b.keys()
    for k in a:
        for field in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(b[k][field], a[k][field], rtol=0, atol=1e-7)


# ----------------------------------------------------------------------------------------------- refusals


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_target_modules_matching_nothing_and_bad_fields_are_one_line_errors(tmp_path):
    tok = byte_tokenizer()
    rows = synthetic_pairs(8, seed=1)
    for targets, match in ((["q_proj", "nope"], "'nope' matches no module"), (["score"], "reward head")):
        args = RewardConfig(output_dir=str(tmp_path), lora_r=4, lora_target_modules=targets, progress=False)
        with pytest.raises(ValueError) as e:
            RewardTrainer(RewardModel.from_config("tiny-llama"), args, rows, tokenizer=tok)
        assert "field 'lora_target_modules'" in one_line(e) and match in str(e.value)
    with pytest.raises(ValueError) as e:
        RewardConfig(lora_r=-1)
    assert one_line(e) == "field 'lora_r': expected an integer >= 0 (0: full fine-tuning), got -1"
    with pytest.raises(ValueError, match="field 'lora_target_modules': .* lora_r is 0"):
        RewardConfig(lora_target_modules=["q_proj"])
    fam = FAMILIES["deepseek_v3-mla"]  # PEFT would move gate_proj onto the fused experts
    moe = RewardModel.from_config(family_config(fam.model_type, fam.kwargs))
    with pytest.raises(ValueError, match="field 'lora_target_modules': PEFT maps \\['gate_proj'"):
        lora.apply(moe, lora.LoraSettings(2, 4.0, 0.0, ("q_a_proj", "gate_proj")), seed=0)


def test_cli_flag_names_the_flag(capsys):
    from fastrm.cli import main

    assert main(["train", "--data", "x.jsonl", "--model", "tiny-llama", "--lora-r", "-1"]) == 1
    assert "--lora-r: expected an integer >= 0" in capsys.readouterr().err


def test_a_base_with_another_config_is_refused_naming_the_file(trained, tmp_path):
    from fastrm.cli import main
    from fastrm.loading import load_model

    _, out, _ = trained
    torch.manual_seed(0)
    other = RewardModel.from_config("tiny-llama")
    other.backbone.config.rms_norm_eps = 1e-3
    other.save_plain(tmp_path / "other")
    with pytest.raises(ValueError) as e:
        load_model(out, base=tmp_path / "other")
    assert f"{tmp_path / 'other' / 'config.json'}: not the base model" in one_line(e)
    assert main(["merge-lora", str(out), str(tmp_path / "m"), "--base", str(tmp_path / "other")]) == 1


def test_lora_injected_in_place_is_refused_before_training(tmp_path):
    model = RewardModel.from_config("tiny-llama")
    peft.inject_adapter_in_model(peft.LoraConfig(target_modules=["q_proj"]), model.backbone)
    args = RewardConfig(output_dir=str(tmp_path), progress=False, save_final=False)
    with pytest.raises(ValueError) as e:
        RewardTrainer(model, args, synthetic_pairs(8, seed=1), tokenizer=byte_tokenizer())
    assert one_line(e).startswith("model.backbone.layers.0.self_attn.q_proj is a PEFT Linear injected in place")
    assert not list(tmp_path.iterdir())  # refused before anything was written


def test_an_adapter_model_trains_only_with_its_own_settings(trained, tmp_path):
    from fastrm.loading import load_model

    _, out, _ = trained
    for kw, field in ((dict(), "lora_r"), (dict(lora_r=8), "lora_r"), (dict(lora_r=4, lora_alpha=3), "lora_alpha")):
        args = RewardConfig(output_dir=str(tmp_path), progress=False, **kw)
        with pytest.raises(ValueError) as e:
            RewardTrainer(load_model(out), args, synthetic_pairs(8, seed=1))
        assert one_line(e).startswith(f"field '{field}': the model carries LoRA adapters")
    more = tmp_path / "more"  # the same settings: the adapters train on, and the new folder names the same base
    args = RewardConfig(output_dir=str(more), progress=False, lora_r=4, lora_alpha=8, pairs_per_step=16, max_steps=1)
    RewardTrainer(load_model(out), args, synthetic_pairs(16, seed=1)).train()
    assert lora.read_record(more)["base_model"]["path"] == str((out / lora.BASE_DIR).absolute())


# ----------------------------------------------------------------------------------------------- TRL's peft_config


def test_trl_peft_config_trains_as_stock_trl_with_peft(tmp_path):
    """The drop-in with TRL's peft_config against stock trl.RewardTrainer + PEFT, same weights and data, one step
    over the whole set: the same first-step loss, gradient norm and rewards (the adapters are initialised from the
    same seed, as TRL does), then the same eval metrics; save_model() writes an adapter folder stock PEFT loads."""
    trl = pytest.importorskip("trl")
    import test_trl as T

    from fastrm.integrations.trl import RewardTrainer as DropIn

    tok = T.tokenizer()
    cfg = T.resolve_config("tiny-llama", len(tok))
    cfg.num_labels, cfg.pad_token_id = 1, tok.pad_token_id
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(cfg).save_pretrained(tmp_path / "init")
    train, evals = T.rows(T.N_TRAIN, 1, "bt"), T.rows(T.N_EVAL, 2, "bt")

    def lora_cfg():
        return peft.LoraConfig(
            task_type="SEQ_CLS", r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"]
        )

    runs = {}
    for name, cls in (("trl", trl.RewardTrainer), ("fastrm", DropIn)):
        tr = cls(
            model=T.load(tmp_path / "init"),
            args=T.config(tmp_path / name),
            train_dataset=train,
            eval_dataset=evals,
            processing_class=T.tokenizer(),
            peft_config=lora_cfg(),
        )
        tr.train()
        runs[name] = (tr, tr.state.log_history[0], tr.evaluate())
    (_, a, ea), (ours, b, eb) = runs["trl"], runs["fastrm"]
    assert ours._trainer.args.lora_dropout == 0.0  # TRL's disable_dropout (default True) zeroes it, as in TRL
    for key in ("loss", "grad_norm", "accuracy", "margin", "min_reward", "mean_reward", "max_reward"):
        assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    for key in ("eval_loss", "eval_accuracy", "eval_margin", "eval_mean_reward"):
        assert eb[key] == pytest.approx(ea[key], rel=1e-4, abs=3e-5), key
    ours.save_model()
    saved = json.loads((tmp_path / "fastrm" / lora.ADAPTER_CONFIG).read_text())
    assert sorted(saved["target_modules"]) == ["q_proj", "v_proj"] and saved["r"] == 4
    back = peft.PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(saved["base_model_name_or_path"]), tmp_path / "fastrm"
    )
    batch = runs["trl"][0].data_collator([runs["trl"][0].eval_dataset[i] for i in range(T.N_EVAL)])
    with torch.no_grad():
        r_ref = runs["trl"][0].model.eval()(**batch).logits
        torch.testing.assert_close(back.eval()(**batch).logits, r_ref, rtol=1e-4, atol=3e-5)


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(use_dora=True), "use_dora"),
        (dict(use_rslora=True), "use_rslora"),
        (dict(bias="all"), "bias"),
        (dict(task_type="CAUSAL_LM"), "task_type"),
        (dict(task_type=None), "modules_to_save"),
        (dict(target_modules=".*q_proj"), "target_modules"),
        (dict(layers_to_transform=[0]), "layers_to_transform"),
    ],
)
def test_trl_peft_config_fields_fastrm_cannot_honour_are_refused_by_name(kw, field, tmp_path):
    pytest.importorskip("trl")
    import test_trl as T

    from fastrm.integrations.trl import RewardTrainer as DropIn

    cfg = peft.LoraConfig(**{"task_type": "SEQ_CLS", "target_modules": ["q_proj"], **kw})
    with pytest.raises(ValueError, match=rf"peft_config: field '{field}'"):
        DropIn(
            "tiny-llama",
            T.config(tmp_path),
            train_dataset=T.rows(4, 1, "bt"),
            processing_class=T.tokenizer(),
            peft_config=cfg,
        )


def test_yaml_and_flags_train_an_adapter_from_the_command_line(tmp_path, capsys):
    from fastrm.cli import main

    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in synthetic_pairs(16, seed=1)))
    (tmp_path / "lora.yaml").write_text("lora_r: 4\nlora_alpha: 8\nlora_target_modules: [q_proj, v_proj]\n")
    out = tmp_path / "run"
    argv = ["train", "--config", str(tmp_path / "lora.yaml"), "--data", str(tmp_path / "pairs.jsonl"), "--model"]
    argv += ["tiny-llama", "--tokenizer", "byte", "--pairs-per-step", "8", "--max-steps", "1", "--lora-dropout", "0.1"]
    assert main([*argv, "--output-dir", str(out), "--progress", "false"]) == 0
    assert "[lora] r=4, alpha=8, dropout=0.1:" in capsys.readouterr().err
    saved = json.loads((out / lora.ADAPTER_CONFIG).read_text())
    assert (saved["r"], saved["lora_alpha"], saved["lora_dropout"]) == (4, 8, 0.1)
    assert sorted(saved["target_modules"]) == ["q_proj", "v_proj"]
    assert json.loads((out / "training_config.json").read_text())["lora_target_modules"] == ["q_proj", "v_proj"]
