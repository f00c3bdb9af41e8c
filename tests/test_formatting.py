"""The scoring rule (fastrm/formatting.py): a checkpoint without fastrm's record scores exactly as stock
transformers' ``AutoModelForSequenceClassification`` scores it (pad == eos, pad != eos, no pad, BOS-adding and
plain tokenizers, left and right padding) through ``fastrm.score``, ``fastrm score``, ``fastrm bench`` and
``fastrm serve``; fastrm's own checkpoints carry their training rule, and ``fastrm eval`` on a training's eval file
equals the trainer's own final eval for ``append_eos=False``, a chat template and a short ``max_length``."""

import json
import warnings

import numpy as np
import pytest
import torch
from serve_helpers import ServerThread, post

from fastrm import cli, formatting
from fastrm.loading import load_model, load_tokenizer
from fastrm.scoring import score
from fastrm.serve import RewardService, ServeConfig

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Question: what is two plus two? Answer: four, of course.",
    "Human: hello there\nAssistant: hi, how can I help you today?",
    "a b c d e f g h i j k l m n o p q r s t u v w x y z",
]
PROMPTS = ["Question: what is two plus two?", "Human: hello there\nAssistant:"]
RESPONSES = [[" Answer: four.", " five", " four, of course</s>"], [" hi, how can I help?", " go away</s></s>"]]


