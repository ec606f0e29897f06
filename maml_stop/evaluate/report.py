"""Tables, plots and the written analysis of a ``maml-stop evaluate`` results file.

Everything here is a pure function of the results dictionary that :mod:`maml_stop.evaluate.protocol` writes to
``results.json`` (layout in :func:`maml_stop.evaluate.protocol.evaluate_family`), so a report can be rebuilt
from the JSON alone::

    maml-stop evaluate --report-only runs/evaluate/results.json

Two plots the notebooks use sit beside them: :func:`plot_probe_accuracy` (a corpus: how often the
forced answer is already correct, by tokens so far) and :func:`plot_training_curves` (a Lightning
``CSVLogger`` file of meta-training).

Intervals are 95% t-intervals over episodes (mean +- t * sd / sqrt(n)). Episodes of one family redraw
support and query sets from the same pool of traces, so the interval shows how much the figure moves
from one K-shot draw to the next; it is not a confidence interval for the family's population.
The mean row averages the family means; its half-width combines the families' half-widths
(sqrt(sum h_f^2) / n_families, families being independent).

The risk section (:func:`risk_tables`, after the analysis) counts, per method, family and threshold rule,
the episodes whose query EM drop exceeds the rule's target, with a one-sided 95% Clopper-Pearson upper
bound (:func:`violation_rates`), and states what each rule promises.
"""

from __future__ import annotations

import functools
import logging
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import stats

from maml_stop.evaluate.thresholds import min_certifiable_k

log = logging.getLogger(__name__)

__all__ = [
    "mean_ci",
    "t_quantile_975",
    "summarise",
    "markdown_tables",
    "analysis",
    "risk_tables",
    "violation_rates",
    "clopper_pearson_upper",
    "plot_curves",
    "plot_savings_vs_k",
    "plot_calibration",
    "probe_accuracy_by_position",
    "plot_probe_accuracy",
    "plot_training_curves",
    "write_report",
    "fmt_ci",
    "HEADLINE",
]

# the headline figure: % of tokens saved (total, probes included) with the threshold chosen on support
HEADLINE = "savings"
PROBE_METHODS = ("pooled", "finetuned", "scratch", "maml")
METHOD_LABELS = {
    "full": "full generation",
    "first_probe": "stop at the first probe",
    "budget": "token budget",
    "consistency": "answer consistency",
    "confidence": "answer confidence",
    "pooled": "pooled probe",
    "finetuned": "pooled probe + fine-tune",
    "scratch": "probe from scratch",
    "maml": "MAML-adapted probe",
    "oracle": "oracle",
    "oracle_equal_em": "oracle at equal EM",
}
ORACLES = ("oracle", "oracle_equal_em")


@functools.lru_cache(maxsize=None)
def t_quantile_975(df: int) -> float:
    """97.5% quantile of Student's t with ``df`` degrees of freedom (``scipy.stats.t``)."""
    if df <= 0:
        return float("nan")
    return float(stats.t.ppf(0.975, df))


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


def _combine(stats: Sequence[tuple[float, float]]) -> tuple[float, float]:
    stats = [s for s in stats if math.isfinite(s[0])]
    if not stats:
        return float("nan"), float("nan")
    means, halves = zip(*stats)
    return float(np.mean(means)), float(math.sqrt(sum(h * h for h in halves)) / len(halves))


