"""Benchmark metrics from per-response scores, the report's plots and the table ``fastrm bench`` prints.

Pure functions of scores and labels (no model): the in-process command and the Ray Data path build the same report.

RM-Bench accuracy (Liu et al. 2024, "RM-Bench", arXiv 2410.16184; ``compute_accuracy`` in its ``scripts/utils.py``):
for each prompt with chosen responses c_1..c_K and rejected responses r_1..r_K in K styles (K = 3: concise,
detailed plain, detailed markdown) form the K x K matrix M[i][j] = 1 if score(c_i) > score(r_j) else 0 (a tie
counts 0, i.e. wrong), and average M over the prompts. Then

* hard   = mean of the upper-right triangle (i < j: the chosen response is plainer than the rejected one),
* normal = mean of the diagonal (same style),
* easy   = mean of the lower-left triangle (i > j),
* avg    = mean of hard, normal and easy (RM-Bench's domain score; = the mean of all K^2 entries when K = 3).

RM-Bench's **domains** are chosen by name prefix (``split_dataset_by_domain``: chat, math, code, safety), so its
safety-refuse and safety-response files are one Safety domain: one matrix over the prompts of both. Its
**overall** numbers are means over the domains: hard / normal / easy of the domains' hard / normal / easy, and
``avg`` (its ``total_avg_acc``, the leaderboard's average) of the domains' avg. The report gives each file's numbers
(``files``), the domains (``domains``) and the overall (``overall``), and the matrix pooled over all prompts
(``pooled``, weighting domains by their prompt counts; not an RM-Bench number). RewardBench's numbers:
:mod:`fastrm.bench_rewardbench`.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from fastrm.bench_data import REWARDBENCH, REWARDBENCH_2, RM_BENCH, BenchFile, missing_rm_bench_domains
from fastrm.bench_rewardbench import best_of_n_result, rewardbench2_summary, rewardbench_summary
from fastrm.evaluation import json_safe, margin_statistics, plot_margin_histogram, save_figure

REPORT = "bench_report.json"
SCORES = "bench_scores.jsonl"

LEVELS = ("hard", "normal", "easy")
RM_BENCH_PREFIXES = ("chat", "math", "code", "safety")  # RM-Bench's split_dataset_by_domain, in its order


def rm_bench_accuracy(score_chosen: np.ndarray, score_rejected: np.ndarray) -> dict[str, Any]:
    """RM-Bench's accuracies (module docstring) from scores [P, K] of the chosen and rejected responses.

    Returns {"num_prompts", "matrix" [K][K] (rows: chosen style, columns: rejected style), "hard", "normal",
    "easy", "avg"}; hard/easy are None when K = 1.
    """
    sc, sr = np.asarray(score_chosen, dtype=np.float64), np.asarray(score_rejected, dtype=np.float64)
    if sc.ndim != 2 or sc.shape != sr.shape or sc.shape[0] == 0:
        raise ValueError(f"expected two score arrays [P, K] of the same shape, P >= 1; got {sc.shape} and {sr.shape}")
    k = sc.shape[1]
    m = (sc[:, :, None] > sr[:, None, :]).mean(axis=0)  # [K, K]; strict: a tie is wrong
    upper, lower = m[np.triu_indices(k, 1)], m[np.tril_indices(k, -1)]
    out = {
        "num_prompts": int(sc.shape[0]),
        "matrix": m.tolist(),
        "hard": float(upper.mean()) if upper.size else None,
        "normal": float(np.diag(m).mean()),
        "easy": float(lower.mean()) if lower.size else None,
    }
    out["avg"] = float(np.mean([out[x] for x in LEVELS if out[x] is not None]))
    return out


def rm_bench_section(scores: Sequence[Sequence[float]], k: int, subsets: Sequence[str | None]) -> dict[str, Any]:
    """A domain's numbers from each prompt's 2K scores (chosen first), with a breakdown by the records' ``subset``."""
    s = np.asarray(scores, dtype=np.float64)
    out = rm_bench_accuracy(s[:, :k], s[:, k:])
    names = sorted({x for x in subsets if x is not None})
    if len(names) > 1:
        idx = np.asarray([x or "" for x in subsets])
        out["subsets"] = {
            n: {kk: v for kk, v in rm_bench_accuracy(s[idx == n, :k], s[idx == n, k:]).items() if kk != "matrix"}
            for n in names
        }
    return out


