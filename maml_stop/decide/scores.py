"""What a stopping predictor says about stored traces: its probability at every probe, in sample or
cross-fitted on the support set.

The decision layer needs a predictor only as a module that maps a collated
:class:`~maml_stop.data.batches.ProbeBatch` to one logit per probe point, and an adapter only as
something with ``predictor`` and ``fit_support(support, steps=..., renormalise=...)`` (the one road from
support traces to an adapted predictor, :meth:`maml_stop.learn.adapter.InnerLoopAdapter.fit_support`):
:class:`SupportAdapter` says so, so that this layer stays below :mod:`maml_stop.learn`.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np
import torch
from torch import nn

from maml_stop.data import fastpath
from maml_stop.data.batches import collate_traces
from maml_stop.data.corpus import Trace
from maml_stop.data.family import RecentLists
from maml_stop.data.episodes import QuestionGroups, split_support_query

__all__ = ["SupportAdapter", "trace_probabilities", "flat_probabilities", "flat_labels", "split_rows", "crossfit_halves",
           "crossfit_probabilities"]


class SupportAdapter(Protocol):
    """What the learned policies call on an adapter (:class:`maml_stop.learn.adapter.InnerLoopAdapter`)."""

    predictor: nn.Module

    def fit_support(self, support: Sequence[Trace], steps: int | None = None, renormalise: bool = False) -> nn.Module:
        ...


def trace_probabilities(model: nn.Module, traces: Sequence[Trace]) -> list[np.ndarray]:
    """P(stopping here keeps the answer correct) of ``model`` at every probe of each trace (eval mode,
    no gradients): list of (P_i,) float64."""
    if fastpath.enabled():  # rows of a trace are contiguous, in order: views at the trace lengths
        return split_rows(flat_probabilities(model, traces), traces)
    batch = _collated(traces)
    probs = _probabilities(model, batch)
    index = batch.trace_index.numpy()
    return [probs[index == i] for i in range(len(traces))]


def flat_probabilities(model: nn.Module, traces: Sequence[Trace]) -> np.ndarray:
    """:func:`trace_probabilities` concatenated, trace by trace (one batch): (sum of P_i,) float64."""
    return _probabilities(model, _collated(traces))


def flat_labels(traces: Sequence[Trace]) -> np.ndarray:
    """The labels of every probe of ``traces``, trace by trace: (sum of P_i,) float64. On the fast path
    they are read from the collated batch that scored the traces (kept: the same 0/1 values)."""
    if fastpath.enabled() and traces:
        return _collated(traces).labels.double().numpy()
    return np.concatenate([t.labels for t in traces]).astype(np.float64)


def split_rows(flat: np.ndarray, traces: Sequence[Trace]) -> list[np.ndarray]:
    """``flat`` (one row per probe of ``traces``, trace by trace) as one view per trace."""
    ends = np.cumsum([len(t.labels) for t in traces]).tolist()
    return [flat[a:b] for a, b in zip([0, *ends], ends)]


def _probabilities(model: nn.Module, batch) -> np.ndarray:
    # a model already in eval mode throughout is left as it is (eval() and train(False) would change nothing)
    toggle = not fastpath.enabled() or any(m.training for m in model.modules())
    was_training = model.training
    if toggle:
        model.eval()
    with torch.no_grad():
        probs = torch.sigmoid(model(batch)).double().numpy()  # (N,)
    if toggle:
        model.train(was_training)
    return probs


_KEEP = 4
_RECENT = RecentLists(_KEEP)  # the batches of the last few lists scored


def _collated(traces: Sequence[Trace]):
    """``collate_traces(traces)``; on the fast path the last few lists scored are kept (read only here: an
    episode's query set is scored by every learned method)."""
    if not fastpath.enabled():
        return collate_traces(traces)
    batch = _RECENT.get(traces)
    return batch if batch is not None else _RECENT.put(traces, collate_traces(traces))


def crossfit_halves(support: Sequence[Trace], seed: int = 0) -> list[tuple[list[Trace], list[Trace]]]:
    """The cross-fitting of ``support``: ``[(half_a, half_b), (half_b, half_a)]`` as (fit on, score) pairs,
    the questions split in two halves by the one split function seeded by ``seed``; empty with fewer than
    2 questions. :func:`crossfit_probabilities` and the episode-batched evaluation both read it."""
    n_questions = len(QuestionGroups(support))
    if n_questions < 2:
        return []
    half_a, half_b = split_support_query(support, n_questions // 2, None, np.random.default_rng(seed))
    return [(half_a, half_b), (half_b, half_a)]


def crossfit_probabilities(
    adapter: SupportAdapter,
    support: Sequence[Trace],
    steps: int | None = None,
    renormalise: bool = False,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Out-of-sample probabilities of the support traces, by trace id: the support questions are split
    in two halves (the one split function, seeded by ``seed``), and each half is scored by the predictor
    adapted (``adapter.fit_support``) on the other half. Empty with fewer than 2 questions.
    With ``renormalise`` the predictor's normalisation is left at the second half's statistics."""
    out: dict[str, np.ndarray] = {}
    for fit_on, score in crossfit_halves(support, seed):
        with torch.no_grad():  # first-order inner steps, a detached clone
            model = adapter.fit_support(fit_on, steps=steps, renormalise=renormalise)
        out.update(zip([t.trace_id for t in score], trace_probabilities(model, score)))
    return out
