"""The method registry of ``maml-stop evaluate``: method name -> how to build its stopping policy.

Every method of ``DESIGN.md`` "Protocol" is one entry of :data:`BUILDERS`, a function of a
:class:`MethodContext` (the settings, and what one held-out family gives: the meta-trained adapter, the
pooled probe, the predictor shape, the inner loss). :func:`build_policies` builds the requested ones in
the order asked. The candidate grids come from the settings (``experiments/evaluate.yaml``).

>>> from maml_stop.evaluate.config import EvaluateConfig                          # doctest: +SKIP
>>> build_policies(EvaluateConfig(corpus="c"), ["full", "oracle"], None, None, {"n_features": 8})
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import Any, Callable, Sequence

import torch

from maml_stop.data import store

from maml_stop.decide.policies import (
    AnswerConfidence,
    AnswerConsistency,
    EqualEMOracle,
    FirstProbe,
    FullGeneration,
    OraclePolicy,
    ProbePolicy,
    StoppingPolicy,
    TokenBudget,
)
from maml_stop.decide.policies import complexity as CX
from maml_stop.decide.policies.cost_aware import (
    FeatureView,
    GatedProbe,
    GiveUp,
    SparseSchedule,
    ViewProbe,
    free_features,
)
from maml_stop.decide.policies.ensemble import Ensemble
from maml_stop.decide.policies.hybrid import Both, Capped, Either, Floored
from maml_stop.decide.policies.rl import RLPolicy, RLProbePolicy
from maml_stop.decide.registry import make_selector
from maml_stop.decide.thresholds import FixedThreshold
from maml_stop.evaluate.config import DEFAULT_METHODS, BASELINE_DTYPES, EvaluateConfig
from maml_stop.evaluate.folds import load_checkpoint
from maml_stop.learn.adapter import InnerLoopAdapter
from maml_stop.learn.module import CheckpointError
from maml_stop.learn.predictor import PredictorConfig, StoppingPredictor, fresh_copy
from maml_stop.probe.question_features import QuestionFeaturizer

__all__ = ["METHODS", "DEFAULT_METHODS", "COST_AWARE_METHODS", "HYBRID_METHODS", "ENSEMBLE_METHODS", "COMPLEXITY_METHODS",
           "RL_METHODS", "NEEDS_CHECKPOINT", "PROBE_METHODS", "BUILDERS", "MethodContext", "build_policies", "check_methods"]

PROBE_METHODS = ("pooled", "finetuned", "scratch", "maml")  # the learned probes (their calibration is reported)
NEEDS_CHECKPOINT = ("maml",)  # methods that need a meta-trained adapter


@dataclass
class MethodContext:
    """What a method's policy is built from (one held-out family)."""

    cfg: EvaluateConfig
    adapter: Any | None  # meta-trained InnerLoopAdapter (None without a checkpoint)
    pooled: torch.nn.Module | None  # probe trained on the pooled source families
    predictor_config: PredictorConfig  # the architecture of a probe from scratch
    inner_loss: str = "balanced"  # the adapter's inner loss, used by every adapted probe
    maml_steps: int | None = None  # inner steps of the meta-trained adapter at evaluation
    rl_checkpoint: str | None = None  # the held-out family's RL checkpoint (methods rl, rl_unadapted)
    _feature_names: list[str] | None = field(default=None, repr=False)

    @property
    def feature_names(self) -> list[str]:
        """The columns of the traces the policies see (the fold's subset, else the corpus's ``meta.json``
        names), which the cost-aware methods select from."""
        if self._feature_names is None:
            self._feature_names = list(store.read_meta(self.cfg.corpus)["feature_names"])
        return self._feature_names

    @property
    def probe(self) -> dict[str, Any]:  # the threshold grid every learned probe shares
        return dict(taus=self.cfg.taus, tau=self.cfg.tau)

    @property
    def adapted(self) -> dict[str, Any]:  # how an adapted probe scores its support set
        return dict(crossfit=self.cfg.crossfit, seed=self.cfg.seed)


def _finetuned(c: MethodContext) -> StoppingPolicy:
    # adapted in baseline_dtype (float64: the same weights on another CPU's BLAS, issue 29 item 12), batched or not
    start = fresh_copy(c.pooled).to(BASELINE_DTYPES[c.cfg.baseline_dtype])
    tuner = InnerLoopAdapter(start, algorithm="maml", inner_lr=c.cfg.finetune_lr,
                             inner_steps=c.cfg.finetune_steps, first_order=True, loss=c.inner_loss,
                             backend=c.cfg.backend)
    return ProbePolicy(adapter=tuner, name="finetuned", **c.probe, **c.adapted)


