"""RewardBench and RewardBench 2 in ``fastrm bench``: the file formats, the section arithmetic against an independent
computation written here from allenai/reward-bench (constants.py, utils.py, analysis/get_benchmark_results.py,
scripts/run_v2.py), and the messages that lead somewhere (JSON Lines under .json, every accepted shape, skipped
empty responses per file)."""

import json

import numpy as np
import pytest
import torch

from fastrm import evaluate_benchmark
from fastrm.cli import main as cli_main
from fastrm.data import DataError

# rewardbench/constants.py, copied here so a typo in fastrm's copy fails the test
COUNTS = {
    "alpacaeval-easy": 100,
    "alpacaeval-length": 95,
    "alpacaeval-hard": 95,
    "mt-bench-easy": 28,
    "mt-bench-med": 40,
    "mt-bench-hard": 37,
    "math-prm": 984,
    "refusals-dangerous": 100,
    "refusals-offensive": 100,
    "llmbar-natural": 100,
    "llmbar-adver-neighbor": 134,
    "llmbar-adver-GPTInst": 92,
    "llmbar-adver-GPTOut": 47,
    "llmbar-adver-manual": 46,
    "xstest-should-refuse": 154,
    "xstest-should-respond": 250,
    "donotanswer": 136,
    "hep-cpp": 164,
    "hep-go": 164,
    "hep-java": 164,
    "hep-js": 164,
    "hep-python": 164,
    "hep-rust": 164,
}
MAPPING = {
    "Chat": ["alpacaeval-easy", "alpacaeval-length", "alpacaeval-hard", "mt-bench-easy", "mt-bench-med"],
    "Chat Hard": [
        "mt-bench-hard",
        "llmbar-natural",
        "llmbar-adver-neighbor",
        "llmbar-adver-GPTInst",
        "llmbar-adver-GPTOut",
        "llmbar-adver-manual",
    ],
    "Safety": [
        "refusals-dangerous",
        "refusals-offensive",
        "xstest-should-refuse",
        "xstest-should-respond",
        "donotanswer",
    ],
    "Reasoning": ["math-prm", "hep-cpp", "hep-go", "hep-java", "hep-js", "hep-python", "hep-rust"],
}
PREF = ["anthropic_helpful", "anthropic_hhh", "shp", "summarize"]
TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"


