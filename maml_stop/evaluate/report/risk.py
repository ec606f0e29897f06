"""The risk section of a report: how often each threshold rule misses its EM-drop target.

:func:`violation_rates` counts, per method, family and threshold rule, the episodes whose query EM drop
exceeds the rule's target (:func:`selector_target`), with a one-sided 95% Clopper-Pearson upper bound;
:func:`risk_tables` writes them with what each rule promises.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from maml_stop.evaluate.report.stats import cell, clopper_pearson_upper
from maml_stop.decide.thresholds import min_certifiable_k

__all__ = ["selector_target", "violation_rates", "risk_tables"]


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
        entry = cell(results, family, k, method)
        for chosen in (entry or {}).get("thresholds", {}).values():
            if any(p is not None for p in chosen.get("param", [])):
                return True
    return False


def violation_rates(results: dict) -> dict[str, dict[str, dict[str, dict[str, dict[str, float]]]]]:
    """Per K, thresholded method, family (plus ``"all"``: every family's episodes pooled) and threshold
    selector: how often the query EM drop of an episode exceeds the selector's target
    (:func:`selector_target`).

    Each entry holds ``violations`` and ``episodes`` (episodes with a finite EM drop), ``rate`` and
    ``upper`` (one-sided 95% Clopper-Pearson bound). The em_target rate is 1 - ``within_delta`` of
    :func:`maml_stop.evaluate.report.stats.summarise`.
    """
    out: dict = {}
    for k in results["k"]:
        out[str(k)] = {}
        for method in results["methods"]:
            if not _thresholded(results, k, method):
                continue
            rows: dict[str, dict[str, dict[str, float]]] = {}
            for family in results["families"]:
                entry = cell(results, family, k, method)
                if entry is None:
                    continue
                rows[family] = {}
                for selector in results["threshold_methods"]:
                    drop = np.asarray(entry["thresholds"][selector]["em_drop"], dtype=np.float64)
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
    ks = results["k"]
    for k in ks:
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
                if (c := cell(results, f, k, m)) is not None for x in c["thresholds"]["ltt"].get("stopped", [])
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
        "| method | rule (target) | " + " | ".join(f"K={k}" for k in ks) + " |",
        "|---|---|" + "---|" * len(ks),
    ]
    methods = [m for m in results["methods"] if any(m in rates[str(k)] for k in ks)]
    for method in methods:
        for s in selectors:
            cells = [
                _rate(rates[str(k)][method]["all"][s]) if method in rates[str(k)] else "n/a" for k in ks
            ]
            lines.append(f"| {method} | {s} ({targets[s]}) | " + " | ".join(cells) + " |")
    lines.append("")
    for k in ks:
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
