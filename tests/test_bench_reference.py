"""``fastrm bench --rendering rm-bench``: RM-Bench's numbers as RM-Bench computes them, against a reference written
here from RM-Bench's scripts (run_rm.py, utils.py) and FastChat's templates: the conversation text, the tokens,
where stock transformers reads the reward, and the arithmetic (domains by name prefix, one Safety domain, the
overall means) — none of it imported from fastrm."""

import copy
import gzip
import json
import shutil

import numpy as np
import pytest
import torch

from fastrm import evaluate_benchmark
from fastrm.cli import main as cli_main
from fastrm.data import DataError

# FastChat's get_prompt() of each template for the turns Hi / Hello! / Why? / Because. (lm-sys/FastChat 0e6d3e4)
FASTCHAT = {
    "tulu": "<|user|>\nHi\n<|assistant|>\nHello!\n<|user|>\nWhy?\n<|assistant|>\nBecause.\n",
    "zephyr": "<|system|>\n</s>\n<|user|>\nHi</s>\n<|assistant|>\nHello!</s>\n<|user|>\nWhy?</s>\n<|assistant|>\n"
    "Because.</s>\n",
    "vicuna_v1.1": "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions. USER: Hi ASSISTANT: Hello!</s>USER: Why? "
    "ASSISTANT: Because.</s>",
    "llama-2": "[INST] Hi [/INST] Hello! </s><s>[INST] Why? [/INST] Because. </s><s>",
    "mistral": "[INST] Hi [/INST] Hello!</s>[INST] Why? [/INST] Because.</s>",
    "oasst_pythia": "<|prompter|>Hi<|endoftext|><|assistant|>Hello!<|endoftext|><|prompter|>Why?<|endoftext|>"
    "<|assistant|>Because.<|endoftext|>",
    "raw": "HiHello!Why?Because.",
}
# A chat template whose end-of-turn text is the EOS: the text after the response ends in it.
EOT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|endoftext|>{% endfor %}"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def rm_dir(shared_data):
    d = shared_data / "rm-bench"
    if not d.is_dir():
        pytest.skip(f"RM-Bench data not found at {d}")
    return d


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, neox_tokenizer):
    """A tiny Llama-shaped reward model briefly trained on the synthetic task (non-degenerate scores), saved with
    the GPT-NeoX tokenizer (pad = EOS, so its config's pad_token_id is null)."""
    from transformers import LlamaConfig

    from fastrm import RewardConfig, RewardTrainer, load_model
    from fastrm.synthetic import synthetic_pairs

    out = tmp_path_factory.mktemp("ref_ckpt")
    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        vocab_size=len(neox_tokenizer),
    )
    torch.manual_seed(0)
    model = load_model(cfg, tokenizer=neox_tokenizer)
    args = RewardConfig(output_dir=str(out), learning_rate=3e-3, pairs_per_step=16, max_steps=20, progress=False)
    RewardTrainer(model, args, synthetic_pairs(320, seed=0), tokenizer=neox_tokenizer).train()
    return out


# ------------------------------------------------------------------------------------------------ the reference


_PREPARED = {}


def _reference_tokenizer(tok, append_eos):
    """A copy set up as run_rm.py sets its tokenizer (once per tokenizer and setting: copies are slow)."""
    key = (id(tok), append_eos)
    if key not in _PREPARED:
        t = copy.deepcopy(tok)
        t.truncation_side = "left"
        if append_eos:
            t.add_eos_token = True
        _PREPARED[key] = (tok, t)  # the original kept alive so its id is not reused
    return _PREPARED[key][1]


def reference_score(hf, tok, text, *, append_eos, max_length):
    """RM-Bench's run_rm.py: ``tokenizer.truncation_side = "left"``, ``add_eos_token = True`` without a chat
    template, the pipeline's tokenizer call (special tokens on, truncation to max_length), pad = EOS when the
    tokenizer has none and the model config's pad = the tokenizer's when it has none; stock transformers then reads
    the reward at the last token that is not the pad."""
    tok = _reference_tokenizer(tok, append_eos)
    if tok.pad_token_id is None:
        hf.config.pad_token_id = tok.pad_token_id = tok.eos_token_id
    if hf.config.pad_token_id is None:
        hf.config.pad_token_id = tok.pad_token_id
    ids = tok(text, truncation=True, max_length=max_length)["input_ids"]
    with torch.no_grad():
        return hf(input_ids=torch.tensor([ids])).logits[0, 0].item()


def compute_accuracy(results):
    """RM-Bench scripts/utils.py compute_accuracy (one domain), as written there."""
    size = 3
    acc = np.zeros((size, size))
    for r in results:
        for i in range(len(r["score_chosen"])):
            for j in range(len(r["score_rejected"])):
                if r["score_chosen"][i] > r["score_rejected"][j]:
                    acc[i][j] += 1
    acc /= len(results)
    upper = size * (size - 1) / 2
    return {
        "hard_acc": np.sum(np.triu(acc, 1)) / upper,
        "normal_acc": np.mean(np.diag(acc)),
        "easy_acc": np.sum(np.tril(acc, -1)) / upper,
    }


