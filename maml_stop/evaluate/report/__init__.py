"""Tables, plots and the written analysis of a ``maml-stop evaluate`` results file.

Everything here is a pure function of the results dictionary that :mod:`maml_stop.evaluate.protocol` writes to
``results.json`` (layout in :func:`maml_stop.evaluate.protocol.evaluate_family`), so a report can be rebuilt
from the JSON alone (into the folder of that ``results.json``)::

    maml-stop evaluate --report_only runs/evaluate/results.json

One job per module: :mod:`.stats` (intervals: Student t over episodes, paired differences,
Clopper-Pearson; the per-K summary), :mod:`.tables` (the Markdown tables and the one rule "within the
EM-drop target"), :mod:`.analysis` (the written analysis), :mod:`.risk` (how often each threshold rule
misses its target) and :mod:`.plots` (evaluation plots, and the corpus and meta-training plots that the
datasheet, the callbacks and the notebooks use). This module assembles them: :func:`write_report`.

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

from pathlib import Path

from maml_stop.evaluate.report.analysis import analysis
from maml_stop.evaluate.report.plots import (
    plot_calibration,
    plot_curves,
    plot_probe_accuracy,
    plot_savings_vs_k,
    plot_training_curves,
    probe_accuracy_by_position,
)
from maml_stop.evaluate.report.risk import risk_tables, selector_target, violation_rates
from maml_stop.evaluate.report.stats import (
    HEADLINE,
    clopper_pearson_upper,
    fmt_ci,
    mean_ci,
    summarise,
    t_quantile_975,
)
from maml_stop.evaluate.report.tables import backoff_table, markdown_tables, versus_best_table, within_target

__all__ = [
    "mean_ci",
    "t_quantile_975",
    "summarise",
    "markdown_tables",
    "versus_best_table",
    "within_target",
    "analysis",
    "risk_tables",
    "violation_rates",
    "selector_target",
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
        f"K in {results['k']}; {results['episodes']} fixed episodes per family and K (every method on the "
        f"same episodes). Savings are against full generation of the same query traces; total tokens include "
        "every probe a policy ran. Adapted probes choose their threshold on "
        + ("cross-fitted support scores (each half of the support scored by the probe adapted on the other half)."
           if results.get("config", {}).get("crossfit") else "the support traces they were adapted on (in-sample)."),
        "",
        markdown_tables(results),
        *[versus_best_table(results, k) for k in results["k"]],
        analysis(results),
        *([risk] if (risk := risk_tables(results)) else []),
        *([table] if (table := backoff_table(results)) else []),
    ]
    paths["table"] = out / "results.md"
    paths["table"].write_text("\n".join(text))
    for k in results["k"]:
        paths[f"curves_k{k}"] = plot_curves(results, out / f"curves_k{k}.png", k)
    paths["savings_vs_k"] = plot_savings_vs_k(results, out / "savings_vs_k.png")
    paths["calibration"] = plot_calibration(results, out / "calibration.png")
    return paths