def rm_bench_domain(name: str) -> str:
    """RM-Bench's domain of a file or record name: the first of chat, math, code, safety it starts with (so both
    safety files are "safety"); a name with none of them is its own domain."""
    return next((d for d in RM_BENCH_PREFIXES if name.startswith(d)), name)


def rm_bench_summary(
    domain_scores: dict[str, list[np.ndarray]], pooled_scores: list[np.ndarray] | None
) -> dict[str, Any]:
    """RM-Bench's domain numbers (one matrix over each domain's prompts, from every file in it), its overall means
    over the domains, and the pooled-over-prompts numbers (module docstring)."""
    domains = {}
    for name, parts in domain_scores.items():
        s = np.concatenate(parts)
        k = s.shape[1] // 2
        domains[name] = {kk: v for kk, v in rm_bench_accuracy(s[:, :k], s[:, k:]).items()}
    overall: dict[str, Any] = {}
    for key in (*LEVELS, "avg"):
        vals = [d[key] for d in domains.values() if d[key] is not None]
        overall[key] = float(np.mean(vals)) if vals else None
    out: dict[str, Any] = {"domains": domains, "num_domains": len(domains), "overall": overall}
    if pooled_scores:
        s = np.concatenate(pooled_scores)
        k = s.shape[1] // 2
        out["pooled"] = rm_bench_accuracy(s[:, :k], s[:, k:])
    return out


def best_of_n_section(scores: Sequence[Sequence[float]], best: Sequence[Sequence[int]]) -> dict[str, Any]:
    """Best-of-N accuracy and the rank of the labelled best response.

    The model ranks a record's responses by score, higher first, ties broken by index (the rule of
    ``fastrm.scoring.best_of_n``); the rank of the labelled best is its place in that order (1 = the model's pick),
    the best-placed one when several are labelled best. Accuracy is the share of records with rank 1; the random
    baseline is the mean of (labelled best) / N, the accuracy of a uniformly random pick.
    """
    ranks, baseline, model_ties = [], [], 0
    for s, b in zip(scores, best):
        order = sorted(range(len(s)), key=lambda i: (-s[i], i))
        place = {i: r for r, i in enumerate(order, start=1)}
        ranks.append(min(place[i] for i in b))
        baseline.append(len(b) / len(s))
        model_ties += sum(x == s[order[0]] for x in s) > 1
    r = np.asarray(ranks, dtype=np.float64)
    n = np.asarray([len(s) for s in scores], dtype=np.float64)
    return {
        "num_records": len(ranks),
        "accuracy": float((r == 1).mean()),
        "mean_rank": float(r.mean()),
        "mean_n": float(n.mean()),
        "random_baseline_accuracy": float(np.mean(baseline)),
        "model_ties_at_top": int(model_ties),
    }


def pairs_section(scores: Sequence[Sequence[float]]) -> dict[str, Any]:
    """Accuracy and margin statistics of pairs (each group: [chosen, rejected]), as ``fastrm eval`` reports them."""
    s = np.asarray(scores, dtype=np.float64)
    return margin_statistics(s[:, 0] - s[:, 1])


