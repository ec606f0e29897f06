"""The stopping-policy interface and what its decisions cost.

A :class:`StoppingPolicy` is fitted on the K support traces of a family, then picks, per trace, the
probe at which to stop (``stop_index``; ``None`` = run to the end). :meth:`StoppingPolicy.outcome`
turns that choice into EM and tokens with the accounting of ``DESIGN.md``
(:mod:`maml_stop.data.accounting`, the one home of the formulas): probing policies pay every probe
they ran (by default every probe up to the stop; a policy that ran fewer says which, see
:func:`probe_outcome`); full generation and the token budget run no probes (a budget pays the one forced answer at
its cut-off); the oracle needs no probe when it runs to the end.

Thresholded policies (:class:`ThresholdedPolicy`) are families indexed by one parameter (the token
budget, the consistency window k, the confidence level, the probe threshold tau), with candidates
ordered from conservative (stops latest) to aggressive; ``fit`` lets a
:class:`~maml_stop.decide.selector.StopSelector` choose the parameter on support, and ``None``
means "never stop early" (plain full generation, no probes). :func:`evaluate_policy` scores a fitted
policy; with ``param`` it scores a thresholded one at another parameter (another selector's choice,
``policy.choose(selector)``) without changing the policy.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from maml_stop.data.accounting import full_cost, savings, stop_cost, stop_costs
from maml_stop.data.corpus import Trace
from maml_stop.data.family import same_traces
from maml_stop.decide import outcomes as V
from maml_stop.decide.rule import first_hit, first_hits
from maml_stop.decide.selector import StopSelector, SupportSweep
from maml_stop.decide.thresholds import FixedThreshold

log = logging.getLogger(__name__)

__all__ = ["StopOutcome", "Outcomes", "StoppingPolicy", "ThresholdedPolicy", "FirstHitPolicy",
           "full_generation_outcome", "probe_outcome", "evaluate_policy", "sweep_policy"]


@dataclass(frozen=True)
class StopOutcome:
    """What a policy's decision on one trace yields."""

    index: int | None  # probe stopped at; None = ran to the end
    em: bool
    total_tokens: int  # reasoning + probes + answer
    reasoning_tokens: int  # the same without the probes' tokens (how DEER and Dynasor-CoT count)
    # probes whose forced answer the policy ran, when it says so (``probe_outcome(..., ran=R)``); None:
    # not stated, the default accounting (every probe up to ``index``; none for plain full generation).
    # Left out of ==: two outcomes with the same stop, EM and tokens are the same outcome.
    ran: tuple[int, ...] | None = field(default=None, compare=False)

    @property
    def probe_tokens(self) -> int:
        """Tokens of the forced answers the policy ran (``total_tokens - reasoning_tokens``)."""
        return self.total_tokens - self.reasoning_tokens


@dataclass
class Outcomes:
    """Outcomes of one policy on a list of traces, with full generation of the same traces beside them."""

    em: np.ndarray  # (N,) float 0/1
    total_tokens: np.ndarray  # (N,)
    reasoning_tokens: np.ndarray  # (N,)
    full_em: np.ndarray  # (N,)
    full_tokens: np.ndarray  # (N,)
    stopped_early: np.ndarray  # (N,) bool: stopped at a probe

    def saved(self, spent: np.ndarray) -> float:
        """Savings of ``spent`` (``total_tokens`` or ``reasoning_tokens``) against full generation, from
        the NumPy sums (token counts are integers: exact sums, the floats of the torch metric)."""
        return float(savings(float(spent.sum()), float(self.full_tokens.sum())))


def full_generation_outcome(trace: Trace) -> StopOutcome:
    """Plain full generation: no probes, every generated token, the model's own final answer."""
    return StopOutcome(None, bool(trace.final_em), full_cost(trace), full_cost(trace))


