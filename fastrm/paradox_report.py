"""``fastrm paradox``'s numbers, plots and table: pure functions of per-response scores (no model is loaded here), so
the in-process and the Ray paths build the same report and a test recomputes every number from the scores file.

Best-of-N, exact (no sampling). A prompt has n candidates with proxy scores s (the checkpoint's) and gold rewards g.
Draw an N-subset uniformly at random (one of C(n, N)); the proxy picks its highest-scored member (a tie is split
evenly among the tied); the outcome is the pick's gold reward. Sort the candidates by s, descending, 0-based rank r.
Without ties the rank-r candidate is the pick exactly when it is in the subset and the other N-1 members come from
the n-1-r candidates below it::

    P(r) = C(n-1-r, N-1) / C(n, N)            E_N = sum_r P(r) g_r

A group of tied candidates at ranks a..a+c-1 is picked with the sum of those probabilities (one of them is on top
whatever the order among them), split evenly: each gets their mean. The gold oracle is the same with s = g (the
expected best gold reward of an N-subset), the random pick is mean(g) at every N. N = 1 gives mean(g) for any
proxy. Averages are over the prompts with at least N candidates (``num_prompts`` per N).

KL(best-of-N || base) = log N - (N-1)/N, the analytic value used by Stiennon et al. 2020 and Gao et al. 2023 to plot
gold reward against optimisation without RL (Beirami et al. 2024 show it is an upper bound; it assumes distinct
candidates). Kendall's tau-b of proxy against gold per prompt (scipy; undefined when either side is constant),
averaged over the prompts where it is defined.

Across checkpoints: Kendall's tau of pairwise accuracy against the gold best-of-N reward at the summary N, only
over 3 or more checkpoints (fewer give no meaningful rank correlation); "paradox" is true when the best outcome
beats the most accurate checkpoint(s) by more than 2 standard errors of the paired difference over prompts (Chen et
al. 2024, "The Accuracy Paradox in RLHF")."""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy import stats as sps

from fastrm.evaluation import margin_statistics, save_figure

MIN_CHECKPOINTS_FOR_RANK_CORRELATION = 3


# ------------------------------------------------------------------------------------------------ best-of-N


@functools.lru_cache(maxsize=4096)
def _rank_weights(n_cand: int, n: int) -> np.ndarray:
    """P(r) = C(n_cand-1-r, n-1) / C(n_cand, n) for ranks r = 0..n_cand-1 (exact integers, one rounding each)."""
    total = math.comb(n_cand, n)
    w = np.array([math.comb(n_cand - 1 - r, n - 1) / total for r in range(n_cand)], dtype=np.float64)
    w.flags.writeable = False
    return w


def pick_probabilities(proxy: Sequence[float], n: int) -> np.ndarray:
    """Probability [n_cand] float64 that each candidate is the proxy's pick from a uniformly random ``n``-subset,
    ties split evenly (module docstring). Sums to 1."""
    s = np.asarray(proxy, dtype=np.float64)
    m = s.size
    if not 1 <= n <= m:
        raise ValueError(f"best-of-{n} needs 1 <= N <= {m} (the candidates of this prompt)")
    order = np.argsort(-s, kind="stable")
    w = _rank_weights(m, n)
    p = np.empty(m)
    start = 0
    while start < m:  # each run of equal scores (a tie group) shares the mean weight of its ranks
        end = start + 1
        while end < m and s[order[end]] == s[order[start]]:
            end += 1
        p[order[start:end]] = w[start:end].mean()
        start = end
    return p


def expected_gold(proxy: Sequence[float], gold: Sequence[float], n: int) -> float:
    """E[gold reward of the proxy's pick from a uniformly random ``n``-subset] of one prompt."""
    return float(pick_probabilities(proxy, n) @ np.asarray(gold, dtype=np.float64))


def kl_best_of_n(n: int) -> float:
    """log N - (N-1)/N: the analytic KL of best-of-N from the base policy (an upper bound)."""
    return math.log(n) - (n - 1) / n


def default_ns(counts: Sequence[int]) -> list[int]:
    """1, 2, 4, ... up to the largest candidate count, with the smallest and the largest count themselves added."""
    lo, hi = min(counts), max(counts)
    ns = {1 << k for k in range(hi.bit_length()) if 1 << k <= hi} | {lo, hi}
    return sorted(ns)


