"""The pooled probe of the protocol: a stopping predictor trained outside meta-learning, on every probe
of the source families, through the one adaptation function
(:meth:`maml_stop.learn.adapter.InnerLoopAdapter.fit_support`) used as plain full-batch training.

Reproducibility (issue 29 item 12): the weights agree bit for bit between 1 and 2 threads, but 300
full-batch float32 steps carry the last-bit differences of another BLAS code path (another CPU; emulated
with ``MKL_CBWR=COMPATIBLE``: 3.6e-7 in the weights) into the last printed digit of the main job's table.
``dtype=torch.float64`` trains in float64 and returns float64 weights that agree bit for bit across those
paths (tests/test_pooled_reproducible.py); the protocol's ``baseline_dtype`` (experiments/evaluate.yaml:
float64) chooses it, and the fine-tuned probe is adapted from it in the same precision.
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
    dtype: torch.dtype = torch.float32,
) -> StoppingPredictor:
    """A stopping predictor trained on every probe of ``traces`` (the pooled probe of the protocol):
    normalisation from those features, a seeded random init, then ``steps`` full-batch first-order
    gradient steps through :meth:`InnerLoopAdapter.fit_support`. ``predictor_config``: a
    :class:`PredictorConfig` (a mapping with its fields is still accepted). ``dtype``: the precision of the
    training and of the weights returned (float64: reproducible across BLAS code paths)."""
    if not traces:
        raise ValueError("train_predictor needs at least one trace")
    config = PredictorConfig.coerce(predictor_config)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        predictor = StoppingPredictor.from_config(config)  # the float32 init, then trained in ``dtype``
    training = AdapterConfig(algorithm="maml", inner_lr=lr, inner_steps=steps, first_order=True, loss=loss,
                             backend=backend)
    adapter = InnerLoopAdapter.from_config(predictor.to(dtype), training)
    batch = collate_traces(traces, weighting=training.weighting).as_dtype(dtype)
    # the statistics as they are (std 0 -> 1 in set_normalisation), unlike fit_support(renormalise=True),
    # which floors std at 1e-6 first: kept as it was, so that pooled probes stay bit-identical
    predictor.set_normalisation(batch.features.mean(0), batch.features.std(0, unbiased=False))
    with torch.no_grad():
        trained = adapter.fit_support(batch)
    return fresh_copy(trained)  # in ``dtype``

