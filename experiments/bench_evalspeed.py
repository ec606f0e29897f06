"""Episodes per second of the evaluation, the reference path and the fast path side by side (issue 26).

The ``evalspeed`` section of ``experiments/benchmark.py`` (settings: the ``evalspeed:`` block of
``experiments/benchmark.yaml``). On one family of the corpus, at each K, ``episodes`` fixed episodes: every
method alone, then the whole method list together, first with the fast path off (``batched: false``, the
per-trace and per-episode reference code), then on, ``rounds`` times (the medians are reported); wall and
CPU seconds of this process (one thread) and episodes per second. Before the rounds, one call per path (one
episode of full generation) takes the one-off costs (on the fast path, laying the family out: it is kept
for the calls after it) and is reported apart. The two runs of the whole list are compared: decision figures must be equal, and the
probability summaries (Brier, ECE) differ by float order only (the largest relative difference is
reported). The pooled probe is trained once before (its time is reported apart: once per fold).

The projection of a committed report: its evaluate configs parsed as ``maml-stop evaluate`` reads them;
``episodes x len(k) x families x`` the measured seconds per episode of its methods (each method's own
rate at the measured K, summed) plus, per fold, the pooled probe's training when pooled or finetuned is
listed. Meta-training folds (``train_config``) is not included: it is ``maml-stop fit``'s time.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from statistics import median
from typing import Any

log = logging.getLogger(__name__)

MAIN_METHODS = ["full", "first_probe", "budget", "consistency", "confidence", "pooled", "finetuned", "scratch",
                "maml", "oracle", "oracle_equal_em"]


@dataclass
class ReportSettings:
    configs: list[str] = field(default_factory=list)  # `maml-stop evaluate --config` files, read in order
    families: int | None = None  # held-out families, when the configs do not list them (a checkpoint's)


@dataclass
class EvalSpeedSettings:
    family: str | None = "gcd"  # the held-out family timed (None: the corpus's first)
    k: list[int] = field(default_factory=lambda: [16])
    episodes: int = 10  # per K and path
    rounds: int = 1  # every timing repeated, the paths interleaved round by round; the median is reported
    methods: list[str] = field(default_factory=lambda: list(MAIN_METHODS))  # timed alone and together
    configs: list[str] = field(default_factory=lambda: ["experiments/evaluate.yaml"])  # the other settings
    pooled_steps: int | None = None  # None: the configs' (300); the pooled probe is trained once, timed apart
    reports: dict[str, ReportSettings] = field(default_factory=dict)  # name -> what is projected

    def __post_init__(self) -> None:
        self.reports = {k: v if isinstance(v, ReportSettings) else ReportSettings(**(v or {}))
                        for k, v in (self.reports or {}).items()}


def _differences(a: Any, b: Any, path: tuple = ()) -> list[tuple]:
    """(path, a, b) of every leaf where ``a`` and ``b`` (JSON-like) differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [(path, sorted(a), sorted(b))]
        return [d for k in a for d in _differences(a[k], b[k], (*path, k))]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, (*path, i))]
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:  # NaN == NaN here
        return []
    return [] if a == b else [(path, a, b)]


PROBABILITY_FIGURES = {"brier", "ece"}


