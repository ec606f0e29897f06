"""Cost-aware stopping policies over stored traces: policies that run fewer forced answers (issue 10).

A probe's forced answer (trigger + up to 10 answer tokens every 32 tokens) is what makes a probing
policy that never fires cost 1.3-1.6x full generation; only the 8 paid features
(:data:`maml_stop.probe.features.PAID_FEATURES`) need it, the rest come from the generation's own
forward pass. Each policy here states the probes it ran, and is charged ``stop_cost(trace, i, ran=R)``
(:mod:`maml_stop.data.accounting`):

* :class:`ViewProbe` with ``pays="stop"`` (**free probe**): a stopping predictor on the free features
  decides at every probe point; it runs one forced answer, at its stop point (``R = [i]``: the answer
  is the output). Never stopping costs plain full generation, nothing more. ``pays="every"`` is the
  plain probe on a feature view (``R = 0..i``).
* :class:`GatedProbe`: a gate on the free features decides at which probe points a forced answer is
  run; a stopping predictor on free + paid features, read at the forced points only, decides to stop.
  Every gated probe up to the stop is paid (``R`` = the gated probes up to ``i``; all of them when it
  runs to the end). The gate's label is "this probe's forced answer is correct" (the probe label, from
  support): an answer is worth forcing where it may already be right; the stability features of the
  forced points are recomputed over the forced answers only.
* :class:`SparseSchedule`: any thresholded policy on every ``m``-th probe point; the other probe points
  are hidden from it (their features and answers unavailable, stability recomputed over the kept
  answers), and it pays only the kept probes it ran.
* :class:`GiveUp`: a second predicted quantity, P(the full run will be right), from the free features
  (label: the trace's stored final EM, broadcast to its probes). Where it falls below ``below`` the
  policy gives up: it stops there, paying that probe's forced answer (the output; its EM is that
  answer's), since stopping a run that will be wrong anyway loses no EM. Combined with a free or plain
  probe as "stop when either fires"; what a stop costs is the inner probe's rule.

These are the offline forms of the live rule's modes (:class:`maml_stop.live.rule.StopRule`,
:func:`~maml_stop.live.rule.replay`): the free probe is mode ``free``; the gated probe is mode
``gated`` (gate on every probe point's free features, stop predictor over the forced points' vectors
with stability over forced answers), and is tested equal to ``replay`` in ``tests/test_cost_aware.py``.

Each learned part is a :class:`~maml_stop.decide.policies.learned.ProbePolicy` (adapted by the shared
:class:`~maml_stop.learn.adapter.InnerLoopAdapter`, cross-fitted like every adapted probe) on a
:class:`~maml_stop.decide.policies.views.FeatureView` of the traces: the columns it reads, selected by name
(:func:`~maml_stop.decide.policies.views.feature_columns`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from maml_stop.data.corpus import Trace
from maml_stop.decide.policies.base import (
    FirstHitPolicy,
    StopOutcome,
    ThresholdedPolicy,
    full_generation_outcome,
    probe_outcome,
)
from maml_stop.decide.policies.learned import ProbePolicy
from maml_stop.decide.policies.views import STABILITY, TARGETS, FeatureView, feature_columns, free_features, subtrace
from maml_stop.decide.rule import first_hit
from maml_stop.probe.features import feature_cost

__all__ = ["FeatureView", "feature_columns", "free_features", "subtrace", "ViewScorer", "ViewProbe", "GatedProbe",
           "SparseSchedule", "GiveUp", "STABILITY", "TARGETS", "PAYS"]

PAYS = ("every", "stop")  # forced answers a probe pays: every probe up to the stop / the stop's only


class ViewScorer:
    """A :class:`ProbePolicy` on a :class:`FeatureView` (views cached by trace id; they do not depend on
    the fit): fit its scores, score, and forget out-of-sample support scores after a sweep."""

    def __init__(self, probe: ProbePolicy, view: FeatureView) -> None:
        self.probe, self.view = probe, view
        self._views: dict[str, Trace] = {}

    def __call__(self, trace: Trace) -> Trace:
        if trace.trace_id not in self._views:
            self._views[trace.trace_id] = self.view(trace)
        return self._views[trace.trace_id]

    def fit(self, support: Sequence[Trace]) -> None:
        self.probe._fit_scores([self(t) for t in support])

    def forget(self, support: Sequence[Trace]) -> None:
        if self.probe.crossfit:  # out-of-sample support scores served threshold selection only
            for t in support:
                self.probe._probs.pop(t.trace_id, None)

    def prepare(self, traces: Sequence[Trace]) -> None:
        self.probe.prepare([self(t) for t in traces])

    def scores(self, trace: Trace) -> np.ndarray:
        return self.probe.scores(self(trace))


class ViewProbe(FirstHitPolicy):
    """A stopping predictor on a feature view, thresholded at tau like :class:`ProbePolicy`; it pays
    ``pays="every"`` probe up to its stop (the plain probe) or only the forced answer at its stop
    (``"stop"``, the free probe: its view must read free features only)."""

    def __init__(self, probe: ProbePolicy, view: FeatureView, pays: str = "stop",
                 feature_names: Sequence[str] | None = None, name: str = "free_probe") -> None:
        if pays not in PAYS:
            raise ValueError(f"unknown pays={pays!r}; valid: {', '.join(PAYS)}")
        if pays == "stop" and feature_names is not None:
            paid = [feature_names[c] for c in view.columns if feature_cost(feature_names[c]) == "paid"]
            if paid:
                raise ValueError(f"{name}: a probe that pays only its stop must read free features, not {paid}")
        self.learned, self.pays, self.name = ViewScorer(probe, view), pays, name
        super().__init__(probe.selector)

    @property
    def candidates(self) -> list[float]:
        return self.learned.probe.candidates

    @property
    def default_param(self) -> float | None:
        return self.learned.probe.default_param

    def _fit_scores(self, support: Sequence[Trace]) -> None:
        self.learned.fit(support)

    def fit(self, support: Sequence[Trace]) -> "ViewProbe":
        super().fit(support)
        self.learned.forget(support)
        return self

    def prepare(self, traces: Sequence[Trace]) -> None:
        if traces:
            self.learned.prepare(traces)

    def scores(self, trace: Trace) -> np.ndarray:
        return self.learned.scores(trace)

    def stop_outcome(self, trace: Trace, index: int | None) -> StopOutcome:
        """What stopping at ``index`` (None: the end) costs under this probe's rule."""
        if self.pays == "every":
            return probe_outcome(trace, index)
        return probe_outcome(trace, index, ran=[] if index is None else [index])

    def outcome_at(self, trace: Trace, param: float | None) -> StopOutcome:
        return full_generation_outcome(trace) if param is None else self.outcomes_at(trace, [param])[0]

    def outcomes_at(self, trace: Trace, params: Sequence[float]) -> list[StopOutcome]:
        scores = self.scores(trace)
        return [self.stop_outcome(trace, first_hit(scores, p)) for p in params]


