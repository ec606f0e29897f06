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

Weighting (``weighting="cost"``, used by the adapter's ``loss="cost"``), with the trade-off
``cost_lambda`` (lambda >= 0, ``data.cost_lambda`` in YAML; 1 by default) between the two errors of a
stopping decision at probe ``i``:

* stopping too late: ``saved_i``, the fraction of the run-to-the-end cost (every probe run,
  :func:`maml_stop.data.accounting.stop_cost` with ``index=None``) that stopping at ``i`` saves
  (``accounting.savings`` of ``accounting.stop_costs``, clipped to [0, 1]): what a missed stop wastes;
* stopping too early: ``em_lost_i = final_em - probe_em_i`` (1: the stop loses the full run's correct
  answer; 0: nothing changes; -1: the stop gains the answer the full run loses).

A probe whose label is 1 (its forced answer is correct) weighs ``lambda * saved_i``; a probe whose
label is 0 weighs its EM at stake, ``max(em_lost_i, 0)`` (1 when the full run is correct, else 0: the
stop loses nothing the full run had). Every weight is at least ``COST_FLOOR`` so that no support set has
zero total weight. ``lambda = 1`` is the weighting of earlier versions (bit-identical); ``lambda = 0``
is its EM-only limit: every correct probe weighs ``COST_FLOOR`` and every wrong probe its EM at stake.

Every batch collated from traces also carries, whatever its ``weighting``, the two per-probe costs the
query losses of the adapter read (:mod:`maml_stop.learn.adapter`):

* ``cost_weights``: the ``weighting="cost"`` weights above (with the collate's ``cost_lambda``), so that
  a query loss can be cost-weighted while the inner loss stays uniform;
* ``stop_penalty``: ``em_lost_i - lambda * saved_i``, the cost, in EM points, of stopping at probe ``i``
  instead of running to the end (negative: stopping there is worth it). Running to the end costs 0.

>>> from types import SimpleNamespace as T
>>> import numpy as np
>>> t = T(labels=np.array([0., 1., 1.]), final_em=True, positions=np.array([10, 20, 30]),
...       probe_tokens=np.array([5, 5, 5]), reasoning_tokens=35, n_probes=3)
>>> trace_costs(t)            # saved vs the run to the end (35 + 15 = 50 tokens); EM lost
(array([0.7, 0.4, 0.1]), array([1., 0., 0.]))
>>> trace_weights(t, "cost", cost_lambda=2.0).astype(float).round(3).tolist()
[1.0, 0.8, 0.2]
>>> trace_stop_penalty(t, cost_lambda=2.0).astype(float).round(3).tolist()
[-0.4, -0.8, -0.2]
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from maml_stop.data import family, fastpath
from maml_stop.data.accounting import savings, stop_cost, stop_costs
from maml_stop.data.corpus import Trace

__all__ = ["ProbeBatch", "collate_traces", "trace_weights", "trace_costs", "trace_stop_penalty", "check_cost_lambda",
           "TraceTensors", "DataError", "WEIGHTINGS"]

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
    # filled by collate_traces / TraceTensors (None on hand-built batches; see the module docstring)
    cost_weights: Tensor | None = None  # (N,) float32: the weighting="cost" weights, whatever ``weighting``
    stop_penalty: Tensor | None = None  # (N,) float32: em_lost - lambda * saved, cost of stopping here

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def n_features(self) -> int:
        return int(self.features.shape[1])

    @property
    def n_traces(self) -> int:
        return int(self.trace_index[-1].item()) + 1 if len(self) else 0

    def to(self, device: torch.device | str) -> "ProbeBatch":
        return ProbeBatch(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name).to(device)
                             for f in fields(self)})

    def as_dtype(self, dtype: torch.dtype) -> "ProbeBatch":
        """The batch with its floating-point tensors in ``dtype`` (indices unchanged; itself when they
        already are): what a predictor of that precision trains on (issue 29 item 12)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        if all(v is None or not v.is_floating_point() or v.dtype == dtype for v in values.values()):
            return self
        return ProbeBatch(**{k: v.to(dtype) if v is not None and v.is_floating_point() else v for k, v in values.items()})

    def check(self, n_features: int | None = None) -> "ProbeBatch":
        """Raise :class:`DataError` unless the batch is well formed (shapes, finite features, layout
        that the sequence predictors need). Not called in the hot path; returns ``self``."""
        n = len(self)
        if self.features.dim() != 2 or self.features.shape[0] != n:
            raise DataError(f"features must have shape (N, F) with N={n} rows; got {tuple(self.features.shape)}")
        if n_features is not None and self.features.shape[1] != n_features:
            raise DataError(f"features have width {self.features.shape[1]}; the predictor expects {n_features}")
        for name in ("trace_index", "probe_index", "weights", "cost_weights", "stop_penalty"):
            if getattr(self, name) is not None and getattr(self, name).shape != (n,):
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


def check_cost_lambda(cost_lambda: float, what: str = "cost_lambda") -> float:
    """``cost_lambda`` as a float, or a ValueError naming it (``what``) unless it is finite and >= 0."""
    try:
        value = float(cost_lambda)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number >= 0; got {cost_lambda!r}") from None
    if not np.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be finite and >= 0 (0: EM only; larger: tokens count more); got {cost_lambda!r}")
    return value


def trace_costs(trace: Trace) -> tuple[np.ndarray, np.ndarray]:
    """(saved (P,), em_lost (P,)) float64 of stopping at each probe of ``trace`` (see the module docstring):
    the fraction of the run-to-the-end cost saved, in [0, 1], and ``final_em - probe_em`` in {-1, 0, 1}."""
    full = max(stop_cost(trace, None)[0], 1)  # never stopping early, every probe run
    stop_total, _ = stop_costs(trace)  # (P,) tokens when stopping at each probe
    saved = np.clip(savings(stop_total, full), 0.0, 1.0)
    em_lost = float(trace.final_em) - (np.asarray(trace.labels) > 0.5).astype(np.float64)
    return np.asarray(saved, dtype=np.float64), em_lost


def trace_weights(trace: Trace, weighting: str = "uniform", cost_lambda: float = 1.0,
                  costs: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Per-probe loss weights of one trace (see the module docstring); ``costs``: its
    :func:`trace_costs`, when already computed. (P,) float32"""
    if weighting == "uniform":
        return np.ones(trace.n_probes, dtype=np.float32)
    if weighting != "cost":
        raise ValueError(f"unknown weighting {weighting!r}; valid: {', '.join(WEIGHTINGS)}")
    lam = check_cost_lambda(cost_lambda)
    saved, em_lost = trace_costs(trace) if costs is None else costs
    pos = saved if lam == 1.0 else lam * saved  # lambda = 1: the earlier weights, bit for bit
    w = np.where(np.asarray(trace.labels) > 0.5, pos, np.maximum(em_lost, 0.0))
    return np.maximum(w, COST_FLOOR).astype(np.float32)


