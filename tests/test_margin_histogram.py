"""The margin histogram shows every margin: the full range (the few negative margins are the errors accuracy
counts, which percentile-clipped bins hid), the zero line, and a mark for each margin <= 0."""

import numpy as np
import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

from fastrm.evaluation import draw_margin_histogram, margin_bins, plot_margin_histogram  # noqa: E402


def margins(seed: int) -> np.ndarray:
    """A healthy model's margins: a positive bulk, a far outlier, and 0.4% errors (below the 0.5th percentile)."""
    rng = np.random.default_rng(seed)
    d = rng.normal(2.0, 0.5, size=2000)
    d[:8] = rng.uniform(-3.0, -0.5, size=8)  # the errors
    d[8] = 25.0
    return rng.permutation(d)


def drawn(ax) -> tuple[np.ndarray, list[np.ndarray]]:
    """(bin edges, heights per series) of the bars drawn on ``ax``."""
    bars = ax.patches
    lefts = np.array([b.get_x() for b in bars])
    widths = np.array([b.get_width() for b in bars])
    n = len(np.unique(np.round(lefts, 12)))
    edges = np.append(lefts[:n], lefts[n - 1] + widths[n - 1])
    heights = np.array([b.get_height() for b in bars]).reshape(-1, n)
    return edges, list(heights)


def test_every_margin_is_in_the_picture_with_the_zero_line_and_each_error_marked(tmp_path):
    series = {"bt": margins(0), "threshold": margins(1) - 0.5}
    fig, ax = plt.subplots()
    draw_margin_histogram(ax, series)
    edges, heights = drawn(ax)
    allv = np.concatenate(list(series.values()))
    assert edges[0] <= allv.min() and edges[-1] >= allv.max()
    assert np.percentile(allv, 0.5) > allv[allv < 0].max()  # the old 0.5/99.5 percentile bins cut every error
    for d, h in zip(series.values(), heights):
        counts, _ = np.histogram(d, bins=edges)
        assert counts.sum() == d.size  # nothing outside the bins
        np.testing.assert_allclose(h, counts / (d.size * np.diff(edges)))  # and the bars are those counts
    lines = [ln for ln in ax.lines if np.allclose(ln.get_xdata(), 0.0)]
    assert lines, "no zero line"
    ticks = [ln for ln in ax.lines if ln.get_marker() == "|"]
    assert sorted(np.concatenate([t.get_xdata() for t in ticks])) == sorted(allv[allv <= 0])
    assert ax.get_xlim()[0] <= allv.min() and ax.get_xlim()[1] >= allv.max()
    plt.close(fig)
    assert plot_margin_histogram(series, tmp_path / "h.png").stat().st_size > 0


def test_bins_include_zero_and_survive_a_single_value():
    assert margin_bins(np.array([1.0, 3.0]))[0] == 0.0  # all positive: the zero line is still on the axis
    assert margin_bins(np.array([-2.0, -1.0]))[-1] == 0.0
    edges = margin_bins(np.array([0.0, 0.0]))
    assert edges[0] < 0.0 < edges[-1] and len(edges) == 61