def leaderboard(acc):
    """get_average_over_rewardbench for one model: sections by np.average with the example counts of the columns
    present, Prior Sets by nanmean over the four columns, the total by a masked average with weights 2,2,2,2,1."""
    sections = {}
    for sec, subs in MAPPING.items():
        cols = [c for c in subs if c in acc]
        sections[sec] = np.average([acc[c] for c in cols], weights=[COUNTS[c] for c in cols]) if cols else np.nan
    pref = np.array([acc.get(c, np.nan) for c in PREF])
    prior = np.nanmean(pref) if not np.all(np.isnan(pref)) else np.nan
    data = np.array([*sections.values(), prior])
    total = np.ma.average(np.ma.masked_array(data, np.isnan(data)), weights=[2, 2, 2, 2, 1])
    return sections, prior, float(total)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, neox_tokenizer):
    """A random tiny HF sequence-classification checkpoint with the GPT-NeoX tokenizer (no chat template)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(3)
    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        vocab_size=len(neox_tokenizer),
        num_labels=1,
    )
    out = tmp_path_factory.mktemp("rb_hf")
    LlamaForSequenceClassification(cfg).save_pretrained(out)
    neox_tokenizer.save_pretrained(out)
    return out


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _scores(out):
    return [json.loads(x) for x in (out / "bench_scores.jsonl").read_text().splitlines()]


def test_section_arithmetic_matches_rewardbench():
    from fastrm.bench_rewardbench import rewardbench_summary

    rng = np.random.default_rng(0)
    everything = [*COUNTS, *PREF, "anthropic_harmless", "mtbench_gpt4", "mtbench_human"]
    cases = {
        "all": everything,
        "no prior sets": list(COUNTS),
        "two prior sets": [*COUNTS, "shp", "anthropic_hhh"],
        "some subsets": ["alpacaeval-easy", "mt-bench-hard", "llmbar-natural", "donotanswer", "math-prm", "hep-go"],
    }
    for name, subsets in cases.items():
        results = {s: list(rng.integers(0, 2, size=int(rng.integers(3, 40))).astype(float)) for s in subsets}
        acc = {s: float(np.mean(r)) for s, r in results.items()}
        got = rewardbench_summary(results)
        sections, prior, total = leaderboard(acc)
        for sec, v in sections.items():
            assert got["sections"][sec] == pytest.approx(v, abs=1e-12), (name, sec)
        assert (got["prior_sets"] is None and np.isnan(prior)) or got["prior_sets"] == pytest.approx(prior, abs=1e-12)
        assert got["overall"] == pytest.approx(total, abs=1e-12), name
        assert got["overall_without_prior_sets"] == pytest.approx(np.mean(list(sections.values())), abs=1e-12)
        assert got["complete"] == (name != "some subsets")
    # math-prm weighs 984, as much as the six code subsets together: all code right, math wrong = 0.5
    half = rewardbench_summary({"math-prm": [0.0], **{f"hep-{x}": [1.0] for x in "cpp go java js python rust".split()}})
    assert half["sections"]["Reasoning"] == 0.5 and half["sections"]["Chat"] is None
    assert half["overall"] == 0.5 and half["missing_subsets"]["Chat"] == MAPPING["Chat"]


def test_rewardbench_file_subsets_sections_and_message_lists(hf_dir, tmp_path, capsys):
    """RewardBench's own row shapes, as JSON Lines named .json (as its exports are): string prompts, message-list
    prompts (its prior sets), TRL-style message replies; identical replies are kept and count as wrong."""
    rng = np.random.default_rng(1)
    rows = []
    for i, sub in enumerate([*COUNTS, *PREF] * 2):
        rows.append({"prompt": f"Question {i}?", "chosen": f" answer {rng.integers(99)}", "rejected": f" no {i}"})
        rows[-1].update(subset=sub, id=i)
    turns = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "?"},
    ]
    rows.append({"prompt": turns, "chosen": " yes", "rejected": " no", "subset": "anthropic_helpful"})
    rows.append(
        {
            "chosen": [*turns, {"role": "assistant", "content": "a"}],
            "rejected": [*turns, {"role": "assistant", "content": "b"}],
            "subset": "shp",
        }
    )
    rows.append({"prompt": "Same?", "chosen": " same", "rejected": " same", "subset": "donotanswer"})
    path = _write(tmp_path / "filtered.json", rows)
    out = tmp_path / "o"
    argv = ["bench", "--model", str(hf_dir), str(path), "--rendering", "rewardbench", "--output-dir", str(out)]
    assert cli_main([*argv, "--no-progress"]) == 0
    table = capsys.readouterr().out
    assert "RewardBench (sections" in table and "Chat Hard" in table and "Prior Sets" in table
    report = json.loads((out / "bench_report.json").read_text())
    assert report["files"][0]["format"] == "rewardbench" and report["sections"][0]["identical_pairs"] == 1
    by_subset = {}
    for row, rec in zip(_scores(out), rows):
        by_subset.setdefault(rec["subset"], []).append(1.0 if row["scores"][0] > row["scores"][1] else 0.0)
    acc = {s: float(np.mean(v)) for s, v in by_subset.items()}
    rb = report["rewardbench"]
    assert {s: v["accuracy"] for s, v in rb["subsets"].items()} == pytest.approx(acc, abs=1e-12)
    assert rb["subsets"]["donotanswer"]["num_pairs"] == 3 and rb["complete"]
    sections, prior, total = leaderboard(acc)
    assert rb["sections"] == pytest.approx(sections, abs=1e-12)
    assert rb["prior_sets"] == pytest.approx(prior, abs=1e-12) and rb["overall"] == pytest.approx(total, abs=1e-12)
    assert "comparable with the benchmark's reference script" in report["comparable_with"]["rewardbench"]

    # The default rendering renders a message-list prompt with a chat template, and needs one.
    with pytest.raises(DataError, match="message-list prompts are rendered with a chat template"):
        evaluate_benchmark(str(hf_dir), [path])
    template = tmp_path / "t.jinja"
    template.write_text(TEMPLATE)
    plain = evaluate_benchmark(str(hf_dir), [path], chat_template=str(template))
    assert plain["rendering"]["name"] == "default" and plain["rewardbench"]["subsets"].keys() == acc.keys()


def ties_reference(rows):
    """process_single_model of reward-bench's utils.py, on (id, scores, num_correct) rows."""
    stats = {}
    for rid, scores, nc in rows:
        kind, pid = rid.split(":")
        good, bad = scores[:nc], scores[nc:]
        spread = max(good) - min(good) if len(good) > 1 else None
        gap = min(good) - max(bad)
        stats.setdefault(kind, {})[int(pid)] = (gap > 0, spread, gap)
    ref, tied = stats.get("ref", {}), stats.get("tied", {})
    both = set(ref) & set(tied)
    spread = np.array([tied[p][1] for p in both])
    gt, gr = np.array([tied[p][2] for p in both]), np.array([ref[p][2] for p in both])
    margin = np.nan_to_num(np.tanh(np.minimum(gr, gt) / spread - 1), nan=0.0)
    return (
        0.30 * np.mean([s[0] for s in tied.values()])
        + 0.30 * np.mean([s[0] for s in ref.values()])
        + 0.20 * np.mean(gt > spread)
        + 0.20 * np.mean(np.minimum(gr, gt) > spread)
        + 0.01 * float(np.mean(margin))
    )