def summary_n(ns: Sequence[int], counts: Sequence[int]) -> int:
    """The N the one-number summaries use: the largest N that every prompt has candidates for (else the largest)."""
    full = [n for n in ns if n <= min(counts)]
    return max(full) if full else max(ns)


def bon_curve(proxy: Sequence[Sequence[float]], gold: Sequence[Sequence[float]], ns: Sequence[int]) -> dict:
    """Mean over prompts of :func:`expected_gold` at each N (prompts with fewer than N candidates left out)."""
    out: dict[str, list] = {"n": [], "num_prompts": [], "expected_gold": []}
    for n in ns:
        vals = [expected_gold(s, g, n) for s, g in zip(proxy, gold) if len(s) >= n]
        out["n"].append(int(n))
        out["num_prompts"].append(len(vals))
        out["expected_gold"].append(float(np.mean(vals)) if vals else float("nan"))
    return out


def baseline_curves(gold: Sequence[Sequence[float]], ns: Sequence[int]) -> dict:
    """The gold oracle (best-of-N by the gold RM itself) and the random pick at each N, with KL(best-of-N)."""
    oracle = bon_curve(gold, gold, ns)
    rand = [float(np.mean([np.mean(g) for g in gold if len(g) >= n])) for n in ns]
    return {
        "n": oracle["n"],
        "num_prompts": oracle["num_prompts"],
        "kl_bon": [kl_best_of_n(n) for n in ns],
        "oracle": oracle["expected_gold"],
        "random": rand,
    }


def kendall_per_prompt(proxy: Sequence[Sequence[float]], gold: Sequence[Sequence[float]]) -> dict:
    """Kendall's tau-b of proxy against gold within each prompt, averaged over the prompts where it is defined."""
    taus = []
    for s, g in zip(proxy, gold):
        t = sps.kendalltau(s, g).statistic
        if np.isfinite(t):
            taus.append(float(t))
    return {
        "mean": float(np.mean(taus)) if taus else float("nan"),
        "num_prompts": len(taus),
        "undefined": len(proxy) - len(taus),  # a constant proxy or gold within the prompt
    }


# ------------------------------------------------------------------------------------------------ report


def model_entry(
    info: dict,
    chosen: np.ndarray,
    rejected: np.ndarray,
    proxy: Sequence[Sequence[float]],
    gold: Sequence[Sequence[float]],
    ns: Sequence[int],
    n_star: int,
) -> dict:
    """One model's section: ``info`` (name, path, role, step, ...), margin statistics of its pair rewards (the
    numbers ``fastrm eval`` reports), its best-of-N curve under the gold RM, the value at the summary N with its
    standard error over prompts, and its per-prompt Kendall tau."""
    curve = bon_curve(proxy, gold, ns)
    at = per_prompt_bon(proxy, gold, n_star)
    return {
        **info,
        "pairs": margin_statistics(np.asarray(chosen, dtype=np.float64) - np.asarray(rejected, dtype=np.float64)),
        "best_of_n": curve,
        "gold_bon_at_summary_n": curve["expected_gold"][list(ns).index(n_star)],
        "gold_bon_at_summary_n_se": float(at.std(ddof=1) / np.sqrt(at.size)) if at.size > 1 else None,
        "kendall_tau": kendall_per_prompt(proxy, gold),
    }


def per_prompt_bon(proxy: Sequence[Sequence[float]], gold: Sequence[Sequence[float]], n: int) -> np.ndarray:
    """:func:`expected_gold` of every prompt with at least ``n`` candidates [P'] float64 (for paired comparisons)."""
    return np.array([expected_gold(s, g, n) for s, g in zip(proxy, gold) if len(s) >= n], dtype=np.float64)


