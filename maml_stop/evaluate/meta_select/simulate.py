"""The nested simulation: every family's episodes scored by a probe that never trained on it.

For a held-out family ``h`` the meta-selector learns from the episodes of the training families; to see
on them what it will see on ``h`` (scores of a probe that did not train on the family), each training
family ``f`` is scored by a pooled probe trained on the training families other than ``f``
(leave-one-out, or cross-fitting over ``groups`` groups of families), and ``h`` by the probe trained on
every training family, as the protocol's ``pooled`` method is. Scores depend only on the family, not on
the episode, so each family's :class:`~.outcomes.CandidateOutcomes` are computed once and every episode
is a mask (:class:`~.outcomes.EpisodeSweeps`). Episodes are the protocol's
(:meth:`~maml_stop.data.episodes.EpisodeSampler.fixed_episodes`, the same seed): the held-out family's
simulated episodes are the ones ``maml-stop evaluate`` scores.

>>> held, train = nested_sweeps(by_family, ["gcd"], families, ProbeRecipe(), taus, [16], 50)  # doctest: +SKIP
>>> held["gcd"][16].query_figures()[0].shape                                                             # (50, J + 1)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from maml_stop.decide.meta.outcomes import EpisodeSweeps, TraceTable, candidate_outcomes, episode_masks
from maml_stop.data.episodes import EpisodeSampler
from maml_stop.decide.scores import trace_probabilities
from maml_stop.learn.pooled import train_predictor
from maml_stop.learn.predictor import PredictorConfig

log = logging.getLogger(__name__)

__all__ = ["ProbeRecipe", "family_groups_for", "nested_sweeps", "episode_support"]


@dataclass
class ProbeRecipe:
    """How a pooled probe is trained (the protocol's ``pooled`` method: ``train_predictor``)."""

    hidden: int = 64  # width of hidden layers
    depth: int = 0  # 0: a class-balanced logistic probe (cheap); the protocol's default MLP has 2
    kind: str = "mlp"
    steps: int = 300  # full-batch gradient steps
    lr: float = 0.5
    loss: str = "balanced"
    seed: int = 0
    backend: str = "torch_func"

    def train(self, traces: Sequence, n_features: int):

        config = PredictorConfig(n_features=n_features, hidden=self.hidden, depth=self.depth, kind=self.kind)
        return train_predictor(traces, config, self.steps, self.lr, self.loss, seed=self.seed, backend=self.backend)


def family_groups_for(families: Sequence[str], groups: int | None) -> list[list[str]]:
    """The training families split into ``groups`` groups for cross-fitting (None or >= len: one each)."""
    fams = list(families)
    if groups is None or groups >= len(fams):
        return [[f] for f in fams]
    if groups < 2:
        raise ValueError(f"cross-fitting needs at least 2 groups of families; got groups={groups}")
    return [fams[g::groups] for g in range(groups)]


def episode_support(traces: Sequence, family: str, k: int, episodes: int, seed: int) -> list[list[int]]:
    """Indices (into ``traces``) of the support set of each of the protocol's fixed episodes."""

    index = {t.trace_id: i for i, t in enumerate(traces)}
    sampler = EpisodeSampler({family: list(traces)}, k=k, q=None, seed=seed)
    return [[index[t.trace_id] for t in ep.support]
            for ep in sampler.fixed_episodes(family, n=episodes, seed=seed, k=k, q=None)]


def _sweeps(model, traces: Sequence, family: str, taus: Sequence[float], ks: Sequence[int], episodes: int,
            seed: int) -> dict[int, EpisodeSweeps]:
    """K -> the episode sweeps of ``family`` scored by ``model`` (outcomes computed once for every K)."""

    out = candidate_outcomes(TraceTable.from_traces(traces, trace_probabilities(model, traces)), taus)
    return {k: EpisodeSweeps(episode_masks(len(traces), episode_support(traces, family, k, episodes, seed)), out)
            for k in ks}


def nested_sweeps(
    by_family: Mapping[str, Sequence],
    heldout: Sequence[str],
    train: Sequence[str],
    recipe: ProbeRecipe,
    taus: Sequence[float],
    ks: Sequence[int],
    episodes: int,
    train_episodes: int | None = None,
    seed: int = 0,
    groups: int | None = None,
) -> tuple[dict[str, dict[int, EpisodeSweeps]], dict[str, dict[int, EpisodeSweeps]]]:
    """Episode sweeps (family -> K -> sweeps) of the ``heldout`` families (scored by the probe trained
    on every ``train`` family) and of every ``train`` family (scored by the probe trained on the training
    families outside its cross-fitting group; ``groups=None``: leave-one-family-out). ``train_episodes``
    (default ``episodes``) simulated episodes per training family and K."""
    train = [f for f in train if f not in set(heldout)]
    if len(train) < 2:
        raise ValueError(f"nested simulation needs at least 2 training families; got {train}")
    n_features = int(next(iter(by_family[train[0]])).features.shape[1])
    pooled = recipe.train([t for f in train for t in by_family[f]], n_features)
    held = {h: _sweeps(pooled, by_family[h], h, taus, ks, episodes, seed) for h in heldout}
    sims: dict[str, dict[int, EpisodeSweeps]] = {}
    n_train = episodes if train_episodes is None else train_episodes
    for group in family_groups_for(train, groups):
        model = recipe.train([t for f in train if f not in group for t in by_family[f]], n_features)
        for f in group:
            sims[f] = _sweeps(model, by_family[f], f, taus, ks, n_train, seed)
    log.info("nested sweeps, held out %s: %d training families in %d groups", list(heldout), len(train),
             len(family_groups_for(train, groups)))
    return held, {f: sims[f] for f in train}
