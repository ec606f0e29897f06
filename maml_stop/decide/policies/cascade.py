"""Cascades of a small and a large model on paired traces (issue 28 item 3): when to hand a question over.

A :class:`CascadePolicy` decides, per :class:`~maml_stop.data.pairs.PairedTrace`, which model answers and
what that costs (:class:`CascadeOutcome`: EM, tokens of each model, weighted by a
:class:`~maml_stop.data.pairs.CostModel`). The thresholded ones are fitted on the K support pairs and
their parameter is chosen by the threshold selectors (:class:`~maml_stop.decide.selector.StopSelector`)
on a :class:`~maml_stop.decide.selector.SupportSweep` whose reference ("full generation") is **the
large model alone**: the EM drop is measured against the large model's EM and the savings against its
weighted cost; a selector's ``None`` means "send every question to the large model".

Accounting (DESIGN.md "Honest accounting", token counts from :mod:`maml_stop.data.accounting`):

* :class:`SmallOnly` / :class:`LargeOnly`: one model's plain full generation (``full_cost``).
* :class:`EscalateAtProbe` (a): the small model generates; at each probe point its router reads free
  features (no forced answer is paid) and gives P(its full run will be right); at the first probe where
  ``1 - P >= tau`` (the one first-hit rule, :mod:`maml_stop.decide.rule`) the question goes to the large
  model: the small model's ``positions[i]`` tokens are paid, then the large model's full run (from the
  prompt). No escalation: the small model's full run.
* :class:`EscalateAtStart` (b): the router reads the question alone; ``1 - P >= tau``: the large model's full
  run only; else the small model's.
* :class:`RunBoth` (c): both models run in full (both paid); the small model's answer is kept where its
  P(right) at its last probe exceeds the large model's by at least the margin ``m``, else the large one's.
* :class:`OracleRouter`: knows both EMs; the small model unless only the large one is right (then the
  large model alone): a bound, not a policy.

>>> from maml_stop.data.pairs import CostModel
>>> CascadeOutcome(em=True, small_tokens=40, large_tokens=100).cost(CostModel(2.0))
240.0
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from maml_stop.data.accounting import full_cost
from maml_stop.data.pairs import CostModel, PairedTrace
from maml_stop.decide.rule import NEVER, first_hit, first_hits
from maml_stop.decide.selector import StopSelector, SupportSweep
from maml_stop.decide.thresholds import FixedThreshold

log = logging.getLogger(__name__)

__all__ = ["CascadeOutcome", "CascadePolicy", "SmallOnly", "LargeOnly", "OracleRouter", "ThresholdedCascade",
           "EscalateAtProbe", "EscalateAtStart", "RunBoth", "DEFAULT_ESCALATE_TAUS", "DEFAULT_MARGINS"]

# escalate where 1 - P(small right) >= tau: from conservative (escalates most) to aggressive
DEFAULT_ESCALATE_TAUS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
# keep the small answer where P_small - P_large >= m: from conservative (keeps the large answer most) down
DEFAULT_MARGINS: tuple[float, ...] = (0.5, 0.3, 0.2, 0.1, 0.0, -0.1, -0.2, -0.3)


@dataclass(frozen=True)
class CascadeOutcome:
    """What a cascade's decision on one question yields."""

    em: bool
    small_tokens: int  # tokens the small model generated (its probes' forced answers included)
    large_tokens: int
    escalated: bool = False  # the answer is the large model's

    def cost(self, price: CostModel) -> float:
        """Weighted cost in small-model tokens."""
        return price.cost(self.small_tokens, self.large_tokens)


def small_outcome(pair: PairedTrace) -> CascadeOutcome:
    return CascadeOutcome(bool(pair.small.final_em), full_cost(pair.small), 0, False)


def large_outcome(pair: PairedTrace, small_tokens: int = 0) -> CascadeOutcome:
    """The large model's full run after ``small_tokens`` of the small model's."""
    return CascadeOutcome(bool(pair.large.final_em), int(small_tokens), full_cost(pair.large), True)


