"""Leave-one-family-out evaluation of the small -> large cascades (issue 28 item 4), run by
``maml-stop evaluate`` when its settings have a ``cascade:`` block (:class:`CascadeConfig`)::

    maml-stop evaluate --config experiments/evaluate.yaml --config experiments/cascade_evaluate.yaml

Per held-out paired family and K, fixed episodes (``split_support_query``, seeded as in the main protocol):
every method is fitted on the K support pairs and scored on the query pairs, with EM and weighted cost
(:class:`~maml_stop.data.pairs.CostModel`) beside the large and the small model alone on the same
questions. The routers' source families are the held-out family's complement: every other family of the
small model's corpus (their label, the small model's final EM, needs no pairing) and, for the large
model's router of ``run_both``, every other family of the large model's corpus. Methods (:data:`KINDS` x
:data:`~maml_stop.decide.policies.routers.LEARNERS`, plus the references)::

    small, large, oracle_router, escalate_probe_<learner>, escalate_start_<learner>, run_both_<learner>

Thresholded methods record, per selector, the query figures of the parameter chosen on support, and the
query figures of every candidate (the EM/cost curve, best threshold in hindsight beside it, never
instead of it). The report is :mod:`maml_stop.evaluate.cascade_report`.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from maml_stop.data.corpus import Trace, TraceCorpus
from maml_stop.data.episodes import split_support_query
from maml_stop.data.pairs import COST_FILE, CostModel, PairedTrace, load_pairs
from maml_stop.decide.policies import cascade as C
from maml_stop.decide.policies.complexity import ComplexityFeatures, QuestionTable, meta_initialise
from maml_stop.decide.policies.cost_aware import ViewScorer
from maml_stop.decide.policies.learned import ProbePolicy
from maml_stop.decide.policies.routers import LEARNERS, QuestionView, RidgeRouter, RouterConfig, free_view
from maml_stop.evaluate.cascade_report import write_cascade_report
from maml_stop.evaluate.protocol import selectors_for
from maml_stop.evaluate.results_file import json_safe
from maml_stop.learn.adapter import InnerLoopAdapter
from maml_stop.learn.pooled import train_predictor
from maml_stop.learn.predictor import PredictorConfig, StoppingPredictor
from maml_stop.probe.question_features import QuestionFeaturizer

log = logging.getLogger(__name__)

__all__ = ["KINDS", "REFERENCES", "CascadeConfig", "cascade_methods", "make_router", "build_cascade", "run_cascade"]

KINDS = ("escalate_probe", "escalate_start", "run_both")
REFERENCES = ("small", "large", "oracle_router")


def cascade_methods(learners: Sequence[str] = LEARNERS) -> list[str]:
    """Every valid method name."""
    return [*REFERENCES, *(f"{k}_{l}" for k in KINDS for l in learners)]


@dataclass
class CascadeConfig:
    """The ``cascade:`` block of ``maml-stop evaluate`` (tuned values: ``experiments/cascade_evaluate.yaml``)."""

    pairs: str  # the large model's corpus, paired with the evaluation's ``corpus`` (the small model's) by question id
    cost: str | None = None  # the benchmark's cost file (default: <pairs>/cascade_cost.json)
    basis: str = "wall"  # the cost ratio used: wall | cpu | flops
    methods: list[str] = field(default_factory=lambda: ["small", "large", "oracle_router", "escalate_probe_scratch"])
    taus: list[float] = field(default_factory=lambda: list(C.DEFAULT_ESCALATE_TAUS))  # escalate_*: 1 - P(right) >= tau
    default_tau: float = 0.5  # the 'fixed' selector's tau
    margins: list[float] = field(default_factory=lambda: list(C.DEFAULT_MARGINS))  # run_both: P_small - P_large >= m
    default_margin: float = 0.0
    router: dict[str, Any] = field(default_factory=dict)  # RouterConfig fields (all but ``learner``)
    # the paired bootstrap: the first method against each of the others (same episodes)
    compare: list[str] = field(default_factory=lambda: ["escalate_probe_meta", "escalate_probe_scratch",
                                                        "escalate_probe_pooled"])
    target_cost: float = 0.7  # the criterion: the large model's EM within delta at <= this share of its cost

    def __post_init__(self) -> None:
        valid = cascade_methods()
        unknown = [m for m in [*self.methods, *self.compare] if m not in valid]
        if unknown:
            raise ValueError(f"unknown cascade methods {unknown}; valid: {', '.join(valid)}")
        if "learner" in self.router:
            raise ValueError("cascade.router sets how routers learn; the learner is the method name's suffix")
        RouterConfig(**self.router)  # a TypeError naming a field RouterConfig does not have

    def cost_model(self) -> CostModel:
        return CostModel.load(self.cost or Path(self.pairs) / COST_FILE, self.basis)


def _fresh(width: int, cfg: RouterConfig) -> StoppingPredictor:
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        return StoppingPredictor.from_config(PredictorConfig(n_features=width, **cfg.predictor))


def make_router(view, cfg: RouterConfig, width: int, sources: Mapping[str, Sequence[Trace]] | None = None):
    """A router on ``view`` (its rows ``width`` wide) learned as ``cfg.learner`` says
    (:mod:`maml_stop.decide.policies.routers`); ``sources`` (family -> traces, never the held-out family) feed
    the ``pooled`` and ``meta`` learners. Returns an object with ``fit(support)``, ``forget(support)``,
    ``prepare(traces)`` and ``scores(trace) -> (P,)``."""
    if cfg.learner == "ridge":
        return RidgeRouter(view, cfg.ridge)
    adapted = dict(crossfit=cfg.crossfit, seed=cfg.seed, name=f"router/{cfg.learner}")
    if cfg.learner == "scratch":
        adapter = InnerLoopAdapter(_fresh(width, cfg), algorithm="maml", inner_lr=cfg.scratch_lr,
                                   inner_steps=cfg.scratch_steps, first_order=True, backend=cfg.backend)
        return ViewScorer(ProbePolicy(adapter=adapter, renormalise=True, **adapted), view)
    if not sources:
        raise ValueError(f"router learner {cfg.learner!r} learns from source families: none were given")
    viewed = {f: [view(t) for t in ts] for f, ts in sources.items() if ts}
    if cfg.learner == "pooled":
        pooled = train_predictor([t for ts in viewed.values() for t in ts],
                                 PredictorConfig(n_features=width, **cfg.predictor), cfg.pooled_steps, cfg.pooled_lr,
                                 seed=cfg.seed, backend=cfg.backend)
        return ViewScorer(ProbePolicy(predictor=pooled, name="router/pooled"), view)
    adapter = InnerLoopAdapter(_fresh(width, cfg), algorithm="maml", inner_lr=cfg.inner_lr,
                               inner_steps=cfg.inner_steps, first_order=True, backend=cfg.backend)
    meta_initialise(adapter, viewed, steps=cfg.meta_steps, lr=cfg.meta_lr, k=cfg.meta_k, seed=cfg.seed)
    return ViewScorer(ProbePolicy(adapter=adapter, **adapted), view)


class _Fold:
    """What one held-out family's routers learn from: every other family of each model's corpus (their label,
    the model's own final EM, needs no pairing; the large corpus's pilot families count)."""

    def __init__(self, family: str, small: TraceCorpus, large: TraceCorpus, questions: QuestionTable) -> None:
        self.family = family
        self.small_sources = {f: small.traces(f) for f in small.families if f != family}
        self.large_sources = {f: large.traces(f) for f in large.families if f != family}
        self.feature_names = small.feature_names
        self.questions = questions


def build_cascade(name: str, cfg: CascadeConfig, fold: _Fold, price: CostModel) -> C.CascadePolicy:
    """The policy of method ``name`` for one held-out family."""
    refs = {"small": C.SmallOnly, "large": C.LargeOnly, "oracle_router": C.OracleRouter}
    if name in refs:
        return refs[name]()
    kind, learner = next((k, name[len(k) + 1:]) for k in KINDS if name.startswith(k + "_"))
    rc = RouterConfig(learner=learner, **cfg.router)
    if kind == "escalate_probe":
        view = free_view(fold.feature_names)
        router = make_router(view, rc, len(view.columns), fold.small_sources)
        return C.EscalateAtProbe(router, price, cfg.taus, cfg.default_tau, name=name)
    if kind == "escalate_start":
        view = QuestionView(ComplexityFeatures(QuestionFeaturizer(fold.feature_names), fold.questions))
        router = make_router(view, rc, view.width, fold.small_sources)
        return C.EscalateAtStart(router, price, cfg.taus, cfg.default_tau, name=name)
    view = free_view(fold.feature_names)
    small_router = make_router(view, rc, len(view.columns), fold.small_sources)
    large_router = make_router(view, rc, len(view.columns), fold.large_sources)
    return C.RunBoth(small_router, large_router, price, cfg.margins, cfg.default_margin, name=name)


def _figures(outs: Sequence[C.CascadeOutcome], large: Sequence[C.CascadeOutcome], price: CostModel) -> dict[str, float]:
    em = float(np.mean([o.em for o in outs]))
    large_em = float(np.mean([o.em for o in large]))
    cost = float(np.sum([o.cost(price) for o in outs]))
    large_cost = float(np.sum([o.cost(price) for o in large]))
    return {"em": em, "em_vs_large": em - large_em, "cost_share": cost / large_cost,
            "escalated": float(np.mean([o.escalated for o in outs]))}


def evaluate_cascade_family(ecfg, cfg: CascadeConfig, fold: _Fold, pairs: list[PairedTrace], price: CostModel,
                            family_index: int) -> dict[str, Any]:
    """Per K and method: per-episode figures (per selector for the thresholded ones) and the query curve."""
    selectors = selectors_for(ecfg)  # the main protocol's, from the shared registry
    policies = {m: build_cascade(m, cfg, fold, price) for m in cfg.methods}
    out: dict[str, Any] = {}
    for k in ecfg.k:
        cell: dict[str, Any] = {m: {} for m in cfg.methods}
        for e in range(ecfg.episodes):
            rng = np.random.default_rng([ecfg.seed, family_index, k, e])
            support, query = split_support_query(pairs, k, ecfg.query, rng, fold.family)
            large = [C.large_outcome(p) for p in query]
            for m, policy in policies.items():
                policy.fit(support)
                if not isinstance(policy, C.ThresholdedCascade):
                    _append(cell[m].setdefault("episodes", {}), _figures([policy.outcome(p) for p in query], large, price))
                    continue
                for s, selector in selectors.items():
                    param = policy.choose(selector)
                    figs = _figures([policy.outcome_at(p, param) for p in query], large, price)
                    figs["param"] = float("nan") if param is None else float(param)
                    _append(cell[m].setdefault("selectors", {}).setdefault(s, {}), figs)
                curve = cell[m].setdefault("curve", {"candidates": list(policy.candidates)})
                every = [policy.outcomes(p) for p in query]  # (Q, J)
                for j, c in enumerate(policy.candidates):
                    _append(curve.setdefault(str(c), {}), _figures([row[j] for row in every], large, price))
        out[str(k)] = cell
        log.info("%s K=%d: %d episodes of %d methods", fold.family, k, ecfg.episodes, len(cfg.methods))
    return out


def _append(into: dict[str, list], figs: Mapping[str, float]) -> None:
    for key, value in figs.items():
        into.setdefault(key, []).append(value)


def run_cascade(ecfg) -> dict[str, Any]:
    """The cascade evaluation of ``ecfg`` (an :class:`~maml_stop.evaluate.config.EvaluateConfig` with a
    ``cascade`` block); writes ``results.json`` and ``results.md`` under ``ecfg.out``."""
    start = time.time()
    cfg = CascadeConfig(**ecfg.cascade)
    price = cfg.cost_model()
    pairs = load_pairs(ecfg.corpus, cfg.pairs, ecfg.families, ecfg.min_probes)
    small = TraceCorpus.load(ecfg.corpus, min_probes=ecfg.min_probes)
    large = TraceCorpus.load(cfg.pairs, min_probes=ecfg.min_probes)
    if large.feature_names != small.feature_names:
        raise ValueError(f"the two corpora probe different features: {cfg.pairs} {large.feature_names} against "
                         f"{ecfg.corpus} {small.feature_names}")
    questions = QuestionTable.load(ecfg.corpus)
    families: dict[str, Any] = {}
    for i, family in enumerate(sorted(pairs)):
        fold = _Fold(family, small, large, questions)
        families[family] = evaluate_cascade_family(ecfg, cfg, fold, pairs[family], price, i)
    results = {
        "settings": {"corpus": ecfg.corpus, "k": list(ecfg.k), "episodes": ecfg.episodes, "seed": ecfg.seed,
                     "query": ecfg.query, "delta": ecfg.delta, "threshold_methods": list(ecfg.threshold_methods),
                     "cascade": asdict(cfg)},
        "cost_model": asdict(price),
        "pairs": {f: len(ps) for f, ps in pairs.items()},
        # the routers' sources: every family of each corpus but the held-out one (a growing harvest changes them)
        "corpus_traces": {"small": {f: len(small.traces(f)) for f in small.families},
                          "large": {f: len(large.traces(f)) for f in large.families}},
        "families": families,
        "seconds": round(time.time() - start, 1),
    }
    out = Path(ecfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(json_safe(results), indent=1))
    write_cascade_report(results, out)
    return results
