"""Every candidate threshold of every episode in one vectorised pass (issue 26 item 2).

A first-hit policy stops at the first probe whose score reaches tau. With the per-trace arrays of one
family padded into a :class:`TraceTable` (built once), :func:`candidate_outcomes` gives the EM and the
tokens of every trace at every candidate at once: the first hit is an argmax over ``scores >= tau``,
costs and EM are gathered by index (the accounting of :mod:`maml_stop.data.accounting`: a stop pays
every probe up to it; a policy that never fires pays every probe and returns the final answer). An
episode is then a membership mask over the family's traces, and :class:`EpisodeSweeps` sums support and
query outcomes of all episodes by one matrix product each: no per-candidate or per-trace Python loop.

>>> import numpy as np
>>> from types import SimpleNamespace as T
>>> t = T(positions=np.array([10, 20]), probe_tokens=np.array([5, 6]), reasoning_tokens=40,
...       labels=np.array([0.0, 1.0]), final_em=True, cap_probe=None)
>>> table = TraceTable.from_traces([t], [np.array([0.3, 0.8])])
>>> out = candidate_outcomes(table, [0.9, 0.5, 0.2])
>>> out.em.tolist(), out.tokens.tolist()
([[1.0, 1.0, 0.0]], [[51.0, 31.0, 15.0]])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from maml_stop.data import accounting

__all__ = ["TraceTable", "CandidateOutcomes", "candidate_outcomes", "EpisodeSweeps", "episode_masks"]


@dataclass
class TraceTable:
    """One family's traces as padded arrays (N traces, P = the longest trace's probes)."""

    scores: np.ndarray  # (N, P) float64 probe scores, -inf past a trace's last probe
    labels: np.ndarray  # (N, P) float64 EM of stopping at each probe
    stop_tokens: np.ndarray  # (N, P) float64 total tokens of stopping at each probe
    never_tokens: np.ndarray  # (N,) tokens of a probing policy that never fires
    full_em: np.ndarray  # (N,) EM of full generation
    full_tokens: np.ndarray  # (N,) tokens of plain full generation (no probes)

    @classmethod
    def from_traces(cls, traces: Sequence, scores: Sequence[np.ndarray]) -> "TraceTable":
        """``scores[i]`` (P_i,) is the probe's score at each probe of ``traces[i]``."""
        if len(traces) != len(scores):
            raise ValueError(f"{len(traces)} traces but {len(scores)} score arrays")
        n, p = len(traces), max((len(s) for s in scores), default=0)
        table = cls(np.full((n, p), -np.inf), np.zeros((n, p)), np.zeros((n, p)), np.zeros(n), np.zeros(n),
                    np.zeros(n))
        for i, (t, s) in enumerate(zip(traces, scores)):
            m = len(s)
            if m != len(t.labels):
                raise ValueError(f"trace {i} has {len(t.labels)} probes but {m} scores")
            table.scores[i, :m] = s
            table.labels[i, :m] = np.asarray(t.labels, dtype=np.float64) > 0.5
            table.stop_tokens[i, :m] = accounting.stop_costs(t)[0]
            table.never_tokens[i] = accounting.stop_cost(t, None)[0]
            table.full_em[i] = float(bool(t.final_em))
            table.full_tokens[i] = accounting.full_cost(t)
        return table

    def __len__(self) -> int:
        return int(self.full_em.shape[0])


@dataclass
class CandidateOutcomes:
    """EM and tokens of every trace at every candidate (J candidates, conservative -> aggressive)."""

    em: np.ndarray  # (N, J)
    tokens: np.ndarray  # (N, J)
    stopped: np.ndarray  # (N, J) bool: stopped at a probe
    full_em: np.ndarray  # (N,)
    full_tokens: np.ndarray  # (N,)


def candidate_outcomes(table: TraceTable, taus: Sequence[float]) -> CandidateOutcomes:
    """Outcomes at every threshold of ``taus`` at once: stop at the first probe with score >= tau."""
    taus = np.asarray(taus, dtype=np.float64)
    hit = table.scores[:, None, :] >= taus[None, :, None]  # (N, J, P)
    first = hit.argmax(axis=2)  # (N, J) first hit (0 where none)
    stopped = hit.any(axis=2)  # (N, J)
    rows = np.arange(len(table))[:, None]
    em = np.where(stopped, table.labels[rows, first], table.full_em[:, None])
    tokens = np.where(stopped, table.stop_tokens[rows, first], table.never_tokens[:, None])
    return CandidateOutcomes(em, tokens, stopped, table.full_em.copy(), table.full_tokens.copy())


def episode_masks(n: int, support: Sequence[Sequence[int]]) -> np.ndarray:
    """(E, N) float 0/1 membership of each episode's support indices."""
    mask = np.zeros((len(support), n))
    for e, idx in enumerate(support):
        mask[e, np.asarray(idx, dtype=np.int64)] = 1.0
    return mask


@dataclass
class EpisodeSweeps:
    """Support and query sums of every episode of one family at every candidate (E episodes).

    The query of an episode is every trace not in its support (the protocol's ``query: null``)."""

    support: np.ndarray  # (E, N) support membership
    out: CandidateOutcomes

    def _sums(self, query: bool) -> dict[str, np.ndarray]:
        w = 1.0 - self.support if query else self.support  # (E, N)
        o = self.out
        loss = o.full_em[:, None] * (1.0 - o.em)  # (N, J) full right, candidate wrong
        gain = (1.0 - o.full_em[:, None]) * o.em  # (N, J) full wrong, candidate right
        return {
            "n": w.sum(1),  # (E,)
            "full_em": w @ o.full_em,  # (E,) correct answers of full generation
            "full_tokens": w @ o.full_tokens,  # (E,)
            "em": w @ o.em,  # (E, J)
            "tokens": w @ o.tokens,  # (E, J)
            "loss": w @ loss,  # (E, J) counts
            "gain": w @ gain,  # (E, J)
            "stopped": w @ o.stopped.astype(np.float64),  # (E, J)
            "wrong_stop": w @ (o.stopped * (1.0 - o.em)),  # (E, J) stopped at a wrong answer
        }

    def support_sums(self) -> dict[str, np.ndarray]:
        return self._sums(query=False)

    def query_sums(self) -> dict[str, np.ndarray]:
        return self._sums(query=True)

    def query_figures(self) -> tuple[np.ndarray, np.ndarray]:
        """(E, J + 1) query EM drop and savings (fractions) of full generation (column 0: 0 and 0) and
        of every candidate (columns 1..J)."""
        q = self.query_sums()
        drop = (q["full_em"][:, None] - q["em"]) / q["n"][:, None]
        savings = accounting.savings(q["tokens"], q["full_tokens"][:, None])
        zero = np.zeros((drop.shape[0], 1))
        return np.hstack([zero, drop]), np.hstack([zero, savings])
