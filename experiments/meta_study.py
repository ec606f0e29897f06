"""The meta-learning study of issue 11: its summary across counts, the paired bootstrap, the criterion, report.md.

The study itself is ``maml-stop evaluate`` with grouped folds (:mod:`maml_stop.evaluate.grouped`: grouped
leave-families-out folds, the number of meta-training families as an axis, one checkpoint per algorithm and
its zero-step checkpoint, every method on the same episodes, fits reused by content hash); its YAML is an
evaluate YAML, ``experiments/meta_study.yaml``. This script runs it and adds what only the study reports:

* per count, K and method the mean over held-out families of savings, EM drop, share within the target and
  adapted query loss; the paired bootstrap (:func:`maml_stop.evaluate.compare.compare`) of each algorithm
  against each baseline of :data:`BASELINES` at each K (95% interval, stratified by family);
* ``report.md``, ``results.json``, ``savings_vs_families.png`` and ``query_loss_vs_families.png`` (against the
  number of meta-training families, one panel per K), beside the protocol's ``n_<count>/`` reports;
* the criterion of issue 11: at some count and K <= 16, a variant within the EM-drop target on every held-out
  family that saves at least 3 points more than both the zero-step baseline and the pooled probe, each 95%
  interval excluding 0 (or a plain "no"); and the same with the mean EM drop over held-out families instead.

    python experiments/meta_study.py --config experiments/evaluate.yaml --config experiments/meta_study.yaml
    python experiments/meta_study.py --config experiments/evaluate.yaml --config experiments/meta_study.yaml \
        --config experiments/meta_study_quick.yaml --n_resamples 199          # a smoke run on the v1 corpus
    python experiments/meta_study.py --report_only runs/meta_study/results.json     # rebuild report.md + plots
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

from maml_stop.evaluate.command import parse_config
from maml_stop.evaluate.compare import compare
from maml_stop.evaluate.config import EvaluateConfig
from maml_stop.evaluate.grouped import run_grouped
from maml_stop.evaluate.report import summarise
from maml_stop.evaluate.report.tables import within_target
from maml_stop.evaluate.results_file import migrate_config, read_results

log = logging.getLogger("meta_study")

CRITERION_POINTS = 3.0  # issue 11 "Done when": savings over zero-step and pooled, K <= 16, within the target
CRITERION_MAX_K = 16
BASELINES = ("pooled", "finetuned", "scratch", "zero_step")  # each compared with each algorithm at each K


def study_config(cfg: EvaluateConfig, n_resamples: int) -> dict[str, Any]:
    """The study's settings as its report names them (the run's own: ``evaluate`` in results.json)."""
    return {"corpus": cfg.corpus, "out": cfg.out, "folds": cfg.folds.n, "val_families": cfg.folds.val_families,
            "seed": cfg.folds.seed, "counts": list(cfg.folds.counts), "families_file": cfg.folds.families_file,
            "fit_configs": cfg.train_configs, "algorithms": dict(cfg.algorithms or {"maml": {}}),
            "baselines": list(BASELINES), "n_resamples": n_resamples}


def _nan_mean(values) -> float:
    a = np.asarray([np.nan if v is None else v for v in values], dtype=np.float64)
    return float(np.nanmean(a)) if np.isfinite(a).any() else float("nan")


def summarise_study(config: dict[str, Any], evaluate: dict[str, Any], grouped: dict[str, Any]) -> dict[str, Any]:
    """The figures of report.md from :func:`maml_stop.evaluate.grouped.run_grouped`'s output: per count, K
    and method the mean over held-out families of savings, EM drop and share of episodes within the target
    (support-chosen threshold, the headline rule), the adapted query loss, and the paired bootstrap rows
    (variant - baseline, ``mean`` over families)."""
    headline = evaluate["threshold_methods"][0]
    variants = list(config["algorithms"])
    curve: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    paired: list[dict[str, Any]] = []
    for key in grouped["counts"]:
        results = grouped["per_count"][key]
        s = summarise(results, headline)
        curve[key] = {}
        for k in results["k"]:
            curve[key][str(k)] = {}
            for m in results["methods"]:
                row = s[str(k)][m]["mean"]
                loss = [_nan_mean(results["query_loss"][f][m][str(k)]) for f in results["families"]
                        if m in results["query_loss"][f]]
                curve[key][str(k)][m] = {
                    "savings": 100 * row["savings"][0], "savings_ci": 100 * row["savings"][1],
                    "em_drop": 100 * row["em_drop"][0], "within_delta": 100 * row["within_delta"][0],
                    "query_loss": float(np.mean(loss)) if loss else None,
                    # the report's one rule: within the EM-drop target on every held-out family
                    "within_target": within_target(s[str(k)], m, "mean", results["families"], results["delta"]),
                }
        for v in variants:
            for b in config["baselines"]:
                other = f"zero_step_{v}" if b == "zero_step" else b
                if other not in results["methods"]:
                    continue
                table = compare(results, results, v, other, headline, results["k"], None, config["n_resamples"],
                                config["seed"])
                rows = table["rows"]
                mean = [r for r in rows if r["family"] == "mean"] or rows  # one family: its own row
                for r in mean:
                    paired.append({"count": key, "variant": v, "baseline": b, "method_b": other, **r})
    first = grouped["per_count"][grouped["counts"][0]]
    return {
        "config": config, "evaluate": evaluate, "threshold": headline, "folds": grouped["folds"],
        "counts": list(grouped["counts"]), "n_train": grouped["n_train"], "k": list(evaluate["k"]),
        "methods": first["methods"], "variants": variants, "curve": curve, "paired": paired,
        "seconds": grouped["seconds"],
    }


def write_study(study: dict[str, Any], out: Path) -> None:
    """results.json, the plots and report.md of ``study`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(study, indent=1, default=_jsonable))
    plot_study(study, out)
    (out / "report.md").write_text(report_markdown(study))


def _jsonable(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    raise TypeError(f"not JSON: {type(x)}")


def _x(study, key) -> float:
    return float(np.mean(study["n_train"][key]))


def plot_study(study: dict[str, Any], out: Path) -> None:
    """savings_vs_families.png (a row of savings and, below it, a row of mean EM drop with the target, so
    that savings bought with accuracy show) and query_loss_vs_families.png: one panel per K, a line per
    method, against the number of meta-training families."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks, counts = study["k"], study["counts"]
    xs = [_x(study, c) for c in counts]
    shown = [m for m in study["methods"] if m not in ("full", "oracle", "oracle_equal_em")]
    target = 100 * study["evaluate"]["delta"]
    for rows, name in (([("savings", "% tokens saved\n(support-chosen threshold)"), ("em_drop", "EM drop (points)")],
                        "savings_vs_families.png"),
                       ([("query_loss", "adapted query loss")], "query_loss_vs_families.png")):
        fig, axes = plt.subplots(len(rows), len(ks), figsize=(4.2 * len(ks), 3.4 * len(rows)),
                                 squeeze=False, sharex=True)
        for r, (figure, ylabel) in enumerate(rows):
            for ax, k in zip(axes[r], ks):
                for m in shown:
                    ys = [study["curve"][c][str(k)][m][figure] for c in counts]
                    if all(y is None for y in ys):
                        continue
                    style = "-o" if m in study["variants"] else ("--x" if m.startswith("zero_step") else ":s")
                    ax.plot(xs, [np.nan if y is None else y for y in ys], style, label=m, markersize=4)
                if figure == "em_drop":
                    ax.axhline(target, color="k", lw=0.8, ls="--")
                ax.set_title(f"K = {k}" if r == 0 else "")
                ax.grid(alpha=0.3)
            axes[r][0].set_ylabel(ylabel)
        for ax in axes[-1]:
            ax.set_xlabel("meta-training families")
        axes[0][-1].legend(fontsize=7, loc="best")
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)


def criterion(study: dict[str, Any]) -> list[dict[str, Any]]:
    """The criterion of issue 11, one row per count, K <= ``CRITERION_MAX_K`` and variant: ``met`` when the
    variant is within the EM-drop target on every held-out family and its savings exceed both the zero-step
    baseline's and the pooled probe's by at least ``CRITERION_POINTS``, each 95% interval excluding 0
    (``low > 0``); ``met_on_mean``: the same with the mean EM drop over held-out families within the target
    instead of every family's (with dozens of held-out families the strict rule alone would say little about
    meta-learning). Rows lacking either comparison are left out."""
    rows = {(r["count"], r["k"], r["variant"], r["baseline"]): r for r in study["paired"] if r["figure"] == "savings"}
    out = []
    for c in study["counts"]:
        for k in (k for k in study["k"] if k <= CRITERION_MAX_K):
            for v in study["variants"]:
                z, p = rows.get((c, k, v, "zero_step")), rows.get((c, k, v, "pooled"))
                if z is None or p is None:
                    continue
                row = study["curve"][c][str(k)][v]
                inside = bool(row["within_target"])
                on_mean = bool(row["em_drop"] <= 100 * study["evaluate"]["delta"])
                beats = all(r["difference"] >= CRITERION_POINTS and r["low"] > 0 for r in (z, p))
                out.append({"count": c, "k": k, "variant": v, "within_target": inside, "mean_within": on_mean,
                            "zero_step": z, "pooled": p, "met": inside and beats, "met_on_mean": on_mean and beats})
    return out


def _yes(flag: bool, bold: bool = False) -> str:
    return ("**yes**" if bold else "yes") if flag else "no"


def report_markdown(study: dict[str, Any]) -> str:
    cfg, ks, counts = study["config"], study["k"], study["counts"]
    lines = [
        "# Meta-learning study: savings against the number of meta-training families", "",
        f"Corpus `{cfg['corpus']}`; {len(study['folds'])} grouped folds (seed {cfg['seed']}; variants of one "
        f"generator held out together), {cfg['val_families']} validation family per fold (whole groups); "
        f"meta-training families per fold: {', '.join(counts)} (nested subsets); fit configs "
        f"{' + '.join(cfg['fit_configs'])} + the study's fragments; K in {ks}; {study['evaluate']['episodes']} fixed "
        f"episodes per held-out family and K, every method on the same episodes; threshold `{study['threshold']}` "
        f"chosen on support (EM drop <= {100 * study['evaluate']['delta']:g} point); {study['seconds']} s.", "",
        "Zero-step baselines (`zero_step_<algorithm>`): the algorithm's random initialisation with the meta-training "
        "families' normalisation, no optimiser step, adapted by the same adapter. Pooled, fine-tuned and "
        "from-scratch probes train on the same meta-training families (the K shots for the last two).", "",
        "## Folds", "", "| fold | held out | validation | meta-training order (nested prefixes) |", "|---|---|---|---|",
    ]
    for f in study["folds"]:
        lines.append(f"| {f['index']} | {', '.join(f['test'])} | {', '.join(f['val'])} | {', '.join(f['train'])} |")
    lines += ["", "Meta-training families per count, per fold: " + "; ".join(
        f"{c}: {study['n_train'][c]}" for c in counts), ""]
    for figure, title, fmt in (("savings", "% of tokens saved (EM drop in points), mean over held-out families", None),
                               ("query_loss", "Adapted query loss (pooled: unadapted), mean over held-out families", None)):
        lines += [f"## {title}", "", "| method | families | " + " | ".join(f"K={k}" for k in ks) + " |",
                  "|---|---|" + "---|" * len(ks)]
        for m in study["methods"]:
            for c in counts:
                cells = []
                for k in ks:
                    v = study["curve"][c][str(k)][m]
                    if figure == "savings":
                        cells.append(f"{v['savings']:.1f} ± {v['savings_ci']:.1f} ({v['em_drop']:.1f})")
                    else:
                        cells.append("" if v["query_loss"] is None else f"{v['query_loss']:.3f}")
                if figure == "query_loss" and not any(cells):
                    continue
                lines.append(f"| {m} | {c} ({_x(study, c):g}) | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["![savings](savings_vs_families.png)", "", "![query loss](query_loss_vs_families.png)", "",
              "## Paired bootstrap: variant - baseline, the same episodes",
              "", f"A = the variant, B = the baseline (`zero_step`: the variant's own zero-step checkpoint). Mean over "
              f"held-out families of the per-episode difference A - B, in points; 95% percentile interval, {cfg['n_resamples']} resamples of the episodes within each family (`maml_stop.evaluate.compare`).", "",
              "| families | K | variant | baseline | savings diff [95% CI] | EM-drop diff [95% CI] | savings verdict | EM-drop verdict |",
              "|---|---|---|---|---|---|---|---|"]
    rows = {(r["count"], r["k"], r["variant"], r["baseline"], r["figure"]): r for r in study["paired"]}
    for c in counts:
        for k in ks:
            for v in study["variants"]:
                for b in cfg["baselines"]:
                    s, e = rows.get((c, k, v, b, "savings")), rows.get((c, k, v, b, "em_drop"))
                    if s is None or e is None:
                        continue
                    lines.append(f"| {c} | {k} | {v} | {b} | {s['difference']:+.1f} [{s['low']:+.1f}, {s['high']:+.1f}] | "
                                 f"{e['difference']:+.1f} [{e['low']:+.1f}, {e['high']:+.1f}] | {s['verdict']} | {e['verdict']} |")
    for c in counts:  # the compact comparison the README shows: every baseline side by side, per variant and K
        lines += ["", f"## Paired comparison, {c} meta-training families: savings difference A - B [95% CI] (EM-drop difference)",
                  "", "| variant | K | " + " | ".join(f"- {b}" for b in cfg["baselines"]) + " |",
                  "|---|---|" + "---|" * len(cfg["baselines"])]
        for v in study["variants"]:
            for k in ks:
                cells = []
                for b in cfg["baselines"]:
                    s, e = rows.get((c, k, v, b, "savings")), rows.get((c, k, v, b, "em_drop"))
                    cells.append("" if s is None or e is None else
                                 f"{s['difference']:+.1f} [{s['low']:+.1f}, {s['high']:+.1f}] ({e['difference']:+.1f})")
                lines.append(f"| {v} | {k} | " + " | ".join(cells) + " |")
    lines += ["", "## The criterion of issue 11", "",
              f"A variant meets it at a count and K <= {CRITERION_MAX_K} when it is within the EM-drop target on every held-out family "
              f"and saves at least {CRITERION_POINTS:g} points more than both the zero-step baseline and the pooled probe, "
              "each 95% interval excluding 0 (`met`); `met on mean`: the same with the mean EM drop over the held-out "
              "families within the target instead.", "",
              "| families | K | variant | within target (every family) | mean EM drop within target | - zero_step [95% CI] | "
              "- pooled [95% CI] | met | met on mean |", "|---|---|---|---|---|---|---|---|---|"]
    verdicts = criterion(study)
    for r in verdicts:
        z, p = r["zero_step"], r["pooled"]
        lines.append(f"| {r['count']} | {r['k']} | {r['variant']} | {_yes(r['within_target'])} | {_yes(r['mean_within'])} | "
                     f"{z['difference']:+.1f} [{z['low']:+.1f}, {z['high']:+.1f}] | {p['difference']:+.1f} [{p['low']:+.1f}, "
                     f"{p['high']:+.1f}] | {_yes(r['met'], True)} | {_yes(r['met_on_mean'], True)} |")
    lines += ["", "Met by some variant: " + ("**yes**" if any(r["met"] for r in verdicts) else "**no**") + "; on the mean "
              "EM drop: " + ("**yes**" if any(r["met_on_mean"] for r in verdicts) else "**no**") + "."]
    lines += ["", "Per-count reports of every method and family: " + ", ".join(f"[`n_{c}/results.md`](n_{c}/results.md)" for c in counts)]
    return "\n".join(lines) + "\n"


def rebuild(path: Path) -> dict[str, Any]:
    """Recompute the study's figures, paired bootstrap, report.md and plots from a study ``results.json``
    and the per-count ``n_<count>/results.json`` beside it (no fit, no evaluation). Without the per-count
    files (a committed report keeps only the study's ``results.json``: the per-count ones hold every
    episode, tens of MB) report.md and the plots are rendered from the stored figures as they are."""
    old = _migrate_study(json.loads(path.read_text()))
    if not all((path.parent / f"n_{c}" / "results.json").is_file() for c in old["counts"]):
        log.info("no per-count results.json beside %s: report.md and plots from its stored figures", path)
        plot_study(old, path.parent)
        (path.parent / "report.md").write_text(report_markdown(old))
        return old
    per_count = {c: read_results(path.parent / f"n_{c}" / "results.json") for c in old["counts"]}
    grouped = {"counts": old["counts"], "folds": old["folds"], "n_train": old["n_train"], "per_count": per_count,
               "seconds": old["seconds"]}
    study = summarise_study(old["config"], old["evaluate"], grouped)
    write_study(study, path.parent)
    return study


def _migrate_study(study: dict[str, Any]) -> dict[str, Any]:
    """A study results.json written before issue 31's names (``shots`` for ``k``, ``fixed_tau`` for ``tau``)."""
    if "shots" in study:
        study["k"] = study.pop("shots")
    migrate_config(study.get("evaluate") or {})
    return study


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Every other argument is maml-stop evaluate's (--config files, --corpus, --out, ...).")
    p.add_argument("--report_only", default=None, help="rebuild report.md and the plots from this study results.json")
    p.add_argument("--n_resamples", type=int, default=9999, help="paired bootstrap resamples")
    args, rest = p.parse_known_args(argv)
    if args.report_only:
        rebuild(Path(args.report_only))
        print(f"report: {Path(args.report_only).parent / 'report.md'}")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = parse_config(rest)
    if cfg.folds.kind != "grouped":
        raise SystemExit(f"the meta study runs grouped folds: folds.kind is {cfg.folds.kind!r} (read "
                         "experiments/meta_study.yaml after experiments/evaluate.yaml)")
    grouped = run_grouped(cfg)
    study = summarise_study(study_config(cfg, args.n_resamples), dataclasses.asdict(cfg), grouped)
    out = Path(cfg.out)
    write_study(study, out)
    print(report_markdown(study))
    print(f"report: {out / 'report.md'}; results: {out / 'results.json'} ({study['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
