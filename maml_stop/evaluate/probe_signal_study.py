"""Run the probe-signal pilot (issue 30) from a YAML and write its report.

    python -m maml_stop.evaluate.probe_signal_study --config experiments/probe_signal_pilot.yaml
    python -m maml_stop.evaluate.probe_signal_study --config ... --report_only   # re-render results.json

The math is in :mod:`maml_stop.evaluate.probe_signal`; this module loops over views, probes and held-out
families (leave-one-family-out), and renders ``results.json`` into ``report.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import yaml
from tqdm import tqdm

from maml_stop.data.corpus import TraceCorpus
from maml_stop.data.store import atomic_write_bytes
from maml_stop.decide.policies.baselines import oracle_at_equal_em
from maml_stop.evaluate.probe_signal import (
    TARGETS,
    ProbeFit,
    View,
    discrimination,
    family_rows,
    fit_probe,
    hindsight_savings,
    reducer,
)
from maml_stop.probe.features import SCALAR_FEATURES

log = logging.getLogger(__name__)


@dataclass
class PilotConfig:
    corpus: str
    states: str  # folder written by maml_stop.harvest.replay (kept out of git)
    out: str
    families: list[str]
    layers: list[int]  # the layers the replay stored
    views: list[View] = field(default_factory=list)
    probes: dict[str, ProbeFit] = field(default_factory=dict)  # name -> how it is trained
    delta: float = 0.01
    seed: int = 0

    @classmethod
    def from_yaml(cls, path: str | Path) -> "PilotConfig":
        raw = yaml.safe_load(Path(path).read_text())
        raw["views"] = [View(**v) for v in raw.get("views", [])]
        raw["probes"] = {k: ProbeFit(**v) for k, v in raw.get("probes", {}).items()}
        for v in raw["views"]:
            unknown = sorted(set(v.probes) - set(raw["probes"]))
            if unknown:
                raise ValueError(f"{path}: view {v.name!r} names probes {unknown}; valid: {', '.join(raw['probes'])}")
        unknown = set(raw) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)}; valid: {', '.join(cls.__dataclass_fields__)}")
        return cls(**raw)


def oracle_savings(traces) -> float:
    """Savings of the oracle at equal EM (fewest tokens with exactly the full run's EM)."""
    outcomes = oracle_at_equal_em(traces)
    spent = sum(o.total_tokens for o in outcomes)
    return 1.0 - spent / sum(t.full_cost for t in traces)


def run(cfg: PilotConfig) -> dict:
    t0 = time.time()
    corpus = TraceCorpus.load(cfg.corpus, cfg.families)
    reps = sorted({v.rep for v in cfg.views if not v.stored})
    rows = {f: family_rows(cfg.states, f, corpus.traces(f), reps, cfg.layers) for f in cfg.families}
    names = corpus.meta["feature_names"]
    costs = corpus.meta.get("feature_costs", {})
    scalar_cols = [names.index(n) for n in SCALAR_FEATURES if n in names]
    scalar_names = [names[i] for i in scalar_cols]
    results: dict = {"config": {**asdict(cfg)}, "families": {}, "views": {}}
    for f, r in rows.items():
        results["families"][f] = {"traces": len(r.traces), "probe_points": int(len(r.row_trace)),
                                  "final_em": float(np.mean([t.final_em for t in r.traces])),
                                  "probe_em": float(r.labels("correct").mean()),
                                  "oracle_equal_em_savings": oracle_savings(r.traces)}
    labels = {(f, target): r.labels(target) for f, r in rows.items() for target in TARGETS}
    jobs = [(v, p) for v in cfg.views for p in (v.probes or cfg.probes)]
    for view, pname in tqdm(jobs, desc="pilot", unit="fit"):
        fit = cfg.probes[pname]
        paid = view.paid(costs, names if view.stored else scalar_names)
        key = f"{view.name} | {pname}"
        cell: dict = {"view": asdict(view), "probe": pname, "paid": paid, "families": {}}
        raw = {f: rows[f].raw(view, scalar_cols) for f in cfg.families}  # built once per view, not per fold
        for held in cfg.families:
            train = [f for f in cfg.families if f != held]
            x_train = np.concatenate([raw[f] for f in train])
            reduce = reducer(view, x_train, seed=cfg.seed)
            z_train, z_held = reduce(x_train), reduce(raw[held])
            fam: dict = {}
            for target in TARGETS:
                y = np.concatenate([labels[f, target] for f in train])
                score = fit_probe(z_train, y, fit)
                s = score(z_held)
                fam[target] = discrimination(s, labels[held, target])
                if target == "correct":
                    r = rows[held]
                    per_trace = [s[r.row_trace == i][np.argsort(r.row_probe[r.row_trace == i])] for i in range(len(r.traces))]
                    fam["hindsight_savings"] = hindsight_savings(r.traces, per_trace, paid, cfg.delta)
                    fam["hindsight_reasoning_savings"] = hindsight_savings(r.traces, per_trace, paid, cfg.delta,
                                                                           count_probes=False)
            cell["families"][held] = fam
        for target in TARGETS:
            cell[f"{target}_roc_auc"] = float(np.nanmean([c[target]["roc_auc"] for c in cell["families"].values()]))
            cell[f"{target}_ece"] = float(np.mean([c[target]["ece"] for c in cell["families"].values()]))
        for figure in ("hindsight_savings", "hindsight_reasoning_savings"):
            cell[figure] = float(np.mean([c[figure] for c in cell["families"].values()]))
        results["views"][key] = cell
    results["seconds"] = round(time.time() - t0, 1)
    return results


def render(results: dict) -> str:
    fams = list(results["families"])
    lines = ["# Probe-signal pilot (issue 30)", "",
             "Leave-one-family-out over the families below; every figure is on the held-out family. "
             "`correct`: this forced answer is right; `give_up`: the full run will end right. Hindsight: the "
             f"best single threshold chosen on the held-out family itself, mean EM drop <= "
             f"{results['config']['delta'] * 100:g} point (a bound, not a K-shot result). Regenerate: "
             "`python -m maml_stop.evaluate.probe_signal_study --config experiments/probe_signal_pilot.yaml`.", "",
             "| family | traces | probe points | final EM | probe EM | oracle at equal EM saves |",
             "|---|---|---|---|---|---|"]
    for f, d in results["families"].items():
        lines.append(f"| {f} | {d['traces']} | {d['probe_points']} | {d['final_em'] * 100:.1f} | {d['probe_em'] * 100:.1f} "
                     f"| {d['oracle_equal_em_savings'] * 100:.1f}% |")
    lines += ["", "## Per view and probe (means over held-out families)", "",
              "| view | probe | cost | ROC-AUC correct | ECE correct | ROC-AUC give-up | hindsight saved | "
              "same, probe tokens not counted |",
              "|---|---|---|---|---|---|---|---|"]
    best = max(results["views"].values(), key=lambda c: c["correct_roc_auc"]) if results["views"] else None
    for key, c in results["views"].items():
        view = key.split(" | ")[0]
        lines.append(f"| {view} | {c['probe']} | {'paid' if c['paid'] else 'free'} | {c['correct_roc_auc']:.3f} | "
                     f"{c['correct_ece']:.3f} | {c['give_up_roc_auc']:.3f} | {c['hindsight_savings'] * 100:.1f}% | "
                     f"{c['hindsight_reasoning_savings'] * 100:.1f}% |")
    lines += ["", "## Per held-out family: ROC-AUC correct / hindsight saved", "",
              "| view | probe | " + " | ".join(fams) + " |", "|---|---|" + "---|" * len(fams)]
    for key, c in results["views"].items():
        cells = [f"{c['families'][f]['correct']['roc_auc']:.2f} / {c['families'][f]['hindsight_savings'] * 100:.1f}%" for f in fams]
        lines.append(f"| {key.split(' | ')[0]} | {c['probe']} | " + " | ".join(cells) + " |")
    if best is not None:
        lines += ["", f"Highest mean ROC-AUC for `correct`: {View(**best['view']).name} with the {best['probe']} probe, "
                  f"{best['correct_roc_auc']:.3f} (criterion: >= 0.85), hindsight savings {best['hindsight_savings'] * 100:.1f}% "
                  "(criterion: >= 10% on average)."]
    lines += ["", f"Run time: {results['seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> Path:
    """ROC-AUC of ``correct`` (held-out mean) against hindsight savings, one point per view and probe: free
    representations in one colour, paid in another, the issue's two criteria as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for paid, colour, label in ((False, "tab:blue", "free (no forced answer until the stop)"),
                                (True, "tab:red", "paid (a forced answer at every probe)")):
        cells = [c for c in results["views"].values() if c["paid"] == paid]
        ax.scatter([c["correct_roc_auc"] for c in cells], [c["hindsight_savings"] * 100 for c in cells], c=colour,
                   label=label, s=18)
        ax.scatter([c["correct_roc_auc"] for c in cells], [c["hindsight_reasoning_savings"] * 100 for c in cells],
                   facecolors="none", edgecolors=colour, s=18)
    ax.axvline(0.85, color="grey", ls="--", lw=1)
    ax.axhline(10, color="grey", ls=":", lw=1)
    ax.set_xlabel("ROC-AUC, this forced answer is right (held-out families, mean)")
    ax.set_ylabel("% saved, best threshold in hindsight")
    ax.set_title("Filled: probe tokens paid; hollow: probe tokens not counted", fontsize=9)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--report_only", action="store_true", help="re-render report.md from the stored results.json")
    args = ap.parse_args(argv)
    cfg = PilotConfig.from_yaml(args.config)
    out = Path(cfg.out)
    if args.report_only:
        results = json.loads((out / "results.json").read_text())
    else:
        results = run(cfg)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / "results.json", json.dumps(results, indent=1, default=float).encode())
    atomic_write_bytes(out / "report.md", render(results).encode())
    plot(results, out / "roc_auc_vs_savings.png")
    print(out / "report.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