# ------------------------------------------------------------------------------------------------ plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_rm_bench(domains: dict[str, dict], mean: dict | None, path: str | Path, title: str) -> Path:
    """Grouped bars: per domain (and the mean over domains) hard / normal / easy accuracy; writes a PNG."""
    plt = _pyplot()
    groups = dict(domains)
    if mean is not None and len(domains) > 1:
        groups["mean"] = mean
    x = np.arange(len(groups))
    fig, ax = plt.subplots(figsize=(max(6.4, 1.3 * len(groups) + 2), 4.0), dpi=120)
    for i, level in enumerate(LEVELS):
        vals = [g[level] if g[level] is not None else np.nan for g in groups.values()]
        bars = ax.bar(x + (i - 1) * 0.27, vals, 0.27, label=level)
        ax.bar_label(bars, fmt="%.2f", fontsize=6)
    ax.axhline(0.5, color="k", lw=0.8, ls="--")
    ax.set_xticks(x, list(groups))
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, ncols=3, loc="upper center")
    return save_figure(fig, plt, path)


# ------------------------------------------------------------------------------------------------ table


def _pct(v: float | None) -> str:
    return "   -  " if v is None else f"{100 * v:6.1f}"


def _levels(d: dict) -> str:
    return "  ".join(_pct(d[k]) for k in (*LEVELS, "avg"))


def _rm_bench_lines(report: dict, skipped: dict[str, int]) -> list[str]:
    rm = report["rm_bench"]
    lines = [f"  {'file':<24}{'prompts':>8}{'skipped':>8}  {'hard':>6}  {'normal':>6}  {'easy':>6}  {'avg':>6}"]
    for name, d in rm["files"].items():
        lines.append(f"  {name:<24}{d['num_prompts']:>8}{skipped.get(name, 0):>8}  {_levels(d)}")
    lines.append(f"  {'RM-Bench domain':<24}{'prompts':>8}{'files':>8}")
    for name, d in rm["domains"].items():
        lines.append(f"  {name:<24}{d['num_prompts']:>8}{len(d['files']):>8}  {_levels(d)}")
    n = rm["num_domains"]
    lines.append(f"  {f'overall ({n} domain' + 's' * (n != 1) + ')':<24}{'':>16}  {_levels(rm['overall'])}")
    if "pooled" in rm and len(rm["files"]) > 1:
        p = rm["pooled"]
        lines.append(f"  {'pooled over prompts':<24}{p['num_prompts']:>8}{'':>8}  {_levels(p)}")
    if rm.get("missing_domains"):
        lines.append(
            f"  (not in the data folder: {', '.join(rm['missing_domains'])}; RM-Bench's overall has 4 domains)"
        )
    return lines


def _rewardbench_lines(report: dict) -> list[str]:
    lines = []
    rb = report.get("rewardbench")
    if rb:
        lines.append("RewardBench (sections weighted by its EXAMPLE_COUNTS; overall weights 2,2,2,2,1 with Prior Sets)")
        lines.append(f"  {'subset':<24}{'pairs':>8}  {'acc':>6}")
        for name, d in rb["subsets"].items():
            lines.append(f"  {name:<24}{d['num_pairs']:>8}  {_pct(d['accuracy'])}")
        for name, v in [*rb["sections"].items(), ("Prior Sets", rb["prior_sets"])]:
            gone = rb["missing_subsets"].get(name)
            note = f"  ({len(gone)} subsets missing)" if gone and v is not None else ""
            lines.append(f"  {name:<24}{'':>8}  {_pct(v)}{note}")
        lines.append(f"  {'overall':<24}{'':>8}  {_pct(rb['overall'])}" + ("" if rb["complete"] else "  (incomplete)"))
    rb2 = report.get("rewardbench_2")
    if rb2:
        lines.append(
            "RewardBench 2 (best-of-N with ties shared; Ties subset: its own score; overall = mean of subsets)"
        )
        lines.append(f"  {'subset':<24}{'prompts':>8}  {'score':>6}")
        for name, d in rb2["subsets"].items():
            lines.append(f"  {name:<24}{d['num_prompts']:>8}  {_pct(d['score'])}")
        note = f"  (missing: {', '.join(rb2['missing_subsets'])})" if rb2["missing_subsets"] else ""
        lines.append(f"  {'overall':<24}{'':>8}  {_pct(rb2['overall'])}{note}")
    return lines


