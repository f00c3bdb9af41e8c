"""``fastrm paradox``: the exact best-of-N expectation against brute-force enumeration and Monte Carlo, every number
of the report against an independent computation from the scores file (and the scores against stock HF), the run
folder layout, bad input, a gold RM with another tokenizer, and the Ray path against in-process scoring."""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats as sps

from fastrm.cli import main as cli_main
from fastrm.paradox_report import expected_gold, pick_probabilities


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: many tiny forwards are slower with oversubscribed OpenMP threads on a busy 2-core box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------------ the formula


def brute_force(proxy, gold, n: int) -> float:
    """Mean over every n-subset of the gold reward of the proxy's pick, a tie among the top split evenly."""
    vals = []
    for sub in itertools.combinations(range(len(proxy)), n):
        top = max(proxy[i] for i in sub)
        tied = [gold[i] for i in sub if proxy[i] == top]
        vals.append(sum(tied) / len(tied))
    return sum(vals) / len(vals)


def test_exact_best_of_n_equals_brute_force_enumeration_with_ties():
    rng = random.Random(0)
    checked = ties = 0
    for _ in range(300):
        m = rng.randint(1, 9)
        levels = rng.choice([2, 3, 5, None])  # few levels: many ties; None: continuous scores
        proxy = [rng.randrange(levels) if levels else rng.gauss(0, 1) for _ in range(m)]
        gold = [rng.choice([rng.gauss(0, 1), 0.5]) for _ in range(m)]  # ties in gold too
        ties += len(set(proxy)) < m
        for n in range(1, m + 1):
            assert expected_gold(proxy, gold, n) == pytest.approx(brute_force(proxy, gold, n), abs=1e-12)
            assert pick_probabilities(proxy, n).sum() == pytest.approx(1.0, abs=1e-12)
            checked += 1
    assert checked > 1000 and ties > 100
    # N = 1 is the random pick, N = n the argmax (ties averaged), for any proxy
    assert expected_gold([3, 1, 3], [1.0, 5.0, 2.0], 1) == pytest.approx(8 / 3)
    assert expected_gold([3, 1, 3], [1.0, 5.0, 2.0], 3) == pytest.approx(1.5)
    with pytest.raises(ValueError, match="1 <= N <= 3"):
        expected_gold([1, 2, 3], [1, 2, 3], 4)


def test_exact_best_of_n_agrees_with_monte_carlo_within_its_error():
    rng = np.random.default_rng(1)
    m = 14
    proxy = rng.integers(0, 6, m).astype(float)  # ties
    gold = rng.normal(size=m)
    for n in (2, 5, 9):
        draws = 40000
        vals = np.empty(draws)
        for t in range(draws):
            sub = rng.choice(m, n, replace=False)
            top = sub[proxy[sub] == proxy[sub].max()]
            vals[t] = gold[rng.choice(top)]  # a tie broken uniformly at random
        se = vals.std(ddof=1) / math.sqrt(draws)
        assert abs(vals.mean() - expected_gold(proxy, gold, n)) < 4 * se


def test_ns_kl_and_the_rank_correlation_needs_three_checkpoints():
    from fastrm.paradox_report import across_checkpoints, default_ns, kl_best_of_n, summary_n

    assert default_ns([8, 8]) == [1, 2, 4, 8]
    assert default_ns([3, 6]) == [1, 2, 3, 4, 6] and summary_n([1, 2, 3, 4, 6], [3, 6]) == 3
    assert kl_best_of_n(1) == 0.0 and kl_best_of_n(4) == pytest.approx(math.log(4) - 0.75)
    two = [
        {"name": k, "pairs": {"accuracy": a}, "gold_bon_at_summary_n": b} for k, a, b in (("a", 0.9, 1), ("b", 0.8, 2))
    ]
    x = across_checkpoints(two, [np.array([1.0, 1.0]), np.array([2.0, 2.0])])
    assert x["kendall_tau"] is None and "at least 3" in x["reason"]
    assert x["most_accurate"] == ["a"] and x["best_outcome"] == "b" and x["paradox"] and x["outcome_gap"] == 1.0


