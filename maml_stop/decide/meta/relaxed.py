"""The first-hit threshold rule, smoothed (issue 25 item 3): a differentiable query outcome of "stop at the
first probe whose probability reaches tau", for meta-objectives that train through the decision.

Read ``h_i = sigmoid((p_i - tau) / T)`` as the chance that the rule fires at probe ``i``; it first fires
there with ``h_i * prod_{j<i} (1 - h_j)`` and never with ``prod_j (1 - h_j)`` (then it returns the full
run's answer, having paid every probe). Expected EM and tokens of every trace follow from the same
accounting rows as the hard rule (:class:`~.outcomes.TraceTable`); as ``T -> 0`` they become the hard
rule's (:func:`hard_outcome`, through :func:`~maml_stop.decide.rule.first_hits`, the one rule). Episode
figures (:func:`episode_figures`): the net paired EM drop and the token savings against full
generation of the traces an episode's mask selects (its support, or its query).

>>> import torch
>>> table = FamilyTensors.from_arrays(labels=[[0.0, 1.0]], stop_tokens=[[15.0, 31.0]], never_tokens=[51.0],
...                                   full_em=[1.0], full_tokens=[41.0], n_probes=[2])
>>> em, tokens, fires = relaxed_outcome(table, torch.tensor([[[0.3, 0.8]]]), torch.tensor([0.5]), 1e-3)
>>> em.round(decimals=3).tolist(), tokens.round(decimals=1).tolist()   # the hard rule stops at the second probe
([[1.0]], [[31.0]])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from maml_stop.data import accounting
from maml_stop.decide.meta.outcomes import TraceTable
from maml_stop.decide.rule import NEVER, first_hits

__all__ = ["FamilyTensors", "relaxed_outcome", "hard_outcome", "episode_figures"]

_H_MAX = 1.0 - 1e-6  # keeps cumprod's gradient finite where a probe fires for sure


@dataclass
class FamilyTensors:
    """One family's traces as padded float64 tensors (N traces, P probes): what both rules read."""

    features: Tensor  # (N, P, F) float32 probe features (0 past a trace's last probe)
    mask: Tensor  # (N, P) float64 1 where the probe exists
    labels: Tensor  # (N, P) EM of stopping at each probe
    stop_tokens: Tensor  # (N, P) total tokens of stopping there (every probe up to it paid)
    never_tokens: Tensor  # (N,) tokens of a probing rule that never fires
    full_em: Tensor  # (N,) EM of full generation
    full_tokens: Tensor  # (N,) tokens of plain full generation (no probes)

    @classmethod
    def from_traces(cls, traces: Sequence) -> "FamilyTensors":
        """From stored traces (the accounting of :class:`~.outcomes.TraceTable`)."""
        table = TraceTable.from_traces(traces, [np.zeros(t.n_probes) for t in traces])
        n, p = table.labels.shape
        feats = np.zeros((n, p, traces[0].features.shape[1]), dtype=np.float32)
        for i, t in enumerate(traces):
            feats[i, : t.n_probes] = t.features
        return cls._of(table.labels, table.stop_tokens, table.never_tokens, table.full_em, table.full_tokens,
                       np.isfinite(table.scores).astype(np.float64), torch.from_numpy(feats))

    @classmethod
    def from_arrays(cls, labels, stop_tokens, never_tokens, full_em, full_tokens, n_probes,
                    features=None) -> "FamilyTensors":
        """From plain arrays (tests, synthetic families); ``n_probes`` (N,) real probes per row."""
        labels = np.asarray(labels, dtype=np.float64)
        mask = (np.arange(labels.shape[1])[None, :] < np.asarray(n_probes)[:, None]).astype(np.float64)
        feats = torch.zeros(labels.shape + (1,)) if features is None else torch.as_tensor(features, dtype=torch.float32)
        return cls._of(labels, stop_tokens, never_tokens, full_em, full_tokens, mask, feats)

    @classmethod
    def _of(cls, labels, stop_tokens, never_tokens, full_em, full_tokens, mask, features) -> "FamilyTensors":
        t = lambda a: torch.from_numpy(np.array(a, dtype=np.float64))  # noqa: E731  (a copy)
        return cls(features, t(mask), t(labels) * t(mask), t(stop_tokens) * t(mask), t(never_tokens), t(full_em),
                   t(full_tokens))

    def __len__(self) -> int:
        return int(self.full_em.shape[0])


