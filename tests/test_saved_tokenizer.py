"""A checkpoint reloads with the tokenizer it was trained with, for every backbone family fastrm runs exactly.

Each family is saved with a foreign tokenizer (GPT-NeoX's pipeline, of ../shared/data, on its first 3000 tokens so
that 23 families fit CI's time; the full tokenizer in the known failing case) and reloaded through
``fastrm.load_model`` and through stock ``AutoTokenizer.from_pretrained`` / ``AutoModelForSequenceClassification``:
token ids on the test's own texts and rewards must be those of the trained model and tokenizer. Where stock
transformers cannot reload that tokenizer (it builds the tokenizer class of the model type itself: qwen2 on
transformers 5.24), ``save_pretrained`` must refuse, naming the class, and write nothing; the ground truth of
"cannot" is measured here by saving the same files by hand.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from backbone_families import FAMILIES, family_config

from fastrm.loading import load_model
from fastrm.model import RewardModel
from fastrm.saved_tokenizer import TokenizerRoundTripError

# Written for this test (not fastrm's PROBE_TEXTS): HH-style turns, blank-line runs, spaces, digits, accents, CJK.
TEXTS = [
    "\n\nHuman: Can you help me?\n\nAssistant: Sure.",
    "a\n\nb\n\n\nc",
    "  indented\tand\ttabbed  ",
    "It's 2024: 31415 items, ÄÖÜ café, 東京, 😀",
    "end of text<|endoftext|>after",
]
PROMPTS = ["\n\nHuman: Sky?\n\nAssistant:", "Hi.\n\n"]  # each sequence <= 24 tokens: phi3-longrope's packing limit
RESPONSES = [[" Yes.", " No.\n\nNo."], [" Hi  there!", " 12 hi"]]


@pytest.fixture(scope="module")
def small_neox(neox_tokenizer):
    """GPT-NeoX's normalizer, pre-tokenizer, decoder and special/added tokens on its first 3000 tokens (the merges
    among them; the 23 added whitespace tokens renumbered after them): a foreign tokenizer ~20x cheaper to
    save and reload."""
    import json

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    keep = 3000
    spec = json.loads(neox_tokenizer.backend_tokenizer.to_str())
    vocab = {t: i for t, i in spec["model"]["vocab"].items() if i < keep}
    renumber = {}
    for a in spec["added_tokens"]:
        if a["id"] >= keep:
            renumber[a["id"]] = keep + len(renumber)
            a["id"] = renumber[a["id"]]
            vocab[a["content"]] = a["id"]
    spec["model"]["vocab"] = vocab
    spec["model"]["merges"] = [m for m in spec["model"]["merges"] if all(x in vocab for x in (*m, "".join(m)))]
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)))
    tok.eos_token, tok.pad_token = neox_tokenizer.eos_token, neox_tokenizer.pad_token
    assert tok("x\n\n\ny a  b")["input_ids"] == [89, 535, 187, 90, 247, 3022, 67]  # NeoX: ..., 50276, 67
    return tok


def _exact_families() -> list[str]:
    import transformers

    return [name for name, f in FAMILIES.items() if f.refusal(transformers.__version__) is None]


def _config(family: str, vocab: int):
    f = FAMILIES[family]
    kw = dict(f.kwargs)
    if "text_config" in kw:  # gemma3 multimodal: the image token ids go above the text vocabulary
        kw["text_config"] = dict(kw["text_config"], vocab_size=vocab + 3)
        kw.update(image_token_index=vocab + 2, boi_token_index=vocab, eoi_token_index=vocab + 1)
    else:
        kw["vocab_size"] = vocab
    return family_config(f.model_type, kw)


def _ids(tok, texts):
    return [list(x) for x in tok(texts, add_special_tokens=False)["input_ids"]]


def _stock_reload_differs(tok, cfg, folder) -> bool:
    """Ground truth: the tokenizer's own files and the config, saved by hand, reloaded by stock transformers."""
    from transformers import AutoTokenizer

    cfg.save_pretrained(folder)
    tok.save_pretrained(folder)
    return _ids(AutoTokenizer.from_pretrained(folder), TEXTS) != _ids(tok, TEXTS)


