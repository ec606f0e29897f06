"""The baselines of the protocol (DESIGN.md): full generation, the first probe, a fixed token budget,
answer consistency (Dynasor-CoT / ES-CoT), answer confidence (DEER), and the two oracles.

>>> from maml_stop.decide.thresholds import FixedThreshold
>>> policy = AnswerConsistency(selector=FixedThreshold(2))          # stop once 2 probe answers agree
>>> policy.fit(support).stop_index(trace)                           # doctest: +SKIP
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from maml_stop.data.accounting import stop_costs
from maml_stop.data.corpus import Trace
from maml_stop.decide.policies.base import (
    FirstHitPolicy,
    StopOutcome,
    StoppingPolicy,
    ThresholdedPolicy,
    full_generation_outcome,
    probe_outcome,
)
from maml_stop.decide.outcomes import CandidateOutcomes, TraceArrays
from maml_stop.decide.selector import StopSelector

__all__ = ["FullGeneration", "FirstProbe", "OraclePolicy", "oracle_at_equal_em", "EqualEMOracle", "TokenBudget",
           "AnswerConsistency", "AnswerConfidence"]


class FullGeneration(StoppingPolicy):
    """Never stop early; run no probes."""

    name = "full"

    def stop_index(self, trace: Trace) -> int | None:
        return None

    def outcome(self, trace: Trace) -> StopOutcome:
        return full_generation_outcome(trace)

    @property
    def vectorised(self) -> bool:
        return type(self) is FullGeneration

    def vector_outcomes(self, traces: Sequence[Trace], arrays: TraceArrays, params: Sequence[float] = ()) -> CandidateOutcomes:
        full = arrays.full_tokens[:, None]
        return CandidateOutcomes(arrays.full_em[:, None].copy(), full.copy(), full.copy(), np.zeros(full.shape, dtype=bool))


class FirstProbe(StoppingPolicy):
    """Stop at the first probe, whatever it says (a trace without probes runs to the end): the answer
    the model gives before most of its chain of thought. When it keeps EM, stopping needs no predictor."""

    name = "first_probe"

    def stop_index(self, trace: Trace) -> int | None:
        return 0 if trace.n_probes else None

    @property
    def vectorised(self) -> bool:
        return type(self) is FirstProbe

    def vector_outcomes(self, traces: Sequence[Trace], arrays: TraceArrays, params: Sequence[float] = ()) -> CandidateOutcomes:
        """Probe 0 where there is one, else the run to the end (paying no probe: there is none)."""
        return _at_probe(arrays, np.zeros(len(arrays), dtype=np.int64), arrays.mask.any(axis=1),
                         arrays.never_total, arrays.never_reasoning)


def _at_probe(arrays: TraceArrays, index: np.ndarray, stopped: np.ndarray, end_total: np.ndarray,
              end_reasoning: np.ndarray) -> CandidateOutcomes:
    """One column of outcomes: stop at probe ``index`` (N,) where ``stopped`` (every probe up to it paid),
    else the run to the end with the full run's EM and ``end_total`` / ``end_reasoning`` tokens."""
    at = np.where(stopped, index, 0) + arrays.mask.shape[1] * np.arange(len(arrays))  # (N,) flat index
    take = (lambda a: a.reshape(-1).take(at)) if arrays.mask.shape[1] else (lambda a: np.zeros(len(arrays)))  # noqa: E731
    return CandidateOutcomes(
        em=np.where(stopped, take(arrays.labels), arrays.full_em)[:, None],
        total=np.where(stopped, take(arrays.stop_total), end_total)[:, None],
        reasoning=np.where(stopped, take(arrays.stop_reasoning), end_reasoning)[:, None],
        stopped=np.asarray(stopped, dtype=bool)[:, None],
    )


class OraclePolicy(StoppingPolicy):
    """Stop at the earliest probe whose answer is correct; when none is, run to the end if the final
    answer is correct (paying no probes: the oracle knows), else stop at the first probe."""

    name = "oracle"

    def stop_index(self, trace: Trace) -> int | None:
        correct = np.flatnonzero(trace.labels > 0.5)
        if correct.size:
            return int(correct[0])
        if trace.final_em or trace.n_probes == 0:
            return None
        return 0

    def outcome(self, trace: Trace) -> StopOutcome:
        index = self.stop_index(trace)
        return full_generation_outcome(trace) if index is None else probe_outcome(trace, index)

    @property
    def vectorised(self) -> bool:
        return type(self) is OraclePolicy

    def vector_outcomes(self, traces: Sequence[Trace], arrays: TraceArrays, params: Sequence[float] = ()) -> CandidateOutcomes:
        correct = (arrays.labels > 0.5) & arrays.mask  # (N, P)
        has = correct.any(axis=1)
        to_end = ~has & ((arrays.full_em > 0.5) | ~arrays.mask.any(axis=1))  # full generation, no probes paid
        return _at_probe(arrays, correct.argmax(axis=1) if correct.size else np.zeros(len(arrays), dtype=np.int64),
                         ~to_end, arrays.full_tokens, arrays.full_tokens)


