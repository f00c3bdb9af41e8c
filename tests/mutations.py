"""Plant the bug classes fastrm's tests exist for, one at a time, and report the ones no test sees (survivors).

    python tests/mutations.py                    # every mutant, its own tests, a table and a JSON report
    python tests/mutations.py --only pool-one-early mu-in-placeholder --json out.json

Each mutant is one exact text replacement in one source file (the original must occur exactly once, so a mutant that
no longer applies after a refactor is reported as ``stale``, never silently skipped as killed). It is applied to a
copy of the working tree (tracked and untracked files, not .venv), and the named tests run there with that copy first
on ``sys.path``. A mutant is ``killed`` when its tests fail, ``survived`` when they pass: a survivor is a test gap
to close. Not a pytest module (no ``test_`` prefix): reviewers run it when they touch a guarded area; it takes minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    bug: str  # the bug class, as a user would meet it
    path: str  # file relative to the repo root
    old: str
    new: str
    tests: tuple[str, ...]  # pytest arguments that must fail with the mutant in place


MUTANTS: tuple[Mutant, ...] = (
    Mutant(
        "mu-in-placeholder",
        "a rank's zero-weight placeholder pass enters the step-wide mu_B (the empty-rank bug)",
        "fastrm/objectives.py",
        "            if real:\n                d = r[: mb.num_pairs].float()",
        "            if True:\n                d = r[: mb.num_pairs].float()",
        ("tests/test_distributed.py::test_two_ranks_equal_one_process_with_empty_ranks",),
    ),
    Mutant(
        "pool-one-early",
        "the reward is pooled one token before the end of a shared-prompt response",
        "fastrm/packing.py",
        "                rows.append(len(ids) - 1)\n                unshared += P + R",
        "                rows.append(len(ids) - 2)\n                unshared += P + R",
        ("tests/test_model.py", "-k", "pool_index or shared_prompt or best_of_n"),
    ),
    Mutant(
        "shared-positions-restart",
        "a shared-prompt response's positions restart at 0 instead of continuing after the prompt",
        "fastrm/packing.py",
        "                pos.extend(range(P, P + R))",
        "                pos.extend(range(R))",
        ("tests/test_model.py", "-k", "positions or shared_prompt or best_of_n"),
    ),
    Mutant(
        "margin-sign",
        "the per-pair margin is added to d instead of subtracted",
        "fastrm/losses.py",
        "        l_pair = F.softplus(-(d - margin.to(dt)))",
        "        l_pair = F.softplus(-(d + margin.to(dt)))",
        ("tests/test_losses.py",),
    ),
    Mutant(
        "threshold-inverted",
        "the threshold rule pushes the pairs above mu_B instead of those below",
        "fastrm/losses.py",
        "        l_pair = torch.where(z.detach() < 0, F.softplus(-z), F.softplus(-d))",
        "        l_pair = torch.where(z.detach() > 0, F.softplus(-z), F.softplus(-d))",
        ("tests/test_losses.py",),
    ),
    Mutant(
        "mu-not-detached",
        "detach_mean=True still differentiates through mu_B",
        "fastrm/losses.py",
        "            mu_used = d.mean().detach() if detach_mean else d.mean()",
        "            mu_used = d.mean()",
        ("tests/test_losses.py",),
    ),
    Mutant(
        "prompt-cut-from-right",
        "a long prompt keeps its first turns instead of the turns nearest the response",
        "fastrm/formatting.py",
        "    return (prompt[len(prompt) - room :] if len(prompt) > room else prompt), responses",
        "    return (prompt[:room] if len(prompt) > room else prompt), responses",
        ("tests/test_data.py", "tests/test_scoring_api.py"),
    ),
    Mutant(
        "normaliser-per-micro-batch",
        "each micro-batch's loss is averaged over its own pairs, so micro-batching changes the gradient",
        "fastrm/trainer.py",
        "        normalizer = n_global / dist.world_size()  # each rank's loss is summed by the gradient all-reduce",
        "        normalizer = None",
        ("tests/test_trainer.py", "tests/test_fused_training.py", "-k", "micro or equal"),
    ),
    Mutant(
        "kernel-wrong-unfused-kind",
        "the fused path runs a loss kind its kernel does not implement",
        "fastrm/model.py",
        "        if self.use_fused(hidden.device) and _fused_loss_kind(loss.kind):",
        "        if self.use_fused(hidden.device):",
        ("tests/test_fused_training.py", "-k", "lacks"),
    ),
    Mutant(
        "prefetch-live-step",
        "the packing thread reads the trainer's live step counter, not the step it packs (a step trained twice)",
        "fastrm/trainer.py",
        "        idx = self.step_indices(step)\n        pairs = [",
        "        idx = self.step_indices(self.step)\n        pairs = [",
        ("tests/test_prefetch.py", "-k", "identical"),
    ),
    Mutant(
        "prefetch-not-overlapped",
        "the next step is packed only after this one ends: the host work is not overlapped",
        "fastrm/trainer.py",
        "                    prefetcher.prefetch(self.step + 1)",
        "                    pass",
        ("tests/test_prefetch.py", "-k", "another_thread"),
    ),
)


def _copy_tree(dst: Path) -> None:
    """The working tree as git sees it (tracked + untracked, not ignored), plus fastrm_kernels -> kernels."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for f in filter(None, files):
        src = ROOT / f.decode()
        if src.is_file():
            (dst / f.decode()).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / f.decode())
    (dst / "fastrm_kernels").symlink_to(dst / "kernels")
    shared = ROOT.parent / "shared"
    if shared.exists():  # the tests find the shared data beside the project root
        (dst.parent / "shared").symlink_to(shared)