# ------------------------------------------------------------------------------------------------ a tiny run


def _tiny_llama(tok):
    from transformers import LlamaConfig

    from fastrm import load_model

    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        vocab_size=len(tok),
    )
    return load_model(cfg, tokenizer=tok)


def _train(out: Path, rows, steps: int, save_steps: int) -> Path:
    from fastrm import RewardConfig, RewardTrainer
    from fastrm.synthetic import byte_tokenizer
    from fastrm.trainer import seed_everything

    tok = byte_tokenizer()
    seed_everything(0)
    cfg = RewardConfig(
        output_dir=str(out),
        max_steps=steps,
        save_steps=save_steps,
        save_total_limit=0,
        pairs_per_step=16,
        learning_rate=3e-3,
        warmup_ratio=0.0,
        max_length=128,
        progress=False,
        logging_steps=1,
    )
    RewardTrainer(_tiny_llama(tok), cfg, rows, tokenizer=tok).train()
    return out


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A run with 4 step checkpoints (the final model equals checkpoint-4), a gold RM trained on clean labels,
    clean eval pairs and candidate rows of 2 to 6 responses with duplicates (exact ties)."""
    from fastrm.synthetic import synthetic_candidates, synthetic_pairs

    top = tmp_path_factory.mktemp("paradox")
    run = _train(top / "run", synthetic_pairs(64, seed=0), steps=4, save_steps=1)
    gold = _train(top / "gold", synthetic_pairs(96, seed=1, flip=0.0), steps=6, save_steps=0)
    pairs = _jsonl(top / "eval.jsonl", synthetic_pairs(24, seed=2, flip=0.0))
    cands = synthetic_candidates(12, 6, seed=3)
    for i, r in enumerate(cands):
        r["responses"] = r["responses"][: 2 + i % 5]
    cands[0]["responses"][1] = cands[0]["responses"][0]  # a duplicate: an exact tie under every model
    return {"top": top, "run": run, "gold": gold, "pairs": pairs, "cands": _jsonl(top / "cands.jsonl", cands)}


def _args(s, out: Path, *extra) -> list[str]:
    return [
        "paradox",
        str(s["run"]),
        "--gold-model",
        str(s["gold"]),
        "--pairs",
        str(s["pairs"]),
        "--candidates",
        str(s["cands"]),
        "--output-dir",
        str(out),
        "--no-progress",
        *extra,
    ]


def _skew_kurt(d: np.ndarray) -> tuple[float, float]:
    """Bias-corrected sample skewness G1 and excess kurtosis G2, from the central moments."""
    n, c = d.size, d - d.mean()
    m2, m3, m4 = (c**2).mean(), (c**3).mean(), (c**4).mean()
    g1, g2 = m3 / m2**1.5, m4 / m2**2 - 3
    return g1 * math.sqrt(n * (n - 1)) / (n - 2), ((n + 1) * g2 + 6) * (n - 1) / ((n - 2) * (n - 3))


def test_every_number_in_the_report_equals_an_independent_computation(setup, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli_main(_args(setup, out)) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "paradox_report.json").read_text())
    lines = [json.loads(x) for x in (out / "paradox_scores.jsonl").read_text().splitlines()]
    pairs = [x for x in lines if x["kind"] == "pair"]
    cands = [x for x in lines if x["kind"] == "candidates"]
    names = [m["name"] for m in report["models"]]
    # the run folder: 4 step checkpoints; the final model has checkpoint-4's weights and is not scored twice
    assert names == ["checkpoint-1", "checkpoint-2", "checkpoint-3", "checkpoint-4"]
    assert [m["step"] for m in report["models"]] == [1, 2, 3, 4] and report["models"][-1]["is_final"]
    assert len(pairs) == 24 and len(cands) == 12 and report["tokenizers"]["same_for_all"]

    gold = [c["scores"]["gold"] for c in cands]
    ns = report["ns"]
    assert ns == [1, 2, 4, 6] and report["summary_n"] == 2  # the fewest candidates is 2
    base = report["baselines"]
    for k, n in enumerate(ns):
        used = [g for g in gold if len(g) >= n]
        assert base["num_prompts"][k] == len(used)
        assert base["random"][k] == pytest.approx(np.mean([np.mean(g) for g in used]), abs=1e-12)
        assert base["oracle"][k] == pytest.approx(np.mean([brute_force(g, g, n) for g in used]), abs=1e-12)
        assert base["kl_bon"][k] == pytest.approx(math.log(n) - (n - 1) / n, abs=1e-15)
    assert cands[0]["scores"]["gold"][0] == cands[0]["scores"]["gold"][1]  # the duplicate ties exactly

    per_prompt = {}
    for m in [*report["models"], report["gold"]]:
        name = m["name"]
        d = np.array([p["chosen"][name] - p["rejected"][name] for p in pairs])
        st = m["pairs"]
        g1, g2 = _skew_kurt(d)
        assert st["num_pairs"] == 24
        assert st["accuracy"] == pytest.approx(np.mean(d > 0), abs=1e-12)
        assert st["bt_loss"] == pytest.approx(np.mean([math.log1p(math.exp(-x)) for x in d]), abs=1e-12)
        assert st["margin_mean"] == pytest.approx(d.mean(), abs=1e-12)
        assert st["margin_std"] == pytest.approx(math.sqrt(((d - d.mean()) ** 2).sum() / (d.size - 1)), abs=1e-12)
        assert st["margin_skewness"] == pytest.approx(g1, abs=1e-9)
        assert st["margin_kurtosis"] == pytest.approx(g2, abs=1e-9)
        assert st["frac_margin_below_zero"] == pytest.approx(np.mean(d < 0), abs=1e-12)
        proxy = [c["scores"][name] for c in cands]
        bon = m["best_of_n"]
        for k, n in enumerate(ns):
            want = [brute_force(s, g, n) for s, g in zip(proxy, gold) if len(s) >= n]
            assert bon["n"][k] == n and bon["num_prompts"][k] == len(want)
            assert bon["expected_gold"][k] == pytest.approx(np.mean(want), abs=1e-12)
        per_prompt[name] = np.array([brute_force(s, g, 2) for s, g in zip(proxy, gold)])
        assert m["gold_bon_at_summary_n"] == pytest.approx(per_prompt[name].mean(), abs=1e-12)
        se = per_prompt[name].std(ddof=1) / math.sqrt(per_prompt[name].size)
        assert m["gold_bon_at_summary_n_se"] == pytest.approx(se, abs=1e-12)
        taus = [sps.kendalltau(s, g).statistic for s, g in zip(proxy, gold)]
        defined = [t for t in taus if not math.isnan(t)]
        assert m["kendall_tau"]["mean"] == pytest.approx(np.mean(defined), abs=1e-12)
        assert m["kendall_tau"]["num_prompts"] == len(defined)
    g = report["gold"]
    assert g["kendall_tau"]["mean"] == pytest.approx(1.0) and g["best_of_n"]["expected_gold"] == base["oracle"]

    x = report["across_checkpoints"]
    acc = [m["pairs"]["accuracy"] for m in report["models"]]
    out_n = [per_prompt[k].mean() for k in names]
    r = sps.kendalltau(acc, out_n)
    assert x["num_checkpoints"] == 4
    if math.isnan(r.statistic):
        assert x["kendall_tau"] is None
    else:
        assert x["kendall_tau"] == pytest.approx(r.statistic, abs=1e-12)
    most = [k for k, a in zip(names, acc) if a == max(acc)]
    best = names[int(np.argmax(out_n))]
    ref = max(most, key=lambda k: per_prompt[k].mean())
    diff = per_prompt[best] - per_prompt[ref]
    se = diff.std(ddof=1) / math.sqrt(diff.size)
    assert x["most_accurate"] == most and x["best_outcome"] == best
    assert x["outcome_gap"] == pytest.approx(diff.mean(), abs=1e-12)
    assert x["outcome_gap_se"] == pytest.approx(se, abs=1e-12)
    assert x["paradox"] == bool(diff.mean() > 2 * se)

    for f in report["outputs"]["plots"]:
        assert Path(f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(n in printed for n in names) and "random pick" in printed and "Kendall tau(accuracy" in printed
    _check_scores_against_stock_hf(setup, pairs, cands)


def _stock_hf_reward(hf, tok, prompt: str, response: str) -> float:
    ids = tok(prompt, add_special_tokens=False)["input_ids"] + tok(response, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        return hf(torch.tensor([ids + [tok.eos_token_id]])).logits[0, 0].item()


def _check_scores_against_stock_hf(s, pairs, cands):
    """The scores file holds what stock transformers gives for each (prompt, response) alone: prompt and response
    tokenized separately, the EOS appended, the last token pooled (one checkpoint and the gold RM)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rows = [json.loads(x) for x in s["cands"].read_text().splitlines()]
    pair_rows = [json.loads(x) for x in s["pairs"].read_text().splitlines()]
    for name, folder in (("checkpoint-2", s["run"] / "checkpoint-2"), ("gold", s["gold"])):
        hf = AutoModelForSequenceClassification.from_pretrained(folder).eval()
        tok = AutoTokenizer.from_pretrained(folder)
        for row, got in zip(rows[:4], cands[:4]):
            want = [_stock_hf_reward(hf, tok, row["prompt"], r) for r in row["responses"]]
            assert got["scores"][name] == pytest.approx(want, abs=2e-5)
        for row, got in zip(pair_rows[:4], pairs[:4]):
            assert got["chosen"][name] == pytest.approx(
                _stock_hf_reward(hf, tok, row["prompt"], row["chosen"]), abs=2e-5
            )
            assert got["rejected"][name] == pytest.approx(
                _stock_hf_reward(hf, tok, row["prompt"], row["rejected"]), abs=2e-5
            )


