"""Stopping predictors trained outside meta-learning: the pooled probe of the protocol, and copies.

Both go through the one adaptation function (:meth:`maml_stop.learn.adapter.InnerLoopAdapter.fit_support`),
used here as plain full-batch training.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from maml_stop.data.corpus import Trace
from maml_stop.learn.predictor import PredictorConfig, StoppingPredictor

__all__ = ["train_predictor", "fresh_copy"]


def fresh_copy(predictor: nn.Module) -> StoppingPredictor:
    """A new StoppingPredictor with ``predictor``'s weights and normalisation as real parameters (an
    adapted clone holds plain tensors, which cannot be adapted again)."""
    new = StoppingPredictor.from_config(predictor.config())
    new.load_state_dict({k: v.detach().clone() for k, v in predictor.state_dict().items()})
    return new


def train_predictor(
    traces: Sequence[Trace],
    predictor_config: PredictorConfig | Mapping,
    steps: int,
    lr: float,
    loss: str = "balanced",
    seed: int = 0,
    backend: str = "learn2learn",
) -> StoppingPredictor:
    """A stopping predictor trained on every probe of ``traces`` (the pooled probe of the protocol):
    normalisation from those features, a seeded random init, then ``steps`` full-batch first-order
    gradient steps through :meth:`InnerLoopAdapter.fit_support`. ``predictor_config``: a
    :class:`PredictorConfig` (a mapping with its fields is still accepted)."""
    from maml_stop.data.batches import collate_traces
    from maml_stop.learn.adapter import AdapterConfig, InnerLoopAdapter

    if not traces:
        raise ValueError("train_predictor needs at least one trace")
    config = PredictorConfig.coerce(predictor_config)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        predictor = StoppingPredictor.from_config(config)
    training = AdapterConfig(algorithm="maml", inner_lr=lr, inner_steps=steps, first_order=True, loss=loss,
                             backend=backend)
    adapter = InnerLoopAdapter.from_config(predictor, training)
    batch = collate_traces(traces, weighting=training.weighting)
    # the statistics as they are (std 0 -> 1 in set_normalisation), unlike fit_support(renormalise=True),
    # which floors std at 1e-6 first: kept as it was, so that pooled probes stay bit-identical
    predictor.set_normalisation(batch.features.mean(0), batch.features.std(0, unbiased=False))
    with torch.no_grad():
        trained = adapter.fit_support(batch)
    return fresh_copy(trained)