def oracle_at_equal_em(traces: Sequence[Trace]) -> list[StopOutcome]:
    """The fewest tokens any stopping rule could spend on ``traces`` with as many correct answers as full
    generation (a set-level oracle, unlike :class:`OraclePolicy`, which maximises EM first).

    Every trace first stops at its cheapest point (a probe, or the end without probes); then traces whose
    cheapest point is wrong but which have a correct one move to their cheapest correct point, fewest
    extra tokens first, until as many answers are correct as under full generation. Each move adds one
    correct answer, so taking the cheapest moves first is optimal. :class:`OraclePolicy` also fixes
    answers that full generation gets wrong, which costs tokens: a policy that keeps the full run's EM
    can beat it on savings but never this oracle.
    """
    chosen: list[StopOutcome] = []
    moves: list[tuple[int, int, StopOutcome]] = []
    for i, trace in enumerate(traces):
        # the options in order: full generation, then probe 0..P-1 (ties go to the first, as min() did)
        full = full_generation_outcome(trace)
        stop_total, stop_reasoning = stop_costs(trace)
        totals = np.concatenate([[full.total_tokens], stop_total])
        ems = np.concatenate([[bool(full.em)], np.asarray(trace.labels) > 0.5])

        def option(j: int) -> StopOutcome:
            return full if j == 0 else StopOutcome(j - 1, bool(ems[j]), int(stop_total[j - 1]), int(stop_reasoning[j - 1]))

        c = int(np.argmin(totals))
        cheapest = option(c)
        chosen.append(cheapest)
        if ems.any() and not ems[c]:
            b = int(np.flatnonzero(ems)[np.argmin(totals[ems])])
            moves.append((int(totals[b] - totals[c]), i, option(b)))
    need = sum(bool(t.final_em) for t in traces) - sum(o.em for o in chosen)
    for _, i, best in sorted(moves, key=lambda m: m[:2])[: max(need, 0)]:
        chosen[i] = best
    return chosen


class EqualEMOracle(StoppingPolicy):
    """:func:`oracle_at_equal_em` as a policy: the choice is made over the whole list of traces it is
    evaluated on (``prepare``), so it is a bound for a query set, not a rule for one trace."""

    name = "oracle_equal_em"

    def __init__(self) -> None:
        self._chosen: dict[int, StopOutcome] = {}

    def prepare(self, traces: Sequence[Trace]) -> None:
        self._chosen = {id(t): o for t, o in zip(traces, oracle_at_equal_em(traces))}

    def stop_index(self, trace: Trace) -> int | None:
        return self.outcome(trace).index

    def outcome(self, trace: Trace) -> StopOutcome:
        if id(trace) not in self._chosen:
            raise ValueError("EqualEMOracle chooses over a set of traces: evaluate it with evaluate_policy(policy, traces)")
        return self._chosen[id(trace)]

    @property
    def vectorised(self) -> bool:
        return type(self) is EqualEMOracle

    def vector_outcomes(self, traces: Sequence[Trace], arrays: TraceArrays, params: Sequence[float] = ()) -> CandidateOutcomes:
        """:func:`oracle_at_equal_em` on the arrays: option 0 is full generation, option j > 0 probe j - 1."""
        n = len(arrays)
        totals = np.concatenate([arrays.full_tokens[:, None], np.where(arrays.mask, arrays.stop_total, np.inf)], axis=1)
        ems = np.concatenate([arrays.full_em[:, None] > 0.5, (arrays.labels > 0.5) & arrays.mask], axis=1)  # (N, 1+P)
        rows = np.arange(n)
        option = totals.argmin(axis=1)  # the cheapest point (ties to the first)
        need = int((arrays.full_em > 0.5).sum()) - int(ems[rows, option].sum())
        movers = np.flatnonzero(ems.any(axis=1) & ~ems[rows, option])
        best = np.where(ems, totals, np.inf).argmin(axis=1)  # the cheapest correct point
        extra = totals[movers, best[movers]] - totals[movers, option[movers]]
        moved = movers[np.lexsort((movers, extra))][: max(need, 0)]  # fewest extra tokens first, then trace order
        option[moved] = best[moved]
        return _at_probe(arrays, option - 1, option > 0, arrays.full_tokens, arrays.full_tokens)


