"""Today's stopping rules behind :class:`~maml_stop.decide.selector.StopSelector`: fixed, EM target,
risk-controlled (Learn-then-Test), cost, and the back-off calibrated on source families.

Each sees how every candidate does on the K support traces (a
:class:`~maml_stop.decide.selector.SupportSweep`) and returns the chosen candidate, or ``None``: never
stop early (plain full generation, no probes). They are selectable by name through
:mod:`maml_stop.decide.registry`.

* :class:`FixedThreshold`: a given value (or the policy's default), whatever the support says.
* :class:`EMTargetThreshold`: the largest support savings whose support EM stays within ``delta`` of
  full generation.
* :class:`LTTThreshold`: Learn-then-Test (Angelopoulos et al. 2021, arXiv:2110.01052) with a binomial
  tail bound and fixed-sequence testing from conservative to aggressive. The loss of a question is 1
  when full generation answers it correctly and the policy does not; its mean bounds the EM drop from
  above, so with probability >= 1 - alpha over the draw of the support set the chosen candidate's EM
  drop is at most ``delta``. Certifying anything needs ``K >= log(alpha) / log(1 - delta)`` support
  questions (230 for delta = 1 point, alpha = 0.1): with fewer, it never stops early.
* :class:`CostThreshold`: a price per generated token and a cost per wrong answer; the candidate (full
  generation included) with the lowest mean cost on the support set (issue 12 item 3).
* :class:`BackoffEMTarget`: the ``em_target`` choice moved ``backoff`` candidates toward the conservative
  end (past the first: never stop early). The back-off is not chosen on support but fitted on a fold's
  source families (:meth:`BackoffEMTarget.fit` on their simulated episodes; :mod:`maml_stop.evaluate.backoff`
  runs them): with K support questions one extra wrong answer is 100/K points, so the most aggressive
  candidate with no support loss overshoots on the query.

The guarantee assumes the policy's scores do not depend on the support set; a predictor adapted on the
same K traces it is calibrated on sees optimistic support scores, so for adapted probes the bound is a
heuristic (see the report).

>>> import numpy as np
>>> sweep = SupportSweep(em=np.array([[1, 1, 0], [1, 1, 1]]), tokens=np.array([[90, 50, 10], [80, 60, 20]]),
...                      full_em=np.array([1, 1]), full_tokens=np.array([100, 100]))
>>> EMTargetThreshold(delta=0.01).select([0.9, 0.5, 0.1], sweep, default=0.5)
0.5
"""

from __future__ import annotations

import logging
import math
from typing import Sequence

import numpy as np
from scipy import stats

from maml_stop.data import accounting
from maml_stop.decide.selector import SelectorEpisode, StopSelector, SupportSweep, check_inputs

log = logging.getLogger(__name__)

__all__ = [
    "FixedThreshold",
    "EMTargetThreshold",
    "LTTThreshold",
    "CostThreshold",
    "BackoffEMTarget",
    "backed_off",
    "backoff_figures",
    "backoff_table",
    "choose_backoff",
    "binom_cdf",
    "min_certifiable_k",
]

_TOL = 1e-9


def binom_cdf(s: int, n: int, p: float) -> float:
    """P(Binomial(n, p) <= s) (``scipy.stats.binom``)."""
    if s < 0:
        return 0.0
    return float(stats.binom.cdf(int(s), int(n), float(p)))


def min_certifiable_k(delta: float, alpha: float) -> int:
    """Fewest support questions for which Learn-then-Test can certify anything (zero losses observed)."""
    if not (0.0 < delta < 1.0 and 0.0 < alpha < 1.0):
        raise ValueError(f"delta and alpha must lie in (0, 1); got delta={delta}, alpha={alpha}")
    return int(math.ceil(math.log(alpha) / math.log1p(-delta)))


def _best_by_savings(candidates: Sequence[float], sweep: SupportSweep, allowed: np.ndarray) -> float | None:
    """The allowed candidate with the largest support savings; None when none saves anything."""
    if not allowed.any():
        return None
    savings = np.where(allowed, sweep.savings(), -np.inf)
    j = int(np.argmax(savings))  # first (most conservative) among ties
    return float(candidates[j]) if savings[j] > 0.0 else None


class FixedThreshold(StopSelector):
    """A fixed value; ``value=None`` takes each policy's default (tau 0.5, k 3, ...)."""

    name = "fixed"
    params = ("value",)

    def __init__(self, value: float | None = None) -> None:
        self.value = value

    def select(self, candidates: Sequence[float], sweep: SupportSweep, default: float | None) -> float | None:
        return self.value if self.value is not None else default


