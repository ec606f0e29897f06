"""The meta-selection study's figures per selector and K, and its files (results.json, results.md).

Per selector, over the held-out families: mean % saved (mean of the family means), families whose mean
query EM drop is within delta, % of episodes within, mean and worst-family drop, the violation rate over
families with its one-sided 95% Clopper-Pearson bound, and a paired bootstrap (episodes resampled within
each family, the same draws for both) of the difference in mean savings against ``em_target``, against
the selector's twin without meta-training, and against ``ltt`` (risk control on the support alone).

>>> s = selector_summary({"a": {"16": {"x": {"savings": [0.3, 0.5], "em_drop": [0.0, 0.02]}}}}, "16", "x", 0.01)
>>> round(s["saved"], 2), s["within"], s["episodes_within"]
(0.4, 1, 0.5)
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from maml_stop.evaluate.report.stats import clopper_pearson_upper
from maml_stop.evaluate.results_file import json_safe

__all__ = ["selector_summary", "paired_bootstrap", "summarise", "write_summary"]

_TOL = 1e-9


def _arrays(results: dict, k: str, name: str, figure: str) -> dict[str, np.ndarray]:
    return {f: np.asarray(r[k][name][figure], dtype=np.float64) for f, r in results.items() if name in r.get(k, {})}


def selector_summary(results: dict, k: str, name: str, delta: float) -> dict[str, Any]:
    """The figures of one selector at one K (``results``: family -> K -> selector -> per-episode lists)."""
    drops, savings = _arrays(results, k, name, "em_drop"), _arrays(results, k, name, "savings")
    fam_drop = {f: float(d.mean()) for f, d in drops.items()}
    n = len(fam_drop)
    violations = sum(d > delta + _TOL for d in fam_drop.values())
    all_drops = np.concatenate(list(drops.values()))
    worst = max(fam_drop, key=fam_drop.get)
    return {
        "saved": float(np.mean([s.mean() for s in savings.values()])),
        "within": n - violations,
        "families": n,
        "episodes_within": float((all_drops <= delta + _TOL).mean()),
        "mean_drop": float(np.mean(list(fam_drop.values()))),
        "worst_drop": fam_drop[worst],
        "worst_family": worst,
        "violation_rate": violations / n,
        "violation_bound": clopper_pearson_upper(violations, n),
        "family_drop": fam_drop,
        "family_saved": {f: float(s.mean()) for f, s in savings.items()},
    }


def paired_bootstrap(results: dict, k: str, a: str, b: str, n_resamples: int, seed: int = 0) -> dict[str, float]:
    """Mean over families of the savings difference a - b, with a 95% percentile interval (episodes
    resampled within each family, paired)."""
    sa, sb = _arrays(results, k, a, "savings"), _arrays(results, k, b, "savings")
    diffs = [sa[f] - sb[f] for f in sa if f in sb]
    rng = np.random.default_rng(seed)
    boot = np.zeros(n_resamples)
    for d in diffs:
        boot += d[rng.integers(0, len(d), size=(n_resamples, len(d)))].mean(1)
    boot /= max(len(diffs), 1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"diff": float(np.mean([d.mean() for d in diffs])), "lo": float(lo), "hi": float(hi)}


def summarise(results: dict[str, Any], twins: Mapping[str, str]) -> dict[str, Any]:
    """K -> selector -> figures, with the two paired comparisons; ``twins``: each study selector's twin
    fitted on the held-out support alone (the study's ``STUDY_SELECTORS``)."""

    cfg = results["config"]
    per = results["results"]
    out: dict[str, Any] = {}
    for k in map(str, cfg["k"] if "k" in cfg else cfg["shots"]):  # "shots": a results.json of before issue 31
        out[k] = {}
        present = lambda m: any(m in r.get(k, {}) for r in per.values())  # noqa: E731  (some methods run at some K)
        for name in [m for m in list(cfg["selectors"]) + ["hindsight"] if present(m)]:
            s = selector_summary(per, k, name, cfg["delta"])
            if name in twins:
                s["vs_em_target"] = paired_bootstrap(per, k, name, "em_target", cfg["n_resamples"], cfg["seed"])
                twin = twins[name]
                s["twin"] = twin
                s["vs_twin"] = paired_bootstrap(per, k, name, twin, cfg["n_resamples"], cfg["seed"])
                if "ltt" in cfg["selectors"]:  # the risk-controlled selector on the support alone
                    s["vs_ltt"] = paired_bootstrap(per, k, name, "ltt", cfg["n_resamples"], cfg["seed"])
                for other in cfg.get("against", []):  # further paired comparisons the config names
                    if present(other):
                        s[f"vs_{other}"] = paired_bootstrap(per, k, name, other, cfg["n_resamples"], cfg["seed"])
            out[k][name] = s
    return out


def _pts(x: float) -> str:
    return f"{100 * x:.1f}"


def _interval(c: dict[str, float]) -> str:
    return f"{100 * c['diff']:+.1f} [{100 * c['lo']:+.1f}, {100 * c['hi']:+.1f}]"


def markdown(results: dict[str, Any], summary: dict[str, Any]) -> str:
    cfg = results["config"]
    lines = [f"# Meta-selection study: {cfg['corpus']}", "",
             f"{len(results['families'])} held-out families, "
             + ("leave-one-family-out" if cfg["folds"] is None else f"{cfg['folds']} grouped folds")
             + f", {cfg['episodes']} episodes per family and K, {cfg['train_episodes']} simulated episodes per "
             f"training family, delta {_pts(cfg['delta'])} pt, alpha {cfg['alpha']}, probe depth {cfg['probe']['depth']}; "
             f"{results.get('seconds', 'n/a')} s.", ""]
    for k, rows in summary.items():
        n = next(iter(rows.values()))["families"]
        against = [o for o in cfg.get("against", []) if o in rows]
        lines += [f"## K = {k}", "",
                  f"| selector | % saved | within (of {n}) | % episodes within | mean drop (pts) | worst family drop (pts) "
                  "| violation rate [95% upper] | vs em_target (% saved, paired 95%) | vs twin | vs ltt |"
                  + "".join(f" vs {o} |" for o in against),
                  "|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(against)]
        for name, s in rows.items():
            vs = _interval(s["vs_em_target"]) if "vs_em_target" in s else "n/a"
            twin = f"{_interval(s['vs_twin'])} ({s['twin']})" if "vs_twin" in s and s["twin"] != name else "n/a"
            lines.append(f"| {name} | {_pts(s['saved'])} | {s['within']} | {_pts(s['episodes_within'])} | "
                         f"{_pts(s['mean_drop'])} | {_pts(s['worst_drop'])} ({s['worst_family']}) | "
                         f"{s['violation_rate']:.2f} [{s['violation_bound']:.2f}] | {vs} | {twin} | "
                         f"{_interval(s['vs_ltt']) if 'vs_ltt' in s and name != 'ltt' else 'n/a'} |"
                         + "".join(f" {_interval(s[f'vs_{o}']) if f'vs_{o}' in s and o != name else 'n/a'} |"
                                   for o in against))
        names = list(rows)
        lines += ["", f"Per family at K = {k}: % saved / mean drop (pts).", "",
                  "| family | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for f in results["families"]:
            lines.append(f"| {f} | " + " | ".join(f"{_pts(rows[m]['family_saved'][f])} / {_pts(rows[m]['family_drop'][f])}"
                                                   for m in names) + " |")
        lines += [""] + _margins(results, k) + _curves(results, k)
    return "\n".join(lines)


def _margins(results: dict[str, Any], k: str) -> list[str]:
    """The margin each fold's meta-calibration chose (pts; inf: never stop early)."""
    cal = [n for n in results["config"]["selectors"] if n.endswith("_cal")]
    if not cal:
        return []
    lines = [f"Meta-calibrated margins (pts) per fold at K = {k} (held-out families of the fold), and the "
             "training family that needed the largest margin (where the state recorded it).", "",
             "| fold | " + " | ".join(cal) + " |", "|---" * (len(cal) + 1) + "|"]
    for fold, fitted in results["fitted"].items():
        cells = []
        for n in cal:
            m, needed = fitted[k][n]["margin"], (fitted[k][n].get("calibration") or {}).get("needed")
            worst = f" ({max(needed, key=lambda f: _margin_value(needed[f]))})" if needed else ""
            cells.append(("inf" if _margin_value(m) == math.inf else f"{100 * _margin_value(m):.2f}") + worst)
        lines.append(f"| {fold} | " + " | ".join(cells) + " |")
    return lines + [""]


def _margin_value(m: Any) -> float:
    """A margin as written to results.json (+inf as "inf") back to a float."""
    return math.inf if m in ("inf", None) else float(m)


def _curves(results: dict[str, Any], k: str) -> list[str]:
    """Each held-out family's mean query drop (pts) at every candidate (the curve behind ``hindsight``)."""
    per = results["results"]
    if not all("curve_drop" in per[f][k]["hindsight"] for f in results["families"]):
        return []
    taus = results["config"]["taus"]
    lines = [f"Mean query EM drop (pts) per candidate tau at K = {k}.", "",
             "| family | " + " | ".join(f"{t:g}" for t in taus) + " |", "|---" * (len(taus) + 1) + "|"]
    for f in results["families"]:
        lines.append(f"| {f} | " + " | ".join(_pts(d) for d in per[f][k]["hindsight"]["curve_drop"][1:]) + " |")
    return lines + [""]


def write_summary(results: dict[str, Any], out: str | Path, twins: Mapping[str, str]) -> dict[str, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(results, twins)
    results["summary"] = summary
    (out / "results.json").write_text(json.dumps(json_safe(results, inf_as_text=True), separators=(",", ":")))
    (out / "results.md").write_text(markdown(results, summary))
    return {"json": out / "results.json", "md": out / "results.md"}
