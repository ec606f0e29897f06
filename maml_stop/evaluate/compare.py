"""``maml-stop compare``: A/B comparison of two methods on the same episodes (issue 12 item 5).

DESIGN.md: "Differences between two methods are judged by a paired bootstrap over the same episodes."
Two ``results.json`` files of ``maml-stop evaluate`` (or two methods of one file) hold per family, K and
method the per-episode query figures under each threshold rule. For every family and K this module
takes the per-episode differences A - B in token savings and in EM drop, resamples the episodes jointly
(:func:`paired_bootstrap`, ``scipy.stats.bootstrap(paired=True)``) and gives a 95% percentile interval and
a verdict; the ``mean`` row averages the family means and resamples episodes within each family
(:func:`stratified_paired_bootstrap`). Percentile intervals, not BCa: BCa is undefined when every
difference is equal (common for EM drops: most episodes lose nothing under either method), and the
percentile interval can be checked against a plain NumPy resampling.

Nothing in ``results.json`` names the questions of an episode, so two files hold the same episodes when
their corpus, seed, episode count, query size, splits and minimum probe count agree and, per family and
K, full generation's per-episode EM and tokens are equal; anything else is refused.

    maml-stop compare runs/a/results.json runs/b/results.json --method_a maml   # one method, two runs
    maml-stop compare runs/a/results.json --method_a maml --method_b pooled     # two methods, one run
    maml-stop compare A.json B.json --threshold_method ltt --k 16 32 --families gcd --out compare.json

>>> est, low, high = paired_bootstrap([0.3, 0.5, 0.4], [0.1, 0.3, 0.2], n_resamples=99, seed=0)
>>> round(est, 12), round(low, 12), round(high, 12)      # constant differences: a zero-width interval
(0.2, 0.2, 0.2)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy import stats

from maml_stop.evaluate.results_file import read_results

__all__ = ["paired_bootstrap", "stratified_paired_bootstrap", "verdict", "check_same_episodes", "compare", "to_markdown", "main"]

# figure -> (what A > B means, what A < B means); figures are per-episode fractions, reported in points
FIGURES = {"savings": ("A saves more", "B saves more"), "em_drop": ("A loses more EM", "B loses more EM")}
TITLES = {"savings": "Token savings (points of full generation's tokens)", "em_drop": "EM drop against full generation (points)"}
# the settings that fix the episodes (EvaluateConfig fields)
EPISODE_SETTINGS = ("corpus", "seed", "episodes", "query", "splits", "min_probes")


def _mean_difference(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(x - y, axis=axis)


def _mean_of_means(*samples: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean([np.mean(s, axis=axis) for s in samples], axis=0)


def paired_bootstrap(
    a: Sequence[float], b: Sequence[float], n_resamples: int = 9999, seed: int = 0, confidence: float = 0.95
) -> tuple[float, float, float]:
    """Mean of ``a - b`` and its percentile bootstrap interval, resampling the pairs (episodes) jointly.

    ``scipy.stats.bootstrap((a, b), mean(a - b), paired=True, method="percentile")``: each resample draws
    ``n`` episode indices with replacement (``rng.integers(0, n, (n_resamples, n))`` from
    ``np.random.default_rng(seed)``) and takes both methods' figures of those episodes.
    """
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or x.size < 2:
        raise ValueError(f"paired samples need the same length >= 2; got {x.shape} and {y.shape}")
    res = stats.bootstrap((x, y), _mean_difference, paired=True, vectorized=True, n_resamples=n_resamples,
                          confidence_level=confidence, method="percentile", rng=np.random.default_rng(seed))
    return float(_mean_difference(x, y)), float(res.confidence_interval.low), float(res.confidence_interval.high)


def stratified_paired_bootstrap(
    pairs: Sequence[tuple[Sequence[float], Sequence[float]]], n_resamples: int = 9999, seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float, float]:
    """Mean over strata (families) of the mean difference ``a - b``, episodes resampled within each stratum.

    A stratum's pairs enter through their differences (resampling the differences is resampling the
    pairs jointly); ``scipy.stats.bootstrap`` with ``paired=False`` resamples each stratum on its own.
    """
    diffs = [np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64) for a, b in pairs]
    if not diffs or any(d.ndim != 1 or d.size < 2 for d in diffs):
        raise ValueError("every stratum needs paired samples of the same length >= 2")
    if len(diffs) == 1:
        return paired_bootstrap(pairs[0][0], pairs[0][1], n_resamples, seed, confidence)
    res = stats.bootstrap(diffs, _mean_of_means, paired=False, vectorized=True, n_resamples=n_resamples,
                          confidence_level=confidence, method="percentile", rng=np.random.default_rng(seed))
    return float(_mean_of_means(*diffs)), float(res.confidence_interval.low), float(res.confidence_interval.high)


def verdict(figure: str, low: float, high: float, confidence: float = 0.95) -> str:
    """What the interval of ``A - B`` says: A more, B more, or no difference (the interval covers 0)."""
    more_a, more_b = FIGURES[figure]
    if low > 0.0:
        return more_a
    if high < 0.0:
        return more_b
    return f"no difference at {100 * confidence:g}%"


# ---------------------------------------------------------------------------------------------------
# results files


def _cell(results: dict, family: str, k: int, method: str, threshold: str) -> dict | None:
    entry = results["results"].get(family, {}).get(str(k), {}).get(method)
    return None if entry is None else entry["thresholds"].get(threshold)


def check_same_episodes(a: dict, b: dict, families: Sequence[str], ks: Sequence[int], methods: tuple[str, str],
                        threshold: str) -> None:
    """Raise a ``ValueError`` naming what differs when ``a`` and ``b`` do not hold the same episodes."""
    settings = [{**{key: r.get(key) for key in ("corpus", "episodes")}, **r.get("config", {})} for r in (a, b)]
    diffs = [f"{key}: {settings[0].get(key)!r} vs {settings[1].get(key)!r}"
             for key in EPISODE_SETTINGS if settings[0].get(key) != settings[1].get(key)]
    for family in families:
        for k in ks:
            xa, xb = _cell(a, family, k, methods[0], threshold), _cell(b, family, k, methods[1], threshold)
            if xa is None or xb is None:
                continue
            for key in ("full_em", "full_tokens"):
                va, vb = np.asarray(xa[key], dtype=np.float64), np.asarray(xb[key], dtype=np.float64)
                if va.shape != vb.shape:
                    diffs.append(f"{family} K={k}: {va.size} vs {vb.size} episodes")
                    break
                bad = np.flatnonzero(~np.isclose(va, vb, rtol=1e-9, atol=1e-12, equal_nan=True))
                if bad.size:
                    i = int(bad[0])
                    diffs.append(f"{family} K={k}: full generation's {key} differs in {bad.size} episodes "
                                 f"(episode {i}: {va[i]:g} vs {vb[i]:g})")
                    break
    if diffs:
        raise ValueError("the two results do not hold the same episodes, so they cannot be paired:\n  "
                         + "\n  ".join(diffs))


def _choose(asked: Sequence | None, a: Sequence, b: Sequence, what: str) -> list:
    shared = [x for x in a if x in b]
    if asked is None:
        if not shared:
            raise ValueError(f"the two results share no {what}: {list(a)} vs {list(b)}")
        return shared
    missing = [x for x in asked if x not in shared]
    if missing:
        raise ValueError(f"{what} {missing} not in both results; shared {what}: {shared}")
    return list(asked)


def compare(
    a: dict, b: dict, method_a: str = "maml", method_b: str | None = None, threshold_method: str | None = None,
    k: Sequence[int] | None = None, families: Sequence[str] | None = None, n_resamples: int = 9999,
    seed: int = 0, confidence: float = 0.95,
) -> dict[str, Any]:
    """Rows of the A/B comparison (per figure, K and family, plus each K's ``mean`` over families).

    Figures are in percentage points: ``a``, ``b`` (means over episodes), ``difference`` (A - B),
    ``low``, ``high`` (its interval) and ``verdict``.
    """
    if not (isinstance(confidence, (int, float)) and 0.0 < confidence < 1.0):
        raise ValueError(f"confidence must be in (0, 1), e.g. 0.95; got {confidence!r}")
    method_b = method_b or method_a
    for name, res, method in (("A", a, method_a), ("B", b, method_b)):
        if method not in res["methods"]:
            raise ValueError(f"method {method!r} is not in results {name}; its methods: {', '.join(res['methods'])}")
    threshold = threshold_method or a["threshold_methods"][0]
    for name, res in (("A", a), ("B", b)):
        if threshold not in res["threshold_methods"]:
            raise ValueError(f"threshold rule {threshold!r} is not in results {name}; "
                             f"its rules: {', '.join(res['threshold_methods'])}")
    families = _choose(families, a["families"], b["families"], "families")
    ks = _choose(None if k is None else [int(x) for x in k], [int(x) for x in a["k"]], [int(x) for x in b["k"]], "K")
    check_same_episodes(a, b, families, ks, (method_a, method_b), threshold)
    rows = []
    for figure in FIGURES:
        for k in ks:
            pairs = {}
            for family in families:
                xa, xb = _cell(a, family, k, method_a, threshold), _cell(b, family, k, method_b, threshold)
                if xa is None or xb is None:
                    continue
                va = np.asarray([np.nan if v is None else v for v in xa[figure]], dtype=np.float64)
                vb = np.asarray([np.nan if v is None else v for v in xb[figure]], dtype=np.float64)
                keep = np.isfinite(va) & np.isfinite(vb)
                pairs[family] = (100.0 * va[keep], 100.0 * vb[keep])
            for family, (va, vb) in pairs.items():
                est, low, high = paired_bootstrap(va, vb, n_resamples, seed, confidence)
                rows.append(_row(figure, k, family, va, vb, est, low, high, confidence))
            if len(pairs) > 1:
                est, low, high = stratified_paired_bootstrap(list(pairs.values()), n_resamples, seed, confidence)
                va = np.mean([p[0].mean() for p in pairs.values()])
                vb = np.mean([p[1].mean() for p in pairs.values()])
                rows.append(_row(figure, k, "mean", np.array([va]), np.array([vb]), est, low, high, confidence,
                                 episodes=sum(len(p[0]) for p in pairs.values())))
    return {"method_a": method_a, "method_b": method_b, "threshold_method": threshold, "families": families,
            "k": ks, "n_resamples": n_resamples, "seed": seed, "confidence": confidence,
            "unit": "percentage points", "rows": rows}


def _row(figure, k, family, va, vb, est, low, high, confidence, episodes=None) -> dict[str, Any]:
    return {"figure": figure, "k": k, "family": family, "episodes": int(episodes or len(va)),
            "a": float(va.mean()), "b": float(vb.mean()), "difference": est, "low": low, "high": high,
            "verdict": verdict(figure, low, high, confidence)}


def to_markdown(table: dict[str, Any], name_a: str = "A", name_b: str = "B") -> str:
    """The comparison as Markdown: one table per figure, a row per K and family."""
    a, b = table["method_a"], table["method_b"]
    level = f"{100 * table['confidence']:g}%"
    lines = [
        f"# A/B comparison: A = `{a}` ({name_a}), B = `{b}` ({name_b})", "",
        f"Threshold rule `{table['threshold_method']}`; the same episodes in both. Differences A - B in points, "
        f"with {level} paired percentile bootstrap intervals ({table['n_resamples']} resamples of the episodes, "
        f"seed {table['seed']}); `mean` averages the family means, resampling episodes within each family.",
    ]
    for figure in FIGURES:
        lines += ["", f"## {TITLES[figure]}", "", "| K | family | episodes | A | B | A - B [" + level + " CI] | verdict |",
                  "|---|---|---|---|---|---|---|"]
        for r in (r for r in table["rows"] if r["figure"] == figure):
            lines.append(f"| {r['k']} | {r['family']} | {r['episodes']} | {r['a']:.1f} | {r['b']:.1f} | "
                         f"{r['difference'] + 0.0:+.2f} [{r['low'] + 0.0:+.2f}, {r['high'] + 0.0:+.2f}] | {r['verdict']} |")
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="maml-stop compare", description=(
        "A/B comparison of two methods on the same episodes: paired bootstrap of the differences in token "
        "savings and EM drop, per family and K, with 95%% intervals and a verdict."))
    p.add_argument("results_a", help="results.json of maml-stop evaluate (A)")
    p.add_argument("results_b", nargs="?", default=None, help="results.json (B; default: the same file as A)")
    p.add_argument("--method_a", default="maml", help="method of A (default: maml)")
    p.add_argument("--method_b", default=None, help="method of B (default: --method_a)")
    p.add_argument("--threshold_method", default=None, help="threshold rule (default: the headline rule of A)")
    p.add_argument("--k", type=int, nargs="+", default=None, help="K values (default: every K of both)")
    p.add_argument("--families", nargs="+", default=None, help="families (default: every family of both)")
    p.add_argument("--n_resamples", type=int, default=9999)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--confidence", type=float, default=0.95)
    p.add_argument("--out", default=None, help="also write the rows as JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    path_b = args.results_b or args.results_a
    try:
        a = read_results(args.results_a)
        b = a if path_b == args.results_a else read_results(path_b)
    except ValueError as err:
        print(f"maml-stop compare: {err}", file=sys.stderr)
        return 2
    if path_b == args.results_a and (args.method_b or args.method_a) == args.method_a:
        print("maml-stop compare: one file and one method: name another file or --method_b", file=sys.stderr)
        return 2
    try:
        table = compare(a, b, args.method_a, args.method_b, args.threshold_method, args.k, args.families,
                        args.n_resamples, args.seed, args.confidence)
    except ValueError as err:
        print(f"maml-stop compare: {err}", file=sys.stderr)
        return 2
    table.update(results_a=args.results_a, results_b=path_b)
    print(to_markdown(table, args.results_a, path_b), end="")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(table, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