class CascadePolicy:
    """Fit on the K support pairs, then choose per pair which model answers."""

    name = "cascade"

    def fit(self, support: Sequence[PairedTrace]) -> "CascadePolicy":
        return self

    def outcome(self, pair: PairedTrace) -> CascadeOutcome:
        raise NotImplementedError


class SmallOnly(CascadePolicy):
    name = "small"

    def outcome(self, pair: PairedTrace) -> CascadeOutcome:
        return small_outcome(pair)


class LargeOnly(CascadePolicy):
    name = "large"

    def outcome(self, pair: PairedTrace) -> CascadeOutcome:
        return large_outcome(pair)


class OracleRouter(CascadePolicy):
    """The small model unless it is wrong and the large one right (then the large model from the start)."""

    name = "oracle_router"

    def outcome(self, pair: PairedTrace) -> CascadeOutcome:
        if pair.large.final_em and not pair.small.final_em:
            return large_outcome(pair)
        return small_outcome(pair)


class ThresholdedCascade(CascadePolicy):
    """A cascade indexed by one parameter (candidates conservative -> aggressive), chosen on support by a
    selector against the large model alone; ``param`` None: the large model alone."""

    def __init__(self, price: CostModel, candidates: Sequence[float], default: float,
                 selector: StopSelector | None = None, name: str = "cascade") -> None:
        if not candidates:
            raise ValueError(f"{name}: needs at least one candidate parameter")
        self.price, self.candidates, self.default_param = price, list(candidates), float(default)
        self.selector = selector if selector is not None else FixedThreshold()
        self.name = name
        self.param: float | None = self.default_param
        self.support_sweep: SupportSweep | None = None

    def _fit_scores(self, support: Sequence[PairedTrace]) -> None:
        """Fit the routers on support."""

    def _forget(self, support: Sequence[PairedTrace]) -> None:
        """Drop out-of-sample support scores after the sweep."""

    def _outcomes(self, pair: PairedTrace, params: np.ndarray) -> list[CascadeOutcome]:
        """The outcome of each parameter of ``params`` ``(J,)`` on ``pair``, its routers read once."""
        raise NotImplementedError

    def outcome_at(self, pair: PairedTrace, param: float | None) -> CascadeOutcome:
        return large_outcome(pair) if param is None else self._outcomes(pair, np.array([float(param)]))[0]

    def outcomes(self, pair: PairedTrace) -> list[CascadeOutcome]:
        """The outcome of every candidate, in candidate order."""
        return self._outcomes(pair, np.asarray(self.candidates, dtype=np.float64))

    def outcome(self, pair: PairedTrace) -> CascadeOutcome:
        return self.outcome_at(pair, self.param)

    def sweep(self, pairs: Sequence[PairedTrace]) -> SupportSweep:
        """EM and weighted cost of every candidate on ``pairs`` against the large model alone: (N, J)."""
        outs = [self.outcomes(p) for p in pairs]
        em = np.array([[o.em for o in row] for row in outs], dtype=np.float64)
        cost = np.array([[o.cost(self.price) for o in row] for row in outs], dtype=np.float64)
        large = [large_outcome(p) for p in pairs]
        return SupportSweep(em=em, tokens=cost, full_em=np.array([o.em for o in large], dtype=np.float64),
                            full_tokens=np.array([o.cost(self.price) for o in large]))

    def fit(self, support: Sequence[PairedTrace]) -> "ThresholdedCascade":
        if not support:
            raise ValueError(f"{self.name}: cannot fit on an empty support set")
        self._fit_scores(support)
        self.support_sweep = self.sweep(support)
        self._forget(support)
        self.param = self.choose(self.selector)
        return self

    def choose(self, selector: StopSelector) -> float | None:
        """The parameter ``selector`` picks from the fitted support sweep (does not change ``param``)."""
        if self.support_sweep is None:
            raise RuntimeError(f"{self.name}: call fit(support) before choosing a threshold")
        return selector.select(self.candidates, self.support_sweep, self.default_param)