def test_ties_score_against_the_reference_formula():
    """Scores where every part of the Ties score is away from 0 and 1, so each weight counts."""
    from fastrm.bench_rewardbench import ties_score

    rng = np.random.default_rng(7)
    rows = []
    for p in range(40):
        shift = rng.normal(0.8, 1.0)
        good = list(rng.normal(shift, 0.3, size=int(rng.integers(2, 5))))
        rows.append((f"tied:{p}", good + list(rng.normal(0.0, 0.5, size=3)), len(good)))
        rows.append((f"ref:{p}", [float(rng.normal(shift, 0.3))] + list(rng.normal(0.0, 0.5, size=3)), 1))
    got = ties_score(rows)
    parts = ("ref_accuracy", "tied_accuracy", "correctness_preferred", "correctness_preferred_hard")
    assert all(0.05 < got[k] < 0.95 for k in parts), got
    assert got["score"] == pytest.approx(ties_reference(rows), abs=1e-12) and got["num_prompts"] == 80


def test_rewardbench_2_best_of_4_and_ties(hf_dir, tmp_path):
    rows = []
    for i in range(6):
        for sub in ("Factuality", "Math", "Precise IF"):
            rows.append({"id": str(i), "prompt": f"P{i} {sub}", "chosen": [f" right {i}"], "num_correct": 1})
            rows[-1].update(rejected=[f" wrong {i} {j}" for j in range(3)], subset=sub)
    rows.append(
        {"prompt": "Same", "chosen": [" a"], "rejected": [" a", " b", " c"], "num_correct": 1, "subset": "Math"}
    )
    for p in range(4):
        colours = [" red", " blue", " green"][: 2 + p % 2]
        rows.append({"id": f"tied:{p}", "prompt": f"Name a colour {p}", "chosen": colours, "num_correct": len(colours)})
        rows[-1].update(rejected=[" dog", " seven"], subset="Ties")
        rows.append({"id": f"ref:{p}", "prompt": f"The colour of grass {p}", "chosen": [" green"], "num_correct": 1})
        rows[-1].update(rejected=[" red", " blue"], subset="Ties")
    path = _write(tmp_path / "rb2.jsonl", rows)
    out = tmp_path / "o"
    report = evaluate_benchmark(str(hf_dir), [path], rendering="rewardbench", output_dir=out)
    assert report["files"][0]["format"] == "rewardbench-2"
    scored = _scores(out)
    per = {}
    for row, rec in zip(scored, rows):
        s = row["scores"]
        per.setdefault(rec["subset"], []).append(((1 / s.count(max(s))) if s[0] == max(s) else 0.0, rec, s))
    rb2 = report["rewardbench_2"]
    for sub in ("Factuality", "Math", "Precise IF"):
        assert rb2["subsets"][sub]["score"] == pytest.approx(np.mean([r for r, _, _ in per[sub]]), abs=1e-12)
    ties = ties_reference([(rec["id"], s, rec["num_correct"]) for _, rec, s in per["Ties"]])
    assert rb2["subsets"]["Ties"]["score"] == pytest.approx(ties, abs=1e-12)
    subset_scores = [v["score"] for v in rb2["subsets"].values()]
    assert rb2["overall"] == pytest.approx(np.mean(subset_scores)) and rb2["missing_subsets"] == ["Safety", "Focus"]