def format_table(report: dict) -> str:
    """The short table printed at the end of ``fastrm bench`` (accuracies in percent); every file's skipped
    records (empty responses among them) are counted in its row and in a note."""
    skipped = {f["name"]: f["skipped"] for f in report["files"]}
    lines = [f"rendering: {report['prompt_format']}"]
    if report.get("rm_bench"):
        lines.append("RM-Bench")
        lines += _rm_bench_lines(report, skipped)
    lines += _rewardbench_lines(report)
    pairs = [s for s in report["sections"] if s["format"] in ("pairs", REWARDBENCH)]
    if pairs:
        lines.append(f"  {'pairs':<24}{'pairs':>8}{'skipped':>8}  {'acc':>6}  {'margin':>7}  {'bt_loss':>7}")
        for s in pairs:
            lines.append(
                f"  {s['name']:<24}{s['num_pairs']:>8}{skipped.get(s['name'], 0):>8}  {_pct(s['accuracy'])}  "
                f"{s['margin_mean']:7.3f}  {s['bt_loss']:7.3f}"
            )
    bon = [s for s in report["sections"] if s["format"] == "best-of-n"]
    if bon:
        lines.append(
            f"  {'best-of-N':<24}{'records':>8}{'skipped':>8}  {'acc':>6}  {'random':>6}  {'rank':>6}  {'mean N':>6}"
        )
        for s in bon:
            lines.append(
                f"  {s['name']:<24}{s['num_records']:>8}{skipped.get(s['name'], 0):>8}  {_pct(s['accuracy'])}  "
                f"{_pct(s['random_baseline_accuracy'])}  {s['mean_rank']:6.2f}  {s['mean_n']:6.1f}"
            )
    for f in report["files"]:
        if f["skipped"]:
            lines.append(
                f"  skipped in {f['name']}: {f['skipped']} of {f['records']} records ({f['skipped_empty_responses']} "
                f"with an empty response); its numbers are over the {f['scored']} scored"
            )
    t = report["timing"]
    total = sum(f["skipped"] for f in report["files"])
    cut = sum(f["prompt_truncated"] + f["response_truncated"] for f in report["files"])
    lines.append(
        f"{t['responses']} responses in {t['scoring_s']:.1f}s ({t['responses_per_s']:.1f} responses/s, "
        f"{'shared prompts' if report['settings']['prefix_sharing'] else 'no prefix sharing'}); "
        f"{total} records skipped, {cut} groups truncated"
    )
    return "\n".join(lines)


EMPTY_MARKS = ("empty string", "only whitespace", "zero tokens", "empty response")


def is_empty_response(reason: str) -> bool:
    """A skip reason that is an empty response (not an empty prompt or subset)."""
    return any(m in reason for m in EMPTY_MARKS) and not any(k in reason for k in ("'prompt'", "'subset'"))


def _file_row(bf: BenchFile, scored: int) -> dict:
    st = bf.stats
    return {
        "path": bf.path,
        "name": bf.name,
        "format": bf.format,
        "bytes": bf.bytes,
        "records": bf.rows,
        "scored": scored,
        "skipped": st.bad_rows_skipped,
        "skipped_empty_responses": sum(is_empty_response(r) for r in bf.skipped),
        "skipped_records": bf.skipped,
        "ties_dropped": st.ties_dropped,
        "unshared_prompt": st.unshared_prompt,
        "prompt_truncated": st.prompt_truncated,
        "response_truncated": st.response_truncated,
        **({"rendering": bf.render_stats} if bf.render_stats else {}),
    }