def trace_stop_penalty(trace: Trace, cost_lambda: float = 1.0,
                       costs: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """``em_lost - cost_lambda * saved`` at each probe: the cost (EM points) of stopping there instead of
    running to the end; ``costs``: its :func:`trace_costs`, when already computed. (P,) float32"""
    saved, em_lost = trace_costs(trace) if costs is None else costs
    return (em_lost - check_cost_lambda(cost_lambda) * saved).astype(np.float32)


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


def collate_traces(traces: Sequence[Trace], weighting: str = "uniform", cost_lambda: float = 1.0) -> ProbeBatch:
    """All probe points of ``traces`` as one :class:`ProbeBatch` (checked: width, finite features);
    ``cost_lambda``: the trade-off of the cost weights and stop penalties (module docstring). On the fast
    path, traces of a registered family (:func:`maml_stop.data.family.family_table`) are gathered from
    the family collated once (:class:`TraceTensors`, the same batch)."""
    check_cost_lambda(cost_lambda)
    hit = family.rows_of(traces)
    if hit is not None:
        table, rows = hit
        tensors = table.layout(("tensors", weighting, float(cost_lambda)),
                               lambda ts: TraceTensors(ts, weighting, cost_lambda=cost_lambda))
        if tensors is not None:
            return tensors.gather(rows)
    return _collate(traces, weighting, cost_lambda)


def _collate(traces: Sequence[Trace], weighting: str, cost_lambda: float) -> ProbeBatch:
    """:func:`collate_traces` from the traces' own arrays."""
    if not traces:
        raise DataError("cannot collate an empty list of traces")
    width = traces[0].features.shape[-1]
    keep = fastpath.enabled()
    for t in traces:
        if not (keep and t.__dict__.get(_CHECKED) == (id(t.features), width)):
            _check_trace(t, width)
            if keep:  # the same features array checked once (issue 26 item 3)
                t.__dict__[_CHECKED] = (id(t.features), width)
    lengths = torch.tensor([t.n_probes for t in traces], dtype=torch.long)
    trace_index = torch.repeat_interleave(torch.arange(len(traces)), lengths)
    rows = [_loss_rows(t, weighting, cost_lambda, keep=keep) for t in traces]  # (weights, cost weights, penalty)
    return ProbeBatch(
        features=torch.from_numpy(np.concatenate([t.features for t in traces]).astype(np.float32)),
        labels=torch.from_numpy(np.concatenate([t.labels for t in traces]).astype(np.float32)),
        trace_index=trace_index,
        probe_index=_segment_positions(trace_index),
        weights=torch.from_numpy(np.concatenate([r[0] for r in rows])),
        cost_weights=torch.from_numpy(np.concatenate([r[1] for r in rows])),
        stop_penalty=torch.from_numpy(np.concatenate([r[2] for r in rows])),
    )


_CHECKED = "_checked_width"  # the attribute a trace keeps (id of its features, width) under once checked
_ROWS = "_loss_rows"  # the attribute a trace keeps its loss rows under, by (weighting, cost_lambda)


def _loss_rows(trace: Trace, weighting: str, cost_lambda: float, keep: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(weights, cost weights, stop penalty) of one trace, each (P,) float32; ``keep``: computed once per
    weighting and ``cost_lambda`` and kept on the trace (labels and costs never change; issue 26 item 3):
    evaluation collates the same query traces for every method and episode."""
    cache = trace.__dict__.setdefault(_ROWS, {}) if keep and hasattr(trace, "__dict__") else {}
    key = (weighting, float(cost_lambda))
    if key not in cache:
        c = trace_costs(trace)  # once per trace: the weights and penalties share them
        cache[key] = (trace_weights(trace, weighting, cost_lambda, c), trace_weights(trace, "cost", cost_lambda, c),
                      trace_stop_penalty(trace, cost_lambda, c))
    return cache[key]


class TraceTensors:
    """A fixed set of traces collated once; :meth:`collate` gathers any subset in a few tensor ops.

    ``TraceTensors(traces).collate(subset)`` equals ``collate_traces(subset)`` (same weighting and
    ``cost_lambda``).
    """

    def __init__(self, traces: Sequence[Trace], weighting: str = "uniform", n_features: int | None = None,
                 cost_lambda: float = 1.0) -> None:
        if not traces:
            raise DataError("TraceTensors needs at least one trace")
        if n_features is not None:  # the others are checked against the first one's width by _collate
            _check_trace(traces[0], n_features)
        self.weighting, self.cost_lambda = weighting, check_cost_lambda(cost_lambda)
        full = _collate(traces, weighting, self.cost_lambda)  # checks each features array (once on the fast path)
        self._row_of = {t.trace_id: i for i, t in enumerate(traces)}
        if len(self._row_of) != len(traces):
            raise DataError("trace ids must be unique")
        self.features, self.labels, self.weights = full.features, full.labels, full.weights  # (R, F), (R,), (R,)
        self.cost_weights, self.stop_penalty = full.cost_weights, full.stop_penalty  # (R,), (R,)
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
        take = lambda t: torch.index_select(t, 0, rows)  # noqa: E731  (several times faster than t[rows], the same)
        return ProbeBatch(
            features=take(self.features),
            labels=take(self.labels),
            trace_index=torch.from_numpy(trace_index),
            probe_index=torch.from_numpy(probe_index),
            weights=take(self.weights),
            cost_weights=take(self.cost_weights),
            stop_penalty=take(self.stop_penalty),
        )