def _cell(results: dict, family: str, k: int, method: str) -> dict | None:
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
    for k in results["shots"]:
        out[str(k)] = {}
        oracle_means: dict[str, dict[str, float]] = {name: {} for name in ORACLES}
        for name in ORACLES:
            for family in results["families"]:
                cell = _cell(results, family, k, name)
                if cell is not None:
                    oracle_means[name][family] = mean_ci(cell["thresholds"][threshold]["savings"])[0]
        for method in results["methods"]:
            rows: dict[str, dict[str, tuple[float, float]]] = {}
            for family in results["families"]:
                cell = _cell(results, family, k, method)
                if cell is None:
                    continue
                chosen = cell["thresholds"][threshold]
                stats = {name: mean_ci(chosen[name]) for name in ("savings", "savings_reasoning", "em", "em_drop")}
                delta = results["delta"]
                stats["within_delta"] = mean_ci([float(d <= delta + 1e-9) for d in chosen["em_drop"]])
                for name in ("curve_savings", "auc", "brier", "ece"):
                    stats[name] = mean_ci(cell.get(name, []))
                for name, key in (("oracle", "oracle_fraction"), ("oracle_equal_em", "equal_em_fraction")):
                    if name == "oracle" or oracle_means[name]:
                        oracle = oracle_means[name].get(family, float("nan"))
                        frac = stats["savings"][0] / oracle if oracle and oracle > 0 else float("nan")
                        stats[key] = (frac, float("nan"))
                rows[family] = stats
            if rows:
                names = next(iter(rows.values())).keys()
                rows["mean"] = {n: _combine([r[n] for r in rows.values()]) for n in names}
                for key in ("oracle_fraction", "equal_em_fraction"):
                    if key not in rows["mean"]:
                        continue
                    fracs = [r[key][0] for f, r in rows.items() if f != "mean"]
                    fracs = [x for x in fracs if math.isfinite(x)]
                    rows["mean"][key] = (float(np.mean(fracs)) if fracs else float("nan"), float("nan"))
            out[str(k)][method] = rows
    return out