def _scratch_adapter(c: MethodContext, config: PredictorConfig) -> InnerLoopAdapter:
    """An adapter that trains a seeded fresh predictor of ``config`` on the support set."""
    with torch.random.fork_rng():
        torch.manual_seed(c.cfg.seed)
        fresh = StoppingPredictor.from_config(config).to(BASELINE_DTYPES[c.cfg.baseline_dtype])  # float32 init, cast
    return InnerLoopAdapter(fresh, algorithm="maml", inner_lr=c.cfg.scratch_lr,
                            inner_steps=c.cfg.scratch_steps, first_order=True, loss=c.inner_loss,
                            backend=c.cfg.backend)


def _scratch(c: MethodContext) -> StoppingPolicy:
    trainer = _scratch_adapter(c, c.predictor_config)
    return ProbePolicy(adapter=trainer, renormalise=True, name="scratch", **c.probe, **c.adapted)


def _maml(c: MethodContext) -> StoppingPolicy:
    if c.adapter is None:
        raise ValueError("method 'maml' needs a checkpoint (--checkpoint, --checkpoints or --train_config)")
    return ProbePolicy(adapter=c.adapter, adapt_steps=c.maml_steps, name="maml", **c.probe, **c.adapted)


# -- the cost-aware methods (maml_stop.decide.policies.cost_aware): each learned part is a probe of
# ``cfg.cost_aware_learner`` ("scratch": trained on the K support traces; "maml": the meta-trained
# adapter, which reads every feature, the unread ones set to its source means) on a feature view.


def _cost_probe(c: MethodContext, names: list[str], name: str, target: str = "probe") -> tuple[ProbePolicy, FeatureView]:
    """A learned probe reading the features ``names`` (labels: ``target``) and the view it reads."""
    learner = c.cfg.cost_aware_learner
    if learner == "maml":
        if c.adapter is None:
            raise ValueError(f"method {name!r} with cost_aware_learner='maml' needs a checkpoint (--checkpoint, "
                             "--checkpoints or --train_config), or cost_aware_learner='scratch'")
        predictor = c.adapter.predictor
        view = FeatureView.of(c.feature_names, names, predictor.n_features,
                              predictor.feature_mean.detach().cpu().numpy(), target)
        return ProbePolicy(adapter=c.adapter, adapt_steps=c.maml_steps, name=name, **c.probe, **c.adapted), view
    if learner != "scratch":
        raise ValueError(f"unknown cost_aware_learner {learner!r}; valid: scratch, maml")
    trainer = _scratch_adapter(c, replace(c.predictor_config, n_features=len(names)))
    probe = ProbePolicy(adapter=trainer, renormalise=True, name=name, **c.probe, **c.adapted)
    return probe, FeatureView.of(c.feature_names, names, None, target=target)


def _free_probe(c: MethodContext) -> StoppingPolicy:
    probe, view = _cost_probe(c, free_features(c.feature_names), "free_probe")
    return ViewProbe(probe, view, pays="stop", feature_names=c.feature_names, name="free_probe")


def _gated_probe(c: MethodContext) -> StoppingPolicy:
    gate, gate_view = _cost_probe(c, free_features(c.feature_names), "gated_probe/gate")
    stop, stop_view = _cost_probe(c, c.feature_names, "gated_probe")
    return GatedProbe(gate, gate_view, stop, stop_view, c.feature_names, c.cfg.gate_threshold, name="gated_probe")


def _sparse(c: MethodContext) -> StoppingPolicy:
    inner = c.cfg.sparse_inner
    if inner not in BUILDERS or inner in ("sparse", "full", "first_probe", "oracle", "oracle_equal_em"):
        raise ValueError(f"sparse_inner must name a thresholded probing method; got {inner!r} "
                         "(e.g. consistency, confidence, pooled, finetuned, scratch, maml, free_probe, gated_probe)")
    return SparseSchedule(BUILDERS[inner](c), c.cfg.sparse_every, c.feature_names, name="sparse")


def _give_up(c: MethodContext, stop: ViewProbe, name: str) -> StoppingPolicy:
    right, right_view = _cost_probe(c, free_features(c.feature_names), f"{name}/right", target="final")
    return GiveUp(stop, right, right_view, below=c.cfg.give_up_below, name=name)


def _free_give_up(c: MethodContext) -> StoppingPolicy:
    return _give_up(c, _free_probe(c), "free_give_up")


