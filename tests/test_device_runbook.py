"""The device runbook (benchmarks/run_device.sh) rehearsed on the CPU, so it works the day a GPU is lent.

`bash benchmarks/run_device.sh all --dry-run` runs every block's code on tiny shapes (the fused kernels under the
Triton interpreter, the packages the device lacks hidden) and must write every JSON the README table is built from;
the benchmarks refuse made-up workloads; the carried HH lengths match the shared data; every torch API on the
runbook's paths exists in the installed torch (.ci/device-stack runs this file under the device's versions).
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import device_table  # noqa: E402
import hh_lengths  # noqa: E402

BLOCKS = ["correctness", "train", "bon", "kernels", "train-1.4b"]


def _runbook(*args, env=None, timeout=1200):
    env = {**os.environ, "PYTHON": sys.executable, **(env or {})}
    env.pop("TRITON_INTERPRET", None)  # the script sets it for the dry run itself
    return subprocess.run(
        ["bash", str(BENCH / "run_device.sh"), *args], capture_output=True, text=True, env=env, timeout=timeout
    )


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("device_out")
    # The caps are the device's; a shared CPU (tests run beside other work) gets four times as long.
    p = _runbook("all", "--dry-run", env={"OUT": str(out), "FASTRM_RUNBOOK_CAP_SCALE": "4"})
    return out, p


def test_dry_run_passes_every_block_and_writes_the_table_fields(dry_run):
    out, p = dry_run
    assert p.returncode == 0, (p.stdout + p.stderr)[-6000:]
    run = json.loads((out / "runbook.json").read_text())
    assert run["dry_run"] is True
    assert [(b["block"], b["status"]) for b in run["blocks"]] == [(b, "ok") for b in BLOCKS]
    assert device_table.check(out) == []
    # What the device tool brings back: at most 8 files, plain names, nothing in subfolders.
    files = sorted(f.name for f in out.iterdir())
    assert len(files) <= 8 and all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files), files
    assert all((out / f).is_file() for f in files)
    assert set(files) == {"runbook.json", "runbook.log", *device_table.BLOCK_FILES.values()}


def test_dry_run_measures_every_stack_and_variant(dry_run):
    out, _ = dry_run
    train = json.loads((out / "train_pythia-410m.json").read_text())
    rows = {r["stack"]: r for r in train["train"]}
    assert list(rows) == ["A", "B", "C", "C0", "D", "CT"]
    # The dry run takes the fused op's path (Triton interpreter) wherever the GPU run would.
    assert {s for s, r in rows.items() if r["fused_head"]} == {"C", "D", "CT"}
    assert rows["CT"]["loss"] == "threshold" and rows["CT"]["micro_batches_per_step"] > 1
    assert all(r["pairs_per_s"] > 0 and r["mfu"] > 0 for r in rows.values())
    assert rows["C"]["profile_top_ops"], "the C step's profile"
    assert "HH-RLHF lengths" in train["meta"]["data"] and train["meta"]["mean_tokens_per_pair"] > 150
    bon = json.loads((out / "bon_pythia-410m.json").read_text())
    got = {(r["n"], r["variant"]) for r in bon["score"]}
    assert got == {(n, v) for n in (4, 16, 64) for v in ("hf_padded", "fastrm_packed", "fastrm_shared_prompt")}
    big = json.loads((out / "train_pythia-1.4b.json").read_text())
    assert [r["stack"] for r in big["train"]] == ["B", "C", "D"]
    kernels = json.loads((out / "kernels.json").read_text())
    assert {(r["impl"], r["mode"]) for r in kernels["results"]} == {
        (i, m) for i in ("fused", "eager") for m in ("fwd", "bwd", "fwdbwd")
    }
    corr = json.loads((out / "correctness.json").read_text())
    assert corr["collected"] >= 40 and corr["complete"]
    assert all(t["outcome"] == "skipped" and "CUDA" in t["reason"] for t in corr["tests"])  # no GPU here
    table = device_table.table(out)
    assert "DRY RUN" in table and "| C | fastrm" in table and "| 64 |" in table and "C >= 1.15x B" in table


def test_check_names_the_file_and_the_missing_field(dry_run, tmp_path):
    out, _ = dry_run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    doc = json.loads((copy / "train_pythia-410m.json").read_text())
    del doc["train"][2]["mfu"]
    (copy / "train_pythia-410m.json").write_text(json.dumps(doc))
    (copy / "kernels.json").unlink()
    problems = device_table.check(copy)
    assert any("train_pythia-410m.json train[2]: field 'mfu' missing" in p for p in problems), problems
    assert any("kernels.json: missing" in p for p in problems), problems


def test_plan_fits_eight_minutes_in_the_issue_order():
    p = _runbook("plan")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.split("\n")
    budget = int(lines[0].split()[1].rstrip("s"))
    caps = [(name, int(cap.rstrip("s"))) for name, cap in (line.split() for line in lines[1:] if line)]
    assert [n for n, _ in caps] == BLOCKS
    assert sum(c for _, c in caps) <= budget <= 8 * 60


def test_bench_train_refuses_without_real_hh_lengths(monkeypatch, tmp_path, capsys):
    import bench_train

    monkeypatch.setattr(hh_lengths, "LENGTHS_FILE", tmp_path / "absent.json")
    assert bench_train.main(["--dry-run", "--out", str(tmp_path / "t.json")]) == 2
    err = capsys.readouterr().err
    assert "absent.json: real HH-RLHF lengths are needed" in err and "hh_lengths.py write" in err
    assert not (tmp_path / "t.json").exists()


def test_bench_scoring_refuses_without_real_text(tmp_path):
    missing = tmp_path / "no-rm-bench"
    p = subprocess.run(
        [sys.executable, str(BENCH / "bench_scoring.py"), "--smoke", "--rm-bench-dir", str(missing), "--out", "x"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 1 and f"bench_scoring: {missing} not found" in p.stderr, p.stderr[-2000:]


def test_hh_like_pairs_carry_real_lengths():
    lengths = hh_lengths.hh_lengths()
    assert len(lengths) > 7000
    pairs = hh_lengths.hh_like_pairs(len(lengths), seed=1)
    assert sorted((len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)) for p in pairs) == sorted(lengths)
    assert 380 < sum(p.num_tokens for p in pairs) / len(pairs) < 430  # HH's ~400 tokens per pair, not ~80
    cut = hh_lengths.hh_like_pairs(200, max_length=128, seed=1)
    assert max(max(p.chosen_len, p.rejected_len) for p in cut) == 128


def test_lengths_file_matches_the_shared_data(neox_tokenizer, shared_data):
    fresh = hh_lengths.dumps(hh_lengths.build(shared_data, neox_tokenizer))
    assert hh_lengths.LENGTHS_FILE.read_text() == fresh, "stale: run `python benchmarks/hh_lengths.py write`"


def test_runbook_imports_without_the_packages_the_device_lacks():
    code = (
        "import importlib, importlib.util, sys\n"
        "assert importlib.util.find_spec('datasets') is None and importlib.util.find_spec('ray') is None\n"
        "import fastrm, fastrm.trainer, fastrm.scoring, fastrm_kernels.reward_head_loss, bench_train, device_table\n"
        "try:\n    import datasets\nexcept ImportError:\n    print('hidden')\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(BENCH / "device_sim"), str(BENCH), *sys.path])}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0 and p.stdout.strip() == "hidden", p.stderr[-3000:]


# ---------------------------------------------------------------------------------------------- torch APIs
RUNBOOK_SOURCES = [
    *sorted((ROOT / "fastrm").rglob("*.py")),
    *sorted((ROOT / "kernels").glob("*.py")),
    *(BENCH / n for n in ("bench_train.py", "bench_kernels.py", "hh_lengths.py", "runbook_plugin.py")),
    *(ROOT / "tests" / n for n in ("test_gpu_hh_packs.py", "kernel_cases.py", "test_kernel_reward_head_loss.py")),
    *(ROOT / "tests" / n for n in ("test_kernel_edges.py", "test_varlen_lengths.py", "test_attention_features.py")),
]


def torch_apis(paths) -> dict[str, set[str]]:
    """Every dotted torch name the files use (``torch.a.b``, ``from torch.a import b``, aliases followed), keeping
    only the longest chains; name -> files."""
    uses: dict[str, set[str]] = {}
    for f in paths:
        tree = ast.parse(Path(f).read_text())
        alias = {}
        for n in ast.walk(tree):
            if isinstance(n, ast.Import):
                for a in n.names:
                    if a.name.split(".")[0] == "torch":
                        alias[a.asname or "torch"] = a.name if a.asname else "torch"
            elif isinstance(n, ast.ImportFrom) and n.level == 0 and (n.module or "").split(".")[0] == "torch":
                for a in n.names:
                    alias[a.asname or a.name] = f"{n.module}.{a.name}"
                    uses.setdefault(f"{n.module}.{a.name}", set()).add(Path(f).name)
        for n in ast.walk(tree):
            if isinstance(n, ast.Attribute):
                parts, node = [], n
                while isinstance(node, ast.Attribute):
                    parts.append(node.attr)
                    node = node.value
                if isinstance(node, ast.Name) and node.id in alias:
                    uses.setdefault(".".join([alias[node.id], *reversed(parts)]), set()).add(Path(f).name)
    return {k: v for k, v in uses.items() if not any(m.startswith(k + ".") for m in uses)}


def _resolve(name: str):
    parts = name.split(".")
    obj, i = None, len(parts)
    while i > 0:  # the longest importable module prefix, then attributes
        try:
            obj = importlib.import_module(".".join(parts[:i]))
            break
        except ImportError:
            i -= 1
    for attr in parts[i:]:
        obj = getattr(obj, attr)
    return obj


def test_every_torch_api_on_the_runbook_paths_exists_in_the_installed_torch():
    """Under .ci/device-stack (torch 2.11, the device's) this is the check that nothing on the runbook's paths uses a
    newer torch API; under the main venv it guards the scan itself. Keyword arguments that changed between releases
    (varlen_attn's is_causal / window_size / enable_gqa) are read from the signature at run time (fastrm.attention)."""
    import fastrm_kernels.reward_head_loss  # noqa: F401 (registers torch.ops.fastrm.*)
    import torch

    apis = torch_apis(RUNBOOK_SOURCES)
    assert len(apis) > 80 and "torch.library.custom_op" in apis and "torch.nn.attention.varlen.varlen_attn" in apis
    missing = {}
    for name, files in sorted(apis.items()):
        try:
            _resolve(name)
        except (AttributeError, ImportError) as e:
            missing[name] = f"{sorted(files)}: {e}"
    assert not missing, f"not in torch {torch.__version__}: {missing}"
