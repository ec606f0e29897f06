"""What a fold of ``maml-stop evaluate`` fits on its source families before it evaluates its held-out one:
the back-off of ``em_target_backoff`` (:mod:`maml_stop.evaluate.backoff`) and the meta-learned selectors
(:data:`~maml_stop.decide.meta.rules.META_SELECTORS`), per thresholded method and K."""

from __future__ import annotations

import copy
import logging
from typing import Any, Mapping

from maml_stop.data.corpus import TraceCorpus
from maml_stop.decide.meta.rules import META_SELECTORS
from maml_stop.decide.policies import StoppingPolicy, ThresholdedPolicy
from maml_stop.decide.selector import StopSelector
from maml_stop.evaluate.backoff import calibrate_backoff, simulate_episodes
from maml_stop.evaluate.config import EvaluateConfig

log = logging.getLogger(__name__)

__all__ = ["calibrate_backoffs", "fit_across_families", "source_traces"]


def source_traces(cfg: EvaluateConfig, fold, source: TraceCorpus) -> dict[str, list]:
    """The fold's source families -> their traces in ``cfg.splits`` (every split when None)."""
    return {s: [t for t in source.traces(s) if cfg.splits is None or t.split in cfg.splits] for s in fold.sources}


def fit_across_families(cfg: EvaluateConfig, fold, source: TraceCorpus, policies: Mapping[str, StoppingPolicy],
                         selectors: Mapping[str, StopSelector]) -> dict[tuple[str, int], dict[str, StopSelector]]:
    """(method, K) -> the meta-learned selectors asked for (:data:`~maml_stop.decide.meta.rules.META_SELECTORS`),
    each fitted on ``backoff_episodes`` simulated episodes of every source family of the fold. The
    source families were in the fold's training (pooled, maml), so this is the deployment road, not the
    nested simulation: ``maml-stop meta-select`` scores each family by a probe that never trained on it."""
    wanted = [s for s in selectors if s in META_SELECTORS]
    if not wanted:
        return {}
    by_family = source_traces(cfg, fold, source)
    out: dict[tuple[str, int], dict[str, StopSelector]] = {}
    for name, policy in policies.items():
        if isinstance(policy, ThresholdedPolicy):
            for k in cfg.k:
                episodes = simulate_episodes(policy, by_family, k, cfg.backoff_episodes, cfg.query, cfg.seed,
                                             cfg.progress, what="meta-selectors")
                out[name, k] = {s: copy.deepcopy(selectors[s]).fit(policy.candidates, episodes) for s in wanted}
    return out


def calibrate_backoffs(cfg: EvaluateConfig, fold, source: TraceCorpus, policies: Mapping[str, StoppingPolicy],
                        selectors: Mapping[str, StopSelector]) -> dict[tuple[str, int], Any]:
    """(method, K) -> the fold's :class:`~maml_stop.evaluate.backoff.BackoffCalibration` of every
    thresholded method, on the fold's source families, when ``em_target_backoff`` is asked for."""
    if "em_target_backoff" not in selectors:
        return {}
    by_family = source_traces(cfg, fold, source)
    out = {}
    for name, policy in policies.items():
        if isinstance(policy, ThresholdedPolicy):
            for k in cfg.k:
                out[name, k] = calibrate_backoff(policy, by_family, k, cfg.backoff_episodes, cfg.query, cfg.seed,
                                                 cfg.delta, cfg.progress)
                log.info("%s, held-out %s, K=%d: em_target back-off %d (worst source-family EM drop %.1f pts)",
                         name, fold.family, k, out[name, k].backoff, 100 * out[name, k].drop[:, out[name, k].backoff].max())
    return out
