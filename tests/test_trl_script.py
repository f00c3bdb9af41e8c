"""TRL's own reward script, run as a TRL user runs it, with the drop-in's one added import.

The script is the installed ``trl/scripts/reward.py`` (what ``trl reward ...`` runs), copied at test time into a tmp
folder with ``from fastrm.integrations.trl import RewardTrainer`` added under its ``from trl import RewardTrainer``,
and run in a subprocess on a local tiny Llama causal LM and a local prompt/chosen/rejected JSONL folder. It must
run to the end (train, ``trainer.accelerator.print``, ``save_model``, ``trainer.end()``), learn, and leave a folder
that transformers loads with the rewards the trainer logged in its last evaluation.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

trl = pytest.importorskip("trl")

from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402

import fastrm  # noqa: E402
from fastrm.presets import resolve_config  # noqa: E402
from fastrm.synthetic import byte_tokenizer  # noqa: E402

ADDED = "from fastrm.integrations.trl import RewardTrainer  # the one added line"


def script_with_drop_in(dest: Path) -> Path:
    """TRL's installed reward script with the drop-in import added after its own import of RewardTrainer."""
    import trl.scripts.reward as reward_script

    src = Path(reward_script.__file__).read_text()
    pattern = re.compile(r"^( *)from trl import [^\n]*\bRewardTrainer\b[^\n]*$", re.M)
    assert len(pattern.findall(src)) == 1, "TRL's reward script no longer imports RewardTrainer on one line"
    out = dest / "reward.py"
    out.write_text(pattern.sub(lambda m: f"{m.group(0)}\n{m.group(1)}{ADDED}", src))
    return out


def kind_rows(n: int, seed: int) -> list[dict]:
    """prompt/chosen/rejected rows whose preferred reply is always a kind one: a few steps learn it."""
    rng = np.random.default_rng(seed)
    good, bad = ["Happy to help!", "Sure, gladly.", "Of course!"], ["Go away.", "No.", "Not my problem."]
    return [
        {
            "prompt": f"Please help with task {rng.integers(1000)}.\n",
            "chosen": " " + str(rng.choice(good)),
            "rejected": " " + str(rng.choice(bad)),
        }
        for _ in range(n)
    ]


def hf_rewards(model, tok, rows: list[dict], side: str) -> np.ndarray:
    """Rewards of ``prompt + side`` as TRL tokenizes a standard row (text + EOS text, special tokens added)."""
    texts = [r["prompt"] + r[side] + tok.eos_token for r in rows]
    batch = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits[:, 0].double().numpy()


def test_trl_reward_script_runs_to_the_end_with_the_one_added_import(tmp_path):
    tok = byte_tokenizer()
    cfg = resolve_config("tiny-llama", len(tok))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "tiny")  # a causal LM, as users start from
    tok.save_pretrained(tmp_path / "tiny")
    (tmp_path / "data").mkdir()
    test_rows = kind_rows(16, 2)
    for split, rows in (("train", kind_rows(64, 1)), ("test", test_rows)):
        (tmp_path / "data" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    script = script_with_drop_in(tmp_path)
    args = (
        "--model_name_or_path tiny --dataset_name data --output_dir out --per_device_train_batch_size 16 "
        "--max_steps 8 --learning_rate 1e-3 --logging_steps 2 --eval_strategy steps --eval_steps 4 "
        "--report_to none --bf16 false"
    ).split()
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(Path(fastrm.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
    )
    p = subprocess.run(
        [sys.executable, str(script), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert p.returncode == 0, p.stderr[-4000:]
    assert "Training completed." in p.stdout and "Model saved to out." in p.stdout  # trainer.accelerator.print

    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [4, 8] and [r["step"] for r in records if "loss" in r] == [2, 4, 6, 8]
    print(f"\nTRL script evals: {[(r['step'], round(r['eval_loss'], 3), r['eval_accuracy']) for r in evals]}")
    # learned: an untrained head scores ~log 2 = 0.69
    assert evals[-1]["eval_loss"] < min(0.4, evals[0]["eval_loss"]) and evals[-1]["eval_accuracy"] >= 0.9, evals

    # the saved folder: transformers loads it, and its rewards are the ones the trainer logged after the last step
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    saved_tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    rc, rr = hf_rewards(model, saved_tok, test_rows, "chosen"), hf_rewards(model, saved_tok, test_rows, "rejected")
    rewards, last = np.concatenate([rc, rr]), evals[-1]
    got = {
        "eval_loss": float(np.logaddexp(0.0, -(rc - rr)).mean()),
        "eval_accuracy": float((rc > rr).mean()),
        "eval_margin": float((rc - rr).mean()),
        "eval_min_reward": float(rewards.min()),
        "eval_mean_reward": float(rewards.mean()),
        "eval_max_reward": float(rewards.max()),
    }
    for key, value in got.items():
        assert value == pytest.approx(last[key], rel=1e-4, abs=1e-5), key
