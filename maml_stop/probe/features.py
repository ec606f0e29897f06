"""Features of a probe point, computed only from what exists at that moment of generation.

The same code runs in the harvester and, later, inside ``generate()`` for live stopping: it sees the
last-layer hidden states and next-token entropies of the tokens generated so far, and the probe answers
so far; never a later token, the final answer or the gold answer.

Feature vector (names in :attr:`ProbeFeaturizer.feature_names`):

* ``h0..h{D-1}``: summary of the last-layer hidden state (``summary="last"``: at the probe point;
  ``"mean"``: mean over the window since the previous probe), projected to ``proj_dim`` with a seeded
  Gaussian random projection (``proj_dim=0`` keeps the full width);
* ``m0..m{D-1}`` (only with ``mid_layer``): the same summary of the hidden state after decoder layer
  ``mid_layer`` (an index into ``output_hidden_states``: 0 = embeddings), with its own projection
  (seed ``proj_seed + 1``), so that a feature study can compare layers;
* answer confidence: ``logprob_mean``, ``logprob_min``, ``logprob_first`` of the forced answer tokens,
  ``answer_tokens`` (its length) and ``answer_empty`` (no answer could be extracted);
* answer stability: ``same_as_prev``, ``run_length`` (current run of identical answers),
  ``n_distinct`` (distinct answers so far);
* ``entropy_mean`` (mean next-token entropy over the window) and ``entropy_last``;
* progress: ``tokens_so_far``, ``log_tokens``, ``probe_index``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

SCALAR_FEATURES = (
    "logprob_mean",
    "logprob_min",
    "logprob_first",
    "answer_tokens",
    "answer_empty",
    "same_as_prev",
    "run_length",
    "n_distinct",
    "entropy_mean",
    "entropy_last",
    "tokens_so_far",
    "log_tokens",
    "probe_index",
)
SUMMARIES = ("last", "mean")

# Cost classes (DESIGN.md, honest accounting): a *free* feature comes from the generation's own forward
# pass (hidden states, entropies, progress); a *paid* one needs the forced answer of that probe. A policy
# pays for the forced answers it runs, so which features it reads decides what it pays.
PAID_FEATURES = ("logprob_mean", "logprob_min", "logprob_first", "answer_tokens", "answer_empty",
                 "same_as_prev", "run_length", "n_distinct")
COST_CLASSES = ("free", "paid")


def feature_cost(name: str) -> str:
    """``"free"`` or ``"paid"`` for a feature name of :class:`ProbeFeaturizer` (the one rule).

    >>> feature_cost("h3"), feature_cost("m0"), feature_cost("entropy_mean"), feature_cost("run_length")
    ('free', 'free', 'free', 'paid')
    """
    if name in PAID_FEATURES:
        return "paid"
    if name in SCALAR_FEATURES or (name[:1] in ("h", "m") and name[1:].isdigit()):
        return "free"
    raise ValueError(f"unknown feature {name!r}: valid names are h<i>, m<i> and {', '.join(SCALAR_FEATURES)}")


@dataclass
class FeatureState:
    """Running per-row state of a batch of generations (rows indexed 0..B-1 for the whole run)."""

    h_sum: torch.Tensor  # (B, H) float32, sum of hidden states in the window
    m_sum: torch.Tensor | None  # (B, H) float32, the same for the middle layer (None: no mid_layer)
    m_last: torch.Tensor | None  # (B, H)
    h_last: torch.Tensor  # (B, H) float32
    count: torch.Tensor  # (B,) tokens in the window
    ent_sum: torch.Tensor  # (B,) sum of next-token entropies in the window
    ent_last: torch.Tensor  # (B,)
    answers: list[list[str]] = field(default_factory=list)  # probe answers so far, per row


def answer_key(answer: str | None) -> str:
    """How probe answers are compared by the stability features: stripped and lower-cased.

    Comparing the families' canonical forms instead (``family.canonical_answer``: "7.0" = "7",
    "-3/1" = "-3") would merge 73 of the 19,625 consecutive probe-answer pairs of the bundled qwen05
    corpus (0.4%, at 2,048 traces), so the features keep this family-free key, which live stopping
    can compute without knowing the family."""
    return (answer or "").strip().lower()


def answer_stability(previous: list[str], key: str) -> dict[str, float]:
    """``answer_empty``, ``same_as_prev``, ``run_length``, ``n_distinct`` of a probe whose answer key is
    ``key``, after the probes whose keys are ``previous`` (the harvester, live stopping and rescore)."""
    run = 1
    for prev in reversed(previous):
        if prev != key:
            break
        run += 1
    return {
        "answer_empty": float(not key),
        "same_as_prev": float(bool(previous) and previous[-1] == key and key != ""),
        "run_length": float(run),
        "n_distinct": float(len(set(previous + [key]))),
    }


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Next-token entropy in nats. logits: (B, V) -> (B,)"""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


