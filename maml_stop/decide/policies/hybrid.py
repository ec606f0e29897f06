"""Hybrid stopping criteria (issue 13 item 1): any policy under a token budget cap or a minimum-tokens
floor, and "stop when either fires" / "only when both have" combinations of two policies.

Every combination is a :class:`ThresholdedPolicy` whose one parameter is its **first part's** (the
inner policy of :class:`Capped` and :class:`Floored`, ``a`` of :class:`Either` and :class:`Both`): the
threshold selectors choose it on the support sweep of the *combination* (its EM and tokens with the
other part in place). The other part is fitted on the same support set by its own ``fit`` (its own
selector; the builders of ``maml-stop evaluate`` give it a :class:`FixedThreshold` from the YAML), and
the cap and the floor are fixed token counts.

Semantics, per trace, from each part's stop ``i_a``, ``i_b`` (``None``: it never fires):

* ``Either(a, b)`` stops at ``min(i_a, i_b)`` (the first probe where either fires; the end when
  neither does). Each part runs its probes up to that point.
* ``Both(a, b)`` stops at ``max(i_a, i_b)``: a part that has fired stays fired (latched) and runs no
  more probes; the run stops at the first probe at which both have fired, i.e. at the later of the two
  stop points; the end when either never fires. Each part pays its probes up to its own stop (a part
  that fired first has its stop probe charged even when the run does not stop there: conservative).
* ``Capped(inner, max_tokens)`` is ``Either(inner, cap)``: the cap fires at the last probe at or
  before ``max_tokens`` reasoning tokens (the :class:`TokenBudget` rule: a trace that ends within the
  budget runs to its end; one whose first probe lies beyond it stops there), paying that probe.
* ``Floored(inner, min_tokens)`` is ``Both(inner, floor)``: the floor fires at the first probe at or
  after ``min_tokens`` reasoning tokens; an inner stop before it is deferred to that probe (not
  re-decided there); a trace without such a probe runs to its end.

Accounting (DESIGN.md "Honest accounting"): the combination pays the union of the probes its parts ran
(a probe run by both is paid once) and the forced answer at its stop; the cap and the floor decide on
token counts and run no probe of their own. With ``param=None`` (a selector's "never stop early") the
first part never fires: ``Either`` and ``Capped`` are then the other part alone, ``Both`` and
``Floored`` plain full generation.

>>> from maml_stop.decide.thresholds import FixedThreshold
>>> from maml_stop.decide.policies import AnswerConfidence, AnswerConsistency
>>> policy = Either(AnswerConsistency(), AnswerConfidence(selector=FixedThreshold(0.95)))
>>> capped = Capped(AnswerConsistency(), max_tokens=128)
>>> policy.fit(support).outcome(trace)                              # doctest: +SKIP
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from maml_stop.data.corpus import Trace
from maml_stop.decide.policies.base import (
    StopOutcome,
    StoppingPolicy,
    ThresholdedPolicy,
    full_generation_outcome,
    probe_outcome,
    sweep_policy,
)
from maml_stop.decide.policies.baselines import TokenBudget

__all__ = ["TokenCap", "TokenFloor", "Either", "Both", "Capped", "Floored", "outcome_probes"]


def outcome_probes(trace: Trace, out: StopOutcome) -> tuple[int, ...]:
    """The probes whose forced answer ``out`` ran: its stated ``ran``, else the default accounting (every
    probe up to its stop; all of them when it ran to the end having paid probes; none for full generation)."""
    if out.ran is not None:
        return tuple(out.ran)
    if out.index is not None:
        return tuple(range(out.index + 1))
    return tuple(range(trace.n_probes)) if out.probe_tokens else ()


class TokenCap(StoppingPolicy):
    """Stop at a fixed reasoning-token budget (the :class:`TokenBudget` rule at one budget, paying the
    probe at the cut-off). Inside a combination it runs no probe: it decides on the token count."""

    def __init__(self, max_tokens: float, name: str = "cap") -> None:
        if max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0; got {max_tokens}")
        self.max_tokens, self.name = float(max_tokens), name
        self._rule = TokenBudget()  # the one home of the budget's cut-off

    def stop_index(self, trace: Trace) -> int | None:
        return self._rule.stop_index_at(trace, self.max_tokens)

    def outcome(self, trace: Trace) -> StopOutcome:
        return self._rule.outcome_at(trace, self.max_tokens)

    def decision(self, trace: Trace) -> tuple[int | None, tuple[int, ...]]:
        """(stop index, probes run to decide it): a token count needs no forced answer."""
        return self.stop_index(trace), ()


class TokenFloor(StoppingPolicy):
    """Fire at the first probe at or after ``min_tokens`` reasoning tokens (None: the trace has none).
    Alone it stops there, paying that probe; inside a combination it runs no probe of its own."""

    def __init__(self, min_tokens: float, name: str = "floor") -> None:
        if min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0; got {min_tokens}")
        self.min_tokens, self.name = float(min_tokens), name

    def stop_index(self, trace: Trace) -> int | None:
        after = np.flatnonzero(np.asarray(trace.positions) >= self.min_tokens)
        return int(after[0]) if after.size else None

    def outcome(self, trace: Trace) -> StopOutcome:
        i = self.stop_index(trace)
        return full_generation_outcome(trace) if i is None else probe_outcome(trace, i, ran=[i])

    def decision(self, trace: Trace) -> tuple[int | None, tuple[int, ...]]:
        return self.stop_index(trace), ()


def _decision(part: StoppingPolicy, trace: Trace, out: StopOutcome | None = None) -> tuple[int | None, tuple[int, ...]]:
    """(stop index, probes run up to it) of one part on ``trace`` (``out``: its outcome, when known)."""
    if isinstance(part, (TokenCap, TokenFloor)):
        return part.decision(trace)
    out = part.outcome(trace) if out is None else out
    return out.index, outcome_probes(trace, out)


def combine(trace: Trace, rule: str, decisions: Sequence[tuple[int | None, tuple[int, ...]]]) -> StopOutcome:
    """The outcome of stopping by ``rule`` ("either": the first part's stop; "both": the last one's, the
    end when one never fires) given each part's (stop index, probes run up to it)."""
    stops = [i for i, _ in decisions]
    if rule == "either":
        fired = [i for i in stops if i is not None]
        stop = min(fired) if fired else None
    elif rule == "both":
        stop = None if any(i is None for i in stops) else max(stops)  # type: ignore[type-var]
    else:
        raise ValueError(f"unknown rule {rule!r}; valid: either, both")
    ran = {j for _, probes in decisions for j in probes if stop is None or j <= stop}
    if stop is not None:
        ran.add(stop)  # the answer returned is the forced answer at the stop
    return probe_outcome(trace, stop, ran=sorted(ran))


