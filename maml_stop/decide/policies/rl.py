"""The RL stopping policy of :mod:`maml_stop.learn.rl` in the evaluation.

* ``rl``: :class:`RLProbePolicy`, the RL-trained predictor as the init of the one adaptation road
  (``InnerLoopAdapter.fit_support`` on the K support traces, the adapter's supervised inner loss), then
  thresholded by the selectors like every learned probe (:class:`~.learned.ProbePolicy`);
* ``rl_unadapted``: :class:`RLPolicy`, the policy's own decision, no adaptation and no threshold
  selection: stop at the first probe whose stop probability is >= ``stop_at`` (0.5), else run to the
  end having paid every probe (the default accounting of :func:`~.base.probe_outcome`).

Both refuse a held-out family that the RL checkpoint was trained or validated on (``seen_families``).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from torch import nn

from maml_stop.data.corpus import Trace
from maml_stop.decide.policies.base import StoppingPolicy
from maml_stop.decide.policies.learned import ProbePolicy
from maml_stop.decide.rule import DEFAULT_TAUS, first_hit
from maml_stop.decide.scores import SupportAdapter, trace_probabilities

__all__ = ["RLPolicy", "RLProbePolicy", "check_held_out"]


def check_held_out(name: str, support: Sequence[Trace], seen: Sequence[str], checkpoint: str | None) -> None:
    """Raise ``ValueError`` when the support family is one the checkpoint saw in training."""
    families = sorted({t.family for t in support} & set(seen))
    if families:
        raise ValueError(f"{name}: the RL checkpoint {checkpoint} was trained or validated on {families}; it cannot "
                         f"be evaluated on them (families it saw: {sorted(seen)})")


class RLProbePolicy(ProbePolicy):
    """:class:`ProbePolicy` around the RL-trained adapter (adapted on support, thresholded by the
    selectors), with the held-out check."""

    def __init__(self, adapter: SupportAdapter, seen_families: Sequence[str] = (), checkpoint: str | None = None,
                 taus: Sequence[float] = DEFAULT_TAUS, tau: float = 0.5, adapt_steps: int | None = None,
                 crossfit: bool = False, seed: int = 0, name: str = "rl") -> None:
        self.seen_families, self.checkpoint = list(seen_families), checkpoint
        super().__init__(adapter=adapter, taus=taus, tau=tau, adapt_steps=adapt_steps,
                         crossfit=crossfit, seed=seed, name=name)

    def _fit_scores(self, support: Sequence[Trace]) -> None:
        check_held_out(self.name, support, self.seen_families, self.checkpoint)
        super()._fit_scores(support)


class RLPolicy(StoppingPolicy):
    """The RL policy's own decision: stop at the first probe with P(stop) >= ``stop_at``."""

    def __init__(self, predictor: nn.Module, stop_at: float = 0.5, seen_families: Sequence[str] = (),
                 checkpoint: str | None = None, name: str = "rl_unadapted") -> None:
        if not 0.0 < stop_at <= 1.0:
            raise ValueError(f"stop_at must be a probability in (0, 1]; got {stop_at}")
        self.predictor, self.stop_at, self.name = predictor, stop_at, name
        self.seen_families, self.checkpoint = list(seen_families), checkpoint
        self._probs: dict[str, np.ndarray] = {}

    def fit(self, support: Sequence[Trace]) -> "RLPolicy":
        check_held_out(self.name, support, self.seen_families, self.checkpoint)
        return self

    def prepare(self, traces: Sequence[Trace]) -> None:
        missing = [t for t in traces if t.trace_id not in self._probs]
        if missing:
            self._probs.update(zip([t.trace_id for t in missing], trace_probabilities(self.predictor, missing)))

    def stop_index(self, trace: Trace) -> int | None:
        self.prepare([trace])
        return first_hit(self._probs[trace.trace_id], self.stop_at)
