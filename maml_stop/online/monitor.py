"""A rolling EM-drop monitor with a one-sided confidence bound: fall back to full generation while the
stopping policy cannot be trusted, return when it can.

Each request with feedback (it ran to its end, :mod:`.labels`) tells what the deployed policy would have
done on it, decided before the feedback was seen (prequential: out of sample): its paired difference
``d = (final answer right) - (early answer right)`` in {-1, 0, 1} (with agreement feedback "right" means
"stated" for the final answer and "agrees with it" for the early one, so ``d`` is 0 or 1). The EM drop is
``p_loss - p_gain``, the rates of the two kinds of paired disagreement (``d = 1``: stopping lost the
point; ``d = -1``: stopping fixed a wrong final answer). Over the last ``window`` feedbacks (``n``) the
monitor bounds it with one-sided Clopper-Pearson bounds (``scipy.stats.beta``):

* ``net=True`` (gold feedback only; McNemar's conditioning): given the ``m`` discordant pairs, the
  losses are Binomial(m, q) and the drop is ``(m / n) (2 q - 1)``; the bound is ``(m / n) (2 CP(q) - 1)``
  (``m / n`` taken as observed);
* ``net=False`` (the default, and always with agreement feedback, which sees no gains): gains count as 0
  and the bound is the plain bound on the loss rate, as in Learn-then-Test
  (:mod:`maml_stop.decide.thresholds`): it bounds the drop from above, so it falls back more often, on
  a family where stopping early also fixes wrong final answers.

* ``bound="upper"`` (certify, the default): stop early only while the upper bound is ``<= delta``; the
  policy must earn its way back after a switch (and needs about ``log(alpha) / log(1 - delta)`` clean
  feedbacks before it may stop early at all);
* ``bound="lower"`` (detect): fall back once the lower bound is ``> delta`` (the drop is above ``delta``
  with confidence about ``1 - alpha``), return once it is back ``<= delta``.

Before ``min_feedback`` feedbacks are in the window the state does not change (a fresh deployment
starts trusting the policy its K-shot adaptation chose, unless ``start_in_fallback``).

>>> m = DropMonitor(delta=0.1, config=MonitorConfig(window=20, alpha=0.1, bound="lower", min_feedback=5, net=True))
>>> [m.update(1) for _ in range(5)][-1], m.fallback          # five losses of five: the drop is above 0.1
(True, True)
>>> [m.update(0) for _ in range(20)][-1], m.fallback        # twenty clean ones push them out of the window
(False, False)
>>> m.update(-1), round(m.estimate(), 2)                     # a gain: stopping fixed a wrong final answer
(False, -0.05)
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from scipy import stats

__all__ = ["BOUNDS", "MonitorConfig", "DropMonitor", "clopper_pearson"]

BOUNDS = ("upper", "lower")


@dataclass(frozen=True)
class MonitorConfig:
    """The EM-drop monitor (tuned values in ``experiments/drift.yaml``)."""

    window: int = 200  # the last losses the estimate reads (feedback requests, not all requests)
    alpha: float = 0.1  # one-sided risk of the Clopper-Pearson bound
    bound: str = "upper"  # upper (certify: fall back unless the drop is bounded by delta) | lower (detect)
    min_feedback: int = 20  # losses in the window before the monitor may change state
    start_in_fallback: bool = False  # True: a new deployment serves full generation until certified
    net: bool = False  # gold feedback: bound losses minus gains (union bound) instead of losses alone

    def __post_init__(self) -> None:
        if self.bound not in BOUNDS:
            raise ValueError(f"unknown monitor bound {self.bound!r}; valid: {', '.join(BOUNDS)}")
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"monitor alpha is a probability in (0, 1); got {self.alpha}")
        if self.window < 1 or not 0 <= self.min_feedback <= self.window:
            raise ValueError(f"need window >= 1 and 0 <= min_feedback <= window; got window={self.window}, "
                             f"min_feedback={self.min_feedback}")


def clopper_pearson(s: int, n: int, alpha: float, side: str = "upper") -> float:
    """One-sided Clopper-Pearson bound at level ``1 - alpha`` on a binomial rate from ``s`` of ``n``:
    ``upper`` = ``beta.ppf(1 - alpha, s + 1, n - s)`` (1 when s = n), ``lower`` = ``beta.ppf(alpha, s, n - s + 1)``
    (0 when s = 0). With n = 0: 1 (upper) or 0 (lower).

    >>> round(clopper_pearson(0, 100, 0.1), 4)                 # = 1 - 0.1 ** (1 / 100)
    0.0228
    """
    if side not in BOUNDS:
        raise ValueError(f"unknown side {side!r}; valid: {', '.join(BOUNDS)}")
    if not 0 <= s <= n:
        raise ValueError(f"need 0 <= s <= n; got s={s}, n={n}")
    if side == "upper":
        return 1.0 if s >= n else float(stats.beta.ppf(1.0 - alpha, s + 1, n - s))
    return 0.0 if s <= 0 else float(stats.beta.ppf(alpha, s, n - s + 1))


class DropMonitor:
    """Rolling paired differences of the deployed policy on feedback requests and the fallback decision
    (module docstring). :meth:`update` takes one ``d`` in {-1, 0, 1} and returns ``fallback``."""

    def __init__(self, delta: float, config: MonitorConfig | None = None, signed: bool | None = None) -> None:
        if not 0.0 < delta < 1.0:
            raise ValueError(f"delta is an EM drop as a fraction in (0, 1) (0.01 = 1 point); got {delta}")
        self.delta = float(delta)
        self.config = config if config is not None else MonitorConfig()
        # signed: gains count (net drop); False: one-sided losses (gains recorded as 0); None: config.net
        self.signed = self.config.net if signed is None else bool(signed)
        self.diffs: deque[int] = deque(maxlen=self.config.window)
        self.fallback = bool(self.config.start_in_fallback)
        self.alarms = 0  # times it fell back

    @property
    def n(self) -> int:
        return len(self.diffs)

    def estimate(self) -> float:
        """Mean paired difference over the window: the EM drop estimate (NaN when empty)."""
        return sum(self.diffs) / self.n if self.n else float("nan")

    def bound(self) -> float:
        """The configured one-sided bound of the window's EM drop (module docstring)."""
        side, alpha = self.config.bound, self.config.alpha
        losses = sum(1 for d in self.diffs if d > 0)
        if not self.signed:
            return clopper_pearson(losses, self.n, alpha, side)
        m = losses + sum(1 for d in self.diffs if d < 0)  # discordant pairs
        if m == 0:
            return 0.0
        return m / self.n * (2.0 * clopper_pearson(losses, m, alpha, side) - 1.0)

    def decide(self) -> bool:
        """Pure: would the current window call for full generation?"""
        if self.n < self.config.min_feedback:
            return self.fallback
        return self.bound() > self.delta

    def update(self, d: float) -> bool:
        """Record one feedback request's paired difference; returns whether to serve full generation."""
        if d not in (-1, 0, 1):
            raise ValueError(f"a paired difference (final right) - (early right) is -1, 0 or 1; got {d}")
        self.diffs.append(int(d) if self.signed else max(int(d), 0))
        new = self.decide()
        if new and not self.fallback:
            self.alarms += 1
        self.fallback = new
        return self.fallback
