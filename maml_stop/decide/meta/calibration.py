"""The meta-calibrated margin (issue 25 item 2c), in the manner of few-shot conformal prediction with
auxiliary tasks (Fisch et al., ICML 2021).

Each training family ``f`` is scored as the held-out family will be: the selector is fitted on the other
training families' episodes, and ``f``'s **needed margin** ``m_f`` is the smallest margin on the grid
from which on (every larger grid margin too) ``f``'s mean query EM drop over its simulated episodes is
within ``delta``. The margin is the ``ceil((n + 1)(1 - alpha))``-th smallest of the ``n`` needed margins
(+inf, never stopping early, when that rank exceeds ``n``).

What it guarantees: if the held-out family's needed margin (its selector fitted on all ``n`` training
families) is exchangeable with the ``n`` calibration margins, then with probability >= 1 - alpha over
the draw of the n + 1 families, the held-out family's mean query drop (over the episode distribution
simulated) is within ``delta``. It is a statement over families, not per question nor per episode; the
calibration fits use n - 1 families and the held-out fit n (a jackknife's approximation of
exchangeability); and it assumes the held-out family is drawn like the training families.

>>> import numpy as np
>>> conformal_margin(np.array([0.01, 0.02, 0.03, 0.04]), alpha=0.2)   # rank ceil(5 * 0.8) = 4
0.04
>>> conformal_margin(np.array([0.01, 0.02, 0.03, 0.04]), alpha=0.1)   # rank 5 > 4: never stop early
inf
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from maml_stop.decide.meta.features import FamilyEpisodes

__all__ = ["MARGINS", "MarginCalibration", "conformal_margin", "needed_margin", "meta_calibrate"]

MARGINS: tuple[float, ...] = tuple(np.round(np.linspace(-0.05, 0.15, 81), 6))  # fractions of EM (-5..15 pts)
_TOL = 1e-9


def conformal_margin(needed: np.ndarray, alpha: float) -> float:
    """The ``ceil((n + 1)(1 - alpha))``-th smallest needed margin (+inf when that rank exceeds n)."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha is a probability in (0, 1); got {alpha}")
    needed = np.sort(np.asarray(needed, dtype=np.float64))
    rank = math.ceil((len(needed) + 1) * (1.0 - alpha))
    return float(needed[rank - 1]) if rank <= len(needed) else math.inf


def needed_margin(selector: Any, family: FamilyEpisodes, margins: Sequence[float] = MARGINS) -> float:
    """The smallest grid margin from which on ``family``'s mean query drop at the selector's choices stays
    within its ``delta`` (+inf: not even the largest grid margin keeps it)."""
    drop = family.query_drop  # (E, J + 1)
    rows = np.arange(drop.shape[0])
    over = np.array([drop[rows, selector.decide(family.stats, m)].mean() > selector.delta + _TOL for m in margins])
    if not over.any():
        return float(margins[0])
    last = int(np.flatnonzero(over)[-1])
    return float(margins[last + 1]) if last + 1 < len(margins) else math.inf


@dataclass
class MarginCalibration:
    """The chosen margin, every training family's needed margin, and the stated rate."""

    margin: float
    alpha: float
    needed: dict[str, float] = field(default_factory=dict)

    @property
    def guarantee(self) -> str:
        n = len(self.needed)
        return (f"P(held-out family's mean query EM drop <= delta) >= {1 - self.alpha:.2f} over exchangeable "
                f"draws of {n} + 1 families (margin {self.margin:.4f})")

    def to_json(self) -> dict[str, Any]:
        return {"margin": self.margin, "alpha": self.alpha, "needed": dict(self.needed), "guarantee": self.guarantee}


def meta_calibrate(
    make: Callable[[], Any],
    families: Mapping[str, FamilyEpisodes],
    alpha: float,
    margins: Sequence[float] = MARGINS,
) -> MarginCalibration:
    """Leave each training family out, fit ``make()`` (:meth:`Any.learn`, no margin) on the rest,
    take its needed margin; the margin is their conformal quantile (:func:`conformal_margin`)."""
    if len(families) < 2:
        raise ValueError(f"meta-calibration needs at least 2 training families; got {sorted(families)}")
    needed = {}
    for f, sweeps in families.items():
        selector = make().learn([s for g, s in families.items() if g != f])
        needed[f] = needed_margin(selector, sweeps, margins)
    return MarginCalibration(conformal_margin(np.array(list(needed.values())), alpha), alpha, needed)