def _tokenizer(bos: bool, pad: str | None):
    """A byte-level BPE trained here (no download); ``bos``: the default call adds ``<s>`` in front; ``pad``:
    "eos" (pad = ``</s>``), "pad" (its own ``<pad>``) or None (no pad token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<pad>"]
    tok.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(vocab_size=300, special_tokens=specials))
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    kw = {"bos_token": "<s>", "eos_token": "</s>"}
    if pad is not None:
        kw["pad_token"] = "</s>" if pad == "eos" else "<pad>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kw)


# (pad, bos, padding side): every checkpoint shape the issue names
SHAPES = [
    ("eos", False, "right"),
    ("eos", True, "left"),
    ("pad", True, "right"),
    ("pad", False, "left"),
    (None, True, "right"),
]


@pytest.fixture(scope="module", params=SHAPES, ids=lambda s: f"pad={s[0]}-bos={s[1]}-{s[2]}")
def stock(request, tmp_path_factory):
    """A third-party HF reward-model folder (no fastrm record) and the stock scores of every prompt + response."""
    from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

    pad, bos, side = request.param
    tok = _tokenizer(bos, pad)
    tok.padding_side = side
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tok),
        num_labels=1,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    folder = tmp_path_factory.mktemp("hf") / "rm"
    LlamaForSequenceClassification(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    hf = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    want = []
    with torch.no_grad():
        for p, rs in zip(PROMPTS, RESPONSES):
            texts = [p + r for r in rs]
            if pad is None:  # stock transformers refuses batches without a pad id: one text at a time
                want.append([hf(**tok(t, return_tensors="pt")).logits[0, 0].item() for t in texts])
            else:
                want.append(hf(**tok(texts, padding=True, return_tensors="pt")).logits[:, 0].tolist())
    return folder, want


def _close(got, want, tol=1e-4):
    return all(abs(a - b) <= tol for g, w in zip(got, want) for a, b in zip(g, w)) and len(got) == len(want)


def test_python_api_scores_a_third_party_checkpoint_as_stock_transformers(stock):
    folder, want = stock
    model = load_model(folder)
    assert model.scoring_rule.rule == "hf" and model.scoring_rule.origin == "stock"
    got = score(model, PROMPTS, RESPONSES)
    assert _close(got, want), (got, want)
    # the shared-prompt and the one-at-a-time layouts agree, and so does the model's own method
    assert _close(score(model, PROMPTS, RESPONSES, prefix_sharing=False), want)
    assert _close(model.score_texts(PROMPTS, RESPONSES), want)
    # fastrm's training rule (EOS appended and pooled) is another score: the flag selects it
    assert not _close(score(model, PROMPTS, RESPONSES, scoring_rule="fastrm"), want)


def test_fastrm_score_eval_and_bench_score_as_stock(stock, tmp_path):
    folder, want = stock
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": p, "responses": rs}) + "\n" for p, rs in zip(PROMPTS, RESPONSES)))
    assert cli.main(["score", "--model", str(folder), "--input", str(rows), "--output", str(tmp_path / "s.jsonl")]) == 0
    got = [json.loads(x)["scores"] for x in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert _close(got, want), (got, want)

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "".join(
            json.dumps({"prompt": p, "chosen": rs[0], "rejected": rs[1]}) + "\n" for p, rs in zip(PROMPTS, RESPONSES)
        )
    )
    assert cli.main(["eval", "--model", str(folder), "--data", str(pairs), "--output-dir", str(tmp_path / "e")]) == 0
    margins = np.load(tmp_path / "e" / "eval_margins.npy")
    assert np.allclose(margins, [w[0] - w[1] for w in want], atol=2e-4), (margins, want)

    bon = tmp_path / "bon.jsonl"
    bon.write_text(
        "".join(json.dumps({"prompt": p, "responses": rs, "best": 0}) + "\n" for p, rs in zip(PROMPTS, RESPONSES))
    )
    out = tmp_path / "bench"
    assert cli.main(["bench", "--model", str(folder), str(bon), "--output-dir", str(out), "--no-progress"]) == 0
    report = json.loads((out / "bench_report.json").read_text())
    assert report["scoring_rule"]["rule"] == "hf" and report["prompt_format"].startswith("plain")
    got = [json.loads(x)["scores"] for x in (out / "bench_scores.jsonl").read_text().splitlines()]
    assert _close(got, want), (got, want)


def test_fastrm_serve_scores_as_stock_and_health_names_the_rule(stock):
    folder, want = stock
    tok = load_tokenizer(None, folder)
    service = RewardService(load_model(folder), tok, ServeConfig(model=str(folder), max_wait_ms=1))
    server = ServerThread(service)
    try:
        got = post(server, "/score", {"prompts": PROMPTS, "responses": RESPONSES}, headers={}).json()["rewards"]
        assert _close(got, want), (got, want)
        queries = [p + r for p, rs in zip(PROMPTS, RESPONSES) for r in rs]
        got = post(server, "/get_reward", {"query": queries}, headers={}).json()["rewards"]
        assert _close([got], [[w for ws in want for w in ws]]), (got, want)
        import httpx

        h = httpx.get(server.url + "/health", timeout=30).json()
        assert h["scoring_rule"] == "hf" and "stock transformers" in h["scoring"]
    finally:
        server.stop()


def test_pooled_prefix_is_stocks_last_non_pad_token():
    assert formatting.pooled_prefix([5, 6, 2, 2], 2) == [5, 6]  # pad == eos: the token before a trailing EOS run
    assert formatting.pooled_prefix([5, 2, 6], 2) == [5, 2, 6]
    assert formatting.pooled_prefix([2, 2], 2) == [2]  # all pad: HF's argmax gives position 0
    assert formatting.pooled_prefix([5, 2], None) == [5, 2]  # no pad id: the last token


# ------------------------------------------------------------------------------------------------ fastrm's own


def test_every_checkpoint_records_its_rule_and_an_explicit_flag_wins_with_a_warning(tmp_path):
    from fastrm.config import RewardConfig
    from fastrm.synthetic import byte_tokenizer, synthetic_pairs
    from fastrm.trainer import RewardTrainer

    tok = byte_tokenizer()
    torch.manual_seed(0)
    cfg = RewardConfig(
        output_dir=str(tmp_path / "run"),
        max_steps=2,
        pairs_per_step=4,
        save_steps=1,
        append_eos=False,
        max_length=40,
        progress=False,
    )
    RewardTrainer(load_model("tiny-llama", tokenizer=tok), cfg, synthetic_pairs(16), tokenizer=tok).train()
    for folder in (tmp_path / "run", tmp_path / "run" / "checkpoint-1", tmp_path / "run" / "checkpoint-2"):
        rule = formatting.read_rule(folder)
        assert rule is not None and (rule.rule, rule.append_eos, rule.max_length) == ("fastrm", False, 40), folder
    model = load_model(tmp_path / "run")
    assert model.scoring_rule.origin == "record" and not model.scoring_rule.append_eos
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        base = score(model, "Say something about Ada.", [" Ada is kind.", " Ada is rude."])
        (enc,) = formatting.encode_groups(model.scoring_rule, tok, ["Say something about Ada."], [[" Ada is kind."]])
        assert enc.responses[0][-1] != tok.eos_token_id  # no EOS: the last text token is pooled, as trained
    with pytest.warns(formatting.ScoringRuleWarning, match=r"--append-eos true differs .*append_eos=False"):
        other = score(model, "Say something about Ada.", [" Ada is kind.", " Ada is rude."], append_eos=True)
    assert other != base
    # a run written before records existed: its training_config.json says how it was trained
    (tmp_path / "run" / formatting.RULE_FILE).unlink()
    legacy = load_model(tmp_path / "run").scoring_rule
    assert (legacy.rule, legacy.append_eos, legacy.max_length) == ("fastrm", False, 40)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / formatting.RULE_FILE).write_text(json.dumps({"format": "fastrm-scoring", "version": 1, "pool": "x"}))
    with pytest.raises(ValueError, match=r"fastrm_scoring.json: the fastrm rule pools 'last'"):
        formatting.read_rule(bad)


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _chat(prompt: str, response: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


@pytest.mark.parametrize("setting", ["append_eos_false", "chat_template", "short_max_length"])
def test_fastrm_eval_equals_the_trainers_final_eval(setting, tmp_path, capsys):
    """Issue 31.1: the checkpoint scores its own eval file as the trainer did, for settings that change a score."""
    from fastrm.config import RewardConfig
    from fastrm.synthetic import byte_tokenizer, synthetic_pairs
    from fastrm.trainer import RewardTrainer

    tok = byte_tokenizer()
    rows = synthetic_pairs(48, seed=3)
    kw = dict(max_length=2048, append_eos=True)
    if setting == "append_eos_false":
        kw["append_eos"] = False
    elif setting == "short_max_length":
        kw["max_length"] = 24  # prompts (and some responses) are cut
        tok.chat_template = CHAT_TEMPLATE  # shipped, but plain pair rows never use it: nor may bench by default
    else:
        tok.chat_template = CHAT_TEMPLATE
        rows = [{k: _chat(r["prompt"], r[k]) for k in ("chosen", "rejected")} for r in rows]
    train, evals = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows[:32]))
    evals.write_text("".join(json.dumps(r) + "\n" for r in rows[32:]))
    torch.manual_seed(0)
    cfg = RewardConfig(
        output_dir=str(tmp_path / "run"), max_steps=3, pairs_per_step=8, learning_rate=3e-3, progress=False, **kw
    )
    result = RewardTrainer(load_model("tiny-llama", tokenizer=tok), cfg, str(train), str(evals), tokenizer=tok).train()
    capsys.readouterr()
    assert cli.main(["eval", "--model", str(tmp_path / "run"), "--data", str(evals)]) == 0
    got = json.loads(capsys.readouterr().out)
    want = result["eval"]
    assert got["num_pairs"] == want["num_pairs"] == 16
    for key in ("accuracy", "bt_loss", "margin_mean", "margin_std"):
        assert got[key] == pytest.approx(want[key], abs=1e-5), key
    if setting != "chat_template":  # bench = eval on a pair file (issue 27.1): plain text, the checkpoint's rule
        out = tmp_path / "bench"
        assert cli.main(["bench", "--model", str(tmp_path / "run"), str(evals), "--output-dir", str(out)]) == 0
        (section,) = json.loads((out / "bench_report.json").read_text())["sections"]
        for key in ("num_pairs", "accuracy", "bt_loss", "margin_mean"):
            assert section[key] == pytest.approx(got[key], abs=1e-5), key
        capsys.readouterr()
    if setting != "chat_template":  # the other rule scores differently: the test can see the bug it is for
        flag = ["--append-eos", "true"] if setting == "append_eos_false" else ["--max-length", "2048"]
        with pytest.warns(formatting.ScoringRuleWarning):
            assert cli.main(["eval", "--model", str(tmp_path / "run"), "--data", str(evals), *flag]) == 0
        other = json.loads(capsys.readouterr().out)
        assert other["bt_loss"] != pytest.approx(want["bt_loss"], abs=1e-5)
