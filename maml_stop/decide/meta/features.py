"""What a support set says about each candidate, as arrays (the meta-selectors' inputs).

:class:`FamilyEpisodes` is what a meta-selector learns from, per training family: every simulated
episode's support statistics and query drop, and the family's loss and gain rates. It is built from a
simulation's :class:`~.outcomes.EpisodeSweeps` (exact) or from the protocol's
:class:`~maml_stop.decide.selector.SelectorEpisode` lists (:func:`by_family`; rates from the queries).

:class:`SupportStats` holds, for E episodes and J candidates (conservative -> aggressive), the paired
support counts against full generation: losses (full right, candidate wrong), gains (full wrong,
candidate right), stops, stops at a wrong answer, and the token savings. It is built from the summed
sweeps of a simulation (:meth:`~.outcomes.EpisodeSweeps.support_sums`) or from one
:class:`~maml_stop.decide.selector.SupportSweep` (a deployment's K shots, E = 1).

>>> import numpy as np
>>> from maml_stop.decide.selector import SupportSweep
>>> sweep = SupportSweep(em=np.array([[1, 0], [0, 1]]), tokens=np.array([[90, 20], [99, 30]]),
...                      full_em=np.array([1, 0]), full_tokens=np.array([100, 100]))
>>> s = SupportStats.from_sweep(sweep, stopped=np.array([[1, 1], [0, 1]]))
>>> s.loss.tolist(), s.gain.tolist(), s.drop.tolist()
([[0.0, 1.0]], [[0.0, 1.0]], [[0.0, 0.0]])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

from maml_stop.data import accounting

if TYPE_CHECKING:  # pragma: no cover
    from maml_stop.decide.meta.outcomes import EpisodeSweeps
    from maml_stop.decide.selector import SelectorEpisode

__all__ = ["SupportStats", "FamilyEpisodes", "by_family", "infer_stopped"]


def _logit(count: np.ndarray, total: np.ndarray) -> np.ndarray:
    """Smoothed log-odds of ``count`` out of ``total`` (add one half to each side)."""
    return np.log((count + 0.5) / (total - count + 0.5))


@dataclass
class SupportStats:
    """Paired support counts of E episodes at J candidates (all (E, J) but ``n``, ``full_em`` (E,))."""

    n: np.ndarray  # (E,) support questions
    full_em: np.ndarray  # (E,) full generation's correct answers
    loss: np.ndarray  # (E, J) full right, candidate wrong
    gain: np.ndarray  # (E, J) full wrong, candidate right
    stopped: np.ndarray  # (E, J) traces stopped at a probe
    wrong_stop: np.ndarray  # (E, J) traces stopped at a wrong answer
    savings: np.ndarray  # (E, J) support token savings (fraction)

    @classmethod
    def from_sums(cls, sums: Mapping[str, np.ndarray]) -> "SupportStats":
        return cls(sums["n"], sums["full_em"], sums["loss"], sums["gain"], sums["stopped"], sums["wrong_stop"],
                   accounting.savings(sums["tokens"], sums["full_tokens"][:, None]))

    @classmethod
    def from_sweep(cls, sweep, stopped: np.ndarray | None = None) -> "SupportStats":
        """One support set (E = 1); ``stopped`` (K, J) defaults to :func:`infer_stopped`."""
        em, full = sweep.em, sweep.full_em[:, None]
        stop = infer_stopped(sweep.tokens) if stopped is None else np.asarray(stopped, dtype=np.float64)
        one = lambda a: np.asarray(a, dtype=np.float64).sum(0, keepdims=True)  # noqa: E731  (1, J)
        return cls(np.array([float(sweep.n)]), np.array([float(sweep.full_em.sum())]), one(full * (1 - em)),
                   one((1 - full) * em), one(stop), one(stop * (1 - em)),
                   np.atleast_2d(accounting.savings(sweep.tokens.sum(0), sweep.full_tokens.sum())))

    @property
    def drop(self) -> np.ndarray:
        """(E, J) net paired support EM drop (fraction): (losses - gains) / K."""
        return (self.loss - self.gain) / self.n[:, None]

    def design(self) -> np.ndarray:
        """(E, J, 7) the conditioning statistics of a candidate's prior: 1, log-odds of the support
        precision of its stops, of the support full-generation EM, of its stop rate, its rank j / (J - 1),
        and the rank's products with the two rates."""
        e, j = self.loss.shape
        rank = np.broadcast_to(np.arange(j) / max(j - 1, 1), (e, j))
        precision = _logit(self.stopped - self.wrong_stop, self.stopped)
        full = np.broadcast_to(_logit(self.full_em, self.n)[:, None], (e, j))
        stop = _logit(self.stopped, np.broadcast_to(self.n[:, None], (e, j)))
        return np.stack([np.ones((e, j)), precision, full, stop, rank, precision * rank, stop * rank], -1)