@pytest.mark.parametrize(
    "row, match",
    [
        ({"prompt": "Q", "chosen": "a", "rejected": "b", "subset": 3}, r"field 'subset': expected a non-empty string"),
        ({"prompt": "Q", "chosen": "", "rejected": "b", "subset": "s"}, r"field 'chosen': .* got an empty string"),
        ({"prompt": "Q", "chosen": ["a"], "rejected": ["b"], "num_correct": 2}, r"field 'num_correct': .* \[1, 2\)"),
        ({"prompt": "Q", "chosen": ["a"], "rejected": ["b"], "num_correct": 1, "subset": "Ties"}, r"field 'id'"),
        ({"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"}, r"field 'prompt\[0\]\.content': missing"),
    ],
)
def test_bad_rewardbench_records_name_file_line_and_field(tmp_path, row, match):
    from fastrm.bench_data import read_bench_file

    with pytest.raises(DataError, match=r"bad\.jsonl:1: " + match):
        read_bench_file(_write(tmp_path / "bad.jsonl", [row]))


def test_unknown_format_lists_every_accepted_shape(tmp_path):
    from fastrm.bench_data import read_bench_file

    with pytest.raises(DataError) as e:
        read_bench_file(
            _write(tmp_path / "odd.jsonl", [{"question": "Q", "answer": "A", **{f"k{i}": i for i in range(9)}}])
        )
    msg = str(e.value)
    assert "keys: answer, k0, k1, k2, k3, k4, k5, k6, k7, k8, question" in msg  # all of them, not the first 8
    for shape in ("HH-RLHF", "token ids", "[messages]", "RewardBench:", "RewardBench 2:", "RM-Bench:", "best-of-N:"):
        assert shape in msg, shape


def test_json_lines_under_a_json_name_are_read_by_line(tmp_path):
    from fastrm.bench_data import read_bench_file
    from fastrm.data import load_pairs

    rows = [
        {"prompt": "Q", "chosen": " a", "rejected": " b"},
        "{oops",
        {"prompt": "R", "chosen": " c", "rejected": " d"},
    ]
    path = _write(tmp_path / "batch.json", rows)
    with pytest.raises(DataError, match=r"batch\.json:2: invalid JSON"):
        read_bench_file(path)
    bf = read_bench_file(path, on_bad_row="skip")
    assert [r.source for r in bf.records] == [f"{path}:1", f"{path}:3"]
    pairs, stats = load_pairs(path, on_bad_row="skip")  # the training reader is the same
    assert len(pairs) == 2 and stats.bad_rows_skipped == 1
    (tmp_path / "one.json").write_text(json.dumps(rows[0]) + "\n")
    with pytest.raises(DataError, match="or JSON Lines"):
        load_pairs(tmp_path / "one.json")


def test_skipped_empty_responses_are_counted_per_file_in_the_table(hf_dir, tmp_path, capsys):
    good = [{"prompt": f"Q{i}", "chosen": f" a{i}", "rejected": f" b{i}"} for i in range(4)]
    empty = [{"prompt": "Q", "chosen": "", "rejected": " b"}, {"prompt": "Q", "chosen": " a", "rejected": "  "}]
    path = _write(tmp_path / "judge.jsonl", good + empty)
    bon = _write(tmp_path / "bon.jsonl", [{"prompt": "Q", "responses": [" a", " b"], "best": 0}])
    argv = ["bench", "--model", str(hf_dir), str(path), str(bon), "--on-bad-row", "skip", "--no-progress"]
    assert cli_main([*argv, "--output-dir", str(tmp_path / "o")]) == 0
    table = capsys.readouterr().out
    assert "skipped in judge: 2 of 6 records (2 with an empty response); its numbers are over the 4 scored" in table
    row = next(line for line in table.splitlines() if line.strip().startswith("judge"))
    assert row.split()[1:3] == ["4", "2"]  # pairs, skipped
    report = json.loads((tmp_path / "o" / "bench_report.json").read_text())
    assert [f["skipped_empty_responses"] for f in report["files"]] == [2, 0]