def across_checkpoints(entries: Sequence[dict], per_prompt: Sequence[np.ndarray]) -> dict:
    """Accuracy against outcome over the checkpoints (not the gold RM): the rank correlation (3 or more only), the
    most accurate checkpoint(s), the best outcome, the gap between them with its paired standard error over
    prompts (``per_prompt[k]``: checkpoint k's best-of-N gold reward per prompt at the summary N), and whether that
    gap is real (more than 2 standard errors: the accuracy paradox) or within noise."""
    acc = [e["pairs"]["accuracy"] for e in entries]
    bon = [e["gold_bon_at_summary_n"] for e in entries]
    out: dict[str, Any] = {"num_checkpoints": len(entries), "kendall_tau": None, "p_value": None}
    if len(entries) < MIN_CHECKPOINTS_FOR_RANK_CORRELATION:
        out["reason"] = (
            f"not computed: a rank correlation over {len(entries)} checkpoint(s) means nothing "
            f"(needs at least {MIN_CHECKPOINTS_FOR_RANK_CORRELATION})"
        )
    else:
        r = sps.kendalltau(acc, bon)
        if np.isfinite(r.statistic):
            out["kendall_tau"], out["p_value"] = float(r.statistic), float(r.pvalue)
        else:
            out["reason"] = "not defined: accuracy or outcome is the same for every checkpoint"
    if not entries:
        return out
    top_acc = max(acc)
    most = [i for i, a in enumerate(acc) if a == top_acc]
    best = int(np.argmax(bon))
    ref = max(most, key=lambda i: bon[i])  # the most accurate checkpoint with the best outcome
    d = np.asarray(per_prompt[best]) - np.asarray(per_prompt[ref])
    se = float(d.std(ddof=1) / np.sqrt(d.size)) if d.size > 1 else None
    gap = float(bon[best] - bon[ref])
    out.update(
        most_accurate=[entries[i]["name"] for i in most],
        best_outcome=entries[best]["name"],
        outcome_gap=gap,  # >= 0: how much better the best outcome is than the most accurate checkpoint's
        outcome_gap_se=se,
        paradox=bool(gap > 0 and (se is None or gap > 2 * se)),
    )
    return out


# ------------------------------------------------------------------------------------------------ table