# ------------------------------------------------------------------------------------------------ bad input


def test_bad_input_is_one_line_naming_file_and_line_or_counted_with_skip(setup, tmp_path, capsys):
    s = dict(setup)
    rows = [json.loads(x) for x in setup["cands"].read_text().splitlines()]
    s["cands"] = _jsonl(tmp_path / "c.jsonl", [rows[0], {"prompt": "Q\n", "responses": [" only one"]}, *rows[1:3]])
    assert cli_main(_args(s, tmp_path / "o")) == 1
    err = capsys.readouterr().err
    assert f"{s['cands']}:2: field 'responses': best-of-N needs at least 2 responses, got 1" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 2  # the message and the --debug hint

    assert cli_main(_args(s, tmp_path / "o", "--on-bad-row", "skip", "--ns", "1,2")) == 0
    report = json.loads((tmp_path / "o" / "paradox_report.json").read_text())
    assert report["data"]["candidates"]["skipped"] == [
        {"source": f"{s['cands']}:2", "reason": "field 'responses': best-of-N needs at least 2 responses, got 1"}
    ]
    assert report["data"]["candidates"]["num_prompts"] == 3 and "1 bad rows skipped" in capsys.readouterr().err

    empty = tmp_path / "empty_run"
    (empty / "checkpoint-3").mkdir(parents=True)
    for run, words in ((tmp_path / "nothing", "no checkpoints"), (empty, "checkpoint-3: a checkpoint folder without")):
        run.mkdir(exist_ok=True)
        assert cli_main(["paradox", str(run), *_args(setup, tmp_path / "o")[2:]]) == 1
        assert words in capsys.readouterr().err
    assert cli_main(_args(setup, tmp_path / "o", "--ns", "1,7")) == 1
    assert "--ns: N=7 is outside 1..6" in capsys.readouterr().err


