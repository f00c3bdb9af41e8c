"""Every backbone family fastrm accepts is exact against stock transformers; the others are refused at construction.

Exact families: rewards and the gradients of every parameter, both layouts, equal HF's
``AutoModelForSequenceClassification`` (eager attention, one sequence at a time) loaded from fastrm's own checkpoint,
fp32. Windows are 4-6 tokens and sequences 8-20, so every window is exceeded on purpose; weights are drawn wider
than HF's default so attention is peaked enough for a lost mask to show.
"""

import re
import warnings

import pytest
import torch
from backbone_families import FAMILIES, GQA, family_config, rand_pairs

from fastrm.backbones import UnsupportedBackbone
from fastrm.model import RewardModel
from fastrm.packing import pack_pairs


def build(name, seed=0):
    fam = FAMILIES[name]
    torch.manual_seed(seed)
    model = RewardModel.from_config(family_config(fam.model_type, fam.kwargs)).eval()
    sinks = [m for n, m in model.named_parameters() if n.endswith("sinks")]
    with torch.no_grad():  # GPT-OSS: sinks large enough to matter
        for s in sinks:
            s.copy_(torch.linspace(-1.0, 2.0, s.numel()))
    return model


def fastrm_rewards_and_grads(model, pairs, layout, weights):
    model.zero_grad()
    r = model(pack_pairs(pairs, layout))
    (r * weights).sum().backward()
    keys = model.hf_key_map()
    return r.detach(), {keys[n]: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def stock_rewards_and_grads(hf, pairs, weights):
    hf.zero_grad()
    seqs = [p.prompt_ids + p.chosen_ids for p in pairs] + [p.prompt_ids + p.rejected_ids for p in pairs]
    r = torch.stack([hf(input_ids=torch.tensor([s])).logits[0, 0] for s in seqs])
    (r * weights).sum().backward()
    return r.detach(), {n: p.grad.clone() for n, p in hf.named_parameters() if p.grad is not None}


# The rules behind a refusal, observed on the installed transformers (not read from fastrm's own checks), and a word
# fastrm's message must then contain.
RULE_WORDS = {
    "bypass": "AttentionInterface",  # cannot use, or never calls, a registered attention function
    "kwargs": "keyword arguments",  # a keyword argument of the model call never reaches attention
    "mixing": "outside attention",  # with attention returning zeros, token 0 still changes later rows
}


def observed_rule_break(cfg) -> str | None:
    """The first rule (see RULE_WORDS) this family breaks on the installed transformers, or None.

    The stock backbone is built with a registered attention function that returns zeros and records whether a
    keyword argument of the model call arrived; then token 0 is changed: any later row that moves was mixed outside
    the registered attention."""
    from transformers import AttentionInterface, AutoModel

    calls: list[bool] = []

    def zero_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
        calls.append(kw.get("fastrm_probe") is True)
        return query.new_zeros(query.shape[0], query.shape[2], query.shape[1], value.shape[-1]), None

    AttentionInterface.register("fastrm_rule_probe", zero_attention)
    try:
        torch.manual_seed(0)
        model = AutoModel.from_config(cfg, attn_implementation="fastrm_rule_probe").eval()
    except (ValueError, KeyError, TypeError, NotImplementedError, AttributeError):  # (MPT on transformers 5.17)
        return "bypass"
    ids = torch.tensor([[5, 17, 3, 42, 9, 28, 11, 60]])
    other = ids.clone()
    other[0, 0] = 77
    with torch.no_grad():
        try:
            a = model(input_ids=ids, use_cache=False, fastrm_probe=True).last_hidden_state
        except TypeError:  # the model call itself refuses unknown keywords
            return "kwargs"
        except AttributeError:  # MPT on transformers 5.24: its mask builder returns None for a registered function
            return "bypass"
        if not calls:
            return "bypass"
        if not all(calls):
            return "kwargs"
        b = model(input_ids=other, use_cache=False, fastrm_probe=True).last_hidden_state
    # Expert kernels regroup tokens, which moves rows by float rounding (1e-6); a real mixer moves them by O(1).
    moved = (a[0, 1:] - b[0, 1:]).abs().max().item()
    return "mixing" if moved > 1e-3 * a.abs().max().item() else None


@pytest.mark.filterwarnings("ignore:the saved checkpoint has pad_token_id=null")
@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_is_exact_or_refused_by_rule(name, tmp_path):
    """Every family either runs exactly (packed rewards and gradients, both layouts, equal HF eager on each sequence
    alone, from fastrm's checkpoint) or is refused at construction; a family that breaks a rule on the installed
    transformers must be refused, naming the rule. tests/backbone_families.py lists the refusals per version: a
    family refused where the table says exact fails (support was lost); one that runs where the table says refused
    passes with a warning (support was gained: update the table and the README)."""
    import transformers
    from transformers import AutoModelForSequenceClassification

    fam = FAMILIES[name]
    version = transformers.__version__
    rule = observed_rule_break(family_config(fam.model_type, fam.kwargs))
    listed = fam.refusal(version)
    try:
        model = build(name)
    except UnsupportedBackbone as e:
        msg = str(e)
        assert fam.model_type in msg and "another family" in msg
        assert listed is not None, f"{name} is refused on transformers {version}, which the table lists as exact: {msg}"
        assert re.search(listed, msg), msg
        if rule is not None:
            assert RULE_WORDS[rule] in msg, f"{name} breaks the {rule!r} rule, but the refusal does not say so: {msg}"
        return
    assert rule is None, f"{name} breaks the {rule!r} rule on transformers {version}, yet fastrm accepted it"
    if listed is not None:
        msg = f"{name} now runs on transformers {version} (tests/backbone_families.py lists it as refused)"
        warnings.warn(msg, stacklevel=1)
    max_len = 24 if name == "phi3-longrope" else 20  # longrope past its original length: tests/test_long_rope.py
    pairs = rand_pairs(3, seed=1, rlen=(4, max_len - 9))
    weights = torch.linspace(-1.0, 2.0, 2 * len(pairs))
    model.save_pretrained(tmp_path)
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path, attn_implementation="eager").eval()
    want_r, want_g = stock_rewards_and_grads(hf, pairs, weights)
    assert want_r.abs().max() > 1e-3  # a reward that is not trivially zero
    for layout in ("separate", "shared_prompt"):
        r, g = fastrm_rewards_and_grads(model, pairs, layout, weights)
        torch.testing.assert_close(r, want_r, rtol=1e-5, atol=1e-5, msg=f"{name} {layout} rewards")
        assert g.keys() <= want_g.keys() and len(g) >= len(want_g) - 1  # HF may hold one unused buffer-like param
        for k, v in g.items():
            torch.testing.assert_close(v, want_g[k], rtol=1e-4, atol=1e-5, msg=f"{name} {layout} grad {k}")


