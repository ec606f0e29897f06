"""The Markdown tables of a report, and the one home of the rule "within the EM-drop target".

:func:`markdown_tables` gives the headline summary over K (one per threshold rule) and one detailed table
per K; :func:`versus_best_table` sets a method against the best baseline within the target. A method is
within the target on a family when its mean EM drop is at most ``delta`` there, and on the mean row only
when it is within it on every held-out family (:func:`within_target`; the analysis uses the same rule).
"""

from __future__ import annotations

import math

from maml_stop.evaluate.methods import PROBE_METHODS
from maml_stop.evaluate.report.stats import ORACLES, fmt_ci, summarise

__all__ = ["METHOD_LABELS", "pct", "markdown_tables", "within_target", "versus_best_table", "backoff_table"]

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


def pct(x: float) -> str:
    """A fraction as a whole percentage (``"n/a"`` when not finite)."""
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
            "| method | " + " | ".join(f"K={k}" for k in results["k"]) + " |",
            "|---|" + "---|" * len(results["k"]),
        ]
        for method in results["methods"]:
            cells = []
            for k in results["k"]:
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
    for k in results["k"]:
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
                    f"{pct(s['within_delta'][0])} | {fmt_ci(*s['curve_savings'])} | {pct(s['oracle_fraction'][0])} | "
                    + (f"{pct(s['equal_em_fraction'][0])} | " if equal_em else "") +
                    f"{fmt_ci(*s['savings_reasoning'])} | {fmt_ci(*s['auc'], scale=1.0, digits=3)} |"
                )
        lines.append("")
    probe = [m for m in results["methods"] if m in PROBE_METHODS]
    if probe:
        lines += [
            "### Calibration of the probes on query probe points (mean over families)",
            "",
            "| method | " + " | ".join(f"Brier K={k} | ECE K={k}" for k in results["k"]) + " |",
            "|---|" + "---|---|" * len(results["k"]),
        ]
        for method in probe:
            cells = []
            for k in results["k"]:
                row = summary[str(k)].get(method, {}).get("mean")
                cells += ["n/a", "n/a"] if row is None else [
                    fmt_ci(*row["brier"], scale=1.0, digits=3), fmt_ci(*row["ece"], scale=1.0, digits=3)
                ]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


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
            f"{pct(m['oracle_fraction'][0])} | " + (f"{pct(m['equal_em_fraction'][0])} | " if equal_em else "")
            + f"{100 * oracle:.1f} |"
        )
    lines += ["", "Mean row: a method is within the target only when it is within it on every held-out family."]
    return "\n".join(lines) + "\n"


def backoff_table(results: dict) -> str:
    """The ``em_target_backoff`` calibration of every fold (back-off, worst and mean source-family EM drop
    and mean source-family savings at it), or ``""`` when no fold calibrated one."""
    rows = []
    for family in results["families"]:
        for k in results["k"]:
            for method, cell in (results["results"][family].get(str(k)) or {}).items():
                calib = cell.get("backoff") if isinstance(cell, dict) else None
                if not calib:
                    continue
                b = calib["backoff"]
                drop = [d[b] for d in calib["drop"]]
                saved = [s[b] for s in calib["savings"]]
                worst = calib["families"][max(range(len(drop)), key=drop.__getitem__)]
                rows.append(f"| {family} | {k} | {method} | {b} | {100 * max(drop):.1f} ({worst}) | "
                            f"{100 * sum(drop) / len(drop):.1f} | {100 * sum(saved) / len(saved):.1f} |")
    if not rows:
        return ""
    return "\n".join([
        "### The back-off of `em_target_backoff`, calibrated on each fold's source families",
        "",
        "Each fold fits every thresholded method on fixed episodes of its source families (never the held-out "
        "one), thresholds it by `em_target` on support, and takes the smallest back-off (candidates toward the "
        f"conservative end) whose mean query EM drop is within {100 * results['delta']:g} point(s) on every source "
        "family (`maml_stop/evaluate/backoff.py`).",
        "",
        "| held-out family | K | method | back-off | worst source EM drop (pts) | mean source EM drop (pts) | mean source saved % |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
    ])