def comparable_with(report: dict) -> dict[str, str]:
    """What each benchmark's numbers in the report can be put next to, and what keeps them from a leaderboard."""
    if report["rendering"]["name"] == "default":
        base = (
            "fastrm's own formatting (bench = eval): comparable with this model's fastrm eval and training metrics "
            "and with other default-rendering fastrm bench runs, not with the leaderboard (--rendering rm-bench is)"
        )
    else:
        base = (
            "the reference rendering: comparable with the benchmark's reference script run on this model "
            "(RewardBench's scripts/run_rm.py, which RM-Bench's copies) and with the leaderboard"
        )
    limit = ["--limit"] if report["settings"].get("limit") is not None else []
    gaps: dict[str, list[str]] = {}
    if "rm_bench" in report:
        absent = [d for d in RM_BENCH_PREFIXES if d not in report["rm_bench"]["domains"]]
        gaps["rm_bench"] = ([f"no {', '.join(absent)} domain"] if absent else []) + limit
    if "rewardbench" in report:
        gaps["rewardbench"] = ([] if report["rewardbench"]["complete"] else ["subsets missing"]) + limit
    if "rewardbench_2" in report:
        gaps["rewardbench_2"] = (["subsets missing"] if report["rewardbench_2"]["missing_subsets"] else []) + limit
    return {
        k: base + (f"; the overall is not the leaderboard's ({', '.join(g)})" if g else "") for k, g in gaps.items()
    }