def test_the_rule_probe_sees_each_rule():
    """The probe itself can fail: a family of each kind is flagged (on every transformers the project tested)."""
    for name, rule in (("lfm2", "mixing"), ("bloom", "bypass"), ("nemotron", "kwargs"), ("llama", None)):
        fam = FAMILIES[name]
        assert observed_rule_break(family_config(fam.model_type, fam.kwargs)) == rule, name


def test_windows_are_applied_when_exceeded_and_dropped_when_not():
    """Sanity of the matrix: losing the window changes the rewards when sequences exceed it (so the matrix would
    catch it), and a window no sequence exceeds changes nothing."""
    from fastrm import attention

    model = build("mistral-window")
    long, short = rand_pairs(3, seed=2), rand_pairs(3, seed=2, plen=(1, 1), rlen=(1, 3))
    with torch.no_grad():
        want_long, want_short = model(pack_pairs(long)), model(pack_pairs(short))
        orig = attention._layer_window
        attention._layer_window = lambda *a: None
        try:
            assert (model(pack_pairs(long)) - want_long).abs().max() > 1e-3
            torch.testing.assert_close(model(pack_pairs(short)), want_short, rtol=0, atol=0)
        finally:
            attention._layer_window = orig


def test_opt_350m_style_head_is_sized_from_the_projection():
    model = build("opt-350m-style")
    assert model.score.in_features == 16 and model.norm_name is None


