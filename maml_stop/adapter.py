"""The one inner-loop adaptation function: adapt a stopping predictor on a support set.

Meta-training (:class:`maml_stop.module.MetaStoppingModule`), evaluation and the adaptation script all
call :meth:`InnerLoopAdapter.adapt`; it wraps learn2learn (imported through :mod:`maml_stop.l2l`):

* ``maml``: ``MAML`` on the whole predictor (``first_order=True`` is FOMAML), Finn et al. 2017;
* ``anil``: the body is shared and only the head is adapted (``MAML`` on ``predictor.head``), so the
  support embedding is computed once per episode; Raghu et al. 2020;
* ``metasgd``: ``MetaSGD`` with a learned rate per parameter entry (``adapter.lrs``, trained by the outer
  optimiser), Li et al. 2017.

>>> import torch
>>> from maml_stop.predictor import StoppingPredictor
>>> from maml_stop.data import ProbeBatch
>>> support = ProbeBatch(torch.randn(6, 4), torch.tensor([0., 1, 1, 0, 1, 0]),
...                      torch.zeros(6, dtype=torch.long), torch.arange(6), torch.ones(6))
>>> adapter = InnerLoopAdapter(StoppingPredictor(4, hidden=8, depth=1), inner_steps=3)
>>> adapted = adapter.adapt(support)      # a StoppingPredictor clone; adapter.predictor is untouched
>>> adapted(support).shape
torch.Size([6])

Gradients: the inner loop always runs under ``torch.enable_grad()``. When the caller has gradients
enabled (meta-training), the adapted clone stays connected to the predictor's parameters (and to
``lrs``) so the query loss back-propagates through the adaptation: second-order unless
``first_order``. When the caller runs under ``torch.no_grad()`` (validation, evaluation, the adapt
script) nobody can back-propagate anyway, so the inner steps are first-order (same adapted values,
cheaper) and the returned clone is detached. Under ``torch.inference_mode()`` adaptation is
impossible and raises: use ``Trainer(inference_mode=False)``.

Inner losses (``loss``): ``bce`` (mean over probe points), ``balanced`` (each class present in the
batch weighs half, so a support set with few correct probes still teaches both sides), ``cost`` (each
probe weighted by ``ProbeBatch.weights``; fill them with ``weighting="cost"``, see :mod:`maml_stop.data`).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maml_stop.data import DataError, ProbeBatch
from maml_stop.l2l import MAML, MetaSGD
from maml_stop.predictor import StoppingPredictor

__all__ = ["InnerLoopAdapter", "ALGORITHMS", "LOSSES", "inner_loss", "loss_weights"]

log = logging.getLogger(__name__)

ALGORITHMS = ("maml", "anil", "metasgd")
LOSSES = ("bce", "balanced", "cost")


def loss_weights(batch: ProbeBatch, kind: str = "balanced") -> Tensor:
    """Per-probe weights of the inner loss ``kind``, summing to 1. (N,)"""
    if kind == "bce":
        return torch.full_like(batch.labels, 1.0 / max(len(batch), 1))
    if kind == "balanced":  # each class present weighs half (all of it when the other is absent)
        pos = batch.labels
        n_pos = pos.sum()
        w = pos / n_pos.clamp(min=1.0) + (1.0 - pos) / (pos.numel() - n_pos).clamp(min=1.0)
    elif kind == "cost":
        w = batch.weights
    else:
        raise ValueError(f"unknown inner loss {kind!r}; valid: {', '.join(LOSSES)}")
    return w / w.sum().clamp(min=1e-12)


def inner_loss(logits: Tensor, batch: ProbeBatch, kind: str = "balanced", weights: Tensor | None = None) -> Tensor:
    """Weighted binary cross-entropy of ``logits`` (N,) against ``batch.labels``; ``weights`` (N,),
    summing to 1, default ``loss_weights(batch, kind)`` (pass them to skip recomputing in a loop)."""
    w = loss_weights(batch, kind) if weights is None else weights
    return F.binary_cross_entropy_with_logits(logits, batch.labels, weight=w, reduction="sum")


def _detach_(module: nn.Module) -> nn.Module:
    """Cut an adapted clone from the graph (in place)."""
    for m in module.modules():
        for key, p in m._parameters.items():
            if p is not None:
                m._parameters[key] = p.detach()
    return module


class InnerLoopAdapter(nn.Module):
    """Adapts ``predictor`` on a support set; see the module docstring."""

    def __init__(
        self,
        predictor: StoppingPredictor,
        algorithm: str = "maml",
        inner_lr: float = 0.1,
        inner_steps: int = 5,
        first_order: bool = False,
        loss: str = "balanced",
    ) -> None:
        super().__init__()
        if algorithm not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {algorithm!r}; valid: {', '.join(ALGORITHMS)}")
        if loss not in LOSSES:
            raise ValueError(f"unknown inner loss {loss!r}; valid: {', '.join(LOSSES)}")
        if inner_steps < 0 or inner_lr <= 0:
            raise ValueError(f"need inner_steps >= 0 and inner_lr > 0; got {inner_steps}, {inner_lr}")
        self.predictor = predictor
        self.algorithm, self.inner_lr, self.inner_steps = algorithm, inner_lr, inner_steps
        self.first_order, self.loss_kind = first_order, loss
        if algorithm == "maml":
            learner: nn.Module = MAML(predictor, lr=inner_lr, first_order=first_order)
        elif algorithm == "anil":
            learner = MAML(predictor.head, lr=inner_lr, first_order=first_order)
        else:
            learner = MetaSGD(predictor, lr=inner_lr, first_order=first_order)
            self.lrs = learner.lrs  # learned per-parameter rates: outer-optimised, saved in checkpoints
        # The wrapper holds no parameters of its own beyond the predictor's and ``lrs``; keeping it out of
        # the submodules keeps state_dict keys single (``predictor.*``, ``lrs.*``).
        object.__setattr__(self, "_learner", learner)

    def config(self) -> dict:
        """Constructor arguments besides the predictor (stored in checkpoints)."""
        return {"algorithm": self.algorithm, "inner_lr": self.inner_lr, "inner_steps": self.inner_steps,
                "first_order": self.first_order, "loss": self.loss_kind}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config().items())

    def forward(self, batch: ProbeBatch) -> Tensor:
        """The unadapted predictor's logits. (N,)"""
        return self.predictor(batch)

    def loss(self, model: nn.Module, batch: ProbeBatch) -> Tensor:
        """The inner loss of ``model`` (the predictor or an adapted clone) on ``batch``."""
        return inner_loss(model(batch), batch, self.loss_kind)

    def adapt(self, support: ProbeBatch, steps: int | None = None) -> StoppingPredictor:
        """An adapted clone of the predictor after ``steps`` (default ``inner_steps``) inner steps on
        ``support``. The predictor itself is never modified."""
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                "adaptation needs gradients but inference mode is on; run evaluation under "
                "torch.no_grad() instead (Lightning: Trainer(inference_mode=False))"
            )
        if len(support) == 0:
            raise DataError("empty support set: the adapter needs at least one labelled probe point")
        steps = self.inner_steps if steps is None else steps
        if steps < 0:
            raise ValueError(f"steps must be >= 0; got {steps}")
        outer = torch.is_grad_enabled()
        first_order = self.first_order or not outer
        w = loss_weights(support, self.loss_kind)  # (N,) once, not per step
        with torch.enable_grad():
            if self.algorithm == "anil":
                emb = self.predictor.embed(support)  # (N, H) computed once: the body is not adapted
                if not outer:
                    emb = emb.detach()
                head = self._learner.clone(first_order=first_order)
                for _ in range(steps):
                    head.adapt(inner_loss(head(emb).squeeze(-1), support, weights=w), first_order=first_order)
                # only the head is a clone: the body stays the predictor's own modules (never detach those)
                return self._with_head(head.module if outer else _detach_(head.module))
            else:
                learner = self._learner.clone() if self.algorithm == "metasgd" else self._learner.clone(first_order=first_order)
                for _ in range(steps):
                    learner.adapt(inner_loss(learner(support), support, weights=w), first_order=first_order)
                adapted = learner.module
        return adapted if outer else _detach_(adapted)

    def _with_head(self, head: nn.Module) -> StoppingPredictor:
        """A shallow copy of the predictor sharing its body, with ``head`` in place of its head."""
        p = self.predictor
        clone = p.__class__.__new__(p.__class__)
        clone.__dict__ = p.__dict__.copy()
        clone._modules = p._modules.copy()
        clone._modules["head"] = head
        return clone
