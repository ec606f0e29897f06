"""The written analysis of a report, generated from the numbers: where a method wins and loses.

Wins and losses are paired over the same episodes (:func:`maml_stop.evaluate.report.stats.paired`): a
win is a per-episode savings difference whose 95% interval excludes 0 in the method's favour. "Within
the EM target" is :func:`maml_stop.evaluate.report.tables.within_target`.
"""

from __future__ import annotations

import math

from maml_stop.evaluate.report.stats import ORACLES, fmt_ci, paired, summarise
from maml_stop.evaluate.report.tables import METHOD_LABELS, pct, within_target

__all__ = ["analysis"]


def analysis(results: dict, method: str = "maml") -> str:
    """A short written analysis of where ``method`` wins and loses, generated from the numbers."""
    if method not in results["methods"]:
        return f"({method} was not evaluated; no analysis.)\n"
    threshold = results["threshold_methods"][0]
    summary = summarise(results, threshold)
    delta = results["delta"]
    ks = results["k"]
    rivals = [m for m in results["methods"] if m not in (method, "full", *ORACLES)]
    lines = [f"## Where {METHOD_LABELS.get(method, method)} wins and loses", ""]
    lines.append(
        f"Headline: % of tokens saved (total, probes included) against full generation with the threshold "
        f"chosen by `{threshold}` on the K support traces; EM drop target {100 * delta:g} point(s). "
        "Comparisons are paired over the same episodes; 'wins' and 'loses' mean the 95% interval of the "
        "per-episode difference excludes 0."
    )
    lines.append("")
    for k in ks:
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
            f"{fmt_ci(*m['em_drop'])} points (EM drop within target in {pct(m['within_delta'][0])} of episodes; "
            f"{pct(m['oracle_fraction'][0])} of the oracle's savings"
            + (f", {pct(m['equal_em_fraction'][0])} of the equal-EM oracle's" if "equal_em_fraction" in m else "")
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
        for k in ks:
            for r in rivals:
                d = paired(results, family, k, method, r, "savings", threshold)
                if d is None or not math.isfinite(d[0]):
                    continue
                drop = paired(results, family, k, method, r, "em_drop", threshold)
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

    n_cmp = len(results["families"]) * len(ks) * len(rivals)
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
        (f, k) for f in results["families"] for k in ks
        if f in summary[str(k)].get(method, {})
        and not within_target(summary[str(k)], method, f, results["families"], delta)
    ]
    if over:
        lines.append(
            f"The support-chosen threshold misses the EM target on average in {len(over)} (family, K) cells: "
            + ", ".join(f"{f} K={k}" for f, k in over[:10]) + ("..." if len(over) > 10 else "") + "."
        )
    if len(ks) > 1:
        lo, hi = str(ks[0]), str(ks[-1])
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
        row = summary[str(ks[-1])].get(m, {}).get("mean")
        if row is not None and math.isfinite(row["brier"][0]):
            cal.append(f"{m} Brier {row['brier'][0]:.3f}, ECE {row['ece'][0]:.3f}")
    if cal:
        lines.append(f"Calibration at K={ks[-1]}: " + "; ".join(cal) + ".")
    if "ltt" in results["threshold_methods"]:
        ltt = summarise(results, "ltt")
        stopped = [
            ltt[str(k)].get(method, {}).get("mean", {}).get("savings", (float("nan"),))[0] for k in ks
        ]
        if all(math.isfinite(x) and abs(x) < 1e-12 for x in stopped):
            lines.append(
                "Learn-then-Test certified no early stopping at any K: with an EM-drop target of "
                f"{100 * results.get('ltt_delta', delta):g} point(s) at alpha={results.get('ltt_alpha', 'n/a')}, "
                "the binomial bound needs more support questions than K."
            )
    lines.append("")
    return "\n".join(lines)