@pytest.mark.parametrize("family", _exact_families())
def test_checkpoint_reloads_with_the_trained_tokenizer(family, small_neox, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = small_neox
    torch.manual_seed(0)
    cfg = _config(family, len(tok))
    model = RewardModel.from_config(cfg, self_test=False).eval()
    want_rewards = model.score_texts(PROMPTS, RESPONSES, tokenizer=tok)
    ckpt = tmp_path / "ckpt"
    if _stock_reload_differs(tok, cfg, tmp_path / "by-hand"):
        with pytest.raises(TokenizerRoundTripError, match=r"builds a \w+Tokenizer for a model_type .* encodes"):
            model.save_pretrained(ckpt, tokenizer=tok)
        assert not ckpt.exists()  # refused before anything was written
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(ckpt, tokenizer=tok)

    ours = load_model(ckpt, self_test=False).eval()
    stock_tok = AutoTokenizer.from_pretrained(ckpt)
    for reloaded in (ours.tokenizer, stock_tok):
        assert _ids(reloaded, TEXTS) == _ids(tok, TEXTS)
        assert reloaded.eos_token_id == tok.eos_token_id
    assert ours.score_texts(PROMPTS, RESPONSES) == want_rewards  # same ids, same weights: the same floats

    hf = AutoModelForSequenceClassification.from_pretrained(ckpt).eval()
    with torch.no_grad():
        for prompt, responses, want in zip(PROMPTS, RESPONSES, want_rewards):
            for response, r in zip(responses, want):
                ids = _ids(stock_tok, [prompt])[0] + _ids(stock_tok, [response])[0] + [stock_tok.eos_token_id]
                assert hf(input_ids=torch.tensor([ids])).logits[0, 0].item() == pytest.approx(r, abs=1e-4)


def test_known_case_is_refused_before_training(neox_tokenizer, tmp_path):
    """tiny-qwen2 + the GPT-NeoX tokenizer: the trainer refuses at construction, not at its first checkpoint."""
    from fastrm.config import RewardConfig
    from fastrm.synthetic import synthetic_pairs
    from fastrm.trainer import RewardTrainer

    model = load_model("tiny-qwen2", tokenizer=neox_tokenizer, self_test=False)
    args = RewardConfig(output_dir=str(tmp_path / "out"), max_steps=1, progress=False)
    with pytest.raises(TokenizerRoundTripError, match=r"Qwen2Tokenizer.*'qwen2'.*encodes '.*\\n\\n.*' as \["):
        RewardTrainer(model, args, synthetic_pairs(4), tokenizer=neox_tokenizer, device=torch.device("cpu"))
    assert not (tmp_path / "out").exists()


def test_old_checkpoint_still_loads_its_own_tokenizer_in_fastrm(neox_tokenizer, tmp_path):
    """A qwen2 checkpoint written before the check (tokenizer saved as TokenizersBackend) reloads in fastrm with
    the tokenizer it was trained with, not the Qwen2Tokenizer stock AutoTokenizer builds."""
    torch.manual_seed(0)
    model = load_model("tiny-qwen2", tokenizer=neox_tokenizer, self_test=False)
    model.tokenizer = None
    model.save_pretrained(tmp_path)  # weights and config only
    neox_tokenizer.save_pretrained(tmp_path)  # the tokenizer as fastrm used to write it
    from fastrm.loading import load_tokenizer

    for tok in (load_model(tmp_path, self_test=False).tokenizer, load_tokenizer(str(tmp_path))):
        assert _ids(tok, TEXTS) == _ids(neox_tokenizer, TEXTS)
