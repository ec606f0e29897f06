"""Every candidate threshold of a first-hit policy on many traces in one pass (issue 26 item 2).

A first-hit policy (:class:`~maml_stop.decide.policies.base.FirstHitPolicy` that keeps the default
accounting) stops at the first probe whose score reaches the candidate (the one rule,
:func:`maml_stop.decide.rule.first_hits`). With the traces' accounting arrays padded into a
:class:`TraceArrays` (each trace's rows computed once and kept on the trace: features, labels and costs
never change), :func:`candidate_outcomes` gives the EM, total and reasoning tokens and whether it stopped
of every trace at every candidate at once, gathered by index from the accounting of
:mod:`maml_stop.data.accounting` (a stop pays every probe up to it; a policy that never fires pays every
probe and returns the final answer). The per-trace Python loop of ``outcomes_at`` is the reference it
equals exactly (tests/test_outcomes.py): the figures are integers and 0/1, so no float order changes.

:func:`vectorised` (:func:`maml_stop.data.fastpath.fast_path`) switches the fast path off for a reference
run (``batched: false`` in the evaluate config).

>>> import numpy as np
>>> from types import SimpleNamespace as T
>>> t = T(positions=np.array([10, 20]), probe_tokens=np.array([5, 6]), reasoning_tokens=40,
...       labels=np.array([0.0, 1.0]), final_em=True, cap_probe=None)
>>> out = candidate_outcomes(TraceArrays.of([t]), pad_scores([np.array([0.3, 0.8])]), [0.9, 0.5, 0.2])
>>> out.em.tolist(), out.total.tolist(), out.stopped.tolist()
([[1.0, 1.0, 0.0]], [[51.0, 31.0, 15.0]], [[False, True, True]])
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Sequence

import numpy as np

from maml_stop.data import accounting, family, fastpath
from maml_stop.decide.rule import NEVER, first_hits

__all__ = ["TraceArrays", "CandidateOutcomes", "candidate_outcomes", "pad_scores", "vectorised", "is_enabled"]

_ROW = "_accounting_row"  # the attribute a trace keeps its accounting row under
_KEEP = 4
_RECENT = family.RecentLists(_KEEP)  # the TraceArrays of the last few lists asked for


def is_enabled() -> bool:
    """Whether the vectorised path is on (:func:`maml_stop.data.fastpath.enabled`, the default)."""
    return fastpath.enabled()


vectorised = fastpath.fast_path  # the switch: ``with vectorised(False):`` runs the reference loops


def _row(trace) -> tuple:
    """(labels (P,) 0/1, stop total (P,), stop reasoning (P,), positions (P,), probe tokens (P,), never total,
    never reasoning, full EM, full tokens, reasoning tokens) of one trace, from the accounting, computed once
    and kept on the trace."""
    row = getattr(trace, "__dict__", {}).get(_ROW)
    if row is None:
        total, reasoning = accounting.stop_costs(trace)
        never_total, never_reasoning = accounting.stop_cost(trace, None)
        row = ((np.asarray(trace.labels) > 0.5).astype(np.float64), total.astype(np.float64),
               reasoning.astype(np.float64), np.asarray(trace.positions, dtype=np.float64),
               np.asarray(trace.probe_tokens, dtype=np.float64), float(never_total), float(never_reasoning),
               float(bool(trace.final_em)), float(accounting.full_cost(trace)), float(trace.reasoning_tokens))
        try:
            trace.__dict__[_ROW] = row
        except AttributeError:  # a trace without a __dict__ (slots): recomputed each time
            pass
    return row


@dataclass
class TraceArrays:
    """The accounting of N traces padded to the longest one's P probes."""

    labels: np.ndarray  # (N, P) float 0/1: EM of stopping at each probe (0 past a trace's last probe)
    stop_total: np.ndarray  # (N, P) total tokens of stopping at each probe having run every probe up to it
    stop_reasoning: np.ndarray  # (N, P) reasoning tokens of the same
    positions: np.ndarray  # (N, P) reasoning tokens before each probe
    probe_tokens: np.ndarray  # (N, P) what each probe costs (0 past a trace's last probe)
    mask: np.ndarray  # (N, P) bool: the probe exists
    never_total: np.ndarray  # (N,) tokens of a probing policy that never fires (every probe run)
    never_reasoning: np.ndarray  # (N,)
    full_em: np.ndarray  # (N,) EM of full generation
    full_tokens: np.ndarray  # (N,) tokens of plain full generation (no probes)
    reasoning_tokens: np.ndarray  # (N,) every reasoning token of the run

    @classmethod
    def of(cls, traces: Sequence) -> "TraceArrays":
        """The arrays of ``traces``; the last few lists asked for are kept (an episode's query set is
        swept by every method and scored at every selector's choice). Traces of a registered family
        (:func:`maml_stop.data.family.family_table`) are gathered from the family's arrays, padded to
        its longest trace (padding is never a hit: the same outcomes)."""
        hit = _RECENT.get(traces)
        if hit is None:
            found = family.rows_of(traces)
            whole = None if found is None else found[0].layout("accounting", lambda ts: cls._build(ts)[1])
            hit = _RECENT.put(traces, whole.take(found[1]) if whole is not None else cls._build(traces)[1])
        return hit

    def take(self, rows: np.ndarray) -> "TraceArrays":
        """The arrays of the traces at ``rows``."""
        return TraceArrays(*(getattr(self, f.name).take(rows, axis=0) for f in fields(self)))  # take: a[rows], faster

    def pad(self, scores: Sequence[np.ndarray]) -> np.ndarray:
        """:func:`pad_scores` of one score per probe of each trace, as wide as these arrays (N, P)."""
        lengths = self.mask.sum(axis=1)
        if len(scores) != len(lengths) or any(len(s) != n for s, n in zip(scores, lengths.tolist())):
            raise ValueError(f"scores of {[len(s) for s in scores][:5]}... probes for traces of {lengths[:5].tolist()}...")
        return self.pad_flat(np.concatenate(scores) if len(scores) else np.zeros(0))

    def pad_flat(self, flat: np.ndarray) -> np.ndarray:
        """(N, P) of one score per probe, trace by trace (``flat``), -inf past each trace's last probe."""
        out = np.full(self.mask.shape, -np.inf)
        out[self.mask] = flat  # row-major: trace by trace, probe by probe
        return out

    @classmethod
    def _build(cls, traces: Sequence) -> tuple[tuple, "TraceArrays"]:
        rows = [_row(t) for t in traces]
        n, p = len(rows), max((len(r[0]) for r in rows), default=0)
        per_probe = np.zeros((5, n, p))  # labels, stop total, stop reasoning, positions, probe tokens
        mask = np.zeros((n, p), dtype=bool)
        for i, r in enumerate(rows):
            m = len(r[0])
            per_probe[:, i, :m] = r[:5]
            mask[i, :m] = True
        scalars = np.array([r[5:] for r in rows], dtype=np.float64).reshape(n, 5).T.copy()
        return tuple(traces), cls(*per_probe, mask, *scalars)

    def __len__(self) -> int:
        return int(self.full_em.shape[0])


