"""Online A/B test of two serving policies with an always-valid confidence sequence.

Traffic is split in randomised blocks of two: of each two consecutive requests a fair coin sends one to
A and the other to B, so each pair gives one difference ``D = reward_A - reward_B`` of two independent
requests from the same stream (iid when the stream is; mean ``mu_A - mu_B``; variance
``var_A + var_B``, without the inverse-propensity blow-up of a per-request coin). A policy sees only its
own requests (an online stopper learns from its half alone). The reward of a request is minus the cost
of :class:`~maml_stop.decide.thresholds.CostThreshold`: ``-(token_price * tokens + wrong_answer_cost *
(1 - EM))``.

After every pair, the asymptotic confidence sequence of Waudby-Smith, Arbour, Sinha, Kennedy and Ramdas
(2021, "Time-uniform central limit theory and asymptotic confidence sequences", arXiv:2103.06476,
Theorem 2.2) on the mean difference,

    mean_n +- sd_n * sqrt( 2 (n rho^2 + 1) / (n^2 rho^2) * log( sqrt(n rho^2 + 1) / alpha ) ),
    rho = sqrt( (-2 log alpha + log(-2 log alpha + 1)) / t_star ),

covers ``mu_A - mu_B`` at all n at once with probability about ``1 - alpha`` (so peeking after every pair
is allowed; ``t_star`` is the number of pairs where it is tightest). The test stops the first time the
sequence excludes 0 (after ``min_pairs``): "A better" or "B better"; a run that reaches ``max_requests``
without that says "no difference".

>>> ab = SequentialAB(ABConfig(alpha=0.05, min_pairs=10, t_star=100))
>>> verdicts = [ab.update(1.0 + 0.1 * (i % 3), 0.0) for i in range(12)]
>>> verdicts.index("A better") + 1                     # the first pair allowed to decide
10
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np

__all__ = ["ABConfig", "ABResult", "SequentialAB", "reward", "run_ab", "VERDICTS"]

VERDICTS = ("A better", "B better", "no difference")

# a serving policy: a request -> (EM of the answer served, total tokens spent)
Server = Callable[..., tuple[bool, int]]


@dataclass(frozen=True)
class ABConfig:
    """The online A/B test (tuned values in ``experiments/drift.yaml``)."""

    alpha: float = 0.05  # risk of the time-uniform confidence sequence (two-sided)
    t_star: int = 500  # pairs at which the sequence is tightest
    min_pairs: int = 20  # pairs before a verdict may be given (the variance estimate settles)
    max_requests: int = 4000  # "no difference" when no verdict by then
    token_price: float = 0.001  # reward = -(token_price * tokens + wrong_answer_cost * (1 - EM))
    wrong_answer_cost: float = 1.0
    seed: int = 0  # the coin of each block of two

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"alpha is a probability in (0, 1); got {self.alpha}")
        if self.t_star < 1 or self.min_pairs < 2 or self.max_requests < 2 * self.min_pairs:
            raise ValueError(f"need t_star >= 1, min_pairs >= 2 and max_requests >= 2 * min_pairs; got "
                             f"{self.t_star}, {self.min_pairs}, {self.max_requests}")
        for label, x in (("token_price", self.token_price), ("wrong_answer_cost", self.wrong_answer_cost)):
            if not (math.isfinite(x) and x >= 0.0):
                raise ValueError(f"{label} is a non-negative finite price; got {x}")


def reward(em: bool | float, tokens: float, token_price: float = 0.001, wrong_answer_cost: float = 1.0) -> float:
    """Minus the cost of a request: ``-(token_price * tokens + wrong_answer_cost * (1 - em))``."""
    return -(token_price * float(tokens) + wrong_answer_cost * (1.0 - float(em)))


def half_width(sd: float, n: int, alpha: float, t_star: int) -> float:
    """Half-width of the asymptotic confidence sequence after ``n`` pairs (module docstring)."""
    la = -2.0 * math.log(alpha)
    rho2 = (la + math.log(la + 1.0)) / t_star
    v = n * rho2 + 1.0
    return sd * math.sqrt(2.0 * v / (n * n * rho2) * math.log(math.sqrt(v) / alpha))


@dataclass
class ABResult:
    """The outcome of :func:`run_ab`."""

    verdict: str  # one of VERDICTS
    n_requests: int  # requests served when the test stopped (2 per pair)
    n_pairs: int
    mean_difference: float  # mean reward A - B per request
    lower: float  # the confidence sequence at the stop
    upper: float
    reward_a: float  # mean reward of each arm
    reward_b: float
    history: list[tuple[int, float, float, float]] = field(default_factory=list)  # (pairs, mean, lower, upper)

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "history"}


class SequentialAB:
    """The confidence sequence on paired differences; :meth:`update` returns a verdict or None."""

    def __init__(self, config: ABConfig | None = None) -> None:
        self.config = config if config is not None else ABConfig()
        self.n, self._sum, self._sq = 0, 0.0, 0.0
        self.sum_a = self.sum_b = 0.0
        self.lower, self.upper = -math.inf, math.inf

    @property
    def mean(self) -> float:
        return self._sum / self.n if self.n else float("nan")

    def update(self, reward_a: float, reward_b: float) -> str | None:
        d = float(reward_a) - float(reward_b)
        self.n += 1
        self._sum += d
        self._sq += d * d
        self.sum_a += reward_a
        self.sum_b += reward_b
        if self.n < 2:
            return None
        var = max(self._sq / self.n - self.mean ** 2, 0.0) * self.n / (self.n - 1)
        h = half_width(math.sqrt(var), self.n, self.config.alpha, self.config.t_star)
        self.lower, self.upper = self.mean - h, self.mean + h
        return self.verdict()

    def verdict(self) -> str | None:
        """Pure: "A better" / "B better" once the sequence excludes 0 (after ``min_pairs``), else None."""
        if self.n < self.config.min_pairs:
            return None
        if self.lower > 0.0:
            return VERDICTS[0]
        if self.upper < 0.0:
            return VERDICTS[1]
        return None


def run_ab(serve_a: Server, serve_b: Server, stream: Iterable, config: ABConfig | None = None) -> ABResult:
    """Split ``stream`` (items passed to the servers as they are; a tuple is unpacked into arguments) in
    randomised blocks of two between ``serve_a`` and ``serve_b`` and test sequentially (module
    docstring). Stops at the first verdict or after ``max_requests`` requests."""
    cfg = config if config is not None else ABConfig()
    rng = np.random.default_rng(cfg.seed)
    test = SequentialAB(cfg)
    history: list[tuple[int, float, float, float]] = []
    verdict, served, items = None, 0, iter(stream)

    def call(server: Server, item) -> float:
        em, tokens = server(*item) if isinstance(item, tuple) else server(item)
        return reward(em, tokens, cfg.token_price, cfg.wrong_answer_cost)

    while served + 2 <= cfg.max_requests:
        try:
            first, second = next(items), next(items)
        except StopIteration:
            break
        a_first = bool(rng.random() < 0.5)
        r_a = call(serve_a, first if a_first else second)
        r_b = call(serve_b, second if a_first else first)
        served += 2
        verdict = test.update(r_a, r_b)
        history.append((test.n, test.mean, test.lower, test.upper))
        if verdict is not None:
            break
    n = max(test.n, 1)
    return ABResult(verdict or VERDICTS[2], served, test.n, test.mean, test.lower, test.upper,
                    test.sum_a / n, test.sum_b / n, history)
