"""The pooled probe of the protocol: a stopping predictor trained outside meta-learning, on every probe
of the source families, through the one adaptation function
(:meth:`maml_stop.learn.adapter.InnerLoopAdapter.fit_support`) used as plain full-batch training.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from maml_stop.data.batches import collate_traces
from maml_stop.data.corpus import Trace
from maml_stop.learn.adapter import AdapterConfig, InnerLoopAdapter
from maml_stop.learn.predictor import PredictorConfig, StoppingPredictor, fresh_copy

__all__ = ["train_predictor"]


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