def test_a_gold_rm_with_another_tokenizer_and_a_gold_from_the_same_run(setup, tmp_path, neox_tokenizer, capsys):
    """Each model tokenizes with its own tokenizer (the report says so); a gold RM taken from the run is warned
    about; two models give no rank correlation."""
    gold = tmp_path / "neox_gold"
    torch.manual_seed(0)
    _tiny_llama(neox_tokenizer).save_pretrained(gold, tokenizer=neox_tokenizer)
    s = {**setup, "gold": gold}
    assert cli_main(_args(s, tmp_path / "o")) == 0
    captured = capsys.readouterr()
    report = json.loads((tmp_path / "o" / "paradox_report.json").read_text())
    tk = report["tokenizers"]
    assert not tk["same_for_all"] and len(tk["groups"]) == 2 and "gold RM's tokenizer differs" in tk["note"]
    assert "each model tokenized the same texts with its own tokenizer" in captured.err
    assert report["models"][0]["tokenizer"] != report["gold"]["tokenizer"]

    ckpt = setup["run"] / "checkpoint-1"
    argv = ["paradox", str(ckpt), str(setup["run"] / "checkpoint-3"), "--gold-model", str(setup["run"])]
    assert cli_main([*argv, *_args(setup, tmp_path / "o2")[4:]]) == 0
    report = json.loads((tmp_path / "o2" / "paradox_report.json").read_text())
    assert [m["name"] for m in report["models"]] == ["checkpoint-1", "checkpoint-3"]
    assert report["across_checkpoints"]["kendall_tau"] is None and "at least 3" in capsys.readouterr().out
    assert not report["warnings"]  # model folders given, not the run: nothing to warn about
    argv = ["paradox", str(setup["run"]), "--gold-model", str(setup["run"] / "checkpoint-4")]
    assert cli_main([*argv, *_args(setup, tmp_path / "o3")[4:]]) == 0
    report = json.loads((tmp_path / "o3" / "paradox_report.json").read_text())
    assert any("is a checkpoint of the run" in w for w in report["warnings"])
    assert any("same weights as checkpoint-4" in w for w in report["warnings"])
    assert "warning: the gold RM" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ Ray


