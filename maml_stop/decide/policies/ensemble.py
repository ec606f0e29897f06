"""Ensembles of stopping policies (issue 13 item 3): average or vote over several predictors and
heuristics (e.g. MAML-adapted probe + answer consistency + answer confidence), with weights fitted on the
support set.

Each part is a :class:`FirstHitPolicy` (a per-probe score thresholded by its own parameter). Its
**score in [0, 1]** at each probe (:func:`part_scores`):

* a learned probe (:class:`ProbePolicy`): its P(stopping here keeps the answer correct);
* :class:`AnswerConfidence`: exp(mean answer-token log-prob) of the forced answer (the trace's
  ``logprob_mean``), 0 where the forced answer is empty;
* :class:`AnswerConsistency`: the run length of identical non-empty probe answers up to this probe
  divided by ``window``, capped at 1 (0 where the answer is empty);
* any other first-hit part: its score clipped to [0, 1].

**Weights** (:func:`fit_weights`), fitted on the support probes: ``w_j ∝ max(AUC_j - 0.5, 0)``, AUC_j the
area under the ROC curve of part j's score against the probes' labels (does stopping here keep the answer
right), pooled over every probe of the K support traces; uniform when no part beats chance or the
labels are all one class. Rank-based, no optimisation, no scale to learn: at K = 16 (a few hundred
probes, strongly correlated within a trace) it cannot overfit the way a regression of the labels on
the scores can, and a part at chance gets no weight. A learned part with ``crossfit=True`` gives its
out-of-sample support scores to the weights and to the ensemble's support sweep (without crossfit
its in-sample scores look better than they are, and it gets more weight than it should).

Combination rules, per probe t, with weights ``w`` (summing to 1):

* ``combine="average"``: score(t) = sum_j w_j s_j(t); stop at the first probe with score >= tau. The
  parameter is tau (grid ``taus``, conservative -> aggressive; default ``tau``).
* ``combine="vote"``: part j has fired by probe t when its own score reached its own support-chosen
  parameter at some probe <= t (its own first-hit rule, its parameter chosen by its own selector in its
  ``fit``; a part whose selector says "never stop early" never fires; a fired part stays fired, as in
  :class:`~maml_stop.decide.policies.hybrid.Both`). score(t) = the weight share of fired parts; stop at
  the first probe where it reaches q. The parameter is q, the required weight share (grid ``shares``;
  q = 1: every weighted part has fired, q = 0.5: a weighted majority).

Either way the ensemble exposes ONE parameter to the threshold selectors (tau, or q), chosen on the
ensemble's own support sweep. Every part is fitted on the same support set (its own ``fit``); the support
scores the weights and the sweep read are taken right after each part has fitted its scores (as
:class:`~maml_stop.decide.policies.hybrid.Either` does, before a crossfit probe forgets them).

Accounting (DESIGN.md "Honest accounting"): every part reads the forced answer of every probe point up
to the stop (they are probing policies, the heuristics read the answer and its log-probs), so the
ensemble pays the default: every probe up to its stop (all of them when it runs to the end), and no
``ran`` is stated.

>>> from maml_stop.decide.thresholds import FixedThreshold
>>> from maml_stop.decide.policies import AnswerConfidence, AnswerConsistency
>>> policy = Ensemble([AnswerConsistency(), AnswerConfidence()], combine="average", selector=FixedThreshold(0.8))
>>> policy.fit(support).outcome(trace)                              # doctest: +SKIP
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from maml_stop.data.corpus import Trace
from maml_stop.decide.policies.base import FirstHitPolicy
from maml_stop.decide.policies.baselines import AnswerConsistency
from maml_stop.decide.rule import DEFAULT_TAUS
from maml_stop.decide.selector import StopSelector

__all__ = ["Ensemble", "part_scores", "fit_weights", "roc_auc", "COMBINE_RULES", "DEFAULT_SHARES"]

COMBINE_RULES = ("average", "vote")
DEFAULT_SHARES: tuple[float, ...] = (1.0, 0.75, 0.5, 0.25)  # vote: required weight share, conservative first
_EPS = 1e-9  # weight shares are sums of floats: 0.4999999999 counts as 0.5


def part_scores(part: FirstHitPolicy, raw: np.ndarray, window: int = 3) -> np.ndarray:
    """(P,) a part's score in [0, 1] from its raw ``part.scores(trace)`` (see the module docstring)."""
    raw = np.asarray(raw, dtype=np.float64)
    if isinstance(part, AnswerConsistency):
        return np.minimum(raw / float(window), 1.0)
    return np.clip(np.where(np.isfinite(raw), raw, 0.0), 0.0, 1.0)  # confidence: -inf (empty answer) -> 0


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Area under the ROC curve (ties count one half); None when the labels are all one class."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels) > 0.5
    pos, neg = scores[labels], scores[~labels]
    if not pos.size or not neg.size:
        return None
    diff = pos[:, None] - neg[None, :]  # (n_pos, n_neg)
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


def fit_weights(scores: Sequence[np.ndarray], labels: np.ndarray) -> np.ndarray:
    """(J,) weights of J parts, summing to 1: ``max(AUC_j - 0.5, 0)`` normalised, from each part's pooled
    support-probe scores ``scores[j]`` (N_probes,) against ``labels`` (N_probes,); uniform when no part
    beats chance or the labels are one class."""
    aucs = [roc_auc(s, labels) for s in scores]
    w = np.array([0.0 if a is None else max(a - 0.5, 0.0) for a in aucs])
    if w.sum() <= 0:
        return np.full(len(scores), 1.0 / len(scores))
    return w / w.sum()