def _probe_give_up(c: MethodContext) -> StoppingPolicy:
    probe, view = _cost_probe(c, c.feature_names, "probe_give_up/stop")
    return _give_up(c, ViewProbe(probe, view, pays="every", name="probe_give_up/stop"), "probe_give_up")


# -- the hybrid methods (maml_stop.decide.policies.hybrid): the threshold selectors choose the first
# part's parameter on the combination's support sweep; the cap, the floor and the second part's level are
# fixed from the settings.


def _hybrid_inner(c: MethodContext, name: str) -> StoppingPolicy:
    inner = c.cfg.hybrid_inner
    if inner not in BUILDERS or inner in ("full", "first_probe", "oracle", "oracle_equal_em", *HYBRID_METHODS):
        raise ValueError(f"hybrid_inner must name a thresholded probing method; got {inner!r} "
                         "(e.g. budget, consistency, confidence, pooled, finetuned, scratch, maml, free_probe)")
    if inner in NEEDS_CHECKPOINT and c.adapter is None:
        raise ValueError(f"method {name!r} with hybrid_inner={inner!r} needs a checkpoint (--checkpoint, "
                         "--checkpoints or --train_config), or another hybrid_inner (e.g. scratch)")
    return BUILDERS[inner](c)


def _consistency_confidence(c: MethodContext) -> tuple[AnswerConsistency, AnswerConfidence]:
    return (AnswerConsistency(windows=c.cfg.consistency_windows),
            AnswerConfidence(selector=FixedThreshold(c.cfg.hybrid_confidence_level), levels=c.cfg.confidence_levels))


def _either_consistency_confidence(c: MethodContext) -> StoppingPolicy:
    return Either(*_consistency_confidence(c), name="either_consistency_confidence")


def _both_consistency_confidence(c: MethodContext) -> StoppingPolicy:
    return Both(*_consistency_confidence(c), name="both_consistency_confidence")


# -- the ensembles (maml_stop.decide.policies.ensemble): a learned probe (``cfg.ensemble_learner``),
# answer consistency and answer confidence, weights fitted on support; the selectors choose the
# average's tau or the vote's required weight share on the ensemble's support sweep.


def _ensemble(c: MethodContext, combine: str) -> StoppingPolicy:
    name, learner = f"ensemble_{combine}", c.cfg.ensemble_learner
    if learner not in ("maml", "scratch"):
        raise ValueError(f"unknown ensemble_learner {learner!r}; valid: maml, scratch")
    if learner == "maml" and c.adapter is None:
        raise ValueError(f"method {name!r} with ensemble_learner='maml' needs a checkpoint (--checkpoint, "
                         "--checkpoints or --train_config), or ensemble_learner='scratch'")
    parts = [BUILDERS[learner](c), AnswerConsistency(windows=c.cfg.consistency_windows),
             AnswerConfidence(levels=c.cfg.confidence_levels)]
    for part in parts:  # each part's own threshold (what the vote counts), chosen on support
        part.selector = make_selector(c.cfg.ensemble_part_selector, delta=c.cfg.delta, alpha=c.cfg.ltt_alpha,
                                      value=None, token_price=c.cfg.token_price,
                                      wrong_answer_cost=c.cfg.wrong_answer_cost)
    return Ensemble(parts, combine=combine, taus=c.cfg.taus, tau=c.cfg.tau,
                    shares=c.cfg.ensemble_shares, default_share=c.cfg.ensemble_default_share,
                    window=c.cfg.ensemble_window, name=name)


# name -> builder, in the order of the report's tables (the cost-aware methods last, so that tables
# without them keep their order)
BUILDERS: dict[str, Callable[[MethodContext], StoppingPolicy]] = {
    "full": lambda c: FullGeneration(),
    "first_probe": lambda c: FirstProbe(),
    "budget": lambda c: TokenBudget(quantiles=c.cfg.budget_quantiles),
    "consistency": lambda c: AnswerConsistency(windows=c.cfg.consistency_windows),
    "confidence": lambda c: AnswerConfidence(levels=c.cfg.confidence_levels),
    "pooled": lambda c: ProbePolicy(predictor=c.pooled, name="pooled", **c.probe),
    "finetuned": _finetuned,
    "scratch": _scratch,
    "maml": _maml,
    "oracle": lambda c: OraclePolicy(),
    "oracle_equal_em": lambda c: EqualEMOracle(),
    "free_probe": _free_probe,
    "gated_probe": _gated_probe,
    "sparse": _sparse,
    "free_give_up": _free_give_up,
    "probe_give_up": _probe_give_up,
    "hybrid_budget": lambda c: Capped(_hybrid_inner(c, "hybrid_budget"), c.cfg.hybrid_max_tokens, name="hybrid_budget"),
    "hybrid_floor": lambda c: Floored(_hybrid_inner(c, "hybrid_floor"), c.cfg.hybrid_min_tokens, name="hybrid_floor"),
    "either_consistency_confidence": _either_consistency_confidence,
    "both_consistency_confidence": _both_consistency_confidence,
    "ensemble_average": lambda c: _ensemble(c, "average"),
    "ensemble_vote": lambda c: _ensemble(c, "vote"),
}
# -- complexity budgets (maml_stop.decide.policies.complexity, issue 13 item 2): a per-question token budget
# predicted from the question text (and a start probe's free features); run only when listed.


