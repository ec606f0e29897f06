"""The pooled probe of a fold of ``maml-stop evaluate``: the probe trained on the fold's source families
without adaptation (methods ``pooled`` and ``finetuned``), through :func:`maml_stop.evaluate.cache.pooled_probe`
(``backend``, ``baseline_dtype``, ``cache_dir`` and the rest of the settings honoured the same way for every fold).

Folds that share their source families, predictor shape and loss (the held-out families of one grouped
fold, :mod:`maml_stop.evaluate.grouped`) share one probe: :func:`shared_pooled` trains it once, before
the folds are evaluated side by side (two workers would otherwise both train it). One-out folds never
share their sources: nothing is trained ahead for them.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any, Mapping, Sequence

from maml_stop.evaluate.cache import pooled_probe
from maml_stop.evaluate.config import BASELINE_DTYPES, EvaluateConfig
from maml_stop.evaluate.folds import Fold
from maml_stop.evaluate.fork import fork_map
from maml_stop.learn.predictor import PredictorConfig, StoppingPredictor

__all__ = ["fold_probe_config", "pooled_key", "fold_pooled", "shared_pooled"]


def fold_probe_config(cfg: EvaluateConfig, fold: Fold, n_features: int) -> tuple[PredictorConfig, str]:
    """The predictor shape and loss of the probes a fold builds: its checkpoint's, else ``cfg.predictor``
    with the balanced loss."""
    adapter = fold.adapter
    config = adapter.predictor.config() if adapter is not None else PredictorConfig(n_features=n_features, **cfg.predictor)
    return config, getattr(adapter, "loss_kind", "balanced")


def pooled_key(cfg: EvaluateConfig, fold: Fold, n_features: int) -> str:
    """What a fold's pooled probe is a function of, besides the settings every fold shares."""
    config, loss = fold_probe_config(cfg, fold, n_features)
    return json.dumps([fold.sources, fold.feature_names, asdict(config), loss])


def fold_pooled(cfg: EvaluateConfig, narrowed: Mapping, fold: Fold) -> StoppingPredictor:
    """The pooled probe of ``fold``, trained on its source families (read from ``cache_dir`` when trained before)."""
    _, source = narrowed[None if fold.feature_names is None else tuple(fold.feature_names)]
    config, loss = fold_probe_config(cfg, fold, len(source.feature_names))
    traces = [t for s in fold.sources for t in source.traces(s)]
    return pooled_probe(cfg.cache_dir, traces, config, cfg.pooled_steps, cfg.pooled_lr, loss, seed=cfg.seed,
                        backend=cfg.backend, dtype=BASELINE_DTYPES[cfg.baseline_dtype])


def shared_pooled(cfg: EvaluateConfig, narrowed: Mapping, folds: Sequence[Fold]) -> dict[str, Any]:
    """:func:`pooled_key` -> the pooled probe, for the keys that several folds share, trained once each
    (``cfg.workers`` side by side); empty when no method needs a pooled probe or no fold shares one."""
    if not any(m in cfg.methods for m in ("pooled", "finetuned")):
        return {}
    groups: dict[str, list[Fold]] = {}
    for fold in folds:
        _, source = narrowed[None if fold.feature_names is None else tuple(fold.feature_names)]
        groups.setdefault(pooled_key(cfg, fold, len(source.feature_names)), []).append(fold)
    shared = {key: members[0] for key, members in groups.items() if len(members) > 1}
    probes = fork_map(fold_pooled, list(shared.values()), cfg.workers, cfg, narrowed)
    return dict(zip(shared, probes))