def run_mutant(m: Mutant, timeout: float) -> dict:
    """Apply ``m`` to a fresh copy and run its tests: {"name", "status": killed|survived|stale|timeout, ...}."""
    with tempfile.TemporaryDirectory(prefix="fastrm-mutant-") as d:
        tree = Path(d) / "fastrm"
        tree.mkdir()
        _copy_tree(tree)
        target = tree / m.path
        text = target.read_text()
        if text.count(m.old) != 1:
            return {"name": m.name, "status": "stale", "detail": f"{m.path}: the original occurs {text.count(m.old)}x"}
        target.write_text(text.replace(m.old, m.new))
        env = {**os.environ, "PYTHONPATH": f"{tree}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *m.tests]
        t0 = time.perf_counter()
        try:
            r = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"name": m.name, "status": "timeout", "seconds": round(time.perf_counter() - t0, 1)}
        tail = (r.stdout + r.stderr).strip().splitlines()[-1:] or [""]
        # rc 1: tests failed (killed); rc 0: all passed (survived); anything else (collection error, no tests) is
        # reported as it is, so a mutant that breaks the import is not counted as a test catching it.
        status = {0: "survived", 1: "killed"}.get(r.returncode, f"error rc={r.returncode}")
        return {"name": m.name, "status": status, "seconds": round(time.perf_counter() - t0, 1), "last": tail[0]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--only", nargs="+", metavar="NAME", help=f"mutants to run (default all: {[m.name for m in MUTANTS]})"
    )
    p.add_argument("--json", help="write the report here")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per mutant (default 900)")
    a = p.parse_args(argv)
    unknown = set(a.only or ()) - {m.name for m in MUTANTS}
    if unknown:
        p.error(f"unknown mutants {sorted(unknown)}; known: {[m.name for m in MUTANTS]}")
    chosen = [m for m in MUTANTS if not a.only or m.name in a.only]
    results = []
    for m in chosen:
        r = {**run_mutant(m, a.timeout), "bug": m.bug, "file": m.path, "tests": " ".join(m.tests)}
        results.append(r)
        print(f"{r['status']:>10}  {m.name:<28} {r.get('seconds', '')}s  {m.bug}", flush=True)
    survivors = [r["name"] for r in results if r["status"] != "killed"]
    print(f"{len(results) - len(survivors)}/{len(results)} killed; not killed: {survivors or 'none'}")
    if a.json:
        Path(a.json).write_text(json.dumps({"mutants": results, "not_killed": survivors}, indent=2) + "\n")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