class EMTargetThreshold(StopSelector):
    """Largest support savings whose support EM drop against full generation is at most ``delta``."""

    name = "em_target"
    params = ("delta",)

    def __init__(self, delta: float = 0.01) -> None:
        if not 0.0 <= delta < 1.0:
            raise ValueError(f"delta is an EM drop as a fraction in [0, 1) (0.01 = 1 point); got {delta}")
        self.delta = delta

    def select(self, candidates: Sequence[float], sweep: SupportSweep, default: float | None) -> float | None:
        check_inputs(candidates, sweep)
        if sweep.n == 0:
            raise ValueError("cannot choose a threshold on an empty support set")
        return _best_by_savings(candidates, sweep, sweep.em_drop() <= self.delta + _TOL)


class LTTThreshold(StopSelector):
    """Learn-then-Test: binomial-tail p-values, fixed-sequence testing from conservative to aggressive;
    among the certified candidates, the one with the largest support savings."""

    name = "ltt"
    params = ("delta", "alpha")

    def __init__(self, delta: float = 0.01, alpha: float = 0.1) -> None:
        if not 0.0 < delta < 1.0:
            raise ValueError(f"delta is an EM drop as a fraction in (0, 1) (0.01 = 1 point); got {delta}")
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha is a probability in (0, 1); got {alpha}")
        self.delta = delta
        self.alpha = alpha

    def p_values(self, sweep: SupportSweep) -> np.ndarray:
        """(J,) p-value of H_j: 'the expected loss of candidate j exceeds delta'."""
        counts = np.rint(sweep.losses().sum(0)).astype(int)
        return np.array([binom_cdf(int(s), sweep.n, self.delta) for s in counts])

    def select(self, candidates: Sequence[float], sweep: SupportSweep, default: float | None) -> float | None:
        check_inputs(candidates, sweep)
        if sweep.n == 0:
            raise ValueError("cannot choose a threshold on an empty support set")
        if sweep.n < min_certifiable_k(self.delta, self.alpha):
            log.debug(
                "LTT: K=%d support questions cannot certify an EM drop <= %.3f at alpha=%.2f (needs K >= %d); "
                "never stopping early",
                sweep.n, self.delta, self.alpha, min_certifiable_k(self.delta, self.alpha),
            )
            return None
        allowed = np.zeros(len(candidates), dtype=bool)
        for j, p in enumerate(self.p_values(sweep)):  # fixed sequence: stop at the first non-rejection
            if p > self.alpha:
                break
            allowed[j] = True
        return _best_by_savings(candidates, sweep, allowed)


class CostThreshold(StopSelector):
    """Lowest expected cost on support: ``token_price * tokens + wrong_answer_cost * (1 - EM)`` per question.

    The candidates are full generation (``None``: no probes, ``full_tokens``, ``full_em``) and every
    threshold of the sweep (tokens with the probes it ran). Ties go to the most conservative: full
    generation first, then the candidates in their order. Only the ratio of the two prices matters:
    ``wrong_answer_cost / token_price`` is how many tokens one wrong answer is worth.

    >>> import numpy as np
    >>> sweep = SupportSweep(em=np.array([[1, 1, 0], [1, 1, 1]]), tokens=np.array([[90, 50, 10], [80, 60, 20]]),
    ...                      full_em=np.array([1, 1]), full_tokens=np.array([100, 100]))
    >>> CostThreshold(token_price=1.0, wrong_answer_cost=100.0).select([0.9, 0.5, 0.1], sweep, default=0.5)
    0.5
    >>> print(CostThreshold(token_price=0.0, wrong_answer_cost=1.0).select([0.9, 0.5, 0.1], sweep, default=0.5))
    None
    """

    name = "cost"
    params = ("token_price", "wrong_answer_cost")

    def __init__(self, token_price: float = 0.001, wrong_answer_cost: float = 1.0) -> None:
        for label, x in (("token_price", token_price), ("wrong_answer_cost", wrong_answer_cost)):
            if not (math.isfinite(x) and x >= 0.0):
                raise ValueError(f"{label} is a non-negative finite price; got {x}")
        self.token_price = float(token_price)
        self.wrong_answer_cost = float(wrong_answer_cost)

    def costs(self, sweep: SupportSweep) -> np.ndarray:
        """(1 + J,) mean cost per support question: full generation first, then each candidate."""
        full = self.token_price * sweep.full_tokens + self.wrong_answer_cost * (1.0 - sweep.full_em)  # (K,)
        each = self.token_price * sweep.tokens + self.wrong_answer_cost * (1.0 - sweep.em)  # (K, J)
        return np.concatenate([[full.mean()], each.mean(0)])

    def select(self, candidates: Sequence[float], sweep: SupportSweep, default: float | None) -> float | None:
        check_inputs(candidates, sweep)
        if sweep.n == 0:
            raise ValueError("cannot choose a threshold on an empty support set")
        costs = self.costs(sweep)
        best = costs.min()
        j = int(np.flatnonzero(costs <= best + _TOL * max(1.0, abs(best)))[0])  # most conservative among ties
        return None if j == 0 else float(candidates[j - 1])