class TokenBudget(ThresholdedPolicy):
    """Stop at a fixed reasoning-token budget B: answer from the last probe at or before B, paying that
    one probe (a trace that ends within B runs to its end; one whose first probe lies beyond B answers
    at its first probe). Candidate budgets are quantiles of the support traces' lengths."""

    name = "budget"

    def __init__(
        self,
        selector: StopSelector | None = None,
        quantiles: Sequence[float] = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1),
        default_quantile: float = 0.5,
    ) -> None:
        if not quantiles or any(not 0.0 <= q <= 1.0 for q in quantiles):
            raise ValueError(f"quantiles must be a non-empty list of fractions in [0, 1]; got {list(quantiles)}")
        self.quantiles = sorted(quantiles, reverse=True)  # large budget = conservative
        self.default_quantile = default_quantile
        self._budgets: list[float] = []
        self._default: float | None = None
        super().__init__(selector)

    @property
    def candidates(self) -> list[float]:
        if not self._budgets:
            raise RuntimeError("TokenBudget: call fit(support) first; its budgets are quantiles of support lengths")
        return self._budgets

    @property
    def default_param(self) -> float | None:
        return self._default

    def _fit_scores(self, support: Sequence[Trace]) -> None:
        lengths = np.array([t.reasoning_tokens for t in support], dtype=np.float64)
        self._budgets = [float(np.quantile(lengths, q)) for q in self.quantiles]
        self._default = float(np.quantile(lengths, self.default_quantile))

    def stop_index_at(self, trace: Trace, param: float) -> int | None:
        if trace.reasoning_tokens <= param or trace.n_probes == 0:
            return None
        before = np.flatnonzero(trace.positions <= param)
        return int(before[-1]) if before.size else 0

    def outcome_at(self, trace: Trace, param: float | None) -> StopOutcome:
        index = None if param is None else self.stop_index_at(trace, param)
        if index is None:
            return full_generation_outcome(trace)
        return probe_outcome(trace, index, ran=[index])  # the one forced answer at the cut-off

    @property
    def vectorised(self) -> bool:
        return type(self) is TokenBudget

    def vector_outcomes(self, traces: Sequence[Trace], arrays: TraceArrays, params: Sequence[float]) -> CandidateOutcomes:
        """:meth:`outcome_at` at every budget at once: the last probe at or before it (else the first),
        paying that one probe; full generation where the run ends within it or has no probes."""
        budgets = np.asarray(list(params), dtype=np.float64)  # (J,)
        full = (arrays.reasoning_tokens[:, None] <= budgets) | ~arrays.mask.any(axis=1)[:, None]  # (N, J)
        before = arrays.mask[:, None, :] & (arrays.positions[:, None, :] <= budgets[None, :, None])  # (N, J, P)
        p = before.shape[2]
        at = np.where(before.any(axis=2), p - 1 - before[..., ::-1].argmax(axis=2), 0)  # (N, J) last such probe
        rows = np.arange(len(arrays))[:, None]
        return CandidateOutcomes(
            em=np.where(full, arrays.full_em[:, None], arrays.labels[rows, at]),
            total=np.where(full, arrays.full_tokens[:, None], arrays.positions[rows, at] + arrays.probe_tokens[rows, at]),
            reasoning=np.where(full, arrays.full_tokens[:, None], arrays.positions[rows, at]),
            stopped=~full,
        )


class AnswerConsistency(FirstHitPolicy):
    """Stop once the last k probe answers agree (and are not empty): Dynasor-CoT (Fu et al. 2024,
    arXiv:2412.20993) and ES-CoT. The window k is the parameter; larger k is more conservative."""

    name = "consistency"

    def __init__(self, selector: StopSelector | None = None, windows: Sequence[int] = (8, 6, 5, 4, 3, 2)) -> None:
        if not windows or any(int(k) < 1 for k in windows):
            raise ValueError(f"windows must be positive integers; got {list(windows)}")
        self.windows = sorted({int(k) for k in windows}, reverse=True)
        super().__init__(selector)

    @property
    def candidates(self) -> list[float]:
        return [float(k) for k in self.windows]

    @property
    def default_param(self) -> float | None:
        return 3.0

    def scores(self, trace: Trace) -> np.ndarray:
        """(P,) how many consecutive probes up to each one gave this same non-empty answer."""
        answers = [a.strip() for a in trace.probe_answers]
        run = np.zeros(len(answers))
        for i, a in enumerate(answers):
            run[i] = (run[i - 1] + 1 if i > 0 and a == answers[i - 1] else 1) if a else 0
        return run


class AnswerConfidence(FirstHitPolicy):
    """Stop at the first probe whose forced answer is confident: exp(mean answer-token log-prob) >= c
    (DEER, Yang et al. 2025, arXiv:2504.15895). Higher c is more conservative."""

    name = "confidence"

    def __init__(
        self,
        selector: StopSelector | None = None,
        levels: Sequence[float] = (0.999, 0.99, 0.98, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5),
    ) -> None:
        if not levels or any(not 0.0 <= c <= 1.0 for c in levels):
            raise ValueError(f"levels must be probabilities in [0, 1]; got {list(levels)}")
        self.levels = sorted(levels, reverse=True)
        super().__init__(selector)

    @property
    def candidates(self) -> list[float]:
        return list(self.levels)

    @property
    def default_param(self) -> float | None:
        return 0.95

    def scores(self, trace: Trace) -> np.ndarray:
        """(P,) exp(mean answer-token log-prob) of each probe answer; -inf where the answer is empty."""
        confidence = np.exp(trace.logprob_mean.astype(np.float64))
        nonempty = np.array([bool(a.strip()) for a in trace.probe_answers], dtype=bool)
        return np.where(nonempty, confidence, -np.inf)
