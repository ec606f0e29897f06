"""The decision's second half: a :class:`StopSelector` turns how every candidate does on the K support
traces (a :class:`SupportSweep`) into the candidate to use, or ``None``: full generation (issue 25 item 1).

A thresholded policy (a stopping predictor with threshold tau, answer-consistency with window k, ...)
offers an ordered list of **candidates**, from the most conservative (stops latest) to the most
aggressive; full generation is always a choice. A selector that learns across families (a prior, a
mapping, a margin, a back-off) is fitted first on simulated episodes of the meta-training families
(:class:`SelectorEpisode`: a support sweep and the query sweep of the same episode); today's rules learn
nothing there, so their :meth:`StopSelector.fit` is a no-op. :meth:`StopSelector.state_dict` is what an
adapted artifact records (the rule's name, its settings and what it fitted), and the registry
(:func:`maml_stop.decide.registry.selector_from_state`) rebuilds the same selector from it.

>>> import numpy as np
>>> sweep = SupportSweep(em=np.array([[1, 1, 0], [1, 1, 1]]), tokens=np.array([[90, 50, 10], [80, 60, 20]]),
...                      full_em=np.array([1, 1]), full_tokens=np.array([100, 100]))
>>> sweep.em_drop().tolist(), sweep.savings().round(2).tolist()
([0.0, 0.0, 0.5], [0.15, 0.45, 0.85])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from maml_stop.data import accounting

__all__ = ["SupportSweep", "SelectorEpisode", "StopSelector", "ThresholdSelector", "check_inputs"]


@dataclass
class SupportSweep:
    """How each candidate does on the support traces (candidates ordered conservative -> aggressive)."""

    em: np.ndarray  # (K, J) EM of the answer returned by candidate j on trace k
    tokens: np.ndarray  # (K, J) total tokens (probes included) of candidate j on trace k
    full_em: np.ndarray  # (K,) EM of full generation
    full_tokens: np.ndarray  # (K,) tokens of full generation

    def __post_init__(self) -> None:
        self.em = np.asarray(self.em, dtype=np.float64).reshape(len(self.full_em), -1)
        self.tokens = np.asarray(self.tokens, dtype=np.float64).reshape(self.em.shape)
        self.full_em = np.asarray(self.full_em, dtype=np.float64)
        self.full_tokens = np.asarray(self.full_tokens, dtype=np.float64)

    @property
    def n(self) -> int:
        return int(self.em.shape[0])

    def em_drop(self) -> np.ndarray:
        """(J,) support EM drop of each candidate against full generation."""
        return self.full_em.mean() - self.em.mean(0)

    def savings(self) -> np.ndarray:
        """(J,) support token savings of each candidate against full generation."""
        return accounting.savings(self.tokens.sum(0), self.full_tokens.sum())

    def losses(self) -> np.ndarray:
        """(K, J) 1 where full generation is right and candidate j is wrong: its mean bounds the EM drop."""
        return self.full_em[:, None] * (1.0 - self.em)


@dataclass(frozen=True)
class SelectorEpisode:
    """One simulated episode of a meta-training family, what a cross-family selector learns from: the
    policy fitted on ``support`` (its sweep) and scored on the query (``query``, the same candidates)."""

    family: str
    support: SupportSweep
    query: SupportSweep


def check_inputs(candidates: Sequence[float], sweep: SupportSweep) -> None:
    """Raise unless ``sweep`` has one column per candidate."""
    if sweep.em.shape[1] != len(candidates):
        raise ValueError(f"the sweep has {sweep.em.shape[1]} columns but there are {len(candidates)} candidates")


class StopSelector:
    """Chooses a candidate from how the candidates do on support; ``None`` = never stop early.

    Subclasses set ``name`` (their registry name), ``params`` (the constructor arguments, recorded by
    :meth:`state_dict`) and :meth:`select`; one that learns across families overrides :meth:`fit` and
    adds what it fitted to :meth:`state_dict` / :meth:`from_state`."""

    name = "selector"
    params: tuple[str, ...] = ()

    def select(self, candidates: Sequence[float], sweep: SupportSweep, default: float | None) -> float | None:
        raise NotImplementedError

    def fit(self, candidates: Sequence[float], episodes: Sequence[SelectorEpisode]) -> "StopSelector":
        """Learn across the meta-training families' episodes; today's rules learn nothing (a no-op)."""
        return self

    def state_dict(self) -> dict[str, Any]:
        """The rule's name and settings (plain values): what an adapted artifact records."""
        return {"name": self.name, **{p: getattr(self, p) for p in self.params}}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> "StopSelector":
        """The selector :meth:`state_dict` described."""
        state = dict(state)
        name = state.pop("name", cls.name)
        if name != cls.name:
            raise ValueError(f"a state of selector {name!r} cannot build {cls.__name__} ({cls.name!r})")
        unknown = sorted(set(state) - set(cls.params))
        if unknown:
            raise ValueError(f"{cls.name}: unknown settings {unknown}; valid: {list(cls.params)}")
        return cls(**state)


ThresholdSelector = StopSelector  # the former name (meta-learned selectors, older notebooks)
