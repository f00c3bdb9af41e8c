"""pytest plugin of the device runbook: every test's outcome in a JSON file, rewritten after each test.

``pytest -p runbook_plugin`` with ``FASTRM_RUNBOOK_JSON=path`` (benchmarks/ on PYTHONPATH, as run_device.sh sets it).
A junit XML is written only when pytest exits, so a run cut by its time cap would leave nothing; this file always
holds the tests finished so far, with the versions and the GPU they ran on.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

_STATE: dict = {}


def _environment() -> dict:
    import torch

    env = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(["pytest", *sys.argv[1:]]),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }
    for mod in ("triton", "transformers"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:
            env[mod] = None
    return env


def _write() -> None:
    path = _STATE.get("path")
    if path is None:
        return
    tests = _STATE["tests"]
    counts = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "skipped", "error")}
    doc = {
        **_STATE["env"],
        "collected": _STATE.get("collected"),
        "counts": counts,
        "seconds": round(time.time() - _STATE["t0"], 1),
        "complete": _STATE.get("complete", False),
        "tests": tests,
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(path)


def pytest_configure(config):
    target = os.environ.get("FASTRM_RUNBOOK_JSON")
    if target:
        _STATE.update(path=Path(target), tests=[], t0=time.time(), env=_environment())
        _write()


def pytest_collection_finish(session):
    _STATE["collected"] = len(session.items)
    _write()


def pytest_runtest_logreport(report):
    if "path" not in _STATE:
        return
    failed_setup = report.when == "setup" and report.outcome == "failed"
    if not (report.when == "call" or report.skipped or failed_setup or (report.when == "teardown" and report.failed)):
        return
    outcome = "skipped" if report.skipped else report.outcome
    if report.when != "call" and report.failed:
        outcome = "error"
    row = {"test": report.nodeid, "outcome": outcome, "seconds": round(report.duration, 3)}
    if report.skipped and isinstance(report.longrepr, tuple):
        row["reason"] = str(report.longrepr[2])[:300]
    elif report.failed:
        row["message"] = str(report.longreprtext)[-1500:]
    _STATE["tests"].append(row)
    _write()


def pytest_sessionfinish(session, exitstatus):
    if "path" in _STATE:
        _STATE["complete"] = True
        _STATE["exit_status"] = int(exitstatus)
        _write()