def infer_stopped(tokens: np.ndarray) -> np.ndarray:
    """(K, J) 0/1: which support traces a first-hit policy stopped early, from its tokens alone. A policy
    that never fires pays every probe, the most any candidate can cost, so a trace stopped at candidate j
    iff it cost less there than at its costliest candidate (exact when some candidate, usually the most
    conservative, does not fire on the trace; where every candidate fires, the costliest counts as not
    stopped)."""
    tokens = np.asarray(tokens, dtype=np.float64)
    return (tokens < tokens.max(axis=1, keepdims=True)).astype(np.float64)


def _smoothed(hits: np.ndarray, trials: float) -> np.ndarray:
    return (np.asarray(hits, dtype=np.float64) + 0.5) / (float(trials) + 1.0)


@dataclass
class FamilyEpisodes:
    """One training family's simulated episodes (E) at J candidates."""

    stats: SupportStats  # the support statistics of every episode
    query_drop: np.ndarray  # (E, J + 1) query EM drop: full generation (0), then every candidate
    loss_rate: np.ndarray  # (J,) the family's rate of losses among questions full generation gets right
    gain_rate: np.ndarray  # (J,) its rate of gains among questions full generation gets wrong
    full_em: float  # the family's full-generation EM

    @classmethod
    def from_sweeps(cls, sweeps: "EpisodeSweeps") -> "FamilyEpisodes":
        o = sweeps.out
        right = float(o.full_em.sum())
        return cls(SupportStats.from_sums(sweeps.support_sums()), sweeps.query_figures()[0],
                   _smoothed((o.full_em[:, None] * (1 - o.em)).sum(0), right),
                   _smoothed(((1 - o.full_em[:, None]) * o.em).sum(0), len(o.full_em) - right),
                   float(o.full_em.mean()))

    @classmethod
    def from_episodes(cls, episodes: Sequence["SelectorEpisode"]) -> "FamilyEpisodes":
        """From one family's episodes (support and query sweeps); rates pooled over the query sets."""
        if not episodes:
            raise ValueError("no episodes to learn from")
        parts = [SupportStats.from_sweep(ep.support, getattr(ep.support, "stopped", None)) for ep in episodes]
        stats = SupportStats(*(np.concatenate([getattr(p, f) for p in parts]) for f in SupportStats.__dataclass_fields__))
        drops = [np.concatenate([[0.0], ep.query.em_drop()]) for ep in episodes]
        right = sum(float(ep.query.full_em.sum()) for ep in episodes)
        wrong = sum(float((1 - ep.query.full_em).sum()) for ep in episodes)
        loss = sum(ep.query.losses().sum(0) for ep in episodes)
        gain = sum(((1 - ep.query.full_em[:, None]) * ep.query.em).sum(0) for ep in episodes)
        full = float(np.mean([ep.query.full_em.mean() for ep in episodes]))
        return cls(stats, np.stack(drops), _smoothed(loss, right), _smoothed(gain, wrong), full)


def by_family(episodes: Sequence["SelectorEpisode"]) -> dict[str, FamilyEpisodes]:
    """The protocol's simulated episodes grouped by family (in first-seen order)."""
    groups: dict[str, list] = {}
    for ep in episodes:
        groups.setdefault(ep.family, []).append(ep)
    return {f: FamilyEpisodes.from_episodes(eps) for f, eps in groups.items()}
