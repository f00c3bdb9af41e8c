"""The device runbook's bookkeeping, field check and README table (standard library only: it runs between blocks).

    python benchmarks/device_table.py table OUT      # the README tables from a run's folder (markdown)
    python benchmarks/device_table.py check OUT      # exit 1 unless every JSON has the fields the tables use
    (start / block: called by benchmarks/run_device.sh to keep OUT/runbook.json up to date)

OUT holds what ``bash benchmarks/run_device.sh all`` wrote: runbook.json (GPU, budget, each block's status), and per
block the JSON named in BLOCK_FILES. The targets are issue 24's; each is a ratio measured side by side in one run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

BLOCK_FILES = {
    "correctness": "correctness.json",
    "train": "train_pythia-410m.json",
    "bon": "bon_pythia-410m.json",
    "kernels": "kernels.json",
    "train-1.4b": "train_pythia-1.4b.json",
}
# The fields the tables below read: a JSON without one fails `check` (the dry run runs it in CI).
TRAIN_META = (
    "date",
    "command",
    "device",
    "torch",
    "triton",
    "transformers",
    "python",
    "matmul_tflops_measured",
    "data",
)
TRAIN_ROW = (
    "shape",
    "stack",
    "loss",
    "fused_head",
    "step_s",
    "pairs_per_s",
    "real_tokens_per_s",
    "mfu",
    "peak_mem_gib",
    "micro_batches_per_step",
    "triton_compiles_in_timed_steps",
)
SCORE_ROW = ("shape", "n", "variant", "responses_per_s", "peak_mem_gib", "max_tokens_per_batch")
KERNELS_TOP = ("gpu", "torch", "triton", "date", "command", "results", "speedup_fused")
KERNELS_ROW = ("T", "B", "H", "impl", "mode", "median_ms")
CORRECTNESS_TOP = ("device", "torch", "triton", "transformers", "date", "collected", "counts", "tests")
STACK_WHAT = {
    "A": "TRL-style: padded batches, head on every token",
    "B": "OpenRLHF-style: packed varlen, head on every token",
    "C": "fastrm: packed varlen, fused head + loss",
    "C0": "C without the fused head",
    "D": "fastrm, shared-prompt packing",
    "CT": "C with loss=threshold (step-wide mu)",
}


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _missing(obj: dict, fields, where: str) -> list[str]:
    return [f"{where}: field '{f}' missing" for f in fields if f not in obj]


# ---------------------------------------------------------------------------------------------- bookkeeping
def start(out: Path, gpu: str, budget: int, dry_run: bool, mode: str, command: str) -> None:
    doc = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": command,
        "gpu": gpu,
        "dry_run": dry_run,
        "mode": mode,
        "budget_s": budget,
        "blocks": [],
    }
    (out / "runbook.json").write_text(json.dumps(doc, indent=1) + "\n")


def block(out: Path, name: str, status: str, rc: int | None, seconds: int, cap: int) -> None:
    path = out / "runbook.json"
    doc = _load(path) or {"blocks": []}
    doc["blocks"].append(
        {"block": name, "status": status, "rc": rc, "seconds": seconds, "cap_s": cap, "file": BLOCK_FILES.get(name)}
    )
    path.write_text(json.dumps(doc, indent=1) + "\n")


# ---------------------------------------------------------------------------------------------- check
def check(out: Path) -> list[str]:
    """Problems with a run's folder: missing files of finished blocks, missing fields, failed tests."""
    run = _load(out / "runbook.json")
    if run is None:
        return [f"{out / 'runbook.json'}: missing or unreadable"]
    problems = []
    for b in run.get("blocks", []):
        name, status = b["block"], b["status"]
        if status == "skipped":
            continue
        path = out / BLOCK_FILES[name]
        doc = _load(path)
        if doc is None:
            if status == "ok" or name != "correctness":  # a cut benchmark still wrote its first JSON
                problems.append(f"{path}: missing or unreadable (block {name}: {status})")
            continue
        where = str(path)
        if name == "correctness":
            problems += _missing(doc, CORRECTNESS_TOP, where)
            counts = doc.get("counts", {})
            if counts.get("failed") or counts.get("error"):
                problems.append(f"{where}: {counts.get('failed')} failed, {counts.get('error')} errors")
            if not doc.get("collected"):
                problems.append(f"{where}: no test collected")
        elif name == "kernels":
            problems += _missing(doc, KERNELS_TOP, where)
            rows = doc.get("results") or []
            if status == "ok" and not rows:
                problems.append(f"{where}: no results")
            for i, r in enumerate(rows):
                problems += _missing(r, KERNELS_ROW, f"{where} results[{i}]")
        else:
            problems += _missing(doc.get("meta", {}), TRAIN_META, f"{where} meta")
            key, fields = ("score", SCORE_ROW) if name == "bon" else ("train", TRAIN_ROW)
            rows = doc.get(key) or []
            if status == "ok" and not (rows and doc.get("complete")):
                problems.append(f"{where}: '{key}' empty or the run not complete")
            for i, r in enumerate(rows):
                problems += _missing(r, fields, f"{where} {key}[{i}]")
        if status == "failed":
            problems.append(f"block {name}: failed (rc {b.get('rc')})")
    return problems


