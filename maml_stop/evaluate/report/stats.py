"""The statistics of a report: per-episode figures summarised per K, method and family.

Intervals are 95% Student t-intervals over episodes (mean +- t * sd / sqrt(n)). Episodes of one family
redraw support and query sets from the same pool of traces, so the interval shows how much the figure
moves from one K-shot draw to the next; it is not a confidence interval for the family's population.
The mean row averages the family means; its half-width combines the families' half-widths
(sqrt(sum h_f^2) / n_families, families being independent). Differences between two methods are paired
over the same episodes (:func:`paired`). Rates of rare events get a one-sided Clopper-Pearson bound
(:func:`clopper_pearson_upper`).
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import numpy as np
from scipy import stats as scipy_stats

__all__ = [
    "HEADLINE",
    "ORACLES",
    "t_quantile_975",
    "mean_ci",
    "fmt_ci",
    "combine",
    "cell",
    "summarise",
    "paired",
    "clopper_pearson_upper",
]

# the headline figure: % of tokens saved (total, probes included) with the threshold chosen on support
HEADLINE = "savings"
ORACLES = ("oracle", "oracle_equal_em")


@functools.lru_cache(maxsize=None)
def t_quantile_975(df: int) -> float:
    """97.5% quantile of Student's t with ``df`` degrees of freedom (``scipy.stats.t``)."""
    if df <= 0:
        return float("nan")
    return float(scipy_stats.t.ppf(0.975, df))


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """Mean and 95% half-width over episodes (NaN values dropped; half-width 0 for one value)."""
    x = np.asarray([v for v in values if v is not None], dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return float("nan"), float("nan")
    if x.size == 1:
        return float(x[0]), 0.0
    return float(x.mean()), float(t_quantile_975(x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))


def fmt_ci(mean: float, half: float, scale: float = 100.0, digits: int = 1) -> str:
    """``"31.2 ± 2.3"`` (values scaled by ``scale``: 100 turns fractions into % or points)."""
    if not math.isfinite(mean):
        return "n/a"
    m = round(mean * scale, digits) + 0.0  # + 0.0 turns -0.0 into 0.0
    return f"{m:.{digits}f} ± {half * scale:.{digits}f}"


def combine(stats: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """Mean of independent families' means and the combined half-width sqrt(sum h_f^2) / n (non-finite
    means dropped)."""
    stats = [s for s in stats if math.isfinite(s[0])]
    if not stats:
        return float("nan"), float("nan")
    means, halves = zip(*stats)
    return float(np.mean(means)), float(math.sqrt(sum(h * h for h in halves)) / len(halves))


def cell(results: dict, family: str, k: int, method: str) -> dict | None:
    """One (family, K, method) entry of ``results["results"]``, or None when it was not evaluated."""
    return results["results"].get(family, {}).get(str(k), {}).get(method)


def summarise(results: dict, threshold: str | None = None) -> dict[str, dict[str, dict[str, dict[str, list]]]]:
    """Per K, method and family (plus ``"mean"``): (mean, half-width) of every reported figure.

    Figures: ``savings``, ``savings_reasoning``, ``em``, ``em_drop``, ``within_delta`` (fraction of
    episodes whose query EM drop is <= delta) with the support-chosen threshold ``threshold`` (default:
    the first threshold method); ``curve_savings`` (best threshold in hindsight), ``auc``, ``brier``,
    ``ece``; ``oracle_fraction`` (mean savings / mean oracle savings, no interval) and, when the oracle at
    equal EM was evaluated, ``equal_em_fraction`` (the same against it).
    """
    threshold = threshold or results["threshold_methods"][0]
    out: dict = {}
    for k in results["k"]:
        out[str(k)] = {}
        oracle_means: dict[str, dict[str, float]] = {name: {} for name in ORACLES}
        for name in ORACLES:
            for family in results["families"]:
                entry = cell(results, family, k, name)
                if entry is not None:
                    oracle_means[name][family] = mean_ci(entry["thresholds"][threshold]["savings"])[0]
        for method in results["methods"]:
            rows: dict[str, dict[str, tuple[float, float]]] = {}
            for family in results["families"]:
                entry = cell(results, family, k, method)
                if entry is None:
                    continue
                chosen = entry["thresholds"][threshold]
                stats = {name: mean_ci(chosen[name]) for name in ("savings", "savings_reasoning", "em", "em_drop")}
                delta = results["delta"]
                stats["within_delta"] = mean_ci([float(d <= delta + 1e-9) for d in chosen["em_drop"]])
                for name in ("curve_savings", "auc", "brier", "ece"):
                    stats[name] = mean_ci(entry.get(name, []))
                for name, key in (("oracle", "oracle_fraction"), ("oracle_equal_em", "equal_em_fraction")):
                    if name == "oracle" or oracle_means[name]:
                        oracle = oracle_means[name].get(family, float("nan"))
                        frac = stats["savings"][0] / oracle if oracle and oracle > 0 else float("nan")
                        stats[key] = (frac, float("nan"))
                rows[family] = stats
            if rows:
                names = next(iter(rows.values())).keys()
                rows["mean"] = {n: combine([r[n] for r in rows.values()]) for n in names}
                for key in ("oracle_fraction", "equal_em_fraction"):
                    if key not in rows["mean"]:
                        continue
                    fracs = [r[key][0] for f, r in rows.items() if f != "mean"]
                    fracs = [x for x in fracs if math.isfinite(x)]
                    rows["mean"][key] = (float(np.mean(fracs)) if fracs else float("nan"), float("nan"))
            out[str(k)][method] = rows
    return out


def paired(results: dict, family: str, k: int, a: str, b: str, figure: str, threshold: str) -> tuple[float, float] | None:
    """Mean and half-width of the per-episode difference a - b (same episodes for every method)."""
    ca, cb = cell(results, family, k, a), cell(results, family, k, b)
    if ca is None or cb is None:
        return None
    xa = np.asarray(ca["thresholds"][threshold][figure], dtype=np.float64)
    xb = np.asarray(cb["thresholds"][threshold][figure], dtype=np.float64)
    if xa.shape != xb.shape or xa.size == 0:
        return None
    return mean_ci(xa - xb)


def clopper_pearson_upper(violations: int, n: int, level: float = 0.95) -> float:
    """One-sided ``level`` Clopper-Pearson upper bound on a binomial rate from ``violations`` of ``n``
    (1.0 when every trial violates; NaN for ``n = 0``).

    >>> round(clopper_pearson_upper(0, 50), 4), clopper_pearson_upper(3, 3)
    (0.0582, 1.0)
    """
    if n <= 0:
        return float("nan")
    if violations >= n:
        return 1.0
    return float(scipy_stats.beta.ppf(level, violations + 1, n - violations))