@dataclass
class CandidateOutcomes:
    """Outcomes of every trace at every candidate (J candidates, in the order given)."""

    em: np.ndarray  # (N, J) float 0/1
    total: np.ndarray  # (N, J) total tokens (probes included)
    reasoning: np.ndarray  # (N, J) reasoning tokens
    stopped: np.ndarray  # (N, J) bool: stopped at a probe


def pad_scores(scores: Sequence[np.ndarray]) -> np.ndarray:
    """(N, P) float64 scores, -inf past each trace's last probe (never a hit)."""
    p = max((len(s) for s in scores), default=0)
    out = np.full((len(scores), p), -np.inf)
    for i, s in enumerate(scores):
        out[i, : len(s)] = s
    return out


def candidate_outcomes(arrays: TraceArrays, scores: np.ndarray, candidates: Sequence[float]) -> CandidateOutcomes:
    """Stop at the first probe whose score (``scores`` (N, P), :func:`pad_scores`) reaches each candidate."""
    taus = np.asarray(list(candidates), dtype=np.float64)  # (J,)
    first = first_hits(scores[:, None, :], taus, mask=arrays.mask[:, None, :])  # (N, J), NEVER where none
    stopped = first != NEVER
    at = np.where(stopped, first, 0) + arrays.mask.shape[1] * np.arange(len(arrays))[:, None]  # (N, J) flat (N*P) index
    take = lambda a: a.reshape(-1).take(at)  # noqa: E731  (a[rows, at] on the flat array: the same, faster)
    return CandidateOutcomes(
        em=np.where(stopped, take(arrays.labels), arrays.full_em[:, None]),
        total=np.where(stopped, take(arrays.stop_total), arrays.never_total[:, None]),
        reasoning=np.where(stopped, take(arrays.stop_reasoning), arrays.never_reasoning[:, None]),
        stopped=stopped,
    )