def build_report(files: list[BenchFile], scores: list[list[list[float]]], meta: dict) -> dict:
    """The report from each file's records and their scores (``scores[f][g]``: one float per response)."""
    sections, rm_files, rm_scores, file_rows = [], {}, [], []
    rm_domains: dict[str, list[np.ndarray]] = {}
    rm_domain_files: dict[str, list[str]] = {}
    rb: dict[str, list[float]] = {}
    rb2: dict[str, list] = {}
    for bf, s in zip(files, scores):
        file_rows.append(_file_row(bf, len(s)))
        head = {"name": bf.name, "file": bf.path, "format": bf.format}
        if bf.format == RM_BENCH:
            sec = rm_bench_section(s, bf.k or 0, [r.label["subset"] for r in bf.records])
            name = _unique(bf.name, rm_files)
            rm_files[name] = sec
            rm_scores.append(np.asarray(s, dtype=np.float64))
            for rec, row in zip(bf.records, s):
                d = rm_bench_domain(rec.label.get("domain") or bf.name)
                if _k_clash(rm_domains.get(d), len(row)):  # one matrix needs one K: a file with another K apart
                    d = f"{d}-k{bf.k}"
                rm_domains.setdefault(d, []).append(np.asarray([row], dtype=np.float64))
                if name not in rm_domain_files.setdefault(d, []):
                    rm_domain_files[d].append(name)
            sections.append({**head, "k": bf.k, **sec})
        elif bf.format == "best-of-n":
            sections.append({**head, **best_of_n_section(s, [r.label["best"] for r in bf.records])})
            sections[-1]["label_ties"] = sum(bool(r.label["label_tie"]) for r in bf.records)
        elif bf.format == REWARDBENCH:
            per: dict[str, list[float]] = {}
            for rec, (c, r) in zip(bf.records, s):
                per.setdefault(rec.label["subset"], []).append(1.0 if c > r else 0.0)
                rb.setdefault(rec.label["subset"], []).append(1.0 if c > r else 0.0)
            same = sum(rec.responses[0] == rec.responses[1] for rec in bf.records)
            subsets = {k: {"num_pairs": len(v), "accuracy": float(np.mean(v))} for k, v in sorted(per.items())}
            sections.append({**head, **pairs_section(s), "identical_pairs": same, "subsets": subsets})
        elif bf.format == REWARDBENCH_2:
            for rec, row in zip(bf.records, s):
                rb2.setdefault(rec.label["subset"], []).append((rec.label["id"], row, rec.label["num_correct"]))
            results = [best_of_n_result(row) for row in s]
            sections.append({**head, "num_prompts": len(s), "best_of_n_score": float(np.mean(results))})
        else:
            sections.append({**head, **pairs_section(s)})
    report: dict[str, Any] = {
        "fastrm_version": _version(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        **{k: v for k, v in meta.items() if k != "timing"},
        "files": file_rows,
        "sections": sections,
    }
    report.setdefault("rendering", {"name": "default", "description": report.get("prompt_format")})
    if rm_files:
        same_k = len({x.shape[1] for x in rm_scores}) == 1
        summary = rm_bench_summary(rm_domains, rm_scores if same_k else None)
        for d, names in rm_domain_files.items():
            summary["domains"][d]["files"] = names
        folders = {Path(f.path).parent for f in files if f.benchmark == RM_BENCH}
        report["rm_bench"] = {
            "definition": (
                "per prompt M[i][j] = 1 if score(chosen_i) > score(rejected_j) else 0 (ties count 0), averaged over "
                "the prompts; hard = mean of M[i][j] for i < j (chosen plainer than rejected), normal = the "
                "diagonal, easy = i > j, avg = mean of hard, normal, easy; files: per file; domains: RM-Bench's "
                "domains by name prefix (chat, math, code, safety: both safety files are one domain, one matrix over "
                "their prompts); overall: mean over the domains (avg = RM-Bench's total_avg_acc); pooled: one "
                "matrix over all prompts"
            ),
            "files": rm_files,
            **summary,
            "missing_domains": sorted(
                {rm_bench_domain(d) for folder in folders for d in missing_rm_bench_domains(folder)}
                - set(summary["domains"])
            ),
        }
    if rb:
        report["rewardbench"] = rewardbench_summary(rb)
    if rb2:
        report["rewardbench_2"] = rewardbench2_summary(rb2)
    report["comparable_with"] = comparable_with(report)
    report["timing"] = meta["timing"]
    return report


def _k_clash(parts: list[np.ndarray] | None, width: int) -> bool:
    """A domain already holding prompts with another number of responses (one matrix needs one K)."""
    return bool(parts) and parts[0].shape[1] != width  # type: ignore[index]


def _unique(name: str, taken: dict) -> str:
    out, i = name, 2
    while out in taken:
        out, i = f"{name}-{i}", i + 1
    return out


def _version() -> str:
    from fastrm.version import __version__

    return __version__


def write_outputs(report: dict, files: list[BenchFile], scores: list[list[list[float]]], output_dir) -> None:
    """bench_report.json, bench_scores.jsonl (one line per record: source and its responses' scores; RM-Bench
    records also as score_chosen / score_rejected, RM-Bench's own field names) and the PNGs."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = []
    if "rm_bench" in report:
        rm = report["rm_bench"]
        title = f"RM-Bench ({report['model']['spec'] or report['model']['model_type']}; {report['rendering']['name']})"
        plots.append(str(plot_rm_bench(rm["domains"], rm["overall"], out / "bench_rm_bench.png", title)))
    margins = {
        bf.name: np.asarray([g[0] - g[1] for g in s]) for bf, s in zip(files, scores) if bf.format == "pairs" and s
    }
    if margins:
        plots.append(str(plot_margin_histogram(margins, out / "bench_margin_hist.png", title="Reward margin (bench)")))
    report["outputs"] = {"report": str(out / REPORT), "scores": str(out / SCORES), "plots": plots}
    with open(out / SCORES, "w", encoding="utf-8") as fh:
        for bf, per_file in zip(files, scores):
            for rec, s in zip(bf.records, per_file):
                row = {"file": bf.path, "source": rec.source, "scores": s}
                if bf.format == RM_BENCH:
                    k = bf.k or 0
                    row.update(id=rec.label["id"], score_chosen=s[:k], score_rejected=s[k:])
                elif bf.format == "best-of-n":
                    row["best"] = rec.label["best"]
                fh.write(json.dumps(row) + "\n")
    (out / REPORT).write_text(json.dumps(json_safe(report), indent=2, allow_nan=False))