class GiveUp(ViewProbe):
    """Stop when either fires: ``stop`` (a :class:`ViewProbe`) reaches tau, or P(the full run will be
    right) of ``right`` (a :class:`ProbePolicy` on ``right_view``: free features, target ``"final"``)
    falls below ``below``. Costs follow ``stop``'s rule (a give-up pays its probe's forced answer)."""

    def __init__(self, stop: ViewProbe, right: ProbePolicy, right_view: FeatureView, below: float = 0.1,
                 name: str = "give_up") -> None:
        if right_view.target != "final":
            raise ValueError("the give-up predictor is trained on the final EM: its view needs target='final'")
        if not 0.0 <= below <= 1.0:
            raise ValueError(f"below must be a probability in [0, 1]; got {below}")
        self.stop, self.right, self.below = stop, ViewScorer(right, right_view), below
        self.learned, self.pays, self.name = stop.learned, stop.pays, name
        FirstHitPolicy.__init__(self, stop.selector)

    def _fit_scores(self, support: Sequence[Trace]) -> None:
        self.stop.learned.fit(support)
        self.right.fit(support)

    def fit(self, support: Sequence[Trace]) -> "GiveUp":
        FirstHitPolicy.fit(self, support)
        self.stop.learned.forget(support)
        self.right.forget(support)
        return self

    def prepare(self, traces: Sequence[Trace]) -> None:
        if traces:
            self.stop.learned.prepare(traces)
            self.right.prepare(traces)

    def p_right(self, trace: Trace) -> np.ndarray:
        """P(the full run will be right) at every probe point. (P,)"""
        return self.right.scores(trace)

    def scores(self, trace: Trace) -> np.ndarray:
        return np.where(self.p_right(trace) < self.below, np.inf, self.stop.scores(trace))