def relaxed_outcome(table: FamilyTensors, probs: Tensor, tau: Tensor, temperature: float
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """Expected EM, tokens and firing probability of every trace under the smoothed rule.

    ``probs`` (E, N, P) the probe's probabilities in E episodes; ``tau`` (E,) one threshold per episode,
    or (E, J) J candidate thresholds per episode; returns three (E, N) tensors, or (E, J, N)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    tau = tau.double()
    per_candidate = tau.dim() == 2
    p = probs.double()[:, None] if per_candidate else probs.double()  # (E, 1, N, P) or (E, N, P)
    t = tau[:, :, None, None] if per_candidate else tau[:, None, None]
    h = torch.sigmoid((p - t) / temperature) * table.mask  # (E, [J,] N, P)
    keep = torch.cumprod(1.0 - h.clamp(max=_H_MAX), dim=-1)  # not fired up to and at i
    before = torch.cat([torch.ones_like(keep[..., :1]), keep[..., :-1]], dim=-1)  # not fired before i
    first = h * before  # first fires at i
    never = keep[..., -1]  # (E, [J,] N)
    em = (first * table.labels).sum(-1) + never * table.full_em
    tokens = (first * table.stop_tokens).sum(-1) + never * table.never_tokens
    return em, tokens, 1.0 - never


def hard_outcome(table: FamilyTensors, probs: np.ndarray, tau: np.ndarray) -> tuple[np.ndarray, ...]:
    """The hard rule's EM, tokens and whether it fired: ``probs`` (E, N, P) against ``tau`` (E,) give
    (E, N) each, against ``tau`` (E, J) (E, J, N) each."""
    tau = np.asarray(tau, dtype=np.float64)
    probs = np.asarray(probs, dtype=np.float64)
    if tau.ndim == 2:
        probs = np.broadcast_to(probs[:, None], (tau.shape[0], tau.shape[1]) + probs.shape[1:])
    mask = np.broadcast_to(table.mask.numpy() > 0, probs.shape)
    first = first_hits(probs, tau[..., None], mask)  # (E, [J,] N)
    fired = first != NEVER
    idx = np.where(fired, first, 0)
    rows = np.arange(len(table))
    labels, stop_tokens = table.labels.numpy(), table.stop_tokens.numpy()
    em = np.where(fired, labels[rows, idx], table.full_em.numpy())
    tokens = np.where(fired, stop_tokens[rows, idx], table.never_tokens.numpy())
    return em, tokens, fired.astype(np.float64)


def episode_figures(table: FamilyTensors, em, tokens, weights):
    """Net paired EM drop and token savings of the traces ``weights`` selects (0/1 membership (E, N)) at
    every outcome ``em``, ``tokens`` ((E, N) -> (E,), or (E, J, N) -> (E, J)). Torch in, torch out
    (differentiable), or NumPy in, NumPy out."""
    if isinstance(em, Tensor):
        w = torch.as_tensor(weights, dtype=torch.float64)
        full_em, full_tokens = table.full_em, table.full_tokens
    else:
        w = np.asarray(weights, dtype=np.float64)
        full_em, full_tokens = table.full_em.numpy(), table.full_tokens.numpy()
    if em.ndim == 3:
        w = w[:, None]
    n = w.sum(-1)
    drop = ((w * full_em).sum(-1) - (w * em).sum(-1)) / n
    saved = accounting.savings((w * tokens).sum(-1), (w * full_tokens).sum(-1))
    return drop, saved
