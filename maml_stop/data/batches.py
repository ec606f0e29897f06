"""Probe points of traces as tensors: :class:`ProbeBatch`, :func:`collate_traces`, :class:`TraceTensors`.

A :class:`ProbeBatch` holds every probe point of a list of traces, flattened: rows of one trace are
contiguous and in probe order (``probe_index`` 0, 1, 2, ...), which the sequence variants of the
predictor rely on (see :meth:`ProbeBatch.check`).

>>> from maml_stop.data.corpus import TraceCorpus                        # doctest: +SKIP
>>> traces = TraceCorpus.load("experiments/corpus/qwen05").traces("basic_arithmetic")[:16]
>>> batch = collate_traces(traces)
>>> batch.features.shape, batch.n_traces                             # (N, F), 16

:class:`TraceTensors` collates a fixed set of traces once and then gathers any subset with a few
tensor ops: the meta-training hot path uses it instead of re-collating NumPy arrays every episode.

Weighting (``weighting="cost"``, used by the adapter's ``loss="cost"``): a probe whose label is 1
weighs the fraction of the full run's tokens that stopping there saves (what a missed stop wastes);
a probe whose label is 0 weighs 1 when the run's own final answer is correct (a stop there loses the
answer) and ``COST_FLOOR`` otherwise (stopping there loses nothing the full run had). Every weight is
at least ``COST_FLOOR`` so that no support set has zero total weight.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from maml_stop.data.accounting import savings, stop_cost, stop_costs
from maml_stop.data.corpus import Trace

__all__ = ["ProbeBatch", "collate_traces", "trace_weights", "TraceTensors", "DataError", "WEIGHTINGS"]

WEIGHTINGS = ("uniform", "cost")
COST_FLOOR = 0.05  # smallest probe weight under weighting="cost"


class DataError(ValueError):
    """Traces or batches that the learning code cannot use (NaN features, wrong width, empty sets)."""


@dataclass
class ProbeBatch:
    """All probe points of a list of traces, flattened (rows of a trace contiguous, in probe order)."""

    features: Tensor  # (N, F) float32
    labels: Tensor  # (N,) float32 in {0, 1}
    trace_index: Tensor  # (N,) long: which trace of the list
    probe_index: Tensor  # (N,) long: position of the probe within its trace
    weights: Tensor  # (N,) float32 (1.0 by default; cost-weighted losses fill it)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def n_features(self) -> int:
        return int(self.features.shape[1])

    @property
    def n_traces(self) -> int:
        return int(self.trace_index[-1].item()) + 1 if len(self) else 0

    def to(self, device: torch.device | str) -> "ProbeBatch":
        return ProbeBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def check(self, n_features: int | None = None) -> "ProbeBatch":
        """Raise :class:`DataError` unless the batch is well formed (shapes, finite features, layout
        that the sequence predictors need). Not called in the hot path; returns ``self``."""
        n = len(self)
        if self.features.dim() != 2 or self.features.shape[0] != n:
            raise DataError(f"features must have shape (N, F) with N={n} rows; got {tuple(self.features.shape)}")
        if n_features is not None and self.features.shape[1] != n_features:
            raise DataError(f"features have width {self.features.shape[1]}; the predictor expects {n_features}")
        for name in ("trace_index", "probe_index", "weights"):
            if getattr(self, name).shape != (n,):
                raise DataError(f"{name} must have shape ({n},); got {tuple(getattr(self, name).shape)}")
        if not torch.isfinite(self.features).all():
            bad = torch.nonzero(~torch.isfinite(self.features).all(dim=1)).flatten()[:5].tolist()
            raise DataError(f"non-finite (NaN/inf) features at rows {bad}")
        if n:
            expected = _segment_positions(self.trace_index)
            if not torch.equal(expected, self.probe_index):
                raise DataError(
                    "rows of a trace must be contiguous and in probe order (probe_index 0, 1, ...); "
                    "build batches with collate_traces or TraceTensors"
                )
        return self


def _segment_positions(trace_index: Tensor) -> Tensor:
    """Position of each row within its run of equal ``trace_index`` values. (N,) -> (N,)"""
    n = trace_index.shape[0]
    rows = torch.arange(n)
    new = torch.ones(n, dtype=torch.bool)
    new[1:] = trace_index[1:] != trace_index[:-1]
    start = torch.cummax(torch.where(new, rows, torch.zeros_like(rows)), dim=0).values
    return rows - start


def trace_weights(trace: Trace, weighting: str = "uniform") -> np.ndarray:
    """Per-probe loss weights of one trace (see the module docstring). (P,) float32"""
    if weighting == "uniform":
        return np.ones(trace.n_probes, dtype=np.float32)
    if weighting != "cost":
        raise ValueError(f"unknown weighting {weighting!r}; valid: {', '.join(WEIGHTINGS)}")
    full = max(stop_cost(trace, None)[0], 1)  # never stopping early, every probe run
    stop_total, _ = stop_costs(trace)  # (P,) tokens when stopping at each probe
    saved = np.clip(savings(stop_total, full), 0.0, 1.0)
    neg = 1.0 if trace.final_em else COST_FLOOR
    w = np.where(trace.labels > 0.5, saved, neg)
    return np.maximum(w, COST_FLOOR).astype(np.float32)


def _check_trace(trace: Trace, n_features: int | None) -> None:
    f = trace.features
    if f.ndim != 2 or f.shape[0] != trace.n_probes:
        raise DataError(
            f"trace {trace.trace_id}: features shape {f.shape} does not match {trace.n_probes} probe labels"
        )
    if n_features is not None and f.shape[1] != n_features:
        raise DataError(f"trace {trace.trace_id}: feature width {f.shape[1]}, expected {n_features}")
    if not np.isfinite(f).all():
        raise DataError(f"trace {trace.trace_id} has non-finite (NaN/inf) features")


def collate_traces(traces: Sequence[Trace], weighting: str = "uniform") -> ProbeBatch:
    """All probe points of ``traces`` as one :class:`ProbeBatch` (checked: width, finite features)."""
    if not traces:
        raise DataError("cannot collate an empty list of traces")
    width = traces[0].features.shape[-1]
    for t in traces:
        _check_trace(t, width)
    lengths = torch.tensor([t.n_probes for t in traces], dtype=torch.long)
    trace_index = torch.repeat_interleave(torch.arange(len(traces)), lengths)
    return ProbeBatch(
        features=torch.from_numpy(np.concatenate([t.features for t in traces]).astype(np.float32)),
        labels=torch.from_numpy(np.concatenate([t.labels for t in traces]).astype(np.float32)),
        trace_index=trace_index,
        probe_index=_segment_positions(trace_index),
        weights=torch.from_numpy(np.concatenate([trace_weights(t, weighting) for t in traces])),
    )


class TraceTensors:
    """A fixed set of traces collated once; :meth:`collate` gathers any subset in a few tensor ops.

    ``TraceTensors(traces).collate(subset)`` equals ``collate_traces(subset)`` (same weighting).
    """

    def __init__(self, traces: Sequence[Trace], weighting: str = "uniform", n_features: int | None = None) -> None:
        if not traces:
            raise DataError("TraceTensors needs at least one trace")
        for t in traces:
            _check_trace(t, n_features if n_features is not None else traces[0].features.shape[-1])
        self.weighting = weighting
        self._row_of = {t.trace_id: i for i, t in enumerate(traces)}
        if len(self._row_of) != len(traces):
            raise DataError("trace ids must be unique")
        full = collate_traces(traces, weighting)
        self.features, self.labels, self.weights = full.features, full.labels, full.weights  # (R, F), (R,), (R,)
        # index arithmetic in NumPy: on arrays this small it is several times cheaper than torch ops
        self.lengths = np.array([t.n_probes for t in traces], dtype=np.int64)  # (T,)
        self.offsets = np.cumsum(self.lengths) - self.lengths  # (T,) first row of each trace

    def __len__(self) -> int:
        return len(self._row_of)

    def index_of(self, traces: Sequence[Trace]) -> np.ndarray:
        try:
            return np.fromiter((self._row_of[t.trace_id] for t in traces), dtype=np.int64, count=len(traces))
        except KeyError as err:
            raise DataError(f"trace {err.args[0]} is not among the collated traces") from None

    def collate(self, traces: Sequence[Trace]) -> ProbeBatch:
        return self.gather(self.index_of(traces))

    def gather(self, index: np.ndarray | Sequence[int]) -> ProbeBatch:
        """The probe points of the traces at ``index`` (positions in the constructor's list)."""
        index = np.asarray(index, dtype=np.int64)
        if index.size == 0:
            raise DataError("cannot collate an empty list of traces")
        lens = self.lengths[index]  # (T',)
        trace_index = np.repeat(np.arange(index.size), lens)  # (N,)
        first = np.cumsum(lens) - lens  # (T',) first row of each trace in the batch
        probe_index = np.arange(trace_index.size) - first[trace_index]  # (N,)
        rows = torch.from_numpy(self.offsets[index][trace_index] + probe_index)  # (N,) rows of the full tensors
        return ProbeBatch(
            features=self.features[rows],
            labels=self.labels[rows],
            trace_index=torch.from_numpy(trace_index),
            probe_index=torch.from_numpy(probe_index),
            weights=self.weights[rows],
        )