def _f(v: Any, width: int, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return f"{'-':>{width}}"
    return f"{v:>{width}.{digits}f}"


def format_table(report: dict) -> str:
    """The table ``fastrm paradox`` prints at the end: one row per checkpoint, the gold ceiling, the random pick."""
    n_star = report["summary_n"]
    rows = [*report["models"], report["gold"]]
    width = max(12, *(len(m["name"]) + 8 for m in rows))
    head = (
        f"{'model':<{width}}{'step':>6}{'pairs':>7}{'acc':>7}{'BT loss':>9}{'margin':>8}{'std':>7}{'<0':>7}"
        f"{'BoN@' + str(n_star):>9}{'SE':>7}{'tau':>7}"
    )
    lines = [f"accuracy against outcome (gold RM: {report['gold']['path']}; best-of-N by the gold reward)", head]
    for m in rows:
        p = m["pairs"]
        name = m["name"] + (" *" if m["role"] == "gold" else " (final)" if m.get("is_final") else "")
        step = "-" if m.get("step") is None else str(m["step"])
        lines.append(
            f"{name:<{width}}{step:>6}{p['num_pairs']:>7}{_f(p['accuracy'], 7)}{_f(p['bt_loss'], 9)}"
            f"{_f(p['margin_mean'], 8)}{_f(p['margin_std'], 7)}{_f(p['frac_margin_below_zero'], 7)}"
            f"{_f(m['gold_bon_at_summary_n'], 9)}{_f(m['gold_bon_at_summary_n_se'], 7)}"
            f"{_f(m['kendall_tau']['mean'], 7)}"
        )
    base = report["baselines"]
    k = base["n"].index(n_star)
    lines.append(f"{'random pick':<{width}}{'':>51}{_f(base['random'][k], 9)}")  # under the BoN column
    lines.append(
        f"(* the gold RM against itself: the ceiling. BoN@{n_star}: expected gold reward of the pick from a random "
        f"{n_star}-subset, exact, over {base['num_prompts'][k]} prompts, SE its standard error over them; tau: "
        "Kendall tau-b proxy vs gold per prompt)"
    )
    x = report["across_checkpoints"]
    if x["kendall_tau"] is not None:
        corr = f"Kendall tau(accuracy, BoN@{n_star}) over {x['num_checkpoints']} checkpoints = {x['kendall_tau']:.3f}"
        corr += f" (p = {x['p_value']:.3g})"
    else:
        corr = f"rank correlation {x['reason']}"
    lines.append(corr)
    if x.get("most_accurate"):
        line = f"most accurate: {', '.join(x['most_accurate'])}; best outcome: {x['best_outcome']}"
        if x["outcome_gap"] > 0:
            se = "" if x["outcome_gap_se"] is None else f" +- {x['outcome_gap_se']:.4f} (paired SE over prompts)"
            verdict = "the accuracy paradox" if x["paradox"] else "within noise (under 2 SE)"
            line += f", gold BoN@{n_star} higher by {x['outcome_gap']:.4f}{se}: {verdict}"
        lines.append(line)
    lines.extend(f"warning: {w}" for w in report["warnings"])
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(m: dict) -> str:
    return m["name"] if m.get("step") is None else f"step {m['step']}"


def plot_accuracy_vs_outcome(report: dict, path: str | Path) -> Path:
    """Pairwise accuracy (x) against the gold best-of-N reward at the summary N (y): one labelled point per
    checkpoint, joined in training order; the gold RM as a star; the random pick as a dashed line when it is near
    the points (else named in the legend, so the points keep the height of the plot)."""
    plt = _pyplot()
    n_star, models, gold = report["summary_n"], report["models"], report["gold"]
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    xs = [m["pairs"]["accuracy"] for m in models]
    ys = [m["gold_bon_at_summary_n"] for m in models]
    ax.plot(xs, ys, color="0.7", lw=0.8, zorder=1)
    se = [m["gold_bon_at_summary_n_se"] or 0.0 for m in models]
    ax.errorbar(xs, ys, yerr=se, fmt="none", ecolor="0.6", elinewidth=0.8, capsize=2, zorder=1)
    ax.scatter(xs, ys, c=np.arange(len(models)), cmap="viridis", zorder=2, label="checkpoints (bars: 1 SE)")
    for k, (m, x, y) in enumerate(zip(models, xs, ys)):  # labels alternate above and below: close points stay legible
        ax.annotate(_label(m), (x, y), textcoords="offset points", xytext=(4, 5 if k % 2 == 0 else -11), fontsize=7)
    gx, gy = gold["pairs"]["accuracy"], gold["gold_bon_at_summary_n"]
    ax.scatter([gx], [gy], marker="*", s=160, color="k", zorder=3, label="gold RM (ceiling)")
    base = report["baselines"]
    rand = base["random"][base["n"].index(n_star)]
    finite = [v for v in [*(y - e for y, e in zip(ys, se)), gy] if np.isfinite(v)]
    span = (max(finite) - min(finite)) if finite else 0.0
    if finite and rand >= min(finite) - max(span, 1e-9):
        ax.axhline(rand, color="k", lw=0.8, ls="--", label=f"random pick ({rand:.3f})")
    else:
        ax.plot([], [], color="k", lw=0.8, ls="--", label=f"random pick: {rand:.3f} (below the plot)")
    ax.set_xlabel("pairwise accuracy (pairs file)")
    ax.set_ylabel(f"gold reward of best-of-{n_star} (exact expectation)")
    ax.set_title(f"Accuracy against outcome along training (gold: {Path(str(gold['path'])).name})", fontsize=9)
    ax.legend(fontsize=7, loc="best")
    return save_figure(fig, plt, path)


def plot_bon_curves(report: dict, path: str | Path, x_axis: str = "n") -> Path:
    """Gold reward of best-of-N against N (log2) or against KL(best-of-N) = log N - (N-1)/N: one line per checkpoint
    (colour by training order), the gold oracle and the random pick (the shape of the margin paper's Fig. 3)."""
    plt = _pyplot()
    base, models = report["baselines"], report["models"]
    x = base["kl_bon"] if x_axis == "kl" else base["n"]
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    cmap = plt.get_cmap("viridis")
    for i, m in enumerate(models):
        colour = cmap(i / max(1, len(models) - 1))
        ax.plot(x, m["best_of_n"]["expected_gold"], marker="o", ms=3, color=colour, label=_label(m))
    ax.plot(x, base["oracle"], color="k", lw=1.2, ls="-.", label="gold RM (oracle)")
    ax.plot(x, base["random"], color="k", lw=0.8, ls="--", label="random pick")
    if x_axis == "kl":
        ax.set_xlabel("KL(best-of-N || base) = log N - (N-1)/N  (nats, upper bound)")
    else:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("N (candidates per pick)")
    ax.set_ylabel("gold reward of the pick (exact expectation)")
    ax.set_title("Best-of-N under the gold RM, every checkpoint", fontsize=9)
    ax.legend(fontsize=7, ncols=2 if len(models) > 8 else 1)
    return save_figure(fig, plt, path)
