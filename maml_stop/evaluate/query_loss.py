"""The adapted query loss of the grouped folds (issue 11): the adapter's own loss on every query set after
adapting on the support set (a probe given unadapted, such as the pooled one: its loss as it is).

The episodes are :func:`maml_stop.evaluate.protocol.evaluate_family`'s (the same fixed episodes, seed and
query size), so the loss sits beside the EM/token figures of the same episodes.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from maml_stop.data.batches import collate_traces
from maml_stop.data.corpus import Trace
from maml_stop.data.episodes import EpisodeSampler

__all__ = ["adapted_query_loss"]


def adapted_query_loss(adapter: Any, model: Any | None, traces: Sequence[Trace], family: str, ks: Sequence[int],
                       episodes: int, seed: int, query: int | None, steps: int | None) -> dict[str, list[float]]:
    """Per K (as a string), per episode: ``adapter.loss`` on the query set of the model adapted on the
    support set with ``steps`` inner steps (``model`` given: that model, unadapted)."""
    sampler = EpisodeSampler({family: list(traces)}, k=min(ks), q=query, seed=seed)
    out: dict[str, list[float]] = {}
    for k in ks:
        losses = []
        for ep in sampler.fixed_episodes(family, n=episodes, seed=seed, k=k, q=query):
            adapted = model if model is not None else adapter.fit_support(ep.support, steps=steps)
            with torch.no_grad():
                losses.append(float(adapter.loss(adapted, collate_traces(ep.query, weighting=adapter.weighting))))
        out[str(k)] = losses
    return out