class ProbeFeaturizer:
    def __init__(self, hidden_size: int, proj_dim: int = 32, proj_seed: int = 0, summary: str = "mean",
                 mid_layer: int | None = None) -> None:
        if mid_layer is not None and mid_layer < 0:
            raise ValueError(f"mid_layer must be an index >= 0 into the model's hidden states, got {mid_layer}")
        if summary not in SUMMARIES:
            raise ValueError(f"unknown hidden-state summary {summary!r}; valid: {', '.join(SUMMARIES)}")
        if proj_dim < 0:
            raise ValueError(f"proj_dim must be >= 0 (0 = no projection), got {proj_dim}")
        self.hidden_size = hidden_size
        self.proj_dim = proj_dim
        self.proj_seed = proj_seed
        self.summary = summary
        self.mid_layer = mid_layer
        self.projection = self._projection(proj_seed)
        self.mid_projection = self._projection(proj_seed + 1) if mid_layer is not None else None
        width = proj_dim or hidden_size
        mid = [f"m{i}" for i in range(width)] if mid_layer is not None else []
        self.feature_names = [f"h{i}" for i in range(width)] + mid + list(SCALAR_FEATURES)
        self.feature_costs = {name: feature_cost(name) for name in self.feature_names}

    def _projection(self, seed: int) -> torch.Tensor | None:
        if not self.proj_dim:
            return None
        g = torch.Generator().manual_seed(seed)
        # (H, D): entries N(0, 1/D) so that projected norms match the hidden norm in expectation
        return torch.randn(self.hidden_size, self.proj_dim, generator=g) / math.sqrt(self.proj_dim)

    def config(self) -> dict:
        out = {"hidden_size": self.hidden_size, "proj_dim": self.proj_dim, "proj_seed": self.proj_seed,
               "summary": self.summary, "projection": "gaussian, N(0, 1/proj_dim), torch.Generator seed"}
        if self.mid_layer is not None:  # absent: corpora written before it existed still match
            out["mid_layer"] = self.mid_layer
            out["mid_projection"] = "gaussian, N(0, 1/proj_dim), torch.Generator seed proj_seed + 1"
        return out

    def new_state(self, batch_size: int) -> FeatureState:
        H = self.hidden_size
        mid = self.mid_layer is not None
        return FeatureState(
            h_sum=torch.zeros(batch_size, H),
            m_sum=torch.zeros(batch_size, H) if mid else None,
            m_last=torch.zeros(batch_size, H) if mid else None,
            h_last=torch.zeros(batch_size, H),
            count=torch.zeros(batch_size),
            ent_sum=torch.zeros(batch_size),
            ent_last=torch.zeros(batch_size),
            answers=[[] for _ in range(batch_size)],
        )

    def observe(self, state: FeatureState, rows: torch.Tensor, hidden: torch.Tensor, entropy: torch.Tensor,
                hidden_mid: torch.Tensor | None = None) -> None:
        """Add one generation step. rows: (b,) long row ids; hidden: (b, H) last layer; entropy: (b,);
        hidden_mid: (b, H) after layer ``mid_layer`` (required exactly when the featurizer has one)."""
        if (hidden_mid is None) != (state.m_sum is None):
            raise ValueError(f"this featurizer has mid_layer={self.mid_layer}: observe() needs hidden_mid exactly "
                             "when mid_layer is set")
        if hidden_mid is not None:
            state.m_sum.index_add_(0, rows, hidden_mid.float())
            state.m_last[rows] = hidden_mid.float()
        hidden = hidden.float()
        state.h_sum.index_add_(0, rows, hidden)
        state.h_last[rows] = hidden
        state.count[rows] += 1
        state.ent_sum[rows] += entropy.float()
        state.ent_last[rows] = entropy.float()

    def probe_features(
        self,
        state: FeatureState,
        row: int,
        answer: str | None,
        logprobs: list[float],
        n_generated: int,
    ) -> np.ndarray:
        """The feature vector of a probe of ``row`` (then the window restarts). Returns (F,) float32."""
        n = max(float(state.count[row]), 1.0)
        h = state.h_last[row] if self.summary == "last" else state.h_sum[row] / n
        if self.projection is not None:
            h = h @ self.projection
        parts = [h.numpy().astype(np.float32)]
        if state.m_sum is not None:
            m = state.m_last[row] if self.summary == "last" else state.m_sum[row] / n
            if self.mid_projection is not None:
                m = m @ self.mid_projection
            parts.append(m.numpy().astype(np.float32))
            state.m_sum[row].zero_()
        previous = state.answers[row]
        key = answer_key(answer)
        stability = answer_stability(previous, key)
        lp = [float(x) for x in logprobs] or [0.0]
        scalars = [
            float(np.mean(lp)),
            float(np.min(lp)),
            lp[0],
            float(len(logprobs)),
            stability["answer_empty"],
            stability["same_as_prev"],
            stability["run_length"],
            stability["n_distinct"],
            float(state.ent_sum[row]) / n,
            float(state.ent_last[row]),
            float(n_generated),
            math.log1p(n_generated),
            float(len(previous)),
        ]
        previous.append(key)
        state.h_sum[row].zero_()
        state.count[row] = 0
        state.ent_sum[row] = 0
        return np.concatenate(parts + [np.asarray(scalars, dtype=np.float32)])