def probe_outcome(trace: Trace, index: int | None, ran: Sequence[int] | None = None) -> StopOutcome:
    """A probing policy's outcome: stop at probe ``index`` having run the probes ``ran`` (default: 0..index,
    or all of them when it runs to the end). A policy that runs fewer forced answers (the cost-aware
    policies of :mod:`.cost_aware`) states them: the cost is ``stop_cost(trace, index, ran=ran)``, and
    ``ran`` is kept on the outcome."""
    total, reasoning = stop_cost(trace, index, ran)
    stated = None if ran is None else tuple(int(i) for i in ran)
    return StopOutcome(index, trace.stop_em(index), total, reasoning, stated)


_probe_outcome = probe_outcome  # the former private name (tests, older notebooks)


class StoppingPolicy:
    """Fit on the K support traces, then choose a stop index per trace (``None`` = run to the end)."""

    name = "policy"

    def fit(self, support: Sequence[Trace]) -> "StoppingPolicy":
        return self

    def stop_index(self, trace: Trace) -> int | None:
        raise NotImplementedError

    def outcome(self, trace: Trace) -> StopOutcome:
        return probe_outcome(trace, self.stop_index(trace))

    def prepare(self, traces: Sequence[Trace]) -> None:
        """Precompute per-trace scores for a list of traces in one batch (learned policies)."""

    @property
    def vectorised(self) -> bool:
        """Whether :meth:`vector_outcomes` gives this policy's outcomes (exactly those of the per-trace
        methods) on the fast path."""
        return False

    def vector_outcomes(self, traces: Sequence[Trace], arrays: V.TraceArrays, params: Sequence[float]) -> V.CandidateOutcomes:
        """Outcomes of every trace (at every parameter of a thresholded policy; one column without one) in
        one pass (:mod:`maml_stop.decide.outcomes`); only where :attr:`vectorised`. ``arrays``:
        ``TraceArrays.of(traces)``, after ``prepare(traces)`` for a thresholded policy."""
        raise NotImplementedError(f"{self.name} has no vectorised outcomes")


class ThresholdedPolicy(StoppingPolicy):
    """A family of policies indexed by one parameter, chosen on support by a threshold selector.

    Subclasses give ``candidates`` (conservative -> aggressive), ``default_param`` and
    ``stop_index_at``; learned ones also override ``_fit_scores``.
    """

    def __init__(self, selector: StopSelector | None = None) -> None:
        self.selector = selector if selector is not None else FixedThreshold()
        self.param: float | None = self.default_param  # set by fit: the selector's choice on support
        self.support_sweep: SupportSweep | None = None

    @property
    def candidates(self) -> list[float]:
        raise NotImplementedError

    @property
    def default_param(self) -> float | None:
        raise NotImplementedError

    def stop_index_at(self, trace: Trace, param: float) -> int | None:
        raise NotImplementedError

    def outcome_at(self, trace: Trace, param: float | None) -> StopOutcome:
        if param is None:
            return full_generation_outcome(trace)
        return probe_outcome(trace, self.stop_index_at(trace, param))

    def outcomes_at(self, trace: Trace, params: Sequence[float]) -> list[StopOutcome]:
        """:meth:`outcome_at` for many parameters (subclasses vectorise it)."""
        return [self.outcome_at(trace, p) for p in params]

    def stop_index(self, trace: Trace) -> int | None:
        return None if self.param is None else self.stop_index_at(trace, self.param)

    def outcome(self, trace: Trace) -> StopOutcome:
        return self.outcome_at(trace, self.param)

    def _fit_scores(self, support: Sequence[Trace]) -> None:
        """Fit whatever the policy learns from support before its parameter is chosen."""

    def fit(self, support: Sequence[Trace]) -> "ThresholdedPolicy":
        if not support:
            raise ValueError(f"{self.name}: cannot fit on an empty support set")
        self.__dict__.pop(_SWEPT, None)  # scores change with the fit
        self._fit_scores(support)
        self.support_sweep = sweep_policy(self, support)  # kept so other selectors can reuse it
        self.param = self.choose(self.selector)
        log.debug("%s: %s chose %s on %d support traces", self.name, self.selector.name, self.param, len(support))
        return self

    def choose(self, selector: StopSelector) -> float | None:
        """The parameter ``selector`` picks from the fitted support sweep (does not change ``param``)."""
        if getattr(self, "support_sweep", None) is None:
            raise RuntimeError(f"{self.name}: call fit(support) before choosing a threshold")
        return selector.select(self.candidates, self.support_sweep, self.default_param)