class _SmallRouted(ThresholdedCascade):
    """A cascade whose router reads the small model's traces, with taus as its candidates."""

    kind = "escalate"  # the default name

    def __init__(self, router, price: CostModel, taus: Sequence[float] = DEFAULT_ESCALATE_TAUS,
                 default: float = 0.5, selector: StopSelector | None = None, name: str | None = None) -> None:
        self.router = router
        super().__init__(price, sorted(taus), default, selector, name or self.kind)

    def _fit_scores(self, support: Sequence[PairedTrace]) -> None:
        self.router.fit([p.small for p in support])

    def _forget(self, support: Sequence[PairedTrace]) -> None:
        self.router.forget([p.small for p in support])


class EscalateAtProbe(_SmallRouted):
    """(a) Hand over at the first probe where the small model's give-up score ``1 - P(right)`` reaches tau;
    ``router``: a fitted-on-support P(right) over the small traces' probes (``maml_stop.evaluate.cascade.make_router``)."""

    kind = "escalate_probe"

    def escalation(self, pair: PairedTrace, tau: float | None) -> int | None:
        """The probe at which the question is handed over (None: the small model answers)."""
        return first_hit(1.0 - self.router.scores(pair.small), tau)

    def _outcomes(self, pair: PairedTrace, params: np.ndarray) -> list[CascadeOutcome]:
        hits = first_hits(1.0 - self.router.scores(pair.small), params)  # (J,): the probe of the switch
        return [small_outcome(pair) if i == NEVER else large_outcome(pair, int(pair.small.positions[i])) for i in hits]


class EscalateAtStart(_SmallRouted):
    """(b) Hand over before generating where ``1 - P(small right | question)`` reaches tau."""

    kind = "escalate_start"

    def _outcomes(self, pair: PairedTrace, params: np.ndarray) -> list[CascadeOutcome]:
        hits = first_hits(1.0 - self.router.scores(pair.small)[:1], params)  # (J,): the question's one row
        return [small_outcome(pair) if i == NEVER else large_outcome(pair) for i in hits]


class RunBoth(ThresholdedCascade):
    """(c) Both models run in full; keep the small model's answer where its P(right) at its last probe
    exceeds the large model's by at least the margin (``small_router``, ``large_router``: fitted on the
    support pairs' small and large traces; two objects, since the two traces of a pair share an id)."""

    def __init__(self, small_router, large_router, price: CostModel, margins: Sequence[float] = DEFAULT_MARGINS,
                 default: float = 0.0, selector: StopSelector | None = None, name: str = "run_both") -> None:
        if small_router is large_router:
            raise ValueError(f"{name}: give two router objects (the small and the large traces share trace ids)")
        self.small_router, self.large_router = small_router, large_router
        super().__init__(price, sorted(margins, reverse=True), default, selector, name)

    def _fit_scores(self, support: Sequence[PairedTrace]) -> None:
        self.small_router.fit([p.small for p in support])
        self.large_router.fit([p.large for p in support])

    def _forget(self, support: Sequence[PairedTrace]) -> None:
        self.small_router.forget([p.small for p in support])
        self.large_router.forget([p.large for p in support])

    def trust_gap(self, pair: PairedTrace) -> float:
        """P(small right) - P(large right), each at its trace's last probe."""
        return float(self.small_router.scores(pair.small)[-1] - self.large_router.scores(pair.large)[-1])

    def _outcomes(self, pair: PairedTrace, params: np.ndarray) -> list[CascadeOutcome]:
        both = (full_cost(pair.small), full_cost(pair.large))
        keep_small = first_hits(np.array([self.trust_gap(pair)]), params) != NEVER  # (J,)
        return [CascadeOutcome(bool(pair.small.final_em), *both, escalated=False) if k
                else CascadeOutcome(bool(pair.large.final_em), *both, escalated=True) for k in keep_small]