def _pct(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{round(100 * x) + 0:.0f}%"


def markdown_tables(results: dict) -> str:
    """The Markdown report tables: the headline summary over K, then one detailed table per K."""
    delta_pts = 100 * results["delta"]
    lines: list[str] = []
    for threshold in results["threshold_methods"]:
        summary = summarise(results, threshold)
        lines += [
            f"### Mean over held-out families: % of tokens saved (threshold: `{threshold}` on support), "
            f"EM drop in points in brackets",
            "",
            "| method | " + " | ".join(f"K={k}" for k in results["shots"]) + " |",
            "|---|" + "---|" * len(results["shots"]),
        ]
        for method in results["methods"]:
            cells = []
            for k in results["shots"]:
                row = summary[str(k)].get(method, {}).get("mean")
                cells.append("n/a" if row is None else f"{fmt_ci(*row['savings'])} ({fmt_ci(*row['em_drop'])})")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    threshold = results["threshold_methods"][0]
    summary = summarise(results, threshold)
    equal_em = "oracle_equal_em" in results["methods"]
    header = (
        f"| family | method | saved % (support τ) | EM drop (pts) | drop ≤ {delta_pts:g} pt | "
        "saved % (best τ in hindsight) | % of oracle | " + ("% of oracle at equal EM | " if equal_em else "")
        + "reasoning saved % | AUC |"
    )
    for k in results["shots"]:
        lines += [
            f"### K = {k}: threshold `{threshold}` chosen on the K support traces, {results['episodes']} episodes "
            f"per family, 95% intervals over episodes",
            "",
            header,
            "|---|---|---|---|---|---|---|" + ("---|" if equal_em else "") + "---|---|",
        ]
        for family in [*results["families"], "mean"]:
            for method in results["methods"]:
                s = summary[str(k)].get(method, {}).get(family)
                if s is None:
                    continue
                lines.append(
                    f"| {family} | {method} | {fmt_ci(*s['savings'])} | {fmt_ci(*s['em_drop'])} | "
                    f"{_pct(s['within_delta'][0])} | {fmt_ci(*s['curve_savings'])} | {_pct(s['oracle_fraction'][0])} | "
                    + (f"{_pct(s['equal_em_fraction'][0])} | " if equal_em else "") +
                    f"{fmt_ci(*s['savings_reasoning'])} | {fmt_ci(*s['auc'], scale=1.0, digits=3)} |"
                )
        lines.append("")
    probe = [m for m in results["methods"] if m in PROBE_METHODS]
    if probe:
        lines += [
            "### Calibration of the probes on query probe points (mean over families)",
            "",
            "| method | " + " | ".join(f"Brier K={k} | ECE K={k}" for k in results["shots"]) + " |",
            "|---|" + "---|---|" * len(results["shots"]),
        ]
        for method in probe:
            cells = []
            for k in results["shots"]:
                row = summary[str(k)].get(method, {}).get("mean")
                cells += ["n/a", "n/a"] if row is None else [
                    fmt_ci(*row["brier"], scale=1.0, digits=3), fmt_ci(*row["ece"], scale=1.0, digits=3)
                ]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _paired(results: dict, family: str, k: int, a: str, b: str, figure: str, threshold: str) -> tuple[float, float] | None:
    """Mean and half-width of the per-episode difference a - b (same episodes for every method)."""
    ca, cb = _cell(results, family, k, a), _cell(results, family, k, b)
    if ca is None or cb is None:
        return None
    xa = np.asarray(ca["thresholds"][threshold][figure], dtype=np.float64)
    xb = np.asarray(cb["thresholds"][threshold][figure], dtype=np.float64)
    if xa.shape != xb.shape or xa.size == 0:
        return None
    return mean_ci(xa - xb)


def within_target(summary_k: dict, method: str, family: str, families: list[str], delta: float) -> bool:
    """Whether ``method``'s mean EM drop stays within ``delta`` on ``family`` (``"mean"``: on every one of
    ``families``) in one K's ``summarise`` entry."""
    cells = summary_k.get(method, {})
    for f in families if family == "mean" else [family]:
        if f not in cells or cells[f]["em_drop"][0] > delta + 1e-9:
            return False
    return True


def versus_best_table(results: dict, k: int, method: str = "maml") -> str:
    """Per held-out family at one K: ``method`` against the best same-K baseline whose mean EM drop stays
    within the target (the baseline that saves most among those), with both oracles' shares.

    "misses target" when ``method``'s own mean EM drop exceeds the target; "n/a" when no baseline saves
    anything within it. In the mean row a method is within the target only when it is within it on every
    held-out family (``within_target``): a rule that gains EM on one family cannot buy a miss on another.
    """
    if method not in results["methods"]:
        return ""
    threshold = results["threshold_methods"][0]
    summary = summarise(results, threshold)[str(k)]
    delta = results["delta"]
    rivals = [m for m in results["methods"] if m not in (method, "full", *ORACLES)]
    equal_em = "oracle_equal_em" in results["methods"]
    lines = [
        f"### K = {k}: {METHOD_LABELS.get(method, method)} against the best baseline within "
        f"{100 * delta:g} point(s) of EM",
        "",
        "| held-out family | full EM | " + f"{method} saved % (EM drop) | best baseline within target: saved % | "
        f"{method} / best | {method} % of oracle | " + (f"{method} % of oracle at equal EM | " if equal_em else "")
        + "oracle saved % |",
        "|---|---|---|---|---|---|" + ("---|" if equal_em else "") + "---|",
    ]
    families = results["families"]
    missed = [f for f in families if not within_target(summary, method, f, families, delta)]
    for family in [*families, "mean"]:
        m = summary.get(method, {}).get(family)
        if m is None:
            continue
        best = None
        for r in rivals:
            rm = summary.get(r, {}).get(family)
            if rm is not None and within_target(summary, r, family, families, delta) and (
                best is None or rm["savings"][0] > best[1]
            ):
                best = (r, rm["savings"][0])
        if family == "mean" and missed:
            ratio = f"misses target ({', '.join(missed)})"
        elif family in missed:
            ratio = "misses target"
        elif best is None or best[1] <= 1e-9:
            ratio = "n/a"
        else:
            ratio = f"{m['savings'][0] / best[1]:.2f}x"
        full_em = summary.get("full", {}).get(family, {}).get("em", (float("nan"), 0.0))[0]
        oracle = summary.get("oracle", {}).get(family, {}).get("savings", (float("nan"), 0.0))[0]
        name = f"**{family}**" if family == "mean" else family
        lines.append(
            f"| {name} | {100 * full_em:.1f} | {fmt_ci(*m['savings'])} ({100 * m['em_drop'][0]:.1f}) | "
            + ("none" if best is None else f"{best[0]} {100 * best[1]:.1f}") + f" | {ratio} | "
            f"{_pct(m['oracle_fraction'][0])} | " + (f"{_pct(m['equal_em_fraction'][0])} | " if equal_em else "")
            + f"{100 * oracle:.1f} |"
        )
    lines += ["", "Mean row: a method is within the target only when it is within it on every held-out family."]
    return "\n".join(lines) + "\n"


def analysis(results: dict, method: str = "maml") -> str:
    """A short written analysis of where ``method`` wins and loses, generated from the numbers."""
    if method not in results["methods"]:
        return f"({method} was not evaluated; no analysis.)\n"
    threshold = results["threshold_methods"][0]
    summary = summarise(results, threshold)
    delta = results["delta"]
    shots = results["shots"]
    rivals = [m for m in results["methods"] if m not in (method, "full", *ORACLES)]
    lines = [f"## Where {METHOD_LABELS.get(method, method)} wins and loses", ""]
    lines.append(
        f"Headline: % of tokens saved (total, probes included) against full generation with the threshold "
        f"chosen by `{threshold}` on the K support traces; EM drop target {100 * delta:g} point(s). "
        "Comparisons are paired over the same episodes; 'wins' and 'loses' mean the 95% interval of the "
        "per-episode difference excludes 0."
    )
    lines.append("")
    for k in shots:
        m = summary[str(k)].get(method, {}).get("mean")
        if m is None:
            continue
        best = None
        for r in rivals:
            rm = summary[str(k)].get(r, {}).get("mean")
            if rm is not None and within_target(summary[str(k)], r, "mean", results["families"], delta) and (
                best is None or rm["savings"][0] > best[1]["savings"][0]
            ):
                best = (r, rm)
        text = (
            f"- K={k}: {method} saves {fmt_ci(*m['savings'])}% of tokens at an EM drop of "
            f"{fmt_ci(*m['em_drop'])} points (EM drop within target in {_pct(m['within_delta'][0])} of episodes; "
            f"{_pct(m['oracle_fraction'][0])} of the oracle's savings"
            + (f", {_pct(m['equal_em_fraction'][0])} of the equal-EM oracle's" if "equal_em_fraction" in m else "")
            + f"; {fmt_ci(*m['curve_savings'])}% with the best "
            f"threshold in hindsight)."
        )
        if best is not None:
            text += f" Best baseline within the EM target on every held-out family: {best[0]} at {fmt_ci(*best[1]['savings'])}%."
        else:
            text += " No baseline stays within the EM target on every held-out family."
        lines.append(text)
    lines.append("")
    wins, losses = [], []
    for family in results["families"]:
        for k in shots:
            for r in rivals:
                d = _paired(results, family, k, method, r, "savings", threshold)
                if d is None or not math.isfinite(d[0]):
                    continue
                drop = _paired(results, family, k, method, r, "em_drop", threshold)
                item = (family, k, r, d, drop)
                if d[0] - d[1] > 0:
                    wins.append(item)
                elif d[0] + d[1] < 0:
                    losses.append(item)

    def _fmt(items: list, limit: int = 12) -> list[str]:
        items = sorted(items, key=lambda it: -abs(it[3][0]))[:limit]
        return [
            f"  - {fam}, K={k}, vs {r}: {fmt_ci(*d)} points of savings (EM drop difference "
            f"{fmt_ci(*drop) if drop else 'n/a'} points)"
            for fam, k, r, d, drop in items
        ]

    n_cmp = len(results["families"]) * len(shots) * len(rivals)
    lines.append(f"{method} saves more tokens than a rival in {len(wins)} and fewer in {len(losses)} of {n_cmp} "
                 "(family, K, rival) comparisons.")
    if wins:
        lines += ["", "Largest wins:", *_fmt(wins)]
    if losses:
        lines += ["", "Largest losses:", *_fmt(losses)]
    lines.append("")
    # savings bought with EM: a win that costs more EM than the rival is not a clean win
    costly = [w for w in wins if w[4] is not None and w[4][0] - w[4][1] > 0]
    if costly:
        lines.append(
            f"{len(costly)} of the wins come with a significantly larger EM drop than the rival's, so they "
            "trade accuracy for tokens rather than dominate."
        )
    careful = [w for w in losses if w[4] is not None and w[4][0] + w[4][1] < 0]
    if careful:
        lines.append(
            f"{len(careful)} of the losses come with a significantly smaller EM drop than the rival's: a more "
            "conservative operating point rather than a worse one."
        )
    over = [
        (f, k) for f in results["families"] for k in shots
        if (s := summary[str(k)].get(method, {}).get(f)) is not None and s["em_drop"][0] > delta + 1e-9
    ]
    if over:
        lines.append(
            f"The support-chosen threshold misses the EM target on average in {len(over)} (family, K) cells: "
            + ", ".join(f"{f} K={k}" for f, k in over[:10]) + ("..." if len(over) > 10 else "") + "."
        )
    if len(shots) > 1:
        lo, hi = str(shots[0]), str(shots[-1])
        trend = []
        for m in [method, *[r for r in ("finetuned", "scratch", "pooled") if r in results["methods"]]]:
            a = summary[lo].get(m, {}).get("mean")
            b = summary[hi].get(m, {}).get("mean")
            if a and b:
                trend.append(f"{m} {100 * a['savings'][0]:.1f}% -> {100 * b['savings'][0]:.1f}%")
        if trend:
            lines.append(f"From K={lo} to K={hi}, mean savings move: " + "; ".join(trend) + ".")
    cal = []
    for m in [method, "pooled", "finetuned", "scratch"]:
        row = summary[str(shots[-1])].get(m, {}).get("mean")
        if row is not None and math.isfinite(row["brier"][0]):
            cal.append(f"{m} Brier {row['brier'][0]:.3f}, ECE {row['ece'][0]:.3f}")
    if cal:
        lines.append(f"Calibration at K={shots[-1]}: " + "; ".join(cal) + ".")
    if "ltt" in results["threshold_methods"]:
        ltt = summarise(results, "ltt")
        stopped = [
            ltt[str(k)].get(method, {}).get("mean", {}).get("savings", (float("nan"),))[0] for k in shots
        ]
        if all(math.isfinite(x) and abs(x) < 1e-12 for x in stopped):
            lines.append(
                "Learn-then-Test certified no early stopping at any K: with an EM-drop target of "
                f"{100 * results.get('ltt_delta', delta):g} point(s) at alpha={results.get('ltt_alpha', 'n/a')}, "
                "the binomial bound needs more support questions than K."
            )
    lines.append("")
    return "\n".join(lines)


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
    return float(stats.beta.ppf(level, violations + 1, n - violations))


def selector_target(results: dict, selector: str) -> float:
    """The EM-drop target a threshold selector answers to: ``ltt_delta`` for Learn-then-Test, ``delta``
    for the others (``fixed`` promises nothing; it is held to the headline target)."""
    if selector == "ltt":
        return float(results.get("ltt_delta", results["delta"]))
    return float(results["delta"])


def _thresholded(results: dict, k: int, method: str) -> bool:
    """Whether ``method`` chose a threshold in any episode at K (full generation, the first probe and the
    oracles have none: every selector gives them the same figures)."""
    for family in results["families"]:
        cell = _cell(results, family, k, method)
        for chosen in (cell or {}).get("thresholds", {}).values():
            if any(p is not None for p in chosen.get("param", [])):
                return True
    return False


def violation_rates(results: dict) -> dict[str, dict[str, dict[str, dict[str, dict[str, float]]]]]:
    """Per K, thresholded method, family (plus ``"all"``: every family's episodes pooled) and threshold
    selector: how often the query EM drop of an episode exceeds the selector's target
    (:func:`selector_target`).

    Each entry holds ``violations`` and ``episodes`` (episodes with a finite EM drop), ``rate`` and
    ``upper`` (one-sided 95% Clopper-Pearson bound). The em_target rate is 1 - ``within_delta`` of
    :func:`summarise`.
    """
    out: dict = {}
    for k in results["shots"]:
        out[str(k)] = {}
        for method in results["methods"]:
            if not _thresholded(results, k, method):
                continue
            rows: dict[str, dict[str, dict[str, float]]] = {}
            for family in results["families"]:
                cell = _cell(results, family, k, method)
                if cell is None:
                    continue
                rows[family] = {}
                for selector in results["threshold_methods"]:
                    drop = np.asarray(cell["thresholds"][selector]["em_drop"], dtype=np.float64)
                    drop = drop[np.isfinite(drop)]
                    x = int((drop > selector_target(results, selector) + 1e-9).sum())
                    rows[family][selector] = {"violations": x, "episodes": int(drop.size)}
            if not rows:
                continue
            rows["all"] = {
                selector: {
                    "violations": sum(r[selector]["violations"] for r in rows.values()),
                    "episodes": sum(r[selector]["episodes"] for r in rows.values()),
                }
                for selector in results["threshold_methods"]
            }
            for r in rows.values():
                for v in r.values():
                    v["rate"] = v["violations"] / v["episodes"] if v["episodes"] else float("nan")
                    v["upper"] = clopper_pearson_upper(v["violations"], v["episodes"])
            out[str(k)][method] = rows
    return out


def _rate(v: Mapping[str, float]) -> str:
    if not v["episodes"]:
        return "n/a"
    return f"{100 * v['rate']:.1f}% (≤ {100 * v['upper']:.1f}%)"


def risk_tables(results: dict) -> str:
    """How often each threshold rule misses its EM-drop target on the query set, with what the rule
    promises: a table over K (every family's episodes pooled) and one per K by held-out family."""
    rates = violation_rates(results)
    if not any(rates.values()):
        return ""
    selectors = results["threshold_methods"]
    delta = results["delta"]
    alpha = results.get("ltt_alpha")
    targets = {s: f"{100 * selector_target(results, s):g} pt" for s in selectors}
    lines = ["## Risk of the threshold rules: how often the query EM drop exceeds the target", ""]
    promise = {
        "em_target": (
            f"`em_target` (the headline rule) takes the most aggressive threshold whose EM drop on the K "
            f"support traces is within {100 * delta:g} point(s). It promises nothing for an episode's query "
            "set: when the support questions happen to be easy, it picks a threshold that drops more on the "
            "query questions, and the table below measures how often."
        ),
        "ltt": (
            f"`ltt` (Learn-then-Test) keeps a threshold only when a binomial tail bound rejects 'EM drop > "
            f"{targets.get('ltt', '')}' at alpha = {alpha if alpha is not None else 'n/a'}: with probability at least "
            "1 - alpha over the draw of the support set, the chosen threshold's expected EM drop is within its "
            "target (a heuristic for probes adapted on the same support traces). Where K is too small to "
            "certify anything"
            + (f" (K < {min_certifiable_k(selector_target(results, 'ltt'), alpha)})" if alpha is not None else "")
            + " it never stops early, which keeps the target trivially."
        ),
        "fixed": "`fixed` uses a preset threshold whatever the support says and promises nothing.",
    }
    lines += [f"- {promise[s]}" for s in selectors if s in promise]
    lines += [
        "",
        "Violation rate: the share of episodes whose query EM drop exceeds the rule's target ("
        + ", ".join(f"`{s}` {targets[s]}" for s in selectors)
        + "), with a one-sided 95% Clopper-Pearson upper bound in brackets. Episodes are treated as "
        "independent draws; they redraw support and query sets from one family's traces, so the bound is "
        "about that redrawing, not about the family's population. Only methods that choose a threshold are "
        "listed; `all` pools every held-out family's episodes.",
        "",
    ]
    shots = results["shots"]
    for k in shots:
        em_rows = [
            (m, f, r["em_target"]["rate"]) for m, fam in rates[str(k)].items() for f, r in fam.items()
            if f != "all" and "em_target" in r and r["em_target"]["episodes"]
        ]
        if not em_rows:
            continue
        worst = max(em_rows, key=lambda row: row[2])
        text = (
            f"- K={k}: `em_target` misses its {100 * delta:g}-point target on the query set in "
            f"{100 * np.mean([row[2] for row in em_rows]):.1f}% of episodes on average over (method, family) "
            f"cells, up to {100 * worst[2]:.1f}% ({worst[1]}, {worst[0]})"
        )
        ltt_rows = [
            (m, f, r["ltt"]["rate"]) for m, fam in rates[str(k)].items() for f, r in fam.items()
            if f != "all" and "ltt" in r and r["ltt"]["episodes"]
        ]
        if ltt_rows:
            worst = max(ltt_rows, key=lambda row: row[2])
            stopped = [
                x for m in rates[str(k)] for f in results["families"]
                if (c := _cell(results, f, k, m)) is not None for x in c["thresholds"]["ltt"].get("stopped", [])
            ]
            if worst[2] > 0:
                text += (f"; `ltt` misses its {targets['ltt']} target in at most {100 * worst[2]:.1f}% of episodes "
                         f"({worst[1]}, {worst[0]})")
            elif stopped and max(stopped) == 0:
                text += f"; `ltt` certifies nothing at this K (it never stops early), so it never misses"
            else:
                text += f"; `ltt` never misses its {targets['ltt']} target"
        lines.append(text + ".")
    lines += [
        "",
        "### Violation rate per method and rule over K, every held-out family's episodes pooled",
        "",
        "| method | rule (target) | " + " | ".join(f"K={k}" for k in shots) + " |",
        "|---|---|" + "---|" * len(shots),
    ]
    methods = [m for m in results["methods"] if any(m in rates[str(k)] for k in shots)]
    for method in methods:
        for s in selectors:
            cells = [
                _rate(rates[str(k)][method]["all"][s]) if method in rates[str(k)] else "n/a" for k in shots
            ]
            lines.append(f"| {method} | {s} ({targets[s]}) | " + " | ".join(cells) + " |")
    lines.append("")
    for k in shots:
        if not rates[str(k)]:
            continue
        lines += [
            f"### K = {k}: violation rate of each threshold rule per held-out family, {results['episodes']} "
            "episodes per family",
            "",
            "| family | method | " + " | ".join(f"{s}: drop > {targets[s]}" for s in selectors) + " |",
            "|---|---|" + "---|" * len(selectors),
        ]
        for family in [*results["families"], "all"]:
            for method, fam in rates[str(k)].items():
                if family in fam:
                    name = f"**{family}**" if family == "all" else family
                    lines.append(f"| {name} | {method} | " + " | ".join(_rate(fam[family][s]) for s in selectors) + " |")
        lines.append("")
    return "\n".join(lines[:-1]) + "\n"


# ---------------------------------------------------------------------------------------------------
# plots (matplotlib, Agg backend: no display needed)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    """Lay out, write (PNG at 110 dpi) and close a figure; returns its path."""
    plt = _pyplot()
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
    plt = _pyplot()
    k = k if k is not None else results["shots"][-1]
    families = results["families"]
    rows, cols = _grid(len(families))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    colors = method_colors(results["methods"])
    for ax, family in zip(axes.flat, families):
        for method in results["methods"]:
            cell = _cell(results, family, k, method)
            if cell is None:
                continue
            curve = cell["curve"]
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
    return _save(fig, path)


def plot_savings_vs_k(results: dict, path: str | Path) -> Path:
    """Headline savings (support-chosen threshold) against K, mean over families with 95% intervals."""
    plt = _pyplot()
    summary = summarise(results)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    shots = results["shots"]
    colors = method_colors(results["methods"])
    for method in results["methods"]:
        pts = [summary[str(k)].get(method, {}).get("mean") for k in shots]
        if any(p is None for p in pts):
            continue
        ax.errorbar(shots, [100 * p["savings"][0] for p in pts], yerr=[100 * p["savings"][1] for p in pts],
                    marker=POINT_MARKERS.get(method, "o"), capsize=3, label=method, color=colors[method])
    ax.set_xscale("log", base=2)
    ax.set_xticks(shots, [str(k) for k in shots])
    ax.set_xlabel("K (support questions)")
    ax.set_ylabel("% tokens saved (threshold chosen on support)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_calibration(results: dict, path: str | Path) -> Path:
    """Reliability diagram of every probe method (query probe points pooled over families, largest K)."""
    plt = _pyplot()
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
    ax.set_title(f"calibration (K={results['shots'][-1]})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------------
# corpus and meta-training plots (used by the notebooks)


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
    plt = _pyplot()
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
    return _save(fig, path)


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
    plt = _pyplot()
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
    return _save(fig, path)


def write_report(results: dict, out: str | Path) -> dict[str, Path]:
    """Write ``results.md`` (tables + analysis) and the plots into ``out``; returns the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    text = [
        "# Early-stopping evaluation: leave-one-family-out",
        "",
        f"Corpus `{results.get('corpus', '?')}`"
        + (f" (meta-training and pooled-probe families from `{results['source_corpus']}`)"
           if results.get("source_corpus") else "") + f"; held-out families {', '.join(results['families'])}; "
        f"K in {results['shots']}; {results['episodes']} fixed episodes per family and K (every method on the "
        f"same episodes). Savings are against full generation of the same query traces; total tokens include "
        "every probe a policy ran. Adapted probes choose their threshold on "
        + ("cross-fitted support scores (each half of the support scored by the probe adapted on the other half)."
           if results.get("config", {}).get("crossfit") else "the support traces they were adapted on (in-sample)."),
        "",
        markdown_tables(results),
        *[versus_best_table(results, k) for k in results["shots"]],
        analysis(results),
        *([risk] if (risk := risk_tables(results)) else []),
    ]
    paths["table"] = out / "results.md"
    paths["table"].write_text("\n".join(text))
    for k in results["shots"]:
        paths[f"curves_k{k}"] = plot_curves(results, out / f"curves_k{k}.png", k)
    paths["savings_vs_k"] = plot_savings_vs_k(results, out / "savings_vs_k.png")
    paths["calibration"] = plot_calibration(results, out / "calibration.png")
    return paths