class BackoffEMTarget(EMTargetThreshold):
    """The :class:`EMTargetThreshold` choice, ``backoff`` candidates more conservative; stepping past
    the most conservative candidate means never stopping early (``None``), as does no choice at all.

    >>> import numpy as np
    >>> sweep = SupportSweep(em=np.array([[1, 1, 0], [1, 1, 1]]), tokens=np.array([[90, 50, 10], [80, 60, 20]]),
    ...                      full_em=np.array([1, 1]), full_tokens=np.array([100, 100]))
    >>> BackoffEMTarget(delta=0.01, backoff=1).select([0.9, 0.5, 0.1], sweep, default=0.5)
    0.9
    >>> print(BackoffEMTarget(delta=0.01, backoff=2).select([0.9, 0.5, 0.1], sweep, default=0.5))
    None
    """

    name = "em_target_backoff"
    params = ("delta", "backoff")

    def __init__(self, delta: float = 0.01, backoff: int = 0) -> None:
        super().__init__(delta)
        if int(backoff) != backoff or backoff < 0:
            raise ValueError(f"backoff is a number of candidates, a non-negative integer; got {backoff}")
        self.backoff = int(backoff)

    def index(self, candidates: Sequence[float], sweep: SupportSweep) -> int | None:
        """Index of the ``em_target`` choice among ``candidates`` (None: it never stops early)."""
        chosen = super().select(candidates, sweep, None)
        return None if chosen is None else list(candidates).index(chosen)

    def select(self, candidates: Sequence[float], sweep: SupportSweep, default: float | None) -> float | None:
        return backed_off(candidates, self.index(candidates, sweep), self.backoff)

    def fit(self, candidates: Sequence[float], episodes: Sequence[SelectorEpisode]) -> "BackoffEMTarget":
        """The smallest back-off whose mean query EM drop is within ``delta`` on every family of
        ``episodes`` (:func:`backoff_table`, :func:`choose_backoff`)."""
        _, drop, _ = backoff_table(self, candidates, episodes)
        self.backoff = choose_backoff(drop, self.delta)
        return self


def backed_off(candidates: Sequence[float], index: int | None, backoff: int) -> float | None:
    """The candidate ``backoff`` places before ``index`` (None where that is before the first, or no index)."""
    if index is None or index - backoff < 0:
        return None
    return float(candidates[index - backoff])


def backoff_figures(sweep: SupportSweep, index: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(J + 1,) EM drop and savings on ``sweep`` (a query sweep) at every back-off from ``index``, the
    ``em_target`` choice (None: never stops; then every back-off is full generation: 0 and 0)."""
    n_cand = sweep.em.shape[1]
    drop, savings = np.zeros(n_cand + 1), np.zeros(n_cand + 1)
    if index is None:
        return drop, savings
    full_em, full_tokens = sweep.full_em.mean(), sweep.full_tokens.sum()
    for b in range(index + 1):  # beyond index: full generation, no probes
        j = index - b
        drop[b] = full_em - sweep.em[:, j].mean()
        savings[b] = float(accounting.savings(sweep.tokens[:, j].sum(), full_tokens))
    return drop, savings


def backoff_table(selector: BackoffEMTarget, candidates: Sequence[float],
                  episodes: Sequence[SelectorEpisode]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The families of ``episodes`` (in order of appearance) and their mean query EM drop and savings
    (F, J + 1) at every back-off 0..J from ``selector``'s ``em_target`` choice on each support sweep."""
    by_family: dict[str, list[SelectorEpisode]] = {}
    for ep in episodes:
        by_family.setdefault(ep.family, []).append(ep)
    if not by_family:
        raise ValueError(f"{selector.name}: no source-family episodes to fit the back-off on")
    families = list(by_family)
    drop = np.zeros((len(families), len(candidates) + 1))
    savings = np.zeros_like(drop)
    for i, family in enumerate(families):
        eps = by_family[family]
        for ep in eps:
            d, s = backoff_figures(ep.query, selector.index(candidates, ep.support))
            drop[i] += d / len(eps)
            savings[i] += s / len(eps)
    return families, drop, savings


def choose_backoff(drop: np.ndarray, delta: float) -> int:
    """The smallest back-off whose mean EM drop is within ``delta`` on every family ((F, B) ``drop``;
    the last column, never stopping early, is 0)."""
    ok = np.flatnonzero((np.asarray(drop) <= delta + _TOL).all(axis=0))
    return int(ok[0]) if ok.size else int(np.asarray(drop).shape[1] - 1)