def _complexity_features(c: MethodContext) -> CX.ComplexityFeatures:
    start = CX.start_features(store.read_meta(c.cfg.corpus), c.feature_names) if c.cfg.complexity_start_probe else []
    questions = CX.QuestionTable.load(c.cfg.corpus, c.cfg.source_corpus)
    return CX.ComplexityFeatures(QuestionFeaturizer(c.feature_names, start), questions)


def _complexity_budget(c: MethodContext, selector: Any = None, name: str = "complexity_budget") -> StoppingPolicy:
    return CX.ComplexityBudget(_complexity_features(c), selector, scales=c.cfg.complexity_scales,
                            default_scale=c.cfg.complexity_default_scale, alpha=c.cfg.complexity_ridge, name=name,
                            **c.adapted)


def _complexity_sources(c: MethodContext) -> Callable[[str], dict]:
    """Held-out family -> the meta-initialisation's source traces by family: ``source_families``, else the
    checkpoint's training families, else every other family of the source corpus (as the pooled probe's)."""
    def sources(family: str) -> dict:
        corpus = CX.load_corpus(str(c.cfg.source_corpus or c.cfg.corpus), c.cfg.min_probes)
        path = (c.cfg.checkpoints or {}).get(family) or c.cfg.checkpoint
        split = load_checkpoint(path, corpus, c.cfg.allow_other_recipe)[2] if path else {}
        held_out = [family, *([] if c.cfg.checkpoints or c.cfg.train_config else (c.cfg.families or split.get("test") or []))]
        names = c.cfg.source_families or split.get("train") or [g for g in corpus.families if g not in held_out]
        return {g: corpus.traces(g) for g in names if g != family}
    return sources


def _complexity_adapted(c: MethodContext) -> StoppingPolicy:
    view = CX.ComplexityView(_complexity_features(c))
    with torch.random.fork_rng():
        torch.manual_seed(c.cfg.seed)
        fresh = StoppingPredictor.from_config(PredictorConfig(n_features=view.width, **c.cfg.predictor))
    adapter = InnerLoopAdapter(fresh, algorithm="maml", inner_lr=c.cfg.complexity_inner_lr,
                               inner_steps=c.cfg.complexity_inner_steps, first_order=True, loss=c.inner_loss,
                               backend=c.cfg.backend)
    probe = ProbePolicy(adapter=adapter, name="complexity_adapted", **c.probe, **c.adapted)
    meta = dict(steps=c.cfg.complexity_meta_steps, lr=c.cfg.complexity_meta_lr, k=c.cfg.complexity_meta_k,
                seed=c.cfg.seed)
    return CX.ComplexityAdapted(probe, view, _complexity_sources(c), meta, name="complexity_adapted")


def _complexity_capped_maml(c: MethodContext) -> StoppingPolicy:
    if c.adapter is None:
        raise ValueError("method 'complexity_capped_maml' needs a checkpoint (--checkpoint, --checkpoints or "
                         "--train_config): it caps the 'maml' probe")
    scale = c.cfg.complexity_cap_scale  # None: the cap's own scale chosen on support (EM within delta)
    selector = FixedThreshold(scale) if scale is not None else make_selector("em_target", delta=c.cfg.delta)
    cap = _complexity_budget(c, selector, name="complexity_capped_maml/cap")
    return Either(_maml(c), cap, name="complexity_capped_maml")


BUILDERS.update({
    "complexity_budget": _complexity_budget,
    "complexity_adapted": _complexity_adapted,
    "complexity_capped_maml": _complexity_capped_maml,
})
COMPLEXITY_METHODS = ("complexity_budget", "complexity_adapted", "complexity_capped_maml")
COST_AWARE_METHODS = ("free_probe", "gated_probe", "sparse", "free_give_up", "probe_give_up")
HYBRID_METHODS = ("hybrid_budget", "hybrid_floor", "either_consistency_confidence", "both_consistency_confidence")
ENSEMBLE_METHODS = ("ensemble_average", "ensemble_vote")
METHODS: tuple[str, ...] = tuple(BUILDERS)  # every valid method


