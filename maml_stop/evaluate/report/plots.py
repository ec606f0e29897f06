"""The plots: of an evaluation (EM-vs-tokens curves, savings against K, calibration), of a corpus
(:func:`plot_probe_accuracy`: how often the forced answer is already correct, by tokens so far) and of
meta-training (:func:`plot_training_curves`, from a Lightning ``CSVLogger`` file). matplotlib with the
Agg backend (:func:`pyplot`): no display needed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from maml_stop.evaluate.report.stats import cell, summarise

__all__ = [
    "pyplot",
    "save_figure",
    "POINT_MARKERS",
    "method_colors",
    "plot_curves",
    "plot_savings_vs_k",
    "plot_calibration",
    "probe_accuracy_by_position",
    "plot_probe_accuracy",
    "plot_training_curves",
]


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (files only, no display), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> Path:
    """Lay out, write (PNG at 110 dpi) and close a figure; returns its path."""
    plt = pyplot()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _grid(n: int) -> tuple[int, int]:
    cols = min(3, n)
    return int(math.ceil(n / cols)), cols


POINT_MARKERS = {"full": "s", "first_probe": "^", "oracle": "*", "oracle_equal_em": "D"}


def method_colors(methods: Sequence[str]) -> dict[str, Any]:
    """One distinct colour per method (tab20, the dark shades first: more than the 10 of the default cycle),
    the same in every plot of a report."""
    import matplotlib

    cmap = matplotlib.colormaps["tab20"]
    order = [*range(0, 20, 2), *range(1, 20, 2)]
    return {m: cmap(order[i % 20]) for i, m in enumerate(methods)}


def plot_curves(results: dict, path: str | Path, k: int | None = None) -> Path:
    """EM-vs-tokens curves (pooled over episodes) per held-out family, every method, at one K."""
    plt = pyplot()
    k = k if k is not None else results["k"][-1]
    families = results["families"]
    rows, cols = _grid(len(families))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    colors = method_colors(results["methods"])
    for ax, family in zip(axes.flat, families):
        for method in results["methods"]:
            entry = cell(results, family, k, method)
            if entry is None:
                continue
            curve = entry["curve"]
            cost = 1.0 - np.asarray(curve["savings"], dtype=float)
            em = np.asarray(curve["em"], dtype=float)
            style = POINT_MARKERS.get(method, "o") if len(cost) == 1 else ".-"
            ax.plot(cost, em, style, label=method, color=colors[method], markersize=6 if len(cost) == 1 else 3)
        ax.set_title(f"{family} (K={k})")
        ax.set_xlabel("tokens / full generation")
        ax.set_ylabel("EM")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(families):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    return save_figure(fig, path)


def plot_savings_vs_k(results: dict, path: str | Path) -> Path:
    """Headline savings (support-chosen threshold) against K, mean over families with 95% intervals."""
    plt = pyplot()
    summary = summarise(results)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ks = results["k"]
    colors = method_colors(results["methods"])
    for method in results["methods"]:
        pts = [summary[str(k)].get(method, {}).get("mean") for k in ks]
        if any(p is None for p in pts):
            continue
        ax.errorbar(ks, [100 * p["savings"][0] for p in pts], yerr=[100 * p["savings"][1] for p in pts],
                    marker=POINT_MARKERS.get(method, "o"), capsize=3, label=method, color=colors[method])
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("K (support questions)")
    ax.set_ylabel("% tokens saved (threshold chosen on support)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def plot_calibration(results: dict, path: str | Path) -> Path:
    """Reliability diagram of every probe method (query probe points pooled over families, largest K)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4.2))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect")
    cal = results.get("calibration", {})
    for method, bins in cal.items():
        count = np.asarray(bins["count"], dtype=float)
        conf = np.asarray(bins["confidence"], dtype=float)
        freq = np.asarray(bins["frequency"], dtype=float)
        keep = count > 0
        ax.plot(conf[keep], freq[keep], "o-", ms=3, label=method)
    ax.set_xlabel("predicted P(stop keeps the answer)")
    ax.set_ylabel("observed frequency")
    ax.set_title(f"calibration (K={results['k'][-1]})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


# ---------------------------------------------------------------------------------------------------
# corpus and meta-training plots (used by the datasheet and the notebooks)


def probe_accuracy_by_position(traces: Sequence[Any], bin_width: int = 32) -> dict[str, np.ndarray]:
    """Fraction of probe points whose forced answer is already correct, by reasoning tokens so far.

    Probe points are binned by ``positions // bin_width``; empty bins are left out. Returns ``left``
    (B,) left edge of each bin in tokens, ``fraction`` (B,) correct probe answers, ``count`` (B,) probe
    points in the bin.

    >>> from types import SimpleNamespace as T
    >>> out = probe_accuracy_by_position([T(positions=np.array([10, 40, 70]), labels=np.array([0., 1., 1.])),
    ...                                   T(positions=np.array([20]), labels=np.array([1.]))], bin_width=32)
    >>> out["left"].tolist(), out["fraction"].tolist(), out["count"].tolist()
    ([0, 32, 64], [0.5, 1.0, 1.0], [2, 1, 1])
    """
    if bin_width < 1:
        raise ValueError(f"bin_width must be >= 1 token; got {bin_width}")
    pos = np.concatenate([np.asarray(t.positions, dtype=np.int64) for t in traces] or [np.zeros(0, np.int64)])
    lab = np.concatenate([np.asarray(t.labels, dtype=np.float64) for t in traces] or [np.zeros(0)])
    bins = pos // bin_width  # (N,)
    keys, inverse = np.unique(bins, return_inverse=True)  # (B,), (N,)
    count = np.bincount(inverse, minlength=keys.size)
    correct = np.bincount(inverse, weights=lab, minlength=keys.size)
    return {"left": keys * bin_width, "fraction": correct / np.maximum(count, 1), "count": count}


def plot_probe_accuracy(
    traces_by_family: Mapping[str, Sequence[Any]], path: str | Path, bin_width: int = 32, min_count: int = 5
) -> Path:
    """Per family: fraction of probe answers already correct vs. reasoning tokens so far (bins with at
    least ``min_count`` probe points), with the family's final-answer EM as a dashed line."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for family, traces in traces_by_family.items():
        acc = probe_accuracy_by_position(traces, bin_width)
        keep = acc["count"] >= min_count
        line, = ax.plot(acc["left"][keep] + bin_width / 2, acc["fraction"][keep], "o-", ms=3,
                        label=f"{family} ({len(traces)} traces)")
        final_em = float(np.mean([t.final_em for t in traces])) if traces else float("nan")
        ax.axhline(final_em, color=line.get_color(), ls="--", lw=1)
    ax.set_xlabel(f"reasoning tokens so far (bins of {bin_width})")
    ax.set_ylabel("probe answers already correct")
    ax.set_title("forced answer correct vs. position (dashed: final-answer EM)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def plot_training_curves(
    metrics_csv: str | Path,
    path: str | Path,
    keys: Sequence[str] = ("train/loss", "val/loss", "val/loss_unadapted", "val/loss_random_init"),
) -> Path:
    """Loss curves against the optimiser step from a Lightning ``CSVLogger`` ``metrics.csv`` (keys not
    logged are skipped; raises when none of ``keys`` is in the file, listing the columns that are)."""
    import csv

    with open(metrics_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    columns = list(rows[0]) if rows else []
    present = [k for k in keys if k in columns]
    if not present:
        raise ValueError(f"none of {list(keys)} in {metrics_csv}; its columns: {columns}")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in present:
        pts = [(int(r["step"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
        if pts:
            steps, values = zip(*pts)
            ax.plot(steps, values, "-" if key.startswith("train/") else "o-", ms=3, label=key,
                    alpha=0.6 if key.startswith("train/") else 1.0)
    ax.set_xlabel("meta-training step")
    ax.set_ylabel("query loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path)
