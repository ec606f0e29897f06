"""The cascade report's figure (issue 28 item 4): EM against weighted cost, every policy and both single models.

One panel per held-out family and one of their mean, at one K. A thresholded policy is drawn as its query
curve (mean over episodes of each candidate parameter, a line) and the point its support-chosen parameter
gives (selector ``selector``, a large dot): the curve is hindsight, the dot is what the policy does. The
references (``small``, ``large``, ``oracle_router``) are single points. Cost is the share of the large model's
weighted cost on the same questions (:class:`~maml_stop.data.pairs.CostModel`).

>>> plot_cascade(json.loads(Path("runs/cascade/results.json").read_text()), "runs/cascade/em_cost_k16.png", 16)  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from maml_stop.evaluate.report.plots import method_colors, pyplot, save_figure

__all__ = ["MEAN", "cascade_points", "plot_cascade"]

MEAN = "mean over families"
REFERENCE_MARKERS = {"small": "v", "large": "s", "oracle_router": "*"}


def _mean_point(figs: Mapping[str, list]) -> tuple[float, float]:
    return float(np.mean(figs["cost_share"])), float(np.mean(figs["em"]))


def cascade_points(cell: Mapping[str, Any], selector: str) -> dict[str, Any]:
    """One method's figure: ``point`` (cost share, EM) of the reference or of the selector's choice, and
    ``curve`` (the candidates' points, in candidate order; empty for a reference)."""
    if "episodes" in cell:
        return {"point": _mean_point(cell["episodes"]), "curve": []}
    chosen = (cell.get("selectors") or {}).get(selector)
    curve = cell.get("curve") or {"candidates": []}
    return {"point": None if chosen is None else _mean_point(chosen),
            "curve": [_mean_point(curve[str(c)]) for c in curve["candidates"]]}


def _family_means(results: Mapping[str, Any], k: int, selector: str) -> dict[str, dict[str, Any]]:
    """Per method, the mean over families of its points (only methods every family has)."""
    per_family = {f: {m: cascade_points(c, selector) for m, c in results["families"][f][str(k)].items()}
                  for f in results["families"]}
    methods = set.intersection(*(set(v) for v in per_family.values()))
    out = {}
    for m in sorted(methods):
        figs = [per_family[f][m] for f in per_family]
        point = None if any(p["point"] is None for p in figs) else tuple(np.mean([p["point"] for p in figs], axis=0))
        lengths = {len(p["curve"]) for p in figs}
        curve = [tuple(x) for x in np.mean([p["curve"] for p in figs], axis=0)] if len(lengths) == 1 and 0 not in lengths else []
        out[m] = {"point": point, "curve": curve}
    return out


def plot_cascade(results: Mapping[str, Any], path: str | Path, k: int, selector: str | None = None) -> Path:
    """Write the EM-against-cost figure of K = ``k`` (``selector``: default, the first threshold method)."""
    plt = pyplot()
    selector = selector or results["settings"]["threshold_methods"][0]
    families = sorted(results["families"])
    panels = {f: {m: cascade_points(c, selector) for m, c in results["families"][f][str(k)].items()} for f in families}
    panels[MEAN] = _family_means(results, k, selector)
    methods = list(results["families"][families[0]][str(k)])
    colors = method_colors(methods)
    target = results["settings"]["cascade"]["target_cost"]
    cols = min(4, len(panels))  # four panels a row: seven families stay readable
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.8 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (title, points) in zip(axes.flat, panels.items()):
        for m, fig_m in points.items():
            if fig_m["curve"]:
                xs, ys = zip(*fig_m["curve"])
                ax.plot(xs, ys, "-", color=colors[m], alpha=0.45, linewidth=1)
            if fig_m["point"] is not None:
                ax.plot(*fig_m["point"], REFERENCE_MARKERS.get(m, "o"), color=colors[m], label=m,
                        markersize=9 if m in REFERENCE_MARKERS else 5)
        ax.axvline(target, color="grey", linestyle=":", linewidth=1)
        ax.set_title(f"{title} (K={k})")
        ax.set_xlabel("weighted cost / the large model's")
        ax.set_ylabel("EM")
        ax.grid(alpha=0.3)
    axes.flat[len(panels) - 1].legend(fontsize=6, loc="best")
    return save_figure(fig, path)