class GatedProbe(ThresholdedPolicy):
    """A free-feature gate decides where to run a forced answer (P(its answer is correct) >=
    ``gate_threshold``); a stopping predictor reads the forced points only (stability over the forced
    answers, :func:`subtrace`) and stops at the first whose P >= tau. Pays every gated probe up to the
    stop. The stopping predictor is fitted on the support traces' gated sub-traces (the gate's
    out-of-sample support scores when cross-fitting), which is what it reads on the query."""

    def __init__(self, gate: ProbePolicy, gate_view: FeatureView, stop: ProbePolicy, stop_view: FeatureView,
                 feature_names: Sequence[str], gate_threshold: float = 0.5, name: str = "gated_probe") -> None:
        if not 0.0 <= gate_threshold <= 1.0:
            raise ValueError(f"gate_threshold must be a probability in [0, 1]; got {gate_threshold}")
        paid = [feature_names[c] for c in gate_view.columns if feature_cost(feature_names[c]) == "paid"]
        if paid:
            raise ValueError(f"{name}: the gate must read free features only, not {paid}")
        self.gate, self.stop = ViewScorer(gate, gate_view), ViewScorer(stop, stop_view)
        self.feature_names, self.gate_threshold, self.name = list(feature_names), gate_threshold, name
        self._ran: dict[str, np.ndarray] = {}  # per fit: trace id -> gated probes
        self._subs: dict[str, Trace] = {}  # per fit: trace id -> the stop predictor's view of the gated sub-trace
        super().__init__(stop.selector)

    @property
    def candidates(self) -> list[float]:
        return self.stop.probe.candidates

    @property
    def default_param(self) -> float | None:
        return self.stop.probe.default_param

    def gated(self, trace: Trace) -> np.ndarray:
        """The probes whose forced answer the gate runs (all of the trace's). (G,) int64"""
        if trace.trace_id not in self._ran:
            self._ran[trace.trace_id] = np.flatnonzero(self.gate.scores(trace) >= self.gate_threshold)
        return self._ran[trace.trace_id]

    def _sub(self, trace: Trace) -> Trace:
        if trace.trace_id not in self._subs:
            self._subs[trace.trace_id] = self.stop.view(subtrace(trace, self.gated(trace), self.feature_names))
        return self._subs[trace.trace_id]

    def stop_scores(self, trace: Trace) -> np.ndarray:
        """The stopping predictor's P at each gated probe. (G,)"""
        sub = self._sub(trace)
        return self.stop.probe.scores(sub) if sub.n_probes else np.zeros(0)

    def _fit_scores(self, support: Sequence[Trace]) -> None:
        self._ran, self._subs = {}, {}
        self.gate.fit(support)
        subs = [self._sub(t) for t in support if self.gated(t).size]
        if subs:
            self.stop.probe._fit_scores(subs)
        else:  # the gate opens nothing on support: fit on every probe (no out-of-sample sub-trace scores)
            self.stop.probe._fit_scores([self.stop.view(t) for t in support])
            self.stop.probe._probs = {}

    def fit(self, support: Sequence[Trace]) -> "GatedProbe":
        super().fit(support)
        self.gate.forget(support)
        self.stop.forget(support)
        self._ran, self._subs = {}, {}  # support traces were gated on out-of-sample scores
        return self

    def prepare(self, traces: Sequence[Trace]) -> None:
        if traces:
            self.gate.prepare(traces)
            subs = [self._sub(t) for t in traces if self.gated(t).size]
            if subs:
                self.stop.probe.prepare(subs)

    def stop_index_at(self, trace: Trace, param: float) -> int | None:
        return self.outcomes_at(trace, [param])[0].index

    def outcome_at(self, trace: Trace, param: float | None) -> StopOutcome:
        return full_generation_outcome(trace) if param is None else self.outcomes_at(trace, [param])[0]

    def outcomes_at(self, trace: Trace, params: Sequence[float]) -> list[StopOutcome]:
        ran = self.gated(trace)
        out = []
        scores = self.stop_scores(trace)
        for j in (first_hit(scores, p) for p in params):
            out.append(probe_outcome(trace, None, ran=ran) if j is None else
                       probe_outcome(trace, int(ran[j]), ran=ran[: j + 1]))
        return out


