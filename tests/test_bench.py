"""``fastrm bench``: RM-Bench numbers against an independent computation, shared-prompt scores against one sequence
at a time (stock HF), pair and best-of-N files, bad input, and the command on all four RM-Bench domains."""

import gzip
import json
import math

import numpy as np
import pytest
import torch

from fastrm import evaluate_benchmark
from fastrm.cli import main as cli_main
from fastrm.data import DataError

TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: the CPU attention path is many small SDPA calls, which oversubscribed OpenMP threads
    slow down many times over on a busy 2-core machine."""
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
    """A tiny Llama-shaped reward model (1 layer, hidden 32) briefly trained on the synthetic task and saved as a
    fastrm checkpoint with the GPT-NeoX tokenizer; it must have learned something (non-degenerate scores)."""
    from transformers import LlamaConfig

    from fastrm import RewardConfig, RewardTrainer, load_model
    from fastrm.synthetic import synthetic_pairs

    out = tmp_path_factory.mktemp("bench_ckpt")
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
    args = RewardConfig(
        output_dir=str(out), learning_rate=3e-3, pairs_per_step=16, max_steps=20, warmup_ratio=0.0, progress=False
    )
    res = RewardTrainer(
        model, args, synthetic_pairs(320, seed=0), synthetic_pairs(64, seed=1, flip=0.0), tokenizer=neox_tokenizer
    ).train()
    assert res["eval"]["accuracy"] > 0.8, res["eval"]
    return out


def _scores(out_dir):
    return [json.loads(line) for line in (out_dir / "bench_scores.jsonl").read_text().splitlines()]


def _reference_rm_bench(rows):
    """RM-Bench accuracy written out loop by loop (its README's compute_accuracy): not the code under test."""
    k = len(rows[0]["score_chosen"])
    acc = [[0.0] * k for _ in range(k)]
    for r in rows:
        for i in range(k):
            for j in range(k):
                acc[i][j] += 1.0 if r["score_chosen"][i] > r["score_rejected"][j] else 0.0
    acc = [[x / len(rows) for x in row] for row in acc]
    hard = sum(acc[i][j] for i in range(k) for j in range(k) if i < j) / (k * (k - 1) / 2)
    normal = sum(acc[i][i] for i in range(k)) / k
    easy = sum(acc[i][j] for i in range(k) for j in range(k) if i > j) / (k * (k - 1) / 2)
    return {"hard": hard, "normal": normal, "easy": easy, "matrix": acc}


def test_rm_bench_numbers_match_an_independent_computation_and_stock_hf_scores(ckpt, rm_dir, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "b"
    argv = ["bench", "--model", str(ckpt), "rm-bench", "--rm-bench-dir", str(rm_dir), "--limit", "10"]
    assert cli_main([*argv, "--output-dir", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "overall (3 domains)" in printed and "hard" in printed and "rendering: plain prompt" in printed
    report = json.loads((out / "bench_report.json").read_text())
    rows = _scores(out)
    assert len(rows) == 40 and all(f["prompt_truncated"] == 0 for f in report["files"])
    by_file = {}
    for r in rows:
        by_file.setdefault(r["file"], []).append(r)
    for f in report["files"]:
        want = _reference_rm_bench(by_file[f["path"]])
        got = report["rm_bench"]["files"][f["name"]]
        for key in ("hard", "normal", "easy"):
            assert got[key] == pytest.approx(want[key], abs=1e-12), (f["name"], key)
        assert np.allclose(got["matrix"], want["matrix"], atol=1e-12)
    # RM-Bench's domains by name prefix: the two safety files are one Safety domain (one matrix over both)
    paths = {f["name"]: f["path"] for f in report["files"]}
    domains = {
        "chat": by_file[paths["chat"]],
        "code": by_file[paths["code"]],
        "safety": by_file[paths["safety-refuse"]] + by_file[paths["safety-response"]],
    }
    assert list(report["rm_bench"]["domains"]) == ["chat", "code", "safety"]
    want = {d: _reference_rm_bench(r) for d, r in domains.items()}
    for d, w in want.items():
        for key in ("hard", "normal", "easy"):
            assert report["rm_bench"]["domains"][d][key] == pytest.approx(w[key], abs=1e-12), (d, key)
    for key in ("hard", "normal", "easy"):
        mean = sum(w[key] for w in want.values()) / len(want)
        assert report["rm_bench"]["overall"][key] == pytest.approx(mean, abs=1e-12)
        assert report["rm_bench"]["pooled"][key] == pytest.approx(_reference_rm_bench(rows)[key], abs=1e-12)
    avg = np.mean([np.mean([w["hard"], w["normal"], w["easy"]]) for w in want.values()])
    assert report["rm_bench"]["overall"]["avg"] == pytest.approx(avg, abs=1e-12)
    assert report["rendering"]["name"] == "default" and "math" in report["comparable_with"]["rm_bench"]
    spread = [s for r in rows for s in r["scores"]]
    assert np.std(spread) > 1e-3, "degenerate scores would make every comparison a tie"

    # The shared-prompt scores equal stock transformers scoring each (prompt, response) alone.
    hf = AutoModelForSequenceClassification.from_pretrained(ckpt).eval()
    tok = AutoTokenizer.from_pretrained(ckpt)
    for path, domain_rows in by_file.items():
        with gzip.open(path, "rt") as fh:
            rec = json.load(fh)[0]
        p = tok(rec["prompt"], add_special_tokens=False)["input_ids"]
        for resp, want_score in zip(rec["chosen"] + rec["rejected"], domain_rows[0]["scores"]):
            ids = p + tok(resp, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            with torch.no_grad():
                alone = hf(input_ids=torch.tensor([ids])).logits[0, 0].item()
            assert alone == pytest.approx(want_score, abs=1e-4)


def test_shared_prompt_scores_equal_one_sequence_per_response(ckpt, rm_dir, tmp_path):
    kw = dict(rm_bench_dir=rm_dir, limit=4, max_length=2048)
    a = evaluate_benchmark(str(ckpt), "rm-bench:chat,safety-response", output_dir=tmp_path / "a", **kw)
    b = evaluate_benchmark(
        str(ckpt), "rm-bench:chat,safety-response", prefix_sharing=False, output_dir=tmp_path / "b", **kw
    )
    # A token budget smaller than a whole group: each group is scored in pieces of responses, each with the prompt.
    c = evaluate_benchmark(
        str(ckpt), "rm-bench:chat,safety-response", max_tokens_per_batch=1500, output_dir=tmp_path / "c", **kw
    )
    assert c["timing"]["tokens_computed"] > a["timing"]["tokens_computed"]  # the prompt went with every piece
    sa, sb, sc = _scores(tmp_path / "a"), _scores(tmp_path / "b"), _scores(tmp_path / "c")
    assert [r["source"] for r in sa] == [r["source"] for r in sb] == [r["source"] for r in sc]
    assert np.allclose([r["scores"] for r in sa], [r["scores"] for r in sb], atol=1e-5)
    assert np.allclose([r["scores"] for r in sa], [r["scores"] for r in sc], atol=1e-5)
    with pytest.raises(ValueError, match="more than max_tokens_per_batch=100"):
        evaluate_benchmark(str(ckpt), "rm-bench:chat", max_tokens_per_batch=100, **kw)
    assert a["timing"]["tokens_computed"] < b["timing"]["tokens_computed"] == a["timing"]["tokens_unshared"]
    assert a["rm_bench"]["overall"] == b["rm_bench"]["overall"]


def test_hf_checkpoint_with_a_chat_template(tmp_path, rm_dir, neox_tokenizer):
    """Any HF sequence-classification checkpoint: its chat template renders the prompt when asked
    (``chat_template="auto"``), the report says so, and each score is the stock model's score of the rendered
    prompt + response as the tokenizer's default call encodes it (the checkpoint has no fastrm record: rule hf)."""
    from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

    from fastrm.bench_data import render_prompt

    torch.manual_seed(1)
    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        vocab_size=len(neox_tokenizer),
        num_labels=1,
    )
    hf_dir = tmp_path / "hf"
    LlamaForSequenceClassification(cfg).save_pretrained(hf_dir)
    neox_tokenizer.chat_template = TEMPLATE
    try:
        neox_tokenizer.save_pretrained(hf_dir)
    finally:
        neox_tokenizer.chat_template = None
    report = evaluate_benchmark(
        str(hf_dir), "rm-bench:code", rm_bench_dir=rm_dir, limit=2, output_dir=tmp_path / "o", chat_template="auto"
    )
    assert "chat template" in report["prompt_format"] and "the tokenizer's" in report["prompt_format"]
    assert report["scoring_rule"]["rule"] == "hf"
    hf = AutoModelForSequenceClassification.from_pretrained(hf_dir).eval()
    with gzip.open(rm_dir / "code_filtered.json.gz", "rt") as fh:
        rec = json.load(fh)[1]
    prompt = f"<|user|>\n{rec['prompt']}\n<|assistant|>\n"
    got = _scores(tmp_path / "o")[1]["scores"]
    for resp, want in zip(rec["chosen"] + rec["rejected"], got):
        ids = neox_tokenizer(prompt + resp)["input_ids"]
        with torch.no_grad():
            assert hf(input_ids=torch.tensor([ids])).logits[0, 0].item() == pytest.approx(want, abs=1e-4)
    hh = "\n\nHuman: hi\n\nAssistant: yo\n\nHuman: and?\n\nAssistant:"  # an HH prompt renders as its turns
    want = "<|user|>\nhi\n<|assistant|>\nyo\n<|user|>\nand?\n<|assistant|>\n"
    assert render_prompt(neox_tokenizer, TEMPLATE, hh) == want
    plain = evaluate_benchmark(str(hf_dir), "rm-bench:code", rm_bench_dir=rm_dir, limit=2)  # the default
    assert plain["prompt_format"].startswith("plain")


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_pair_and_best_of_n_files_one_report(ckpt, tmp_path, shared_data):
    from fastrm.synthetic import synthetic_pairs

    pairs = _jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(40, seed=5, flip=0.0))
    bon_rows = []
    for i, r in enumerate(synthetic_pairs(30, seed=6, flip=0.0)):
        other = synthetic_pairs(1, seed=100 + i, flip=0.0)[0]["rejected"]
        if i % 2:
            bon_rows.append({"prompt": r["prompt"], "responses": [r["rejected"], r["chosen"], other], "best": 1})
        else:  # the label as given scores: the argmax is the best
            bon_rows.append({"prompt": r["prompt"], "responses": [r["chosen"], other], "scores": [2.0, 0.5]})
    bon = _jsonl(tmp_path / "bon.jsonl", bon_rows)
    bon_tie = _jsonl(tmp_path / "tie.jsonl", [{"prompt": "Q", "responses": [" a", " b", " c"], "scores": [1, 3, 3]}])
    hh = shared_data / "hh-rlhf" / "harmless-base_test.jsonl.gz"
    out = tmp_path / "o"
    report = evaluate_benchmark(str(ckpt), [pairs, bon, bon_tie, hh], limit=40, output_dir=out, max_length=512)
    secs = {s["name"]: s for s in report["sections"]}
    assert [s["format"] for s in report["sections"]] == ["pairs", "best-of-n", "best-of-n", "pairs"]
    rows = {r["source"]: r for r in _scores(out)}
    # pair accuracy recomputed from the per-response scores
    p_rows = [r for r in rows.values() if r["file"] == str(pairs)]
    assert secs["pairs"]["accuracy"] == pytest.approx(np.mean([r["scores"][0] > r["scores"][1] for r in p_rows]))
    assert secs["pairs"]["accuracy"] > 0.8  # the trained model ranks its own task
    # best-of-N: the model's first-highest response must be the labelled best; the rank of the labelled best
    b_rows = [r for r in rows.values() if r["file"] == str(bon)]
    hits, ranks = [], []
    for r in b_rows:
        s = r["scores"]
        best_i = max(range(len(s)), key=lambda i: (s[i], -i))
        hits.append(best_i in r["best"])
        ranks.append(min(1 + sum(x > s[b] for x in s) + sum(x == s[b] for x in s[:b]) for b in r["best"]))
    assert secs["bon"]["accuracy"] == pytest.approx(np.mean(hits))
    assert secs["bon"]["mean_rank"] == pytest.approx(np.mean(ranks))
    assert secs["bon"]["accuracy"] > secs["bon"]["random_baseline_accuracy"]
    assert secs["tie"]["label_ties"] == 1 and rows[f"{bon_tie}:1"]["best"] == [1, 2]
    assert secs["harmless-base_test"]["num_pairs"] == 40 and report["files"][3]["bytes"] == hh.stat().st_size
    assert (out / "bench_margin_hist.png").stat().st_size > 0 and "rm_bench" not in report


@pytest.mark.parametrize(
    "row, match",
    [
        ({"prompt": "Q", "chosen": [], "rejected": ["b"]}, r"bad\.jsonl:2: field 'chosen': expected a non-empty list"),
        ({"prompt": "Q", "chosen": ["a", "b"], "rejected": ["c"]}, r":2: field 'rejected': mismatched lengths: 2 .* 1"),
        ({"prompt": "Q", "chosen": ["a", 3], "rejected": ["c", "d"]}, r":2: field 'chosen\[1\]': .* got int"),
        ({"prompt": "Q", "chosen": ["a"], "rejected": ["c"]}, r":2: field 'chosen': expected 2 responses per side"),
        ({"question": "Q", "answer": "A"}, r":2: unknown format \(keys: answer, question\)"),
        ({"prompt": "Q", "chosen": "a", "rejected": "b"}, r":2: this record is pairs, the file is rm-bench"),
        ("{not json", r":2: invalid JSON"),
    ],
)
def test_bad_rm_bench_style_records_name_file_line_and_field(tmp_path, row, match):
    from fastrm.bench_data import read_bench_file

    path = _jsonl(tmp_path / "bad.jsonl", [{"prompt": "Q", "chosen": ["a", "b"], "rejected": ["c", "d"]}, row])
    with pytest.raises(DataError, match=match):
        read_bench_file(path)
    skipped = read_bench_file(path, on_bad_row="skip")
    assert len(skipped.records) == 1 and skipped.stats.bad_rows_skipped == 1 and ":2:" in skipped.skipped[0]


@pytest.mark.parametrize(
    "row, match",
    [
        ({"prompt": "Q", "responses": ["a", "b"]}, r"field 'best': missing"),
        ({"prompt": "Q", "responses": ["a", "b"], "best": 2}, r"field 'best': expected an index in \[0, 2\)"),
        ({"prompt": "Q", "responses": ["a", "b"], "best": True}, r"field 'best'"),
        ({"prompt": "Q", "responses": ["a", "b"], "scores": [1.0]}, r"field 'scores': mismatched lengths: 1 .* 2"),
        ({"prompt": "Q", "responses": ["a", None], "best": 0}, r"field 'responses\[1\]': .* got null"),
        ({"prompt": "Q", "responses": [], "best": 0}, r"field 'responses': .* got an empty list"),
        ({"prompt": "Q", "responses": ["a", "b"], "scores": [1, 2], "best": 0}, r"field 'best': response 0 does not"),
    ],
)
def test_bad_best_of_n_records(tmp_path, row, match):
    from fastrm.bench_data import read_bench_file

    path = _jsonl(tmp_path / "bon.jsonl", [row])
    with pytest.raises(DataError, match=r"bon\.jsonl:1: " + match):
        read_bench_file(path)


def test_command_errors_are_one_line_and_skips_are_reported(ckpt, tmp_path, capsys):
    good = {"prompt": "Say something about Ada.\n", "chosen": [" Ada is kind."], "rejected": [" Ada is rude."]}
    path = _jsonl(tmp_path / "mixed.jsonl", [good, {"prompt": "Q", "chosen": [" a"], "rejected": []}, good])
    argv = ["bench", "--model", str(ckpt), str(path), "--output-dir", str(tmp_path / "o"), "--no-progress"]
    assert cli_main(argv) == 1
    err = capsys.readouterr().err
    assert "mixed.jsonl:2: field 'rejected'" in err and "Traceback" not in err
    assert cli_main([*argv, "--on-bad-row", "skip"]) == 0
    report = json.loads((tmp_path / "o" / "bench_report.json").read_text())
    f = report["files"][0]
    assert (f["records"], f["scored"], f["skipped"]) == (3, 2, 1) and "mixed.jsonl:2" in f["skipped_records"][0]
    assert (
        report["rm_bench"]["files"]["mixed"]["num_prompts"] == 2
        and report["rm_bench"]["files"]["mixed"]["hard"] is None
    )
    assert report["rm_bench"]["domains"]["mixed"]["files"] == ["mixed"]  # not an RM-Bench domain name: its own
    assert cli_main(["bench", "--model", str(ckpt), str(tmp_path / "nope.jsonl")]) == 1
    assert "no such file or folder" in capsys.readouterr().err


def test_help_shows_examples_and_the_definition(capsys):
    with pytest.raises(SystemExit):
        cli_main(["bench", "--help"])
    text = capsys.readouterr().out
    assert "fastrm bench --model runs/hh rm-bench" in text and "a tie counts 0" in text
    assert "--no-prefix-sharing" in text and "--on-bad-row" in text and "upper-right" in text
    assert cli_main(["--help"]) == 0 and "bench" in capsys.readouterr().out


def test_ray_output_joins_back_to_the_records(tmp_path):
    """The Ray path's join, without starting Ray: scored rows and rejected rows (as ray_bon writes them) map back
    to the validated records by line number; a record the job rejected is a bad record."""
    from fastrm.bench_data import read_bench_file
    from fastrm.bench_ray import join_ray_scores

    path = _jsonl(tmp_path / "bon.jsonl", [{"prompt": "Q", "responses": ["a", "b"], "best": i % 2} for i in range(3)])
    bf = read_bench_file(path)
    src = str(path.resolve())
    scored = _jsonl(tmp_path / "s.jsonl", [{"source": f"{src}:{i}", "scores": [0.0, float(i)]} for i in (1, 3)])
    errors = _jsonl(tmp_path / "e.jsonl", [{"source": f"{src}:2", "row": 1, "reason": "response 1: too long"}])
    with pytest.raises(DataError, match=r"bon\.jsonl:2: response 1: too long"):
        join_ray_scores(bf, scored, errors)
    assert join_ray_scores(bf, scored, errors, on_bad_row="skip") == [[0.0, 1.0], [0.0, 3.0]]
    assert len(bf.records) == 2 and bf.stats.bad_rows_skipped == 1


def test_all_four_rm_bench_domains(ckpt, rm_dir, tmp_path, capsys):
    """The whole of RM-Bench (798 prompts, 4,788 responses) with the tiny model, in CI time."""
    out = tmp_path / "all"
    argv = ["bench", "--model", str(ckpt), "rm-bench", "--rm-bench-dir", str(rm_dir), "--max-length", "512"]
    assert cli_main([*argv, "--output-dir", str(out), "--no-progress"]) == 0
    table = capsys.readouterr().out
    report = json.loads((out / "bench_report.json").read_text())
    rm = report["rm_bench"]
    counts = {name: d["num_prompts"] for name, d in rm["files"].items()}
    assert counts == {"chat": 129, "code": 228, "safety-refuse": 284, "safety-response": 157}
    assert {name: d["num_prompts"] for name, d in rm["domains"].items()} == {"chat": 129, "code": 228, "safety": 441}
    assert rm["pooled"]["num_prompts"] == 798 and rm["missing_domains"] == ["math"]
    assert rm["files"]["safety-refuse"]["subsets"].keys() >= {"refusals-dangerous", "refusals-offensive"}
    for key in ("hard", "normal", "easy", "avg"):
        assert 0.0 <= rm["overall"][key] <= 1.0
        assert math.isclose(rm["overall"][key], np.mean([d[key] for d in rm["domains"].values()]))
    assert report["timing"]["responses"] == 4788 and report["timing"]["responses_per_s"] > 0
    assert sum(f["response_truncated"] for f in report["files"]) > 0  # max_length 512 cuts some, and says so
    assert (out / "bench_rm_bench.png").stat().st_size > 0
    for name in counts:
        assert name in table


def test_speed_script_scores_agree_and_prints_the_ratio(rm_dir, tmp_path, capsys):
    """benchmarks/bench_scoring.py (smoke size): every variant gives the shared-prompt scores; the ratios print.
    The committed CPU result is benchmarks/results/bench_scoring_cpu_*.json."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_scoring.py"
    spec = importlib.util.spec_from_file_location("bench_scoring", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = mod.main(["--smoke", "--rm-bench-dir", str(rm_dir), "--out", str(tmp_path / "s.json")])
    assert set(res["variants"]) == {"shared_prompt", "separate_packed", "one_at_a_time", "hf_padded"}
    assert all(v["max_abs_score_diff_vs_shared"] < 1e-4 for v in res["variants"].values())
    assert res["workload"]["tokens_shared_prompt"] < res["workload"]["tokens_one_sequence_per_response"]
    assert "one_at_a_time takes" in capsys.readouterr().out
