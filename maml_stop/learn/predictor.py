"""The stopping predictor: a probe point's features -> logit of P(stopping here keeps the answer correct).

>>> import torch
>>> from maml_stop.data.batches import ProbeBatch
>>> net = StoppingPredictor(n_features=8, hidden=16, depth=1)
>>> batch = ProbeBatch(torch.randn(5, 8), torch.ones(5), torch.zeros(5, dtype=torch.long),
...                    torch.arange(5), torch.ones(5))
>>> net(batch).shape
torch.Size([5])

Layout (so that ANIL can adapt the head alone): ``embed`` = normalisation buffers -> ``inputs`` of the
chosen ``kind`` -> ``body`` (``depth`` x Linear + ReLU + dropout), then ``head`` = one Linear to a logit.

``kind`` (no look-ahead in any of them: a probe's logit depends only on that probe and earlier probes
of its trace; ``tests/test_predictor.py`` checks it):

* ``mlp``: the probe's own (normalised) features;
* ``delta``: the features, their change since the previous probe of the trace (0 at the first probe)
  and their running mean over the trace's probes so far; all built with a few tensor ops;
* ``gru``: the features plus the state of a small GRU run over the trace's probes in order (a Python
  loop over probe *positions*, batched over traces; slower than ``delta``).

Normalisation statistics (``feature_mean``, ``feature_std``) are buffers: computed on the
meta-training families (``TraceDataModule.normalisation_stats``), set with :meth:`set_normalisation`,
and saved in every checkpoint.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maml_stop.data.batches import ProbeBatch

__all__ = ["StoppingPredictor", "PredictorConfig", "CausalGRU", "KINDS", "fresh_copy"]

KINDS = ("mlp", "delta", "gru")
MIN_STD = 1e-6  # features with a smaller spread on the training families are only centred


@dataclass(frozen=True)
class PredictorConfig:
    """What builds a :class:`StoppingPredictor` (stored in checkpoints and adapted artifacts as a dict,
    :meth:`to_dict`). Tuned values live in ``experiments/*.yaml`` (``model.predictor.hidden``, ...)."""

    n_features: int = 0  # width of a probe point's feature vector (corpus meta.json); 0 = the data's (modules)
    hidden: int = 64  # width of every hidden layer (and of the GRU state for kind="gru")
    depth: int = 2  # hidden layers of the body; 0 = a logistic regression on the inputs
    kind: str = "mlp"  # mlp | delta (+ change since the previous probe, running mean) | gru
    dropout: float = 0.0  # dropout after each hidden layer (training only)

    def to_dict(self) -> dict:
        """Plain types, for files (``torch.save`` weights-only, JSON)."""
        return asdict(self)

    @classmethod
    def coerce(cls, config: "PredictorConfig | Mapping[str, Any]") -> "PredictorConfig":
        """``config`` itself, or a config from a mapping with its field names (a checkpoint's entry)."""
        return config if isinstance(config, cls) else cls(**config)


def apply_linear(x: Tensor, layer: nn.Linear) -> Tensor:
    """``layer(x)``, also when the layer's parameters carry a leading episode axis (episode-batched
    clones): weight (E, out, in), bias (E, out), x (E, N, in) -> (E, N, out)."""
    w, b = layer.weight, layer.bias
    if w.dim() == 2:
        return F.linear(x, w, b)
    return torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))


class CausalGRU(nn.Module):
    """A GRU over the probes of each trace, batched over traces; built from two Linear layers so that
    learn2learn's ``clone_module``/``update_module`` and double backward work on it unchanged."""

    def __init__(self, n_in: int, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.ih = nn.Linear(n_in, 3 * hidden)
        self.hh = nn.Linear(hidden, 3 * hidden)

    def forward(self, x: Tensor, trace_index: Tensor, probe_index: Tensor) -> Tensor:
        """(N, n_in) -> (N, hidden): the state after each probe, having seen that probe and earlier ones."""
        n_traces = int(trace_index.max()) + 1
        n_steps = int(probe_index.max()) + 1
        gi = self.ih(x)  # (N, 3H), all input projections at once
        padded = gi.new_zeros(n_traces, n_steps, 3 * self.hidden).index_put((trace_index, probe_index), gi)
        h = x.new_zeros(n_traces, self.hidden)  # (T, H)
        states = []
        for t in range(n_steps):  # steps past a trace's end only produce states nobody reads
            i_r, i_z, i_n = padded[:, t].chunk(3, dim=1)
            h_r, h_z, h_n = self.hh(h).chunk(3, dim=1)
            r = torch.sigmoid(i_r + h_r)
            z = torch.sigmoid(i_z + h_z)
            n = torch.tanh(i_n + r * h_n)
            h = (1 - z) * n + z * h
            states.append(h)
        return torch.stack(states, dim=1)[trace_index, probe_index]  # (N, H)


class StoppingPredictor(nn.Module):
    """Normalisation buffers + an MLP (or a sequence variant) giving one logit per probe point."""

    def __init__(
        self,
        n_features: int,
        hidden: int = PredictorConfig.hidden,
        depth: int = PredictorConfig.depth,
        kind: str = PredictorConfig.kind,
        dropout: float = PredictorConfig.dropout,
    ) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown predictor kind {kind!r}; valid kinds: {', '.join(KINDS)}")
        if n_features < 1 or hidden < 1 or depth < 0:
            raise ValueError(f"need n_features >= 1, hidden >= 1, depth >= 0; got {n_features}, {hidden}, {depth}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1); got {dropout}")
        self.n_features, self.hidden, self.depth, self.kind, self.dropout = n_features, hidden, depth, kind, dropout
        self.register_buffer("feature_mean", torch.zeros(n_features))  # (F,)
        self.register_buffer("feature_std", torch.ones(n_features))  # (F,)
        if kind == "gru":
            self.encoder = CausalGRU(n_features, hidden)
            width = n_features + hidden
        else:
            width = n_features * (3 if kind == "delta" else 1)
        layers = []
        for _ in range(depth):
            layers.append(nn.Linear(width, hidden))
            width = hidden
        # Linear layers only (ReLU/dropout applied functionally): fewer modules make learn2learn's
        # per-step clone/update, which walk every module in Python, measurably cheaper
        self.body = nn.ModuleList(layers)
        self.head = nn.Linear(width, 1)

    @classmethod
    def from_config(cls, config: PredictorConfig) -> "StoppingPredictor":
        """A fresh predictor (random init from the global torch seed) built from ``config``."""
        return cls(config.n_features, config.hidden, config.depth, config.kind, config.dropout)

    def config(self) -> PredictorConfig:
        """What built this predictor (``config().to_dict()`` is what checkpoints store)."""
        return PredictorConfig(self.n_features, self.hidden, self.depth, self.kind, self.dropout)

    @property
    def dtype(self) -> torch.dtype:
        """The precision of its weights (float32; float64 for a pooled probe trained so, issue 29 item 12):
        :meth:`inputs` casts the features to it, the adapter its support batches."""
        return self.head.weight.dtype

    @torch.no_grad()
    def set_normalisation(self, mean: Tensor, std: Tensor) -> None:
        """Set the feature statistics (from the meta-training families). mean, std: (F,)"""
        mean = torch.as_tensor(mean, dtype=self.feature_mean.dtype).flatten()  # in the predictor's precision
        std = torch.as_tensor(std, dtype=self.feature_mean.dtype).flatten()
        if mean.shape != (self.n_features,) or std.shape != (self.n_features,):
            raise ValueError(
                f"normalisation statistics must have shape ({self.n_features},); got {tuple(mean.shape)}, {tuple(std.shape)}"
            )
        if not (torch.isfinite(mean).all() and torch.isfinite(std).all()) or (std < 0).any():
            raise ValueError("normalisation statistics must be finite with std >= 0")
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(torch.where(std < MIN_STD, torch.ones_like(std), std))

    def inputs(self, batch: ProbeBatch) -> Tensor:
        """The parameter-free part: normalised features (plus, for ``delta``, their change since the
        previous probe and their running mean). Depends on buffers only, so the adapter computes it
        once per support set. (N, F) or (N, 3F)"""
        x = (batch.features.to(self.feature_mean.dtype) - self.feature_mean) / self.feature_std  # (N, F)
        if self.kind != "delta":
            return x
        # rows of a trace are contiguous and in probe order (ProbeBatch layout)
        ti, pi = batch.trace_index, batch.probe_index
        prev = x[torch.arange(x.shape[0]) - (pi > 0).long()]  # (N, F) previous probe (itself at the first)
        n_traces, n_steps = int(ti[-1]) + 1, int(pi.max()) + 1
        padded = x.new_zeros(n_traces, n_steps, x.shape[1]).index_put((ti, pi), x)  # (T, P, F)
        run_mean = torch.cumsum(padded, dim=1)[ti, pi] / (pi + 1).unsqueeze(1)  # (N, F) mean of probes <= i
        return torch.cat([x, x - prev, run_mean], dim=1)  # (N, 3F)

    def embed_inputs(self, x: Tensor, batch: ProbeBatch | None = None) -> Tensor:
        """Body applied to :meth:`inputs`. (N, in) -> (N, width of head input)"""
        if self.kind == "gru":
            x = torch.cat([x, self.encoder(x, batch.trace_index, batch.probe_index)], dim=1)  # (N, F+H)
        for layer in self.body:
            x = torch.relu(apply_linear(x, layer))
            if self.dropout > 0:
                x = F.dropout(x, self.dropout, self.training)
        return x

    def logits_from_inputs(self, x: Tensor, batch: ProbeBatch | None = None) -> Tensor:
        """Logits from :meth:`inputs`: (N, in) -> (N,), or, for an episode-batched clone (parameters
        with a leading episode axis E, see ``InnerLoopAdapter.episode_losses``), (E, N, in) -> (E, N).
        ``batch`` (trace/probe indices) is needed by ``kind="gru"`` only, which has no batched form."""
        return apply_linear(self.embed_inputs(x, batch), self.head).squeeze(-1)

    def embed(self, batch: ProbeBatch) -> Tensor:
        """Everything but the head (what ANIL shares across tasks). -> (N, width of head input)"""
        return self.embed_inputs(self.inputs(batch), batch)

    def forward(self, batch: ProbeBatch) -> Tensor:
        return self.logits_from_inputs(self.inputs(batch), batch)  # (N,) logits

    def predict_proba(self, batch: ProbeBatch) -> Tensor:
        """P(stopping at each probe keeps the answer correct). (N,)"""
        return torch.sigmoid(self(batch))


def fresh_copy(predictor: nn.Module) -> StoppingPredictor:
    """A new StoppingPredictor with ``predictor``'s weights and normalisation as real parameters (an
    adapted clone holds plain tensors, which cannot be adapted again), in its precision."""
    new = StoppingPredictor.from_config(predictor.config()).to(predictor.dtype)
    new.load_state_dict({k: v.detach().clone() for k, v in predictor.state_dict().items()})
    return new