class SparseSchedule(ThresholdedPolicy):
    """``inner`` (any thresholded policy) on every ``every``-th probe point (0, m, 2m, ...): the other
    probe points are hidden from it (:func:`subtrace`), and it pays only the kept probes it ran. Its
    parameter grid, selector and support sweep are the inner policy's, on the sparse sub-traces.

    The stored features of a kept point are those of the dense schedule (a hidden-state window of 32
    tokens, ``probe_index`` counting every probe point): what a live run with this schedule for forced
    answers only and the dense one for free features would read."""

    def __init__(self, inner: ThresholdedPolicy, every: int, feature_names: Sequence[str],
                 name: str | None = None) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1 (1: the dense schedule); got {every}")
        if not isinstance(inner, ThresholdedPolicy):
            raise TypeError(f"SparseSchedule wraps a thresholded policy, not {type(inner).__name__}")
        self.inner, self.every, self.feature_names = inner, every, list(feature_names)
        self.name = name or f"{inner.name}_every{every}"
        self._subs: dict[str, tuple[np.ndarray, Trace]] = {}
        super().__init__(inner.selector)

    @property
    def candidates(self) -> list[float]:
        return self.inner.candidates

    @property
    def default_param(self) -> float | None:
        return self.inner.default_param

    def kept(self, trace: Trace) -> tuple[np.ndarray, Trace]:
        """(the kept probe indices, the sub-trace the inner policy sees)."""
        if trace.trace_id not in self._subs:
            keep = np.arange(0, trace.n_probes, self.every, dtype=np.int64)
            cap = getattr(trace, "cap_probe", None)
            if cap is not None and cap not in keep:  # a capped run's answer is forced at the cap: always run
                keep = np.append(keep, cap)
            self._subs[trace.trace_id] = (keep, subtrace(trace, keep, self.feature_names))
        return self._subs[trace.trace_id]

    def _back(self, trace: Trace, out: StopOutcome) -> StopOutcome:
        """An inner outcome on the sub-trace, in the trace's probe indices (its tokens are already right)."""
        keep, _ = self.kept(trace)
        if out.ran is not None:
            ran = tuple(int(keep[j]) for j in out.ran)
        elif out.index is not None:
            ran = tuple(int(i) for i in keep[: out.index + 1])
        else:
            ran = tuple(int(i) for i in keep) if out.probe_tokens else ()
        index = None if out.index is None else int(keep[out.index])
        return StopOutcome(index, out.em, out.total_tokens, out.reasoning_tokens, ran)

    def fit(self, support: Sequence[Trace]) -> "SparseSchedule":
        if not support:
            raise ValueError(f"{self.name}: cannot fit on an empty support set")
        self.inner.fit([self.kept(t)[1] for t in support])
        self.support_sweep, self.param = self.inner.support_sweep, self.inner.param
        return self

    def prepare(self, traces: Sequence[Trace]) -> None:
        self.inner.prepare([self.kept(t)[1] for t in traces])

    def stop_index_at(self, trace: Trace, param: float) -> int | None:
        return self.outcome_at(trace, param).index

    def outcome_at(self, trace: Trace, param: float | None) -> StopOutcome:
        return self._back(trace, self.inner.outcome_at(self.kept(trace)[1], param))

    def outcomes_at(self, trace: Trace, params: Sequence[float]) -> list[StopOutcome]:
        return [self._back(trace, o) for o in self.inner.outcomes_at(self.kept(trace)[1], params)]