class _Combination(ThresholdedPolicy):
    """Two parts combined by ``rule``; the parameter (grid, default, selector) is the first part's."""

    rule = "either"

    def __init__(self, first: ThresholdedPolicy, second: StoppingPolicy, name: str) -> None:
        if not isinstance(first, ThresholdedPolicy):
            raise TypeError(f"{name}: the first part carries the threshold and must be a ThresholdedPolicy, "
                            f"not {type(first).__name__}")
        if not isinstance(second, StoppingPolicy):
            raise TypeError(f"{name}: the second part must be a StoppingPolicy, not {type(second).__name__}")
        self.first, self.second, self.name = first, second, name
        super().__init__(first.selector)

    @property
    def candidates(self) -> list[float]:
        return self.first.candidates

    @property
    def default_param(self) -> float | None:
        return self.first.default_param

    def fit(self, support: Sequence[Trace]) -> "_Combination":
        """Fit the second part, then the first; the combination's support sweep is taken right after the
        first part has fitted its scores (before it forgets out-of-sample support scores, ``crossfit``),
        and the selector chooses the first part's parameter on it."""
        if not support:
            raise ValueError(f"{self.name}: cannot fit on an empty support set")
        self.second.fit(support)
        swept: list = []
        fit_scores = self.first._fit_scores

        def fit_then_sweep(traces: Sequence[Trace]) -> None:
            fit_scores(traces)
            swept.append(sweep_policy(self, support))

        self.first._fit_scores = fit_then_sweep  # type: ignore[method-assign]
        try:
            self.first.fit(support)
        finally:
            del self.first._fit_scores  # back to the class's method
        # a first part whose fit does not go through _fit_scores (SparseSchedule): sweep after its fit
        self.support_sweep = swept[0] if swept else sweep_policy(self, support)
        self.param = self.choose(self.selector)
        return self

    def prepare(self, traces: Sequence[Trace]) -> None:
        if traces:
            self.first.prepare(traces)
            self.second.prepare(traces)

    def stop_index_at(self, trace: Trace, param: float) -> int | None:
        return self.outcome_at(trace, param).index

    def outcome_at(self, trace: Trace, param: float | None) -> StopOutcome:
        return self.outcomes_at(trace, [param])[0]  # type: ignore[list-item]

    def outcomes_at(self, trace: Trace, params: Sequence[float | None]) -> list[StopOutcome]:
        second = _decision(self.second, trace)
        given = [p for p in params if p is not None]
        firsts = iter(self.first.outcomes_at(trace, given) if given else [])
        out = []
        for p in params:
            if p is None:  # the first part never fires (and runs nothing)
                out.append(full_generation_outcome(trace) if self.rule == "both"
                           else combine(trace, "either", [second]))
            else:
                out.append(combine(trace, self.rule, [_decision(self.first, trace, next(firsts)), second]))
        return out


class Either(_Combination):
    """Stop at the first probe where ``a`` or ``b`` fires; the parameter is ``a``'s (``b`` is fitted on
    support by its own selector)."""

    rule = "either"

    def __init__(self, a: ThresholdedPolicy, b: StoppingPolicy, name: str | None = None) -> None:
        super().__init__(a, b, name or f"either_{a.name}_{b.name}")


class Both(_Combination):
    """Stop at the first probe where both ``a`` and ``b`` have fired (the later of their stops; each
    stays fired); the parameter is ``a``'s (``b`` is fitted on support by its own selector)."""

    rule = "both"

    def __init__(self, a: ThresholdedPolicy, b: StoppingPolicy, name: str | None = None) -> None:
        super().__init__(a, b, name or f"both_{a.name}_{b.name}")


class Capped(Either):
    """``inner`` under a reasoning-token budget: if it has not stopped by the last probe at or before
    ``max_tokens``, stop there (paying that probe)."""

    def __init__(self, inner: ThresholdedPolicy, max_tokens: float, name: str | None = None) -> None:
        self.max_tokens = float(max_tokens)
        super().__init__(inner, TokenCap(max_tokens), name or f"{inner.name}_capped")


class Floored(Both):
    """``inner`` with a minimum of reasoning: its stops before ``min_tokens`` are deferred to the first
    probe at or after ``min_tokens``."""

    def __init__(self, inner: ThresholdedPolicy, min_tokens: float, name: str | None = None) -> None:
        self.min_tokens = float(min_tokens)
        super().__init__(inner, TokenFloor(min_tokens), name or f"{inner.name}_floored")
