"""What a cascade's router learns: P(a model's full run will be right), per probe point of its trace or
from the question alone (issue 28 item 3).

A router reads a **view** of a trace (:func:`free_view`: the free features of every probe point;
:class:`QuestionView`: one row of question features, :mod:`maml_stop.probe.question_features`) labelled
with the trace's final EM (the give-up predictor's label), and is learned in one of :data:`LEARNERS`:

* ``scratch``: a seeded fresh :class:`~maml_stop.learn.predictor.StoppingPredictor` trained on the K
  support traces through the shared adapter (``InnerLoopAdapter.fit_support``, support normalisation);
* ``pooled``: trained once on the source families' traces pooled (``learn.pooled.train_predictor``),
  not adapted;
* ``meta``: meta-initialised on episodes of the source families (first-order MAML,
  :func:`~maml_stop.decide.policies.complexity.meta_initialise`), then adapted on the K support traces;
* ``ridge``: a ridge regression of the label on the view's rows, fitted on support (the plain
  question-only reference; no adapter).

The label needs only the small model's traces, so the small model's router learns from every family
of its corpus but the held-out one, not only from the paired families.

The learned routers are built by :func:`maml_stop.evaluate.cascade.make_router` (it needs the learn floor).

>>> RouterConfig(learner="meta").inner_steps
5
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

import numpy as np
from maml_stop.data.corpus import Trace
from maml_stop.decide.policies.complexity import ComplexityFeatures, RidgeRegressor
from maml_stop.decide.policies.views import FeatureView, free_features

__all__ = ["LEARNERS", "RouterConfig", "free_view", "QuestionView", "RidgeRouter"]

LEARNERS = ("scratch", "pooled", "meta", "ridge")


@dataclass
class RouterConfig:
    """How a router is learned (tuned values: ``experiments/cascade_evaluate.yaml``)."""

    learner: str = "scratch"  # one of LEARNERS
    predictor: dict[str, Any] = field(default_factory=lambda: {"hidden": 32, "depth": 1, "kind": "mlp"})
    scratch_steps: int = 100  # scratch: full-batch steps on the K support traces
    scratch_lr: float = 0.5
    pooled_steps: int = 300  # pooled: full-batch steps on the pooled source traces
    pooled_lr: float = 0.5
    meta_steps: int = 200  # meta: first-order MAML steps on the source families
    meta_lr: float = 0.01
    meta_k: int = 8  # support questions of a meta-training episode
    inner_lr: float = 0.1  # meta: inner-loop step size (meta-training and support)
    inner_steps: int = 5
    ridge: float = 10.0  # ridge: penalty on the standardised inputs
    crossfit: bool = False  # choose the threshold on out-of-sample support scores (two halves)
    seed: int = 0
    backend: str = "learn2learn"

    def __post_init__(self) -> None:
        if self.learner not in LEARNERS:
            raise ValueError(f"unknown router learner {self.learner!r}; valid: {', '.join(LEARNERS)}")


def free_view(feature_names: Sequence[str]) -> FeatureView:
    """Every probe point's free features (no forced answer needed), labelled with the final EM."""
    return FeatureView.of(feature_names, free_features(feature_names), None, target="final")


class QuestionView:
    """A trace as one row of its question's features (``ComplexityFeatures``), labelled with its final EM:
    what a router knows before the model generates anything."""

    def __init__(self, features: ComplexityFeatures) -> None:
        self.features = features

    @property
    def width(self) -> int:
        return self.features.width

    def __call__(self, trace: Trace) -> Trace:
        row = np.asarray(self.features(trace), dtype=np.float32)[None]  # (1, Q)
        zero = np.zeros(1, dtype=np.int64)
        return replace(trace, features=row, labels=np.array([float(trace.final_em)], np.float32), positions=zero,
                       probe_tokens=zero, probe_answers=[""], logprob_mean=np.zeros(1, np.float32), cap_probe=None)


class RidgeRouter:
    """P(right) as a ridge regression of the label on a view's rows (clipped to [0, 1]); fitted on support.
    The methods of :class:`~maml_stop.decide.policies.cost_aware.ViewScorer` (fit, forget, prepare, scores)."""

    def __init__(self, view, alpha: float = 10.0) -> None:
        self.view, self.alpha = view, alpha
        self.model: RidgeRegressor | None = None

    def fit(self, support: Sequence[Trace]) -> None:
        rows = [self.view(t) for t in support]
        x = np.concatenate([r.features for r in rows]).astype(np.float64)  # (sum P, D)
        y = np.concatenate([r.labels for r in rows]).astype(np.float64)
        self.model = RidgeRegressor(self.alpha).fit(x, y)

    def forget(self, support: Sequence[Trace]) -> None:
        """Nothing to forget: the ridge keeps no support scores."""

    def prepare(self, traces: Sequence[Trace]) -> None:
        """Nothing to batch."""

    def scores(self, trace: Trace) -> np.ndarray:
        if self.model is None:
            raise RuntimeError("RidgeRouter: call fit(support) before scoring")
        return np.clip(self.model.predict(self.view(trace).features.astype(np.float64)), 0.0, 1.0)
