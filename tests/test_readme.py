"""Every command and code block of the README runs as written, in a fresh folder beside ../shared as a user's clone
is (only step counts are made small: --pairs for the demo, --max-steps for training, --limit for RM-Bench and
fastrm paradox).

Skipped on purpose: the install lines and `python -m pytest` (this is the test run). `fastrm serve` is started in
the background and the README's curl is sent to it."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP = ("python3 -m venv", "pip install", "python -m pytest")
SMALL = {  # command prefix -> what is appended so the README's commands finish in CI time
    "fastrm demo": ["--pairs", "256"],
    "fastrm train --data synth/noisy.jsonl": ["--max-steps", "4", "--save-steps", "2"],  # before "fastrm train"
    "fastrm paradox": ["--limit", "16"],
    "fastrm train": ["--max-steps", "3"],
    "fastrm bench --model runs/hh rm-bench": ["--limit", "8"],
}


def readme_blocks() -> list[tuple[str, str]]:
    """(language, text) of every fenced code block, in order."""
    return re.findall(r"^```(\w+)\n(.*?)^```", (ROOT / "README.md").read_text(), flags=re.S | re.M)


def commands(block: str) -> list[str]:
    """Shell commands of a bash block: continuation lines joined, comment-only lines dropped."""
    out, cur = [], ""
    for line in block.splitlines():
        cur += line.rstrip()
        if cur.endswith("\\"):
            cur = cur[:-1] + " "
            continue
        if cur.strip() and not cur.lstrip().startswith("#"):
            out.append(cur.strip())
        cur = ""
    return out


def small(cmd: str) -> str:
    for prefix, extra in SMALL.items():
        if cmd.startswith(prefix + " ") or cmd == prefix:
            head, sep, comment = cmd.partition("  #")
            return f"{head.rstrip()} {shlex.join(extra)}" + (f"  #{comment}" if sep else "")
    return cmd


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory, shared_data) -> Path:
    """A folder laid out like a clone: the README's paths (../shared/data, runs/) resolve as they do for a user."""
    top = tmp_path_factory.mktemp("readme")
    (top / "shared").symlink_to(shared_data.parent, target_is_directory=True)
    (top / "fastrm").mkdir()
    return top / "fastrm"


def run(cmd: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    p = subprocess.run(["bash", "-c", cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, f"README command failed: {cmd}\n{p.stderr[-3000:]}"
    assert "Traceback" not in p.stderr, f"{cmd}\n{p.stderr[-3000:]}"
    return p


def test_readme_runs_as_written(user_dir):
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    env.pop("FASTRM_ALLOW_HUB", None)
    ran, server = [], None
    try:
        for lang, block in readme_blocks():
            if lang == "python":
                run(f"{shlex.quote(sys.executable)} - <<'PY'\n{block}PY", user_dir, env)
                ran.append("python block")
                continue
            if lang != "bash":
                continue
            for cmd in commands(block):
                if cmd.startswith(SKIP):
                    continue
                if cmd.startswith("fastrm serve"):
                    server = start_server(cmd, user_dir, env)
                    ran.append(cmd)
                    continue
                p = run(small(cmd), user_dir, env)
                if cmd.startswith("curl"):
                    assert len(json.loads(p.stdout)["rewards"][0]) == 2, p.stdout
                ran.append(cmd)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=60)
    assert any(c.startswith("fastrm demo") for c in ran) and any(c.startswith("curl") for c in ran)
    assert sum(c == "python block" for c in ran) >= 2  # the library example and the TRL example
    # what the README says these commands leave behind
    hh = user_dir / "runs" / "hh"
    assert (hh / "model.safetensors").exists() and (hh / "skipped_rows_train.jsonl").exists()
    assert (hh / "eval-harmless-base_test" / "eval_metrics.json").exists()
    paradox = json.loads((user_dir / "runs" / "paradox" / "noisy" / "paradox_report.json").read_text())
    assert [m["name"] for m in paradox["models"]] == ["checkpoint-2", "checkpoint-4"]
    scored = json.loads((user_dir / "scored.jsonl").read_text().splitlines()[0])
    assert set(scored) >= {"scores", "best_index", "best_response"}


def start_server(cmd: str, cwd: Path, env: dict) -> subprocess.Popen:
    """The README's `fastrm serve` (default 127.0.0.1:8000), waited on until /health answers."""
    import urllib.request

    proc = subprocess.Popen(["bash", "-c", f"exec {cmd.split('#')[0]}"], cwd=cwd, env=env)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert proc.poll() is None, "fastrm serve exited"
        try:
            with urllib.request.urlopen("http://127.0.0.1:8000/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    raise AssertionError("fastrm serve did not answer /health within 180 s")
