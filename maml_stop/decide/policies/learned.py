"""The learned probe: a stopping predictor thresholded at tau.

:class:`ProbePolicy` only thresholds. The road from support traces to an adapted predictor (collate,
normalise, adapt) is :meth:`maml_stop.learn.adapter.InnerLoopAdapter.fit_support`, and out-of-sample
support scores come from :func:`maml_stop.decide.scores.crossfit_probabilities`: the policy calls them.
"""

from __future__ import annotations

from operator import attrgetter
from typing import Sequence

import numpy as np
import torch
from torch import nn

from maml_stop.data import fastpath
from maml_stop.data.family import same_traces
from maml_stop.data.corpus import Trace
from maml_stop.decide.policies.base import FirstHitPolicy
from maml_stop.decide.rule import DEFAULT_TAUS
from maml_stop.decide.scores import (
    SupportAdapter,
    crossfit_probabilities,
    flat_probabilities,
    split_rows,
    trace_probabilities,
)
from maml_stop.decide.selector import StopSelector

__all__ = ["ProbePolicy", "DEFAULT_TAUS"]

_TRACE_ID = attrgetter("trace_id")


class ProbePolicy(FirstHitPolicy):
    """A stopping predictor: stop at the first probe whose P(stop keeps the answer) >= tau.

    ``adapter=None`` uses ``predictor`` as it is (the pooled probe without adaptation); otherwise
    ``fit`` adapts with ``adapter.fit_support(support, adapt_steps, renormalise)`` (MAML-adapted,
    fine-tuned, or trained from scratch: each is an :class:`~maml_stop.learn.adapter.InnerLoopAdapter`
    around the right initial predictor). ``renormalise=True`` first sets the predictor's normalisation
    from the support features (for a predictor trained from scratch, which has no source statistics).

    ``taus`` is the grid the selectors choose from (sorted conservative -> aggressive); ``tau`` is the one
    the ``fixed`` rule uses (``FixedThreshold()``). ``crossfit=True`` chooses tau on out-of-sample support scores
    (:func:`~maml_stop.decide.scores.crossfit_probabilities`, seeded by ``seed``: each half of the
    support questions scored by the predictor adapted on the other half); the policy then uses the
    predictor adapted on all K. Without it, the threshold is chosen on the very traces the predictor
    was adapted on, whose scores are optimistic (see the report).
    """

    def __init__(
        self,
        predictor: nn.Module | None = None,
        adapter: SupportAdapter | None = None,
        selector: StopSelector | None = None,
        taus: Sequence[float] = DEFAULT_TAUS,
        tau: float = 0.5,
        renormalise: bool = False,
        adapt_steps: int | None = None,
        crossfit: bool = False,
        seed: int = 0,
        name: str = "probe",
    ) -> None:
        if predictor is None and adapter is None:
            raise ValueError("ProbePolicy needs a predictor or an adapter")
        if not taus or any(not 0.0 <= t <= 1.0 for t in taus):
            raise ValueError(f"taus must be probabilities in [0, 1]; got {list(taus)}")
        self.predictor = predictor if predictor is not None else adapter.predictor  # type: ignore[union-attr]
        self.adapter = adapter
        self.taus = sorted(taus, reverse=True)  # high tau = conservative
        self.tau = tau
        self.renormalise = renormalise
        self.adapt_steps = adapt_steps
        self.crossfit = crossfit
        self.seed = seed
        self.name = name
        self.model: nn.Module | None = None if adapter is not None else self.predictor
        self._probs = {}  # scores by trace id (see the property)
        super().__init__(selector)

    @property
    def candidates(self) -> list[float]:
        return list(self.taus)

    @property
    def default_param(self) -> float | None:
        return self.tau

    def preset(self, model: nn.Module, support_probs: dict[str, np.ndarray]) -> None:
        """Make the next :meth:`fit` use ``model`` (the predictor adapted on that support set) and
        ``support_probs`` (its cross-fitted support scores, by trace id) instead of adapting: what
        episode-batched evaluation (:mod:`maml_stop.evaluate.batched`) computed for all episodes at once."""
        self._preset = (model, dict(support_probs))

    @property
    def _probs(self) -> dict[str, np.ndarray]:
        """Scores by trace id; a list scored at once on the fast path waits whole (``_pending``) until
        something reads scores by id (here, or a policy that holds this probe)."""
        pending = self.__dict__.get("_pending")
        if pending is not None:
            self._pending = None
            self._by_id.update(zip([t.trace_id for t in pending[1]], self._views(pending)))
        return self._by_id

    @_probs.setter
    def _probs(self, value: dict[str, np.ndarray]) -> None:
        self._pending, self._by_id = None, value

    @staticmethod
    def _views(pending: list) -> list[np.ndarray]:
        if pending[3] is None:
            pending[3] = split_rows(pending[2], pending[1])
        return pending[3]

    def _fit_scores(self, support: Sequence[Trace]) -> None:
        self._probs = {}
        preset, self._preset = getattr(self, "_preset", None), None
        if preset is not None:
            self.model, probs = preset
            if self.crossfit:
                self._probs = probs
            return
        if self.adapter is None:
            self.model = self.predictor
            return
        if self.crossfit:  # support scores for threshold selection, out of sample
            self._probs = crossfit_probabilities(self.adapter, support, self.adapt_steps, self.renormalise, self.seed)
        with torch.no_grad():  # first-order inner steps, a detached clone
            self.model = self.adapter.fit_support(support, steps=self.adapt_steps, renormalise=self.renormalise)

    def fit(self, support: Sequence[Trace]) -> "ProbePolicy":
        super().fit(support)
        if self.crossfit:  # the out-of-sample support scores served threshold selection only
            for t in support:
                self._probs.pop(t.trace_id, None)
        return self

    def probabilities(self, traces: Sequence[Trace]) -> list[np.ndarray]:
        """P(stopping here keeps the answer correct) at every probe, per trace: list of (P_i,)."""
        pending = self._scored_at_once(traces)
        if pending is not None:
            return list(self._views(pending))
        missing = [t for t in traces if t.trace_id not in self._probs]
        if missing:
            self._probs.update(zip([t.trace_id for t in missing], trace_probabilities(self.model, missing)))
        return [self._probs[t.trace_id] for t in traces]

    def flat_probabilities(self, traces: Sequence[Trace]) -> np.ndarray:
        """:meth:`probabilities` concatenated, trace by trace: (sum of P_i,) float64."""
        pending = self._scored_at_once(traces)
        return pending[2] if pending is not None else np.concatenate(self.probabilities(traces))

    def _scored_at_once(self, traces: Sequence[Trace]) -> list | None:
        """On the fast path, when none of ``traces`` has a score yet (their ids distinct), or when they are
        the list so scored last: ``[None, traces, flat scores (one batch, as the loop scores them), views]``."""
        if self.model is None:
            raise RuntimeError(f"{self.name}: call fit(support) before scoring traces")
        if not fastpath.enabled() or not traces or type(self).probabilities is not ProbePolicy.probabilities:
            return None  # the reference path; a subclass that scores its own way
        pending = self.__dict__.get("_pending")
        if pending is not None and same_traces(pending[1], traces):
            return pending
        ids = set(map(_TRACE_ID, traces))
        by_id = self._probs  # any other pending list moves in first
        if len(ids) < len(traces) or not by_id.keys().isdisjoint(ids):
            return None
        self._pending = [None, tuple(traces), flat_probabilities(self.model, traces), None]  # the traces held
        return self._pending

    def prepare(self, traces: Sequence[Trace]) -> None:
        if traces and self._scored_at_once(traces) is None:  # scored at once: nothing split per trace yet
            self.probabilities(traces)

    def scores(self, trace: Trace) -> np.ndarray:
        return self.probabilities([trace])[0]

    def scores_of(self, traces: Sequence[Trace]) -> list[np.ndarray]:
        return self.probabilities(traces)

    def padded_scores(self, traces: Sequence[Trace], arrays) -> np.ndarray:
        return arrays.pad_flat(self.flat_probabilities(traces))