# ---------------------------------------------------------------- checkpoints: what HF pools
def test_checkpoint_scores_padded_batches_in_hf_as_fastrm(tmp_path):
    """fastrm pools the EOS it appends; the saved config's pad id makes HF pool the same token in right- and
    left-padded batches of texts formatted as fastrm formats them (prompt + response + EOS)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fastrm.loading import load_model
    from fastrm.synthetic import byte_tokenizer

    torch.manual_seed(0)
    model = load_model("tiny-llama", tokenizer=byte_tokenizer()).eval()
    prompts = ["Say something about Ada.\n", "Q?", "Describe Bob."]
    responses = [[" Ada is kind.", " no"], [" A much longer answer than the others."], [" Bob? Always so warm."]]
    want = torch.tensor([r for rs in model.score_texts(prompts, responses) for r in rs])
    model.save_pretrained(tmp_path)
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path, attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert hf.config.pad_token_id == tok.pad_token_id != tok.eos_token_id == hf.config.eos_token_id
    texts = [p + r + tok.eos_token for p, rs in zip(prompts, responses) for r in rs]
    for side in ("right", "left"):
        tok.padding_side = side
        enc = tok(texts, padding=True, return_tensors="pt", add_special_tokens=False)
        assert (enc["attention_mask"] == 0).any()
        with torch.no_grad():
            got = hf(**enc).logits[:, 0]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=side)


def _tokenizer(pad_is_eos: bool, unk: bool):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate("abcdefgh")}
    specials = {"eos_token": "</s>"} | ({"unk_token": "<unk>"} if unk else {})
    for s in specials.values():
        vocab[s] = len(vocab)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token=specials.get("unk_token"))), **specials
    )
    tok.pad_token = tok.eos_token if pad_is_eos else None
    return tok


def test_pad_equal_to_eos_is_replaced_by_a_spare_token_or_written_as_null(tmp_path):
    from transformers import AutoConfig

    model = RewardModel.from_config(family_config("llama", GQA))
    tok = _tokenizer(pad_is_eos=True, unk=True)
    model.save_pretrained(tmp_path / "unk", tokenizer=tok)
    cfg = AutoConfig.from_pretrained(tmp_path / "unk")
    assert cfg.eos_token_id == tok.eos_token_id and cfg.pad_token_id == tok.unk_token_id
    assert tok.pad_token == tok.eos_token  # the caller's tokenizer is not changed
    with pytest.warns(UserWarning, match="pad_token_id=null"):
        model.save_pretrained(tmp_path / "null", tokenizer=_tokenizer(pad_is_eos=True, unk=False))
    assert AutoConfig.from_pretrained(tmp_path / "null").pad_token_id is None


# ---------------------------------------------------------------- packing
@pytest.mark.parametrize("layout", ["separate", "shared_prompt"])
def test_empty_responses_are_refused_by_every_packer(layout):
    from fastrm.packing import PackingError, micro_batches, pack_prompt_responses

    pairs = rand_pairs(3, seed=0)
    pairs[1].rejected_ids = []
    with pytest.raises(PackingError, match=r"pair 1 \(pair1.*response 1 is empty"):
        pack_pairs(pairs, layout)
    with pytest.raises(PackingError, match="pair1"):
        micro_batches(pairs, 1000, layout)
    with pytest.raises(PackingError, match="group 1: response 0 is empty"):
        pack_prompt_responses([[1, 2], [3]], [[[4]], [[], [5]]], layout)
