"""The report of the cascade evaluation (:mod:`maml_stop.evaluate.cascade`): EM against weighted cost for
every method and both single models, the issue's criterion (the large model's EM within ``delta`` at
``<= target_cost`` of its cost), the hindsight curve, and the paired bootstrap of the meta-trained router
against the others.

>>> write_cascade_report(json.loads(Path("runs/cascade/results.json").read_text()), "runs/cascade")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from maml_stop.evaluate.cascade_plot import plot_cascade
from maml_stop.evaluate.compare import paired_bootstrap, stratified_paired_bootstrap
from maml_stop.evaluate.report.stats import mean_ci

__all__ = ["episode_figures", "hindsight", "write_cascade_report", "cascade_markdown"]


def episode_figures(cell: Mapping[str, Any], selector: str) -> dict[str, list[float]] | None:
    """A method's per-episode figures: its own (references) or those of ``selector`` (thresholded)."""
    if "episodes" in cell:
        return cell["episodes"]
    return (cell.get("selectors") or {}).get(selector)


def hindsight(cell: Mapping[str, Any], delta: float) -> tuple[float, float, float] | None:
    """(candidate, mean EM vs large, mean cost share) of the cheapest candidate whose mean query EM is
    within ``delta`` of the large model's (best threshold in hindsight); None: no candidate is."""
    curve = cell.get("curve")
    if not curve:
        return None
    best = None
    for c in curve["candidates"]:
        figs = curve[str(c)]
        em, share = float(np.mean(figs["em_vs_large"])), float(np.mean(figs["cost_share"]))
        if em >= -delta - 1e-12 and (best is None or share < best[2]):
            best = (float(c), em, share)
    return best


def _pct(values: list[float], signed: bool = False) -> str:
    m, h = mean_ci(values)
    if not math.isfinite(m):
        return "n/a"
    return f"{m * 100:+.1f} ± {h * 100:.1f}" if signed else f"{m * 100:.1f} ± {h * 100:.1f}"


def cascade_markdown(results: Mapping[str, Any]) -> str:
    s = results["settings"]
    cfg, price = s["cascade"], results["cost_model"]
    delta, target, head = s["delta"], cfg["target_cost"], s["threshold_methods"][0]
    families = sorted(results["families"])
    lines = [
        "# Cascade: small -> large model (issue 28)", "",
        f"Small model's corpus `{s['corpus']}`, large model's `{cfg['pairs']}`, paired by question id "
        f"({', '.join(f'{f}: {n}' for f, n in results['pairs'].items())} pairs). Cost in small-model tokens: "
        f"small tokens + {price['ratio']:.3f} x large tokens (basis `{price['basis']}`, from the benchmark's cost file). "
        f"{s['episodes']} episodes per family and K, K support questions, the rest as query; thresholds chosen on "
        f"support by the selectors against the large model alone (delta = {delta * 100:.0f} point). "
        "Figures: mean over episodes ± 95% interval; EM - large in points; cost as % of the large model's weighted "
        f"cost on the same questions. Regenerate: `maml-stop evaluate --report_only {{out}}/results.json` "
        "(or rerun the command in experiments/cascade_evaluate.yaml).", "",
    ]
    if "corpus_traces" in results:  # the routers learn from every other family of each corpus
        lines += ["Routers' source traces (every family but the held-out one): " + "; ".join(
            f"{which} model {', '.join(f'{f} {n}' for f, n in sorted(sizes.items()))}"
            for which, sizes in results["corpus_traces"].items()) + ".", ""]
    for k in s["k"]:
        lines += [f"## K = {k}", "", "| family | method | selector | EM % | EM - large (pts) | cost % of large | escalated % |",
                  "|---|---|---|---|---|---|---|"]
        for fam in families:
            for m, cell in results["families"][fam][str(k)].items():
                for sel in ([None] if "episodes" in cell else s["threshold_methods"]):
                    figs = episode_figures(cell, sel or head)
                    if figs is None:
                        continue
                    lines.append(f"| {fam} | {m} | {sel or '-'} | {_pct(figs['em'])} | {_pct(figs['em_vs_large'], True)} "
                                 f"| {_pct(figs['cost_share'])} | {_pct(figs['escalated'])} |")
        lines += ["", f"![EM against weighted cost, K = {k}](em_cost_k{k}.png)", "", _criterion(results, k, head), "", _curve_table(results, k), "", _bootstrap(results, k, head), ""]
    return "\n".join(lines)


