"""The back-off of ``em_target_backoff``, calibrated on a fold's source families (issue 10).

With K support questions, ``em_target`` picks the most aggressive candidate whose support EM is within
``delta`` of full generation; one extra wrong answer is 100/K points (6.25 at K = 16), so the pick is
the most aggressive candidate that happened to lose nothing on 16 questions, and on the query it
overshoots the target (the LOFO reports: most probing methods over the 1-point target on 4-7 of 10
families). :class:`~maml_stop.decide.thresholds.BackoffEMTarget` steps ``b`` candidates back toward the
conservative end. ``b`` is one number per fold, method and K, chosen here without the held-out family:
the same policy is fitted and thresholded on ``episodes`` K-shot episodes of every source family (the
families the fold's predictor was meta-trained on), and ``b`` is the smallest back-off whose mean query
EM drop is within ``delta`` on every source family (the target of the protocol, "within the target on
every family"). Past the most conservative candidate the policy never stops early, which always meets it.

The calibration is honest for predictors fitted on support alone (``scratch``, cost-aware policies with
``cost_aware_learner: scratch``); for meta-trained predictors the source families were seen in
meta-training, so their query scores are better than a new family's and ``b`` errs on the aggressive
side (the held-out results say by how much).

>>> calib = calibrate_backoff(policy, {"gcd": traces_gcd, "lcm": traces_lcm}, k=16, episodes=20,  # doctest: +SKIP
...                           query=None, seed=0, delta=0.01)
>>> calib.backoff, calib.drop.shape                                                                  # doctest: +SKIP
(3, (2, 15))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from maml_stop.data.corpus import Trace
from maml_stop.data.episodes import EpisodeSampler
from maml_stop.decide.policies import ThresholdedPolicy, sweep_policy
from maml_stop.decide.selector import SelectorEpisode
from maml_stop.decide.thresholds import BackoffEMTarget, backoff_table, choose_backoff

__all__ = ["BackoffCalibration", "calibrate_backoff", "simulate_episodes"]


@dataclass
class BackoffCalibration:
    """Mean query EM drop and savings on each source family at every back-off 0..J (J = candidates;
    back-off J never stops early), and the chosen back-off."""

    families: list[str]
    episodes: int
    drop: np.ndarray  # (F, J + 1) mean query EM drop (fraction) per source family and back-off
    savings: np.ndarray  # (F, J + 1) mean query token savings (fraction)
    backoff: int

    def to_json(self) -> dict[str, Any]:
        return {"backoff": self.backoff, "families": list(self.families), "episodes": self.episodes,
                "drop": self.drop.tolist(), "savings": self.savings.tolist()}


def simulate_episodes(
    policy: ThresholdedPolicy,
    by_family: Mapping[str, Sequence[Trace]],
    k: int,
    episodes: int,
    query: int | None,
    seed: int,
    progress: bool = False,
    what: str = "simulating",
) -> list[SelectorEpisode]:
    """``policy`` fitted on ``episodes`` fixed K-shot episodes of every family of ``by_family`` and scored
    on each query: what a selector that learns across families is fitted on (:meth:`StopSelector.fit`)."""
    sampler = EpisodeSampler({f: list(ts) for f, ts in by_family.items()}, k=k, q=query, seed=seed)
    simulated: list[SelectorEpisode] = []
    for family in by_family:
        eps = sampler.fixed_episodes(family, n=episodes, seed=seed, k=k, q=query)
        for ep in tqdm(eps, desc=f"{what} {policy.name} on {family} K={k}", disable=not progress, leave=False):
            policy.fit(ep.support)
            simulated.append(SelectorEpisode(family, policy.support_sweep, sweep_policy(policy, ep.query)))
    return simulated


def calibrate_backoff(
    policy: ThresholdedPolicy,
    by_family: Mapping[str, Sequence[Trace]],
    k: int,
    episodes: int,
    query: int | None,
    seed: int,
    delta: float,
    progress: bool = False,
) -> BackoffCalibration:
    """Fit ``policy`` on ``episodes`` fixed K-shot episodes of every family of ``by_family`` (the
    fold's source families), choose by ``em_target`` on support as the protocol does, and return the
    query figures at every back-off with the chosen one (:func:`~maml_stop.decide.thresholds.choose_backoff`,
    what :meth:`BackoffEMTarget.fit` chooses from the same episodes). Leaves ``policy`` fitted on the
    last support set (the protocol refits it on every episode)."""
    if not by_family:
        raise ValueError(f"{policy.name}: no source families to calibrate the em_target back-off on")
    if episodes < 1:
        raise ValueError(f"backoff_episodes must be at least 1; got {episodes}")
    selector = BackoffEMTarget(delta)
    simulated = simulate_episodes(policy, by_family, k, episodes, query, seed, progress, what="back-off")
    families, drop, savings = backoff_table(selector, policy.candidates, simulated)
    return BackoffCalibration(families, episodes, drop, savings, choose_backoff(drop, delta))