def compute_total(results):
    """RM-Bench's compute_accuracy on total_dataset.json: domains by prefix of 'domain', then the means (the math
    domain is absent from the shared data, so it is left out instead of failing on an empty list)."""
    per = {}
    for d in ("chat", "math", "code", "safety"):
        rows = [r for r in results if r["domain"].startswith(d)]
        if rows:
            per[d] = compute_accuracy(rows)
    avg = {d: np.mean(list(v.values())) for d, v in per.items()}
    return (
        per,
        {
            "hard": np.mean([v["hard_acc"] for v in per.values()]),
            "normal": np.mean([v["normal_acc"] for v in per.values()]),
            "easy": np.mean([v["easy_acc"] for v in per.values()]),
            "avg": np.mean(list(avg.values())),
        },
        avg,
    )


def reference_run(hf, tok, rm_dir, domains, limit, render, *, append_eos, max_length=2048):
    rows = []
    for d in domains:
        with gzip.open(rm_dir / f"{d}_filtered.json.gz", "rt") as fh:
            for rec in json.load(fh)[:limit]:
                row = {"domain": d, "id": rec["id"]}
                for side in ("chosen", "rejected"):
                    texts = [render(rec["prompt"], r) for r in rec[side]]
                    row[f"score_{side}"] = [
                        reference_score(hf, tok, t, append_eos=append_eos, max_length=max_length) for t in texts
                    ]
                rows.append(row)
    return rows


def check_against_reference(report, bench_rows, ref_rows):
    """Per-response scores agree, and every RM-Bench number equals the reference's, computed from its own scores."""
    got = {(r["file"].split("/")[-1].split("_filtered")[0], r["id"]): r for r in bench_rows}
    assert len(got) == len(ref_rows)
    for ref in ref_rows:
        mine = got[(ref["domain"], ref["id"])]
        assert np.allclose(mine["score_chosen"], ref["score_chosen"], atol=1e-4)
        assert np.allclose(mine["score_rejected"], ref["score_rejected"], atol=1e-4)
    rm = report["rm_bench"]
    for name in rm["files"]:  # each file alone, as compute_accuracy on that file
        want = compute_accuracy([r for r in ref_rows if r["domain"] == name])
        for level in ("hard", "normal", "easy"):
            assert rm["files"][name][level] == pytest.approx(want[f"{level}_acc"], abs=1e-12), (name, level)
    per, overall, avg = compute_total(ref_rows)
    assert list(rm["domains"]) == list(per)
    for d, v in per.items():
        for level in ("hard", "normal", "easy"):
            assert rm["domains"][d][level] == pytest.approx(v[f"{level}_acc"], abs=1e-12), (d, level)
        assert rm["domains"][d]["avg"] == pytest.approx(avg[d], abs=1e-12)
    for key, v in overall.items():
        assert rm["overall"][key] == pytest.approx(v, abs=1e-12), key


# ------------------------------------------------------------------------------------------------ tests


def tulu(prompt, response):
    """FastChat's tulu template (ADD_NEW_LINE_SINGLE, sep "\\n"), one user and one assistant turn."""
    return f"<|user|>\n{prompt}\n<|assistant|>\n{response}\n"