@pytest.mark.ray
def test_ray_path_scores_what_in_process_scores(setup, tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    from ray_nodes import TEST_ENV

    from fastrm.paradox import evaluate_paradox

    # The first Ray start of the pytest process fixes settings the later Ray modules rely on (auth mode, health
    # checks): start it with the same environment they use, or their clusters fail to start.
    for k, v in TEST_ENV.items():
        monkeypatch.setenv(k, v)

    # one checkpoint and the gold RM: each model is one Ray Data job (an actor pool start, ~20 s on 2 busy cores)
    ckpt = setup["run"] / "checkpoint-2"
    kw = dict(models=[ckpt], gold_model=setup["gold"], pairs=[setup["pairs"]], candidates=[setup["cands"]])
    local = evaluate_paradox(**kw)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        remote = evaluate_paradox(**kw, ray=True, output_dir=tmp_path / "ray")
    finally:
        ray.shutdown()
    for a, b in zip([*local["models"], local["gold"]], [*remote["models"], remote["gold"]]):
        assert a["name"] == b["name"] and a["pairs"] == b["pairs"]
        assert b["best_of_n"]["expected_gold"] == pytest.approx(a["best_of_n"]["expected_gold"], abs=1e-5)
        assert b["kendall_tau"]["mean"] == pytest.approx(a["kendall_tau"]["mean"], abs=1e-6)
    assert remote["settings"]["device"].startswith("candidates: ray")
