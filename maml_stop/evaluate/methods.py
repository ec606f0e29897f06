"""The method registry of ``maml-stop evaluate``: method name -> how to build its stopping policy.

Every method of ``DESIGN.md`` "Protocol" is one entry of :data:`BUILDERS`, a function of a
:class:`MethodContext` (the settings, and what one held-out family gives: the meta-trained adapter, the
pooled probe, the predictor shape, the inner loss). :func:`build_policies` builds the requested ones in
the order asked. The candidate grids come from the settings (``experiments/evaluate.yaml``).

>>> from maml_stop.evaluate.config import EvaluateConfig                          # doctest: +SKIP
>>> build_policies(EvaluateConfig(corpus="c"), ["full", "oracle"], None, None, {"n_features": 8})
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from maml_stop.evaluate.policies import (
    AnswerConfidence,
    AnswerConsistency,
    EqualEMOracle,
    FirstProbe,
    FullGeneration,
    OraclePolicy,
    ProbePolicy,
    StoppingPolicy,
    TokenBudget,
    fresh_copy,
)

from maml_stop.evaluate.report.tables import PROBE_METHODS  # the learned probes (calibration is reported): one home

if TYPE_CHECKING:
    from maml_stop.evaluate.config import EvaluateConfig
    from maml_stop.learn.predictor import PredictorConfig

__all__ = ["METHODS", "NEEDS_CHECKPOINT", "PROBE_METHODS", "BUILDERS", "MethodContext", "build_policies"]


@dataclass
class MethodContext:
    """What a method's policy is built from (one held-out family)."""

    cfg: "EvaluateConfig"
    adapter: Any | None  # meta-trained InnerLoopAdapter (None without a checkpoint)
    pooled: torch.nn.Module | None  # probe trained on the pooled source families
    predictor_config: "PredictorConfig"  # the architecture of a probe from scratch
    inner_loss: str = "balanced"  # the adapter's inner loss, used by every adapted probe
    maml_steps: int | None = None  # inner steps of the meta-trained adapter at evaluation

    @property
    def probe(self) -> dict[str, Any]:  # the threshold grid every learned probe shares
        return dict(taus=self.cfg.taus, default_tau=self.cfg.fixed_tau)

    @property
    def adapted(self) -> dict[str, Any]:  # how an adapted probe scores its support set
        return dict(crossfit=self.cfg.crossfit, seed=self.cfg.seed)


def _finetuned(c: MethodContext) -> StoppingPolicy:
    from maml_stop.learn.adapter import InnerLoopAdapter

    tuner = InnerLoopAdapter(fresh_copy(c.pooled), algorithm="maml", inner_lr=c.cfg.finetune_lr,
                             inner_steps=c.cfg.finetune_steps, first_order=True, loss=c.inner_loss)
    return ProbePolicy(adapter=tuner, name="finetuned", **c.probe, **c.adapted)


def _scratch(c: MethodContext) -> StoppingPolicy:
    from maml_stop.learn.adapter import InnerLoopAdapter
    from maml_stop.learn.predictor import StoppingPredictor

    with torch.random.fork_rng():
        torch.manual_seed(c.cfg.seed)
        fresh = StoppingPredictor.from_config(c.predictor_config)
    trainer = InnerLoopAdapter(fresh, algorithm="maml", inner_lr=c.cfg.scratch_lr,
                               inner_steps=c.cfg.scratch_steps, first_order=True, loss=c.inner_loss)
    return ProbePolicy(adapter=trainer, renormalise=True, name="scratch", **c.probe, **c.adapted)


def _maml(c: MethodContext) -> StoppingPolicy:
    if c.adapter is None:
        raise ValueError("method 'maml' needs a checkpoint (--checkpoint, --checkpoints or --train_config)")
    return ProbePolicy(adapter=c.adapter, adapt_steps=c.maml_steps, name="maml", **c.probe, **c.adapted)


# name -> builder, in the order of the report's tables
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
}
METHODS: tuple[str, ...] = tuple(BUILDERS)
NEEDS_CHECKPOINT = ("maml",)  # methods that need a meta-trained adapter


def build_policies(
    cfg: "EvaluateConfig",
    methods: Sequence[str],
    adapter: Any | None,
    pooled: torch.nn.Module | None,
    predictor_config: "PredictorConfig",
    inner_loss: str = "balanced",
    maml_steps: int | None = None,
) -> dict[str, StoppingPolicy]:
    """Every requested method as a policy; learned probes share the selector-free threshold grid."""
    context = MethodContext(cfg, adapter, pooled, predictor_config, inner_loss, maml_steps)
    policies: dict[str, StoppingPolicy] = {}
    for name in methods:
        if name not in BUILDERS:
            raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}")
        policies[name] = BUILDERS[name](context)
    return policies