def test_rm_bench_rendering_gives_rm_bench_numbers(ckpt, rm_dir, tmp_path, capsys):
    """No chat template: tulu + EOS; the reward read where RM-Bench's pipeline reads it (pad = EOS here)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "o"
    argv = ["bench", "--model", str(ckpt), "rm-bench", "--rm-bench-dir", str(rm_dir), "--limit", "6"]
    assert cli_main([*argv, "--rendering", "rm-bench", "--output-dir", str(out), "--no-progress"]) == 0
    table = capsys.readouterr().out
    assert "rendering: rm-bench reference rendering: conversation template 'tulu'" in table and "safety" in table
    report = json.loads((out / "bench_report.json").read_text())
    assert report["rendering"]["conversation_template"] == "tulu" and report["rendering"]["eos_appended"]
    # fastrm saves a pad distinct from the EOS (config pad_token_id 1), so the pipeline reads the reward at the EOS
    assert report["rendering"]["reward_token"] == "last token that is not pad id 1"
    assert all(f["rendering"]["reward_before_trailing_pad"] == 0 for f in report["files"])
    assert report["rm_bench"]["domains"]["safety"]["files"] == ["safety-refuse", "safety-response"]
    assert "no math domain" in report["comparable_with"]["rm_bench"]
    bench_rows = [json.loads(x) for x in (out / "bench_scores.jsonl").read_text().splitlines()]

    hf = AutoModelForSequenceClassification.from_pretrained(ckpt).eval()
    tok = AutoTokenizer.from_pretrained(ckpt)
    assert tok.chat_template is None and hf.config.pad_token_id == tok.pad_token_id == 1
    domains = ["chat", "code", "safety-refuse", "safety-response"]
    ref_rows = reference_run(hf, tok, rm_dir, domains, 6, tulu, append_eos=True)
    check_against_reference(report, bench_rows, ref_rows)

    # The default rendering is fastrm's own formatting: other scores, and the report says which was used.
    default = evaluate_benchmark(str(ckpt), "rm-bench:chat", rm_bench_dir=rm_dir, limit=6)
    assert default["rendering"]["name"] == "default" and "bench = eval" in default["comparable_with"]["rm_bench"]


def test_chat_template_over_the_whole_conversation_with_special_tokens(ckpt, rm_dir, tmp_path, neox_tokenizer):
    """With a chat template: the whole conversation rendered (end-of-turn after the response included), the
    tokenizer's BOS added, nothing appended, cut from the left (BOS kept). A model with no pad id and a tokenizer
    padding with its EOS, as many hub checkpoints: the reference reads the reward before the trailing EOS."""
    from transformers import AutoModelForSequenceClassification

    tok = copy.deepcopy(neox_tokenizer)
    tok.bos_token = "<|padding|>"
    tok.add_bos_token = True  # a tokenizer that adds a BOS, as Llama's do
    tok.pad_token = tok.eos_token
    assert tok("x")["input_ids"][0] == tok.bos_token_id
    model_dir = tmp_path / "no_pad"
    shutil.copytree(ckpt, model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**cfg, "pad_token_id": None}))
    template = tmp_path / "eot.jinja"
    template.write_text(EOT_TEMPLATE)
    out = tmp_path / "o"
    kw = dict(rm_bench_dir=rm_dir, limit=4, tokenizer=tok, chat_template=str(template), max_length=160)
    report = evaluate_benchmark(
        str(model_dir), "rm-bench:chat,safety-response", rendering="rm-bench", output_dir=out, **kw
    )
    r = report["rendering"]
    assert (r["text"], r["eos_appended"], r["add_special_tokens"]) == ("chat_template", False, True)
    assert sum(f["prompt_truncated"] for f in report["files"]) > 0  # max_length 160 cuts some, and says so
    bench_rows = [json.loads(x) for x in (out / "bench_scores.jsonl").read_text().splitlines()]

    def eot(prompt, response):
        return f"<|user|>\n{prompt}<|endoftext|><|assistant|>\n{response}<|endoftext|>"

    hf = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    assert hf.config.pad_token_id is None
    ref_rows = reference_run(hf, tok, rm_dir, ["chat", "safety-response"], 4, eot, append_eos=False, max_length=160)
    check_against_reference(report, bench_rows, ref_rows)
    assert report["files"][0]["rendering"]["reward_before_trailing_pad"] == 24  # every text ends in <|endoftext|>


def test_conversation_templates_are_fastchats():
    from fastrm.bench_render import CONV_TEMPLATES

    assert set(CONV_TEMPLATES) == set(FASTCHAT)
    for name, want in FASTCHAT.items():
        assert CONV_TEMPLATES[name].render(["Hi", "Hello!", "Why?", "Because."]) == want, name
    assert CONV_TEMPLATES["tulu"].render(["", "A"]) == "<|user|>\n<|assistant|>\nA\n"  # an empty turn: its role


def test_reference_rendering_of_pairs_multi_turn_prompts_and_bad_records(ckpt, tmp_path):
    from fastrm.bench_data import read_bench_file
    from fastrm.bench_render import conversations

    rows = [
        {"prompt": "\n\nHuman: hi\n\nAssistant: yo\n\nHuman: and?\n\nAssistant:", "chosen": " a", "rejected": " b"},
        {"prompt": "Q", "chosen": " c", "rejected": " d"},
    ]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    bf = read_bench_file(path)
    assert conversations(bf.records[0]) == [["hi", "yo", "and?", " a"], ["hi", "yo", "and?", " b"]]
    report = evaluate_benchmark(str(ckpt), [path], rendering="rm-bench")
    assert report["sections"][0]["num_pairs"] == 2
    # A message-list prompt ending with an assistant turn cannot be read by position: a bad record, by line.
    bad = {"prompt": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "chosen": "a"}
    rb = tmp_path / "rb.jsonl"
    rb.write_text(json.dumps({"prompt": "Q", "chosen": " a", "rejected": " b", "subset": "s"}) + "\n")
    rb.write_text(rb.read_text() + json.dumps({**bad, "rejected": "b", "subset": "s"}) + "\n")
    with pytest.raises(DataError, match=r"rb\.jsonl:2: field 'prompt': 2 turns"):
        evaluate_benchmark(str(ckpt), [rb], rendering="rewardbench")
    skipped = evaluate_benchmark(str(ckpt), [rb], rendering="rewardbench", on_bad_row="skip")
    assert skipped["files"][0]["skipped"] == 1
    ids = tmp_path / "ids.jsonl"
    ids.write_text(json.dumps({"chosen_input_ids": [5, 6], "rejected_input_ids": [5, 7]}) + "\n")
    with pytest.raises(DataError, match="token ids cannot be rendered"):
        evaluate_benchmark(str(ckpt), [ids], rendering="rm-bench")
    with pytest.raises(ValueError, match="unknown rendering"):
        evaluate_benchmark(str(ckpt), [path], rendering="tulu")
    assert cli_main(["bench", "--model", str(ckpt), str(path), "--ray", "--rendering", "rm-bench"]) == 1