# -- the RL stopping policy (maml_stop.learn.rl, issue 13 item 5): cfg.rl_checkpoint, read through the same road
# as the maml checkpoint (load_predictor); rl adapts it on support (fit_support) and thresholds it by the
# selectors, rl_unadapted takes its own p >= 0.5 decision. Run only when listed.


def _rl(c: MethodContext, name: str) -> StoppingPolicy:
    path = c.rl_checkpoint or (c.cfg.rl_checkpoint if isinstance(c.cfg.rl_checkpoint, str) else None)
    if not path:
        raise ValueError(f"method {name!r} needs an RL checkpoint (maml-stop fit --config experiments/quickstart.yaml "
                         "--config experiments/rl.yaml): set rl_checkpoint (experiments/rl_evaluate.yaml)")
    # the families its split names, resolved against the families whose shards the source corpus holds
    present = sorted({p.parent.name for p in store.shard_paths(c.cfg.source_corpus or c.cfg.corpus)})
    adapter, meta, split = load_checkpoint(path, SimpleNamespace(feature_names=c.feature_names, families=present))
    names = meta.get("feature_names")
    if (names is not None and list(names) != c.feature_names) or adapter.predictor.n_features != c.predictor_config.n_features:
        raise CheckpointError(f"the RL checkpoint {path} was trained on other features than this evaluation reads:\n"
                              f"  checkpoint ({adapter.predictor.n_features}): {names}\n"
                              f"  corpus     ({len(c.feature_names)}): {c.feature_names}")
    seen = split.get("train", []) + split.get("val", [])
    if name == "rl_unadapted":
        return RLPolicy(adapter.predictor, stop_at=0.5, seen_families=seen, checkpoint=path, name=name)
    steps = (meta.get("hyper_parameters") or {}).get("eval_inner_steps")
    return RLProbePolicy(adapter, seen_families=seen, checkpoint=path, adapt_steps=steps, name=name,
                         **c.probe, **c.adapted)


BUILDERS.update({"rl": lambda c: _rl(c, "rl"), "rl_unadapted": lambda c: _rl(c, "rl_unadapted")})
RL_METHODS = ("rl", "rl_unadapted")
METHODS = (*METHODS, *RL_METHODS)  # valid; run only when listed (not in DEFAULT_METHODS)


def build_policies(
    cfg: EvaluateConfig,
    methods: Sequence[str],
    adapter: Any | None,
    pooled: torch.nn.Module | None,
    predictor_config: PredictorConfig,
    inner_loss: str = "balanced",
    maml_steps: int | None = None,
    rl_checkpoint: str | None = None,
    feature_names: Sequence[str] | None = None,
) -> dict[str, StoppingPolicy]:
    """Every requested method as a policy; learned probes share the selector-free threshold grid.
    ``rl_checkpoint``: the held-out family's RL checkpoint (default: ``cfg.rl_checkpoint`` when it is one path);
    ``feature_names``: the columns of the traces the policies will see (default: the corpus's, from its
    ``meta.json``; a fold that reads a feature subset passes its subset)."""
    context = MethodContext(cfg, adapter, pooled, predictor_config, inner_loss, maml_steps, rl_checkpoint,
                            None if feature_names is None else list(feature_names))
    policies: dict[str, StoppingPolicy] = {}
    for name in methods:
        if name not in BUILDERS:
            raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}")
        policies[name] = BUILDERS[name](context)
    return policies


def check_methods(cfg: EvaluateConfig) -> None:
    """Raise a ``ValueError`` naming the valid methods when the methods asked for cannot be run."""
    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; valid methods: {', '.join(METHODS)}")
    if not (cfg.checkpoint or cfg.checkpoints or cfg.train_config) and any(m in NEEDS_CHECKPOINT for m in cfg.methods):
        raise ValueError(
            "method 'maml' needs a meta-trained checkpoint: pass --checkpoint, --checkpoints or --train_config, "
            f"or leave 'maml' out of --methods (valid methods: {', '.join(METHODS)})"
        )
    rl = [m for m in cfg.methods if m in RL_METHODS]
    if rl and not (cfg.rl_checkpoint or cfg.rl_train_config):
        raise ValueError(f"methods {rl} need an RL checkpoint: set rl_checkpoint (experiments/rl_evaluate.yaml) "
                         "or rl_train_config (experiments/lofo_rl_evaluate.yaml) "
                         f"or leave them out of --methods (valid methods: {', '.join(METHODS)})")