class FirstHitPolicy(ThresholdedPolicy):
    """Stop at the first probe whose score reaches the parameter (the one rule,
    :mod:`maml_stop.decide.rule`): ``scores(trace)`` (P,) says how ready each probe is (a probability, a
    confidence, a run length), computed once for every parameter."""

    def scores(self, trace: Trace) -> np.ndarray:
        raise NotImplementedError

    def scores_of(self, traces: Sequence[Trace]) -> list[np.ndarray]:
        """``[self.scores(t) for t in traces]`` (learned probes answer from one batch)."""
        return [self.scores(t) for t in traces]

    @property
    def vectorised(self) -> bool:  # subclasses that pay other probes override these methods: the loop
        cls = type(self)
        return (cls.outcomes_at is FirstHitPolicy.outcomes_at and cls.stop_index_at is FirstHitPolicy.stop_index_at
                and cls.outcome_at is ThresholdedPolicy.outcome_at and cls.outcome is ThresholdedPolicy.outcome)

    def vector_outcomes(self, traces: Sequence[Trace], arrays: V.TraceArrays, params: Sequence[float]) -> V.CandidateOutcomes:
        return V.candidate_outcomes(arrays, self.padded_scores(traces, arrays), params)

    def padded_scores(self, traces: Sequence[Trace], arrays: V.TraceArrays) -> np.ndarray:
        """(N, P) scores of ``traces`` as wide as ``arrays`` (``TraceArrays.of(traces)``), -inf past each
        trace's last probe."""
        return arrays.pad(self.scores_of(traces))

    def stop_index_at(self, trace: Trace, param: float) -> int | None:
        return first_hit(self.scores(trace), param)

    def outcomes_at(self, trace: Trace, params: Sequence[float]) -> list[StopOutcome]:
        first = first_hits(self.scores(trace), np.asarray(params, dtype=np.float64))  # (J,) NEVER where none
        stop_total, stop_reasoning = stop_costs(trace)  # (P,) tokens stopping at each probe
        never_total, never_reasoning = stop_cost(trace, None)
        out = []
        for j in range(len(params)):
            if first[j] >= 0:
                i = int(first[j])
                out.append(StopOutcome(i, bool(trace.labels[i] > 0.5), int(stop_total[i]), int(stop_reasoning[i])))
            else:
                out.append(StopOutcome(None, bool(trace.final_em), never_total, never_reasoning))
        return out


_FITTED = object()  # evaluate_policy's default: the parameter the policy chose when fitted


def _vectorisable(policy: StoppingPolicy) -> bool:
    """Whether the fast path is on and ``policy`` has a vectorised form of its outcomes."""
    return V.is_enabled() and isinstance(policy, ThresholdedPolicy) and policy.vectorised


def _candidate_outcomes(policy: ThresholdedPolicy, traces: Sequence[Trace], params: Sequence[float]):
    """(arrays, outcomes) of ``traces`` at ``params``; the last sweep of the fitted policy is kept, so that
    scoring it at a selector's choice on the same traces reads its column (``fit`` forgets it)."""
    params = tuple(params)
    memo = policy.__dict__.get(_SWEPT)
    if memo is not None and same_traces(memo[1], traces) and all(p in memo[2] for p in params):
        cols = [memo[2].index(p) for p in params]
        out = memo[4]
        return memo[3], V.CandidateOutcomes(out.em[:, cols], out.total[:, cols], out.reasoning[:, cols], out.stopped[:, cols])
    arrays = V.TraceArrays.of(traces)
    out = policy.vector_outcomes(traces, arrays, params)
    if len(params) > 1:  # a sweep: kept with the traces themselves (their ids stay valid)
        policy.__dict__[_SWEPT] = (None, tuple(traces), params, arrays, out)
    return arrays, out