def _timed(fn) -> tuple[Any, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def measure(s: EvalSpeedSettings, corpus, adapter, described: str) -> dict:
    """Both paths on ``s.family`` of ``corpus`` with the meta-trained ``adapter``; see the module docstring."""
    from maml_stop.evaluate.config import BASELINE_DTYPES
    from maml_stop.data.fastpath import fast_path
    from maml_stop.evaluate.command import parse_config
    from maml_stop.evaluate.methods import build_policies
    from maml_stop.evaluate.protocol import evaluate_family, selectors_for
    from maml_stop.evaluate.results_file import json_safe
    from maml_stop.learn.pooled import train_predictor

    argv = [a for c in s.configs for a in ("--config", c)] + ["--corpus", str(corpus.root or ""), "--progress", "false"]
    cfg = parse_config(argv)
    if s.pooled_steps is not None:
        cfg.pooled_steps = s.pooled_steps
    family = s.family if s.family is not None else corpus.families[0]
    traces = corpus.traces(family)
    sources = [f for f in corpus.families if f != family]
    config, loss = adapter.predictor.config(), getattr(adapter, "loss_kind", "balanced")
    pooled, pooled_wall, pooled_cpu = _timed(lambda: train_predictor(
        [t for f in sources for t in corpus.traces(f)], config, cfg.pooled_steps, cfg.pooled_lr, loss, seed=cfg.seed,
        backend=cfg.backend, dtype=BASELINE_DTYPES[cfg.baseline_dtype]))  # as maml-stop evaluate trains it
    selectors = selectors_for(cfg)
    n = s.episodes * len(s.k)

    def run(methods: list[str], episodes: int = s.episodes) -> tuple[dict, float, float]:
        policies = build_policies(cfg, methods, adapter, pooled, config, loss, feature_names=corpus.feature_names)
        return _timed(lambda: evaluate_family(family, traces, policies, selectors, s.k, episodes, cfg.seed,
                                              cfg.query, cfg.delta, cfg.calibration_bins, progress=False,
                                              batch_max_steps=cfg.batch_max_steps))

    def timing(times: list[tuple[float, float]]) -> dict:  # (wall, cpu) per round -> the medians
        wall, cpu = (float(median(t[i] for t in times)) for i in (0, 1))
        return {"wall_s": wall, "cpu_s": cpu, "episodes_per_s": n / wall, "rounds": len(times)}

    first: dict[str, dict] = {}  # one episode of full generation per path before the rounds: one-off costs
    for path, on in (("reference", False), ("fast", True)):
        with fast_path(on):  # on the fast path: the family's layouts (data/family.py), kept for the calls after it
            _, wall, cpu = run(["full"], episodes=1)
            first[path] = {"wall_s": wall, "cpu_s": cpu}
    times: dict[tuple[str, str], list[tuple[float, float]]] = {}
    results: dict[str, Any] = {}
    for _ in range(max(1, s.rounds)):  # the paths interleaved round by round (load on a shared machine)
        for path, on in (("reference", False), ("fast", True)):
            with fast_path(on):
                for m in s.methods:
                    _, wall, cpu = run([m])
                    times.setdefault((m, path), []).append((wall, cpu))
                    log.info("%s %s: %.3f s per episode", path, m, wall / n)
                res, wall, cpu = run(list(s.methods))
                times.setdefault(("together", path), []).append((wall, cpu))
                results[path] = json.loads(json.dumps(json_safe(res)))
    rows = {m: {path: timing(times[m, path]) for path in ("reference", "fast")} for m in s.methods}
    together = {path: {**timing(times["together", path]), "results": results[path]} for path in ("reference", "fast")}
    diffs = _differences(together["fast"].pop("results"), together["reference"].pop("results"))
    decisions = [d for d in diffs if not PROBABILITY_FIGURES & {str(x) for x in d[0]}]
    prob = [abs(a - b) / max(abs(b), 1e-300) for p, a, b in diffs if p not in decisions and isinstance(a, float)]
    for r in [*rows.values(), together]:
        r["speedup"] = r["reference"]["wall_s"] / r["fast"]["wall_s"]
        r["cpu_speedup"] = r["reference"]["cpu_s"] / r["fast"]["cpu_s"]
    out = {"family": family, "k": list(s.k), "episodes": s.episodes, "episodes_timed": n,
           "traces": len(traces), "predictor": described, "crossfit": cfg.crossfit,
           "pooled_training_s": {"wall": pooled_wall, "cpu": pooled_cpu, "steps": cfg.pooled_steps},
           "first_call_s": first, "rounds": max(1, s.rounds),
           "methods": rows, "together": together,
           "equal": {"decision_differences": len(decisions), "first": [list(map(str, d)) for d in decisions[:3]],
                     "by_method": {m: sum(1 for d in decisions if len(d[0]) > 1 and d[0][1] == m) for m in s.methods},
                     "probability_max_rel_difference": max(prob, default=0.0)}}
    out["projections"] = {name: project(r, out) for name, r in s.reports.items()}
    return out


def project(report: ReportSettings, measured: dict) -> dict:
    """Projected evaluation minutes of a report on both paths (see the module docstring)."""
    from maml_stop.evaluate.command import parse_config

    cfg = parse_config([a for c in report.configs for a in ("--config", c)])
    families = len(cfg.families) if cfg.families else report.families
    missing = [m for m in cfg.methods if m not in measured["methods"]]
    if families is None:
        return {"error": "the configs list no families and the benchmark settings give none"}
    episodes = cfg.episodes * len(cfg.k) * families
    pooled = (measured["pooled_training_s"]["wall"] * families if {"pooled", "finetuned"} & set(cfg.methods) else 0.0)
    n = measured["episodes_timed"]
    out = {"configs": report.configs, "families": families, "k": list(cfg.k), "episodes": cfg.episodes,
           "methods": list(cfg.methods), "not_measured": missing, "pooled_training_min": pooled / 60}
    for path in ("reference", "fast"):
        per_episode = sum(measured["methods"][m][path]["wall_s"] / n for m in cfg.methods if m in measured["methods"])
        out[f"{path}_min"] = (episodes * per_episode + pooled) / 60
    return out


def markdown(r: dict) -> list[str]:
    """The section's tables."""
    lines = ["## Evaluation: reference path against fast path (issue 26)", "",
             f"{r['episodes']} episodes per K in {r['k']} of {r['family']} ({r['traces']} traces), "
             f"cross-fitting {'on' if r['crossfit'] else 'off'}, {r['predictor']}; pooled probe trained once "
             f"({r['pooled_training_s']['steps']} steps: {r['pooled_training_s']['wall']:.1f} s wall, "
             f"{r['pooled_training_s']['cpu']:.1f} s CPU, not in the rates below). One thread."
             + (f" Medians of {r['rounds']} rounds, the two paths interleaved." if r.get("rounds", 1) > 1 else "")
             + (" A first call per path (one episode of full generation; on the fast path it lays the family out, "
                f"kept for every later call) is timed apart: reference {r['first_call_s']['reference']['cpu_s'] * 1e3:.0f} ms, "
                f"fast {r['first_call_s']['fast']['cpu_s'] * 1e3:.0f} ms CPU." if r.get("first_call_s") else ""), "",
             "| method | reference ep/s | fast ep/s | speed-up (wall) | speed-up (CPU) | reference s/ep | fast s/ep |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    n = r["episodes_timed"]
    for name, row in [*r["methods"].items(), ("**all together**", r["together"])]:
        ref, fast = row["reference"], row["fast"]
        lines.append(f"| {name} | {ref['episodes_per_s']:.2f} | {fast['episodes_per_s']:.2f} | {row['speedup']:.1f}x "
                     f"| {row['cpu_speedup']:.1f}x | {ref['wall_s'] / n:.3f} | {fast['wall_s'] / n:.3f} |")
    eq = r["equal"]
    by = ", ".join(f"{m} {c}" for m, c in eq.get("by_method", {}).items() if c)
    lines += ["", f"Results of the two runs of every method together: {eq['decision_differences']} decision figures "
              f"differ (thresholds, EM, tokens, savings, curves){f': {by}' if by else ''}; the probability summaries "
              f"(Brier, ECE) differ by at most {eq['probability_max_rel_difference']:.1e} relative (float order of the "
              "batched inner loop).", ""]
    if r.get("projections"):
        lines += ["Projected evaluation time of committed reports (measured rates at the K above, times episodes, "
                  "K and families; plus the pooled probe per fold; fold meta-training not included):", "",
                  "| report | families x K x episodes | methods | reference min | fast min |", "|---|---|---:|---:|---:|"]
        for name, p in r["projections"].items():
            if "error" in p:
                lines.append(f"| {name} | {p['error']} | | | |")
                continue
            note = f" ({len(p['not_measured'])} not measured: {', '.join(p['not_measured'])})" if p["not_measured"] else ""
            lines.append(f"| {name} | {p['families']} x {len(p['k'])} x {p['episodes']} | {len(p['methods'])}{note} "
                         f"| {p['reference_min']:.1f} | {p['fast_min']:.1f} |")
        lines.append("")
    return lines