def _criterion(results: Mapping[str, Any], k: int, head: str) -> str:
    s = results["settings"]
    delta, target = s["delta"], s["cascade"]["target_cost"]
    lines = [f"### The criterion at K = {k}: EM within {delta * 100:.0f} point of the large model at <= "
             f"{target * 100:.0f}% of its cost (selector `{head}`, mean over the held-out families)", "",
             "| method | EM - large (pts) | cost % of large | met |", "|---|---|---|---|"]
    fams = sorted(results["families"])
    for m in results["families"][fams[0]][str(k)]:
        per = [episode_figures(results["families"][f][str(k)][m], head) for f in fams]
        if any(p is None for p in per):
            continue
        em = float(np.mean([np.mean(p["em_vs_large"]) for p in per]))
        share = float(np.mean([np.mean(p["cost_share"]) for p in per]))
        met = em >= -delta - 1e-12 and share <= target
        lines.append(f"| {m} | {em * 100:+.1f} | {share * 100:.1f} | {'yes' if met else 'no'} |")
    return "\n".join(lines)


def _curve_table(results: Mapping[str, Any], k: int) -> str:
    delta = results["settings"]["delta"]
    lines = [f"### Best threshold in hindsight at K = {k} (the cheapest candidate within {delta * 100:.0f} point of "
             "the large model's mean query EM; reported beside the selectors' figures, never instead of them)", "",
             "| family | method | candidate | EM - large (pts) | cost % of large |", "|---|---|---|---|---|"]
    for fam in sorted(results["families"]):
        for m, cell in results["families"][fam][str(k)].items():
            if "curve" not in cell:
                continue
            best = hindsight(cell, delta)
            lines.append(f"| {fam} | {m} | " + ("none within delta | - | - |" if best is None else
                         f"{best[0]:g} | {best[1] * 100:+.1f} | {best[2] * 100:.1f} |"))
    return "\n".join(lines)


def _bootstrap(results: Mapping[str, Any], k: int, head: str) -> str:
    compare = results["settings"]["cascade"]["compare"]
    a, others = compare[0], compare[1:]
    lines = [f"### Paired bootstrap at K = {k}: `{a}` minus each other router (selector `{head}`, same episodes; "
             "mean difference [95% percentile interval])", "",
             "| against | family | EM - large (pts) | cost % of large |", "|---|---|---|---|"]
    fams = sorted(results["families"])
    for b in others:
        strata: dict[str, list] = {"em_vs_large": [], "cost_share": []}
        for fam in fams + ["all (stratified)"]:
            row = []
            for fig in ("em_vs_large", "cost_share"):
                if fam in results["families"]:
                    cell = results["families"][fam][str(k)]
                    fa, fb = (episode_figures(cell.get(x, {}), head) for x in (a, b))
                    if fa is None or fb is None:
                        row.append("n/a")
                        continue
                    strata[fig].append((fa[fig], fb[fig]))
                    d, lo, hi = paired_bootstrap(fa[fig], fb[fig])
                else:
                    if not strata[fig]:
                        row.append("n/a")
                        continue
                    d, lo, hi = stratified_paired_bootstrap(strata[fig])
                row.append(f"{d * 100:+.1f} [{lo * 100:+.1f}, {hi * 100:+.1f}]")
            lines.append(f"| {b} | {fam} | {row[0]} | {row[1]} |")
    return "\n".join(lines)


def write_cascade_report(results: Mapping[str, Any], out: str | Path) -> Path:
    """Write ``results.md`` and its figures (``em_cost_k<K>.png``) beside the results; returns its path."""
    for k in results["settings"]["k"]:
        plot_cascade(results, Path(out) / f"em_cost_k{k}.png", k)
    path = Path(out) / "results.md"
    path.write_text(cascade_markdown(results).replace("{out}", str(Path(out))) + "\n")
    return path