_SWEPT = "_last_sweep"  # the attribute a policy keeps its last sweep under (cleared by fit)


def evaluate_policy(policy: StoppingPolicy, traces: Sequence[Trace], param: float | None = _FITTED) -> Outcomes:  # type: ignore[assignment]
    """Outcomes of a fitted policy on ``traces`` (with full generation of the same traces). ``param``
    (thresholded policies only): score at that parameter instead of the fitted one (None = never stop
    early), e.g. ``evaluate_policy(policy, query, param=policy.choose(other_selector))``."""
    if V.is_enabled() and policy.vectorised and not isinstance(policy, ThresholdedPolicy) and traces and param is _FITTED:
        a = V.TraceArrays.of(traces)  # a policy without a parameter: every trace at once (no prepare needed)
        out = policy.vector_outcomes(traces, a, ())
        return Outcomes(em=out.em[:, 0], total_tokens=out.total[:, 0], reasoning_tokens=out.reasoning[:, 0],
                        full_em=a.full_em.copy(), full_tokens=a.full_tokens.copy(), stopped_early=out.stopped[:, 0])
    policy.prepare(traces)
    if _vectorisable(policy) and traces:
        chosen = policy.param if param is _FITTED else param
        if chosen is None:  # never stop early: plain full generation, no probes
            a = V.TraceArrays.of(traces)
            return Outcomes(em=a.full_em.copy(), total_tokens=a.full_tokens.copy(), reasoning_tokens=a.full_tokens.copy(),
                            full_em=a.full_em.copy(), full_tokens=a.full_tokens.copy(),
                            stopped_early=np.zeros(len(traces), dtype=bool))
        arrays, out = _candidate_outcomes(policy, traces, [chosen])  # type: ignore[arg-type]
        return Outcomes(em=out.em[:, 0], total_tokens=out.total[:, 0], reasoning_tokens=out.reasoning[:, 0],
                        full_em=arrays.full_em.copy(), full_tokens=arrays.full_tokens.copy(), stopped_early=out.stopped[:, 0])
    if param is _FITTED:
        results = [policy.outcome(t) for t in traces]
    elif isinstance(policy, ThresholdedPolicy):
        results = [policy.outcome_at(t, param) for t in traces]
    else:
        raise TypeError(f"{policy.name} has no parameter; evaluate it without param")
    return Outcomes(
        em=np.array([r.em for r in results], dtype=np.float64),
        total_tokens=np.array([r.total_tokens for r in results], dtype=np.float64),
        reasoning_tokens=np.array([r.reasoning_tokens for r in results], dtype=np.float64),
        full_em=np.array([t.final_em for t in traces], dtype=np.float64),
        full_tokens=np.array([full_cost(t) for t in traces], dtype=np.float64),
        stopped_early=np.array([r.index is not None for r in results], dtype=bool),
    )


def sweep_policy(
    policy: ThresholdedPolicy, traces: Sequence[Trace], candidates: Sequence[float] | None = None
) -> SupportSweep:
    """EM and total tokens of every candidate parameter on ``traces``: (N, J) arrays."""
    cands = list(policy.candidates if candidates is None else candidates)
    policy.prepare(traces)
    if _vectorisable(policy) and traces and cands:
        arrays, out = _candidate_outcomes(policy, traces, cands)  # type: ignore[arg-type]
        return SupportSweep(em=out.em, tokens=out.total, full_em=arrays.full_em.copy(), full_tokens=arrays.full_tokens.copy())
    em = np.zeros((len(traces), len(cands)))
    tokens = np.zeros((len(traces), len(cands)))
    for i, t in enumerate(traces):
        for j, r in enumerate(policy.outcomes_at(t, cands)):
            em[i, j], tokens[i, j] = float(r.em), float(r.total_tokens)
    return SupportSweep(
        em=em,
        tokens=tokens,
        full_em=np.array([t.final_em for t in traces], dtype=np.float64),
        full_tokens=np.array([full_cost(t) for t in traces], dtype=np.float64),
    )
