"""The one stopping rule: stop at the first probe whose score reaches tau.

Every stopping decision of the package is this rule applied to some score (a predictor's probability, a
forced answer's confidence, a run length of agreeing answers): the thresholded policies
(:class:`~maml_stop.decide.policies.base.FirstHitPolicy`), the live criterion
(:class:`~maml_stop.live.rule.StopRule`), the adapted artifact
(:meth:`~maml_stop.live.artifact.AdaptedPredictor.should_stop`) and the RL policy
(:func:`~maml_stop.learn.rl.greedy_stops`). ``tau`` None (or inf) means "never stop early".

* :func:`reached`: one probe point as it happens (live): does ``score`` reach ``tau``?
* :func:`first_hit`: one trace's scores ``(P,)``: the index of the first probe that reaches ``tau``, or None.
* :func:`first_hits`: the array form, NumPy or torch: scores ``(..., P)`` against ``tau`` (a scalar, or an
  array broadcast against the leading dimensions), with an optional mask of real probes; :data:`NEVER`
  where no probe reaches it.

>>> import numpy as np
>>> first_hit(np.array([0.2, 0.7, 0.9]), 0.5), first_hit(np.array([0.2, 0.3]), 0.5)
(1, None)
>>> first_hits(np.array([0.2, 0.7, 0.9]), np.array([0.95, 0.8, 0.5])).tolist()
[-1, 2, 1]
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

__all__ = ["NEVER", "DEFAULT_TAUS", "reached", "first_hit", "first_hits"]

NEVER = -1  # the array form's "no probe reached tau: run to the end"

# probe thresholds from conservative to aggressive: the one default grid (tuned grids go in experiments/*.yaml)
DEFAULT_TAUS: tuple[float, ...] = (0.99, 0.97, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)

Array = TypeVar("Array", np.ndarray, torch.Tensor)


def reached(score: float, tau: float | None) -> bool:
    """Stop at this probe point? ``score >= tau``; ``tau`` None never stops."""
    return tau is not None and score >= tau


def first_hit(scores: np.ndarray, tau: float | None) -> int | None:
    """Index of the first of one trace's probes whose score reaches ``tau`` (scores ``(P,)``); None: none does."""
    if tau is None:
        return None
    hits = np.flatnonzero(np.asarray(scores) >= tau)
    return int(hits[0]) if hits.size else None


def first_hits(scores: Array, tau: float | Array, mask: Array | None = None) -> Array:
    """Index of the first probe whose score reaches ``tau`` along the last axis, :data:`NEVER` where none does.

    ``scores`` ``(..., P)`` (NumPy or torch); ``tau`` a scalar or an array of the leading shape (broadcast:
    one trace's scores ``(P,)`` against taus ``(J,)`` give ``(J,)``); ``mask`` ``(..., P)`` bool: the probes that exist
    (padding is never a hit). Returns int64 of the leading shape, of the input's kind."""
    if isinstance(scores, torch.Tensor):
        hit = scores >= torch.as_tensor(tau, dtype=scores.dtype, device=scores.device)[..., None]
        if mask is not None:
            hit = hit & mask
        return torch.where(hit.any(dim=-1), hit.float().argmax(dim=-1), torch.full_like(hit[..., 0], NEVER, dtype=torch.long))
    hit = np.asarray(scores) >= np.asarray(tau, dtype=np.float64)[..., None]
    if mask is not None:
        hit = hit & np.asarray(mask, dtype=bool)
    first = hit.argmax(axis=-1)  # the first hit, or 0 where there is none
    if hit.size < _LARGE:
        found = hit.any(axis=-1)
    else:  # a sweep of many traces and taus: read the hit at the argmax (any() over a short axis is slower)
        found = np.take_along_axis(hit, first[..., None], axis=-1)[..., 0]
    return np.where(found, first, NEVER).astype(np.int64)


_LARGE = 4096  # hits from which first_hits reads found-or-not at the argmax (the same result, faster)