class Ensemble(FirstHitPolicy):
    """Average (``combine="average"``, parameter tau) or weighted vote (``combine="vote"``, parameter the
    required weight share q) of the per-probe scores of ``parts``, weights fitted on support."""

    def __init__(
        self,
        parts: Sequence[FirstHitPolicy],
        combine: str = "average",
        selector: StopSelector | None = None,
        taus: Sequence[float] = DEFAULT_TAUS,
        tau: float = 0.5,
        shares: Sequence[float] = DEFAULT_SHARES,
        default_share: float = 0.5,
        window: int = 3,
        name: str | None = None,
    ) -> None:
        if combine not in COMBINE_RULES:
            raise ValueError(f"unknown combine rule {combine!r}; valid: {', '.join(COMBINE_RULES)}")
        if len(parts) < 2:
            raise ValueError(f"an ensemble needs at least two parts; got {len(parts)}")
        bad = [type(p).__name__ for p in parts if not isinstance(p, FirstHitPolicy)]
        if bad:
            raise TypeError(f"ensemble parts must be FirstHitPolicy (a per-probe score and a threshold); got {bad}")
        grid = list(taus if combine == "average" else shares)
        if combine == "average" and (not grid or any(not 0.0 <= g <= 1.0 for g in grid)):
            raise ValueError(f"taus must lie in [0, 1]; got {grid}")
        if combine == "vote" and (not grid or any(not 0.0 < g <= 1.0 for g in grid)):  # 0: always stop at once
            raise ValueError(f"shares must lie in (0, 1]; got {grid}")
        if int(window) < 1:
            raise ValueError(f"window must be a positive integer; got {window}")
        self.parts, self.combine, self.window = list(parts), combine, int(window)
        self.grid = sorted(grid, reverse=True)  # high tau / share = conservative
        self.default = float(tau if combine == "average" else default_share)
        self.name = name or f"ensemble_{combine}"
        self.weights = np.full(len(self.parts), 1.0 / len(self.parts))  # set by fit
        self._support_raw: dict[str, list[np.ndarray]] = {}  # trace_id -> each part's raw support scores
        super().__init__(selector)

    @property
    def candidates(self) -> list[float]:
        return list(self.grid)

    @property
    def default_param(self) -> float | None:
        return self.default

    def _fit_scores(self, support: Sequence[Trace]) -> None:
        """Fit every part on ``support`` (its own ``fit`` and selector), keep the raw support scores each
        gives right after fitting its scores, and fit the weights on them."""
        raws: list[dict[str, np.ndarray]] = []
        for part in self.parts:
            captured: dict[str, np.ndarray] = {}
            fit_scores = part._fit_scores

            def fit_then_capture(traces: Sequence[Trace], part=part, fit_scores=fit_scores, captured=captured) -> None:
                fit_scores(traces)
                part.prepare(support)
                captured.update({t.trace_id: np.asarray(part.scores(t), dtype=np.float64) for t in support})

            part._fit_scores = fit_then_capture  # type: ignore[method-assign]
            try:
                part.fit(support)
            finally:
                del part._fit_scores  # back to the class's method
            if not captured:  # a part whose fit does not go through _fit_scores
                part.prepare(support)
                captured = {t.trace_id: np.asarray(part.scores(t), dtype=np.float64) for t in support}
            raws.append(captured)
        self._support_raw = {t.trace_id: [r[t.trace_id] for r in raws] for t in support}
        labels = np.concatenate([np.asarray(t.labels, dtype=np.float64) for t in support])
        pooled = [np.concatenate([part_scores(p, r[t.trace_id], self.window) for t in support])
                  for p, r in zip(self.parts, raws)]
        self.weights = fit_weights(pooled, labels)

    def fit(self, support: Sequence[Trace]) -> "Ensemble":
        try:
            super().fit(support)
        finally:
            self._support_raw = {}  # the support scores served the weights and the sweep only
        return self

    def prepare(self, traces: Sequence[Trace]) -> None:
        if traces:
            for part in self.parts:
                part.prepare(traces)

    def part_matrix(self, trace: Trace) -> np.ndarray:
        """(J, P) every part's score in [0, 1] at every probe of ``trace``."""
        raw = self._raw(trace)
        return np.stack([part_scores(p, r, self.window) for p, r in zip(self.parts, raw)]) if raw else np.zeros((0, 0))

    def _raw(self, trace: Trace) -> list[np.ndarray]:
        if trace.trace_id in self._support_raw:
            return self._support_raw[trace.trace_id]
        return [np.asarray(p.scores(trace), dtype=np.float64) for p in self.parts]

    def fired(self, trace: Trace) -> np.ndarray:
        """(J, P) vote: whether part j has fired at or before each probe at its own fitted parameter."""
        rows = []
        for part, raw in zip(self.parts, self._raw(trace)):
            hit = np.zeros(trace.n_probes, dtype=bool) if part.param is None else raw >= part.param
            rows.append(np.logical_or.accumulate(hit) if hit.size else hit)
        return np.stack(rows)

    def scores(self, trace: Trace) -> np.ndarray:
        """(P,) the weighted mean score (average) or the weight share of fired parts (vote)."""
        if trace.n_probes == 0:
            return np.zeros(0)
        if self.combine == "average":
            return self.weights @ self.part_matrix(trace)
        return self.weights @ self.fired(trace).astype(np.float64) + _EPS
