"""Evaluation: accuracy and the reward-margin distribution (the statistics of Qin et al. 2024, Figure 1)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from scipy import stats as sps

from fastrm.packing import pack_pairs


@torch.no_grad()
def compute_pair_rewards(
    model,
    pairs: Sequence,
    *,
    max_tokens_per_batch: int = 16384,
    layout: str = "separate",
    autocast: bool = False,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Rewards of every pair's chosen and rejected response, in input order: two float64 arrays [N]."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    chosen = np.empty(len(pairs))
    rejected = np.empty(len(pairs))
    # Pack in slices so the sort inside a slice keeps memory bounded and results map back to input order.
    slice_size = 4096
    bar = tqdm(total=len(pairs), desc="eval", unit="pair", disable=not progress)
    for start in range(0, len(pairs), slice_size):
        part = list(range(start, min(start + slice_size, len(pairs))))
        order = _budget_order(pairs, part, max_tokens_per_batch, layout)
        for idx in order:
            batch = pack_pairs([pairs[i] for i in idx], layout).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                r = model(batch).double().cpu().numpy()
            B = len(idx)
            chosen[idx] = r[:B]
            rejected[idx] = r[B:]
            bar.update(B)
    bar.close()
    model.train(was_training)
    return chosen, rejected


def _budget_order(pairs, part: list[int], max_tokens: int, layout: str) -> list[list[int]]:
    from fastrm.packing import pair_cost, plan_micro_batches

    costs = [pair_cost(pairs[i], layout) for i in part]
    return [[part[j] for j in b] for b in plan_micro_batches(costs, max_tokens, [pairs[i].source for i in part])]


def json_safe(obj):
    """Non-finite floats -> None, so files written with json are strict JSON (NaN is not)."""
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def margin_statistics(margins: np.ndarray) -> dict:
    """Accuracy and the shape of the margin distribution d = r_c - r_r.

    accuracy counts d > 0 (a tie is wrong); bt_loss is the Bradley-Terry log-loss -log sigmoid(d), comparable
    across training losses (the threshold loss's own value grows as margins spread); skewness and (excess) kurtosis
    are scipy's bias-corrected estimates.
    """
    d = np.asarray(margins, dtype=np.float64)
    n = d.size
    out = {
        "num_pairs": int(n),
        "accuracy": float((d > 0).mean()) if n else float("nan"),
        "bt_loss": float(np.logaddexp(0.0, -d).mean()) if n else float("nan"),  # -log sigmoid(d): the fit
        "margin_mean": float(d.mean()) if n else float("nan"),
        "margin_std": float(d.std(ddof=1)) if n > 1 else float("nan"),
        "margin_skewness": float(sps.skew(d, bias=False)) if n > 2 and d.std() > 0 else float("nan"),
        "margin_kurtosis": float(sps.kurtosis(d, bias=False)) if n > 3 and d.std() > 0 else float("nan"),
        "frac_margin_below_zero": float((d < 0).mean()) if n else float("nan"),
    }
    return out


def margin_bins(values: np.ndarray, n: int = 60) -> np.ndarray:
    """Histogram bin edges [n + 1] over the full range of ``values``, zero included: no margin falls outside (the
    negative ones are the errors accuracy counts, and a percentile range would hide exactly those)."""
    v = np.asarray(values, dtype=np.float64)
    lo, hi = (min(float(v.min()), 0.0), max(float(v.max()), 0.0)) if v.size else (0.0, 0.0)
    if hi - lo < 1e-12:  # one value (or none): a unit-wide window around it
        lo, hi = lo - 0.5, hi + 0.5
    return np.linspace(lo, hi, n + 1)


def draw_margin_histogram(ax, margins: dict[str, np.ndarray]) -> None:
    """Overlaid density histograms of r_c - r_r on ``ax`` (one per name) over the full range, the zero line, and
    a tick under the axis for every margin <= 0 (each error stays visible however few there are)."""
    allv = np.concatenate([np.asarray(v, dtype=np.float64) for v in margins.values()]) if margins else np.zeros(0)
    bins = margin_bins(allv)
    for name, d in margins.items():
        d = np.asarray(d, dtype=np.float64)
        errors = int((d <= 0).sum())
        label = f"{name} (mean {np.mean(d):.2f}, acc {np.mean(d > 0):.3f}, {errors} with r_c <= r_r)"
        _, _, patches = ax.hist(d, bins=bins, alpha=0.45, density=True, label=label)
        if errors:
            color = patches[0].get_facecolor() if len(patches) else None
            ax.plot(d[d <= 0], np.zeros(errors), "|", color=color, ms=12, mew=1.0, clip_on=False)
    ax.axvline(0.0, color="k", lw=0.8)
    ax.set_xlim(bins[0], bins[-1])
    ax.set_xlabel("reward margin r(x, y_c) - r(x, y_r)  (full range; ticks: margins <= 0)")
    ax.set_ylabel("density")


def save_figure(fig, plt, path: str | Path) -> Path:
    """Lay out ``fig``, write it to ``path`` (its folder made), close it; the one way fastrm's PNGs are written."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_margin_histogram(margins: dict[str, np.ndarray], path: str | Path, title: str = "Reward margin") -> Path:
    """Overlaid histograms of r_c - r_r, one per name (the paper's Figure 1, right; :func:`draw_margin_histogram`);
    writes a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    draw_margin_histogram(ax, margins)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return save_figure(fig, plt, path)


def evaluate_pairs(
    model,
    pairs: Sequence,
    *,
    max_tokens_per_batch: int = 16384,
    layout: str = "separate",
    autocast: bool = False,
    out_dir: str | Path | None = None,
    name: str = "eval",
    progress: bool = False,
) -> dict:
    """Rewards, accuracy and margin statistics of ``pairs``; with ``out_dir`` also writes ``{name}_metrics.json``,
    ``{name}_margins.npy`` and ``{name}_margin_hist.png``."""
    rc, rr = compute_pair_rewards(
        model, pairs, max_tokens_per_batch=max_tokens_per_batch, layout=layout, autocast=autocast, progress=progress
    )
    return margin_report(rc - rr, out_dir=out_dir, name=name)


def margin_report(d: np.ndarray, *, out_dir: str | Path | None = None, name: str = "eval") -> dict:
    """:func:`margin_statistics` of the margins ``d`` [N] float64; with ``out_dir`` also writes
    ``{name}_metrics.json``, ``{name}_margins.npy`` and ``{name}_margin_hist.png``."""
    metrics = margin_statistics(d)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}_metrics.json").write_text(json.dumps(json_safe(metrics), indent=2, allow_nan=False))
        np.save(out / f"{name}_margins.npy", d)
        plot_margin_histogram({name: d}, out / f"{name}_margin_hist.png")
    return metrics


def win_rate_curve(
    scores: Sequence[Sequence[float]],
    gold: Sequence[Sequence[float]],
    ns: Sequence[int],
    *,
    trials: int = 64,
    seed: int = 0,
) -> dict:
    """Best-of-N win rate against a random choice, judged by a gold reward model.

    For each prompt and N, draw ``trials`` random subsets of N candidates; the model picks its highest-scored one,
    the baseline a uniformly random one of the same subset; the pick wins if its gold score is higher (ties count
    half). N larger than a prompt's candidate count is skipped for that prompt.
    """
    rng = np.random.default_rng(seed)
    out = {"n": [], "win_rate": [], "num_prompts": [], "mean_gold_best": [], "mean_gold_random": []}
    for n in ns:
        wins, used, gb, gr = 0.0, 0, 0.0, 0.0
        count = 0
        for s, g in zip(scores, gold):
            if len(s) < n:
                continue
            used += 1
            s, g = np.asarray(s), np.asarray(g)
            for _ in range(trials):
                sub = rng.choice(len(s), size=n, replace=False)
                best = sub[np.argmax(s[sub])]
                rand = sub[rng.integers(n)]
                wins += 1.0 if g[best] > g[rand] else (0.5 if g[best] == g[rand] else 0.0)
                gb += g[best]
                gr += g[rand]
                count += 1
        if count:
            out["n"].append(int(n))
            out["win_rate"].append(wins / count)
            out["num_prompts"].append(used)
            out["mean_gold_best"].append(gb / count)
            out["mean_gold_random"].append(gr / count)
    return out


def plot_win_rate(curves: dict[str, dict], path: str | Path) -> Path:
    """Win rate against N (log2 axis), one line per reward model; writes a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for name, c in curves.items():
        ax.plot(c["n"], c["win_rate"], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.axhline(0.5, color="k", lw=0.8, ls="--")
    ax.set_xlabel("N (candidates)")
    ax.set_ylabel("win rate vs random choice (gold RM)")
    ax.legend(fontsize=8)
    return save_figure(fig, plt, path)