# ---------------------------------------------------------------------------------------------- tables
def _f(x, fmt="{:.2f}") -> str:
    return "n/a" if x is None else fmt.format(x)


def _ratio(a, b):
    return a / b if a is not None and b else None


def train_table(doc: dict) -> tuple[str, dict]:
    """Markdown of one training JSON, and the stack rows by name (first shape, checkpointing off first)."""
    m = doc["meta"]
    rows = {r["stack"]: r for r in reversed(doc["train"])}
    b = rows.get("B")
    lines = [
        f"**{doc['train'][0]['shape']}**, {m['device']}, {m['date']} (torch {m['torch']}, triton {m['triton']}, "
        f"transformers {m['transformers']}; {m['data']}; {m['pairs_per_step'] if 'pairs_per_step' in m else '?'} "
        f"pairs per step, matmul rate measured {m['matmul_tflops_measured']:.3g} TFLOP/s)",
        "",
        "| stack | what | pairs/s | vs B | real tokens/s | MFU | peak GiB | micro-batches/step | Triton compiles in "
        "timed steps |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in sorted(rows.items(), key=lambda kv: list(STACK_WHAT).index(kv[0])):
        lines.append(
            f"| {name} | {STACK_WHAT[name]} | {r['pairs_per_s']:.1f} | "
            f"{_f(_ratio(r['pairs_per_s'], b and b['pairs_per_s']), '{:.2f}x')} | {r['real_tokens_per_s']:.0f} | "
            f"{r['mfu']:.1%} | {_f(r['peak_mem_gib'], '{:.1f}')} | {_f(r['micro_batches_per_step'], '{}')} | "
            f"{_f(r['triton_compiles_in_timed_steps'], '{}')} |"
        )
    return "\n".join(lines), rows


def bon_table(doc: dict) -> tuple[str, dict]:
    by = {}
    for r in doc["score"]:
        by.setdefault(r["n"], {})[r["variant"]] = r["responses_per_s"]
    lines = [
        f"**Best-of-N scoring**, {doc['score'][0]['shape']} (responses/s; {doc['meta']['device']})",
        "",
        "| N | HF padded | fastrm packed | fastrm shared prompt | shared vs HF |",
        "|---|---|---|---|---|",
    ]
    for n, v in sorted(by.items()):
        hf, pk, sh = v.get("hf_padded"), v.get("fastrm_packed"), v.get("fastrm_shared_prompt")
        lines.append(
            f"| {n} | {_f(hf, '{:.0f}')} | {_f(pk, '{:.0f}')} | {_f(sh, '{:.0f}')} | {_f(_ratio(sh, hf), '{:.2f}x')} |"
        )
    return "\n".join(lines), by


def kernels_table(doc: dict) -> tuple[str, list]:
    ms = {(r["T"], r["B"], r["H"], r["mode"], r["impl"]): r["median_ms"] for r in doc["results"] if "median_ms" in r}
    lines = [
        f"**Fused head + loss op** vs the eager composition (norm + head on all T tokens), {doc['gpu']} (median ms)",
        "",
        "| T | B | H | mode | fused | eager | speed-up |",
        "|---|---|---|---|---|---|---|",
    ]
    speedups = []
    for (T, B, H, mode, impl), t in sorted(ms.items()):
        if impl != "fused" or (T, B, H, mode, "eager") not in ms:
            continue
        e = ms[(T, B, H, mode, "eager")]
        speedups.append((mode, e / t))
        lines.append(f"| {T} | {B} | {H} | {mode} | {t:.3f} | {e:.3f} | {e / t:.1f}x |")
    return "\n".join(lines), speedups


def targets(train: dict, bon: dict, speedups: list) -> str:
    """Issue 24's targets against the measured ratios (n/a where a block did not run)."""
    g = lambda s, k: train.get(s, {}).get(k)  # noqa: E731
    c_b = _ratio(g("C", "pairs_per_s"), g("B", "pairs_per_s"))
    d_b = _ratio(g("D", "pairs_per_s"), g("B", "pairs_per_s"))
    ct_c = _ratio(g("CT", "step_s"), g("C", "step_s"))
    mem = _ratio(g("C", "peak_mem_gib"), g("B", "peak_mem_gib"))
    n16 = bon.get(16, {})
    bon16 = _ratio(n16.get("fastrm_shared_prompt"), n16.get("hf_padded"))
    fwdbwd = [s for mode, s in speedups if mode == "fwdbwd"]
    rows = [
        ("C >= 1.15x B (pairs/s)", c_b, lambda v: v >= 1.15, "{:.2f}x"),
        ("D >= 1.4x B (pairs/s)", d_b, lambda v: v >= 1.4, "{:.2f}x"),
        ("C's MFU >= 30%", g("C", "mfu"), lambda v: v >= 0.30, "{:.1%}"),
        ("C's peak memory <= B's", mem, lambda v: v <= 1.0, "{:.2f}x B"),
        ("threshold step <= 1.05x bt step (CT / C)", ct_c, lambda v: v <= 1.05, "{:.2f}x"),
        ("best-of-N at N = 16 >= 3x HF padded", bon16, lambda v: v >= 3.0, "{:.2f}x"),
        ("fused op >= 5x eager (fwd+bwd, worst case)", min(fwdbwd) if fwdbwd else None, lambda v: v >= 5.0, "{:.1f}x"),
    ]
    lines = ["| target | measured | met |", "|---|---|---|"]
    for what, v, ok, fmt in rows:
        lines.append(f"| {what} | {_f(v, fmt)} | {'n/a' if v is None else ('yes' if ok(v) else 'no')} |")
    return "\n".join(lines)


def table(out: Path) -> str:
    run = _load(out / "runbook.json") or {}
    parts = []
    head = f"Device run {run.get('date', '?')}: {run.get('gpu', '?')}"
    if run.get("dry_run"):
        head += " (DRY RUN on a CPU: tiny shapes, the numbers mean nothing)"
    parts.append(head)
    status = ", ".join(f"{b['block']} {b['status']} ({b['seconds']}s)" for b in run.get("blocks", []))
    parts.append(f"Blocks: {status or 'none'}")
    corr = _load(out / BLOCK_FILES["correctness"])
    if corr:
        c = corr["counts"]
        parts.append(
            f"Correctness ({corr['device']}): {c['passed']} passed, {c['failed']} failed, {c['error']} errors, "
            f"{c['skipped']} skipped of {corr['collected']} collected"
        )
    train_rows, bon_rows, speedups = {}, {}, []
    for name in ("train", "train-1.4b"):
        doc = _load(out / BLOCK_FILES[name])
        if doc and doc.get("train"):
            text, rows = train_table(doc)
            parts.append(text)
            if name == "train":
                train_rows = rows
    doc = _load(out / BLOCK_FILES["bon"])
    if doc and doc.get("score"):
        text, bon_rows = bon_table(doc)
        parts.append(text)
    doc = _load(out / BLOCK_FILES["kernels"])
    if doc and doc.get("results"):
        text, speedups = kernels_table(doc)
        parts.append(text)
    parts.append(targets(train_rows, bon_rows, speedups))
    return "\n\n".join(parts) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("start")
    s.add_argument("out", type=Path)
    s.add_argument("--gpu", default="")
    s.add_argument("--budget", type=int, required=True)
    s.add_argument("--dry-run", type=int, default=0)
    s.add_argument("--mode", default="all")
    s.add_argument("--command", default="")
    b = sub.add_parser("block")
    b.add_argument("out", type=Path)
    b.add_argument("name", choices=list(BLOCK_FILES))
    b.add_argument("--status", required=True, choices=["ok", "failed", "timed_out", "skipped"])
    b.add_argument("--rc", type=int)
    b.add_argument("--seconds", type=int, required=True)
    b.add_argument("--cap", type=int, required=True)
    for name in ("check", "table"):
        sub.add_parser(name).add_argument("out", type=Path)
    a = p.parse_args(argv)
    if a.cmd == "start":
        start(a.out, a.gpu, a.budget, bool(a.dry_run), a.mode, a.command)
    elif a.cmd == "block":
        block(a.out, a.name, a.status, a.rc, a.seconds, a.cap)
    elif a.cmd == "check":
        problems = check(a.out)
        for line in problems:
            print(f"check: {line}", file=sys.stderr)
        print(f"check: {'OK' if not problems else f'{len(problems)} problem(s)'} ({a.out})")
        return 1 if problems else 0
    else:
        print(table(a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
