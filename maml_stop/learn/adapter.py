"""The one inner-loop adaptation function: adapt a stopping predictor on a support set.

Meta-training (:class:`maml_stop.learn.module.MetaStoppingModule`), evaluation and the adaptation script all
call :meth:`InnerLoopAdapter.adapt`; by default it wraps learn2learn (imported, lazily, through
:mod:`maml_stop.learn.l2l`):

* ``maml``: ``MAML`` on the whole predictor (``first_order=True`` is FOMAML), Finn et al. 2017;
* ``anil``: the body is shared and only the head is adapted (``MAML`` on ``predictor.head``), so the
  support embedding is computed once per episode; Raghu et al. 2020;
* ``metasgd``: ``MetaSGD`` with a learned rate per parameter entry (``adapter.lrs``, trained by the outer
  optimiser), Li et al. 2017.

Backends (``backend``): ``learn2learn`` (the default; learn2learn's ``MAML``/``MetaSGD``) or ``torch_func``
(:mod:`maml_stop.learn.func_backend`: the same update with ``torch.func.functional_call`` and
``torch.autograd.grad``, torch alone, for machines where learn2learn cannot be built). Both give the
same adapted weights and meta-gradients, and the same state_dict keys (checkpoints load under either).

>>> import torch
>>> from maml_stop.learn.predictor import StoppingPredictor, apply_linear
>>> from maml_stop.data.batches import ProbeBatch
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

The one road from labelled support traces to an adapted predictor is :meth:`InnerLoopAdapter.fit_support`
(collate with the adapter's weighting, optionally take the normalisation from the support features,
adapt): the learned policies of the evaluation, ``maml-stop adapt`` and the meta-training callback all
go through it, and :meth:`InnerLoopAdapter.episode_losses` (meta-training's episode-batched fast path)
is tested equal to it. :func:`maml_stop.decide.scores.crossfit_probabilities` scores support traces out of
sample with it.

Losses (``loss``, a spec ``"KIND"`` or ``"INNER/QUERY"``, e.g. ``balanced/expected_cost``) are
:mod:`maml_stop.learn.losses`.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence

from maml_stop.data.batches import DataError, ProbeBatch, collate_traces
from maml_stop.learn import func_backend
from maml_stop.learn.losses import (LOSSES, QUERY_LOSSES, expected_cost, expected_stop_cost, inner_loss, loss_weights,
                                    parse_loss, query_loss, stop_penalty)
from maml_stop.learn.predictor import StoppingPredictor, apply_linear

if TYPE_CHECKING:  # pragma: no cover
    from maml_stop.data.corpus import Trace

__all__ = ["InnerLoopAdapter", "AdapterConfig", "ALGORITHMS", "LOSSES", "QUERY_LOSSES", "BACKENDS", "inner_loss",
           "loss_weights", "query_loss", "expected_stop_cost", "parse_loss"]

log = logging.getLogger(__name__)

ALGORITHMS = ("maml", "anil", "metasgd")
BACKENDS = ("learn2learn", "torch_func")


@dataclass(frozen=True)
class AdapterConfig:
    """The inner loop of an :class:`InnerLoopAdapter` (stored in checkpoints as a dict, :meth:`to_dict`).
    Tuned values live in ``experiments/*.yaml`` (``model.adapter.algorithm``, ``model.adapter.inner_lr``, ...)."""

    algorithm: str = "maml"  # maml | anil (adapt the head only) | metasgd (learned per-parameter rates)
    inner_lr: float = 0.1  # inner-loop step size (Meta-SGD: the initial value of every learned rate)
    inner_steps: int = 5  # gradient steps on the support set (a call's ``steps`` overrides it)
    first_order: bool = False  # FOMAML: no gradient through the inner steps (always so under no_grad)
    loss: str = "balanced"  # bce | balanced | cost, or INNER/QUERY, e.g. balanced/expected_cost (parse_loss)
    backend: str = "learn2learn"  # learn2learn | torch_func (same results, torch alone: no learn2learn build)

    def to_dict(self) -> dict:
        """Plain types, for files (``torch.save`` weights-only, JSON)."""
        return asdict(self)

    @classmethod
    def coerce(cls, config: "AdapterConfig | Mapping[str, Any]") -> "AdapterConfig":
        """``config`` itself, or a config from a mapping with its field names (a checkpoint's entry)."""
        return config if isinstance(config, cls) else cls(**config)

    @property
    def weighting(self) -> str:
        """The probe weighting its inner loss reads: ``cost`` weights for an inner ``cost``, else uniform."""
        return "cost" if parse_loss(self.loss)[0] == "cost" else "uniform"


def _expand_(module: nn.Module, n: int) -> nn.Module:
    """Give every parameter of a (cloned) module a leading episode axis of size ``n`` (in place; a view,
    still connected to the parameters it was cloned from)."""
    for m in module.modules():
        for key, p in m._parameters.items():
            if p is not None:
                m._parameters[key] = p.unsqueeze(0).expand(n, *p.shape)
    return module


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
        algorithm: str = AdapterConfig.algorithm,
        inner_lr: float = AdapterConfig.inner_lr,
        inner_steps: int = AdapterConfig.inner_steps,
        first_order: bool = AdapterConfig.first_order,
        loss: str = AdapterConfig.loss,
        backend: str = AdapterConfig.backend,
    ) -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"unknown adaptation backend {backend!r}; valid: {', '.join(BACKENDS)}")
        if algorithm not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {algorithm!r}; valid: {', '.join(ALGORITHMS)}")
        self.inner_kind, self.query_kind = parse_loss(loss)  # ValueError naming the valid specs
        if inner_steps < 0 or inner_lr <= 0:
            raise ValueError(f"need inner_steps >= 0 and inner_lr > 0; got {inner_steps}, {inner_lr}")
        self.predictor = predictor
        self.algorithm, self.inner_lr, self.inner_steps = algorithm, inner_lr, inner_steps
        self.first_order, self.loss_kind, self.backend = first_order, loss, backend
        learner: nn.Module | None = None  # the torch_func backend keeps no learner: see _inner_loop
        if backend == "learn2learn":
            from maml_stop.learn import l2l  # ImportError (naming backend torch_func) without learn2learn

            if algorithm == "maml":
                learner = l2l.MAML(predictor, lr=inner_lr, first_order=first_order)
            elif algorithm == "anil":
                learner = l2l.MAML(predictor.head, lr=inner_lr, first_order=first_order)
            else:
                learner = l2l.MetaSGD(predictor, lr=inner_lr, first_order=first_order)
                self.lrs = learner.lrs  # learned per-parameter rates: outer-optimised, saved in checkpoints
        elif algorithm == "metasgd":
            self.lrs = func_backend.metasgd_rates(predictor, inner_lr)  # the same rates, the same keys
        # The wrapper holds no parameters of its own beyond the predictor's and ``lrs``; keeping it out of
        # the submodules keeps state_dict keys single (``predictor.*``, ``lrs.*``).
        object.__setattr__(self, "_learner", learner)

    @classmethod
    def from_config(cls, predictor: StoppingPredictor, config: AdapterConfig) -> "InnerLoopAdapter":
        return cls(predictor, config.algorithm, config.inner_lr, config.inner_steps, config.first_order, config.loss,
                   config.backend)

    def config(self) -> AdapterConfig:
        """Constructor arguments besides the predictor (``config().to_dict()`` is what checkpoints store)."""
        return AdapterConfig(self.algorithm, self.inner_lr, self.inner_steps, self.first_order, self.loss_kind,
                             self.backend)

    @property
    def weighting(self) -> str:
        """The probe weighting :meth:`fit_support` collates with (what the inner loss reads)."""
        return self.config().weighting

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config().to_dict().items())

    def forward(self, batch: ProbeBatch) -> Tensor:
        """The unadapted predictor's logits. (N,)"""
        return self.predictor(batch)

    def loss(self, model: nn.Module, batch: ProbeBatch) -> Tensor:
        """The query (outer) loss of ``model`` (the predictor or an adapted clone) on ``batch`` (the inner
        loss too, unless the spec is ``INNER/QUERY``)."""
        return query_loss(model(batch), batch, self.query_kind)

    def adapt(self, support: ProbeBatch, steps: int | None = None) -> StoppingPredictor:
        """An adapted clone of the predictor after ``steps`` (default ``inner_steps``) inner steps on
        ``support`` (cast to the predictor's precision). The predictor itself is never modified."""
        self._check_can_adapt([support])
        support = support.as_dtype(self.predictor.dtype)  # itself for a float32 predictor
        steps = self.inner_steps if steps is None else steps
        if steps < 0:
            raise ValueError(f"steps must be >= 0; got {steps}")
        outer = torch.is_grad_enabled()
        first_order = self.first_order or not outer
        w = loss_weights(support, self.inner_kind)  # (N,) once, not per step
        with torch.enable_grad():
            if self.algorithm == "anil":
                emb = self.predictor.embed(support)  # (N, H) computed once: the body is not adapted
                if not outer:
                    emb = emb.detach()
                head = self._inner_loop(
                    lambda h: inner_loss(apply_linear(emb, h).squeeze(-1), support, weights=w), steps, first_order)
                # only the head is a clone: the body stays the predictor's own modules (never detach those)
                return self._with_head(head if outer else _detach_(head))
            x = self.predictor.inputs(support)  # (N, in) parameter-free: once, not per step
            adapted = self._inner_loop(
                lambda m: inner_loss(m.logits_from_inputs(x, support), support, weights=w), steps, first_order)
        return adapted if outer else _detach_(adapted)

    def _inner_loop(
        self, loss_of: Callable[[nn.Module], Tensor], steps: int, first_order: bool, episodes: int | None = None
    ) -> nn.Module:
        """``steps`` inner steps on ``loss_of(clone)`` of a clone of the adapted module (the predictor; its
        head for ANIL), on this adapter's backend; ``episodes``: the clone's parameters get a leading
        episode axis of that size first. Returns the adapted clone (connected to the originals)."""
        if self.backend == "torch_func":
            target = self.predictor.head if self.algorithm == "anil" else self.predictor
            lr = list(self.lrs) if self.algorithm == "metasgd" else self.inner_lr
            return func_backend.sgd_adapt(target, loss_of, steps, lr, first_order, episodes)
        if self.algorithm == "metasgd":
            learner = self._learner.clone()
        else:
            learner = self._learner.clone(first_order=first_order)
        if episodes is not None:
            _expand_(learner.module, episodes)
        for _ in range(steps):
            learner.adapt(loss_of(learner.module), first_order=first_order)
        return learner.module

    def fit_support(
        self, support: "Sequence[Trace] | ProbeBatch", steps: int | None = None, renormalise: bool = False
    ) -> StoppingPredictor:
        """The one road from labelled support traces to an adapted predictor: collate them (with the
        weighting the inner loss reads; a :class:`ProbeBatch` is taken as it is), with ``renormalise``
        first set the predictor's own normalisation from the support features (a predictor trained from
        scratch has no source statistics; this changes ``self.predictor``'s buffers), then :meth:`adapt`.
        Gradients as in :meth:`adapt`: call it under ``torch.no_grad()`` for a detached clone."""
        batch = support if isinstance(support, ProbeBatch) else collate_traces(support, weighting=self.weighting)
        if renormalise:
            self.renormalise(batch)
        return self.adapt(batch, steps=steps)

    def renormalise(self, batch: ProbeBatch) -> None:
        """Set the predictor's normalisation from ``batch``'s features (what ``fit_support(...,
        renormalise=True)`` does first; changes ``self.predictor``'s buffers)."""
        features = batch.features.to(self.predictor.dtype)  # (N, F) in the predictor's precision
        mean = features.mean(0)  # (F,)
        std = features.std(0, unbiased=False).clamp(min=1e-6)  # (F,)
        self.predictor.set_normalisation(mean, std)

    def episode_losses(self, episodes: Sequence[tuple[ProbeBatch, ProbeBatch]], steps: int | None = None) -> Tensor:
        """Query loss after adapting on the support set, for each ``(support, query)`` pair. (E,)

        The same computation as ``[self.loss(self.fit_support(s, steps), q) for s, q in episodes]`` (tested
        equal, values and meta-gradients), vectorised over the episodes of a meta-batch with
        :meth:`adapt_episodes`; ``kind="gru"`` has no batched form and loops over :meth:`fit_support`.
        """
        if self.predictor.kind == "gru":
            return torch.stack([self.loss(self.fit_support(s, steps), q) for s, q in episodes])
        adapted = self.adapt_episodes([s for s, _ in episodes], steps)
        queries = [q for _, q in episodes]
        xq, yq, wq = self._padded(queries, self.query_kind)  # (E, Nq, ...); wq: stop penalties for expected_cost
        if self.algorithm == "anil":
            logits = apply_linear(self.predictor.embed_inputs(xq), adapted).squeeze(-1)  # (E, Nq)
        else:
            logits = adapted.logits_from_inputs(xq)  # (E, Nq)
        if self.query_kind == "expected_cost":
            positions = pad_sequence([q.probe_index for q in queries], batch_first=True)  # (E, Nq)
            n_traces = torch.tensor([q.n_traces for q in queries], device=logits.device)  # (E,)
            return expected_cost(logits, positions, wq, n_traces)  # (E,)
        return (F.binary_cross_entropy_with_logits(logits, yq, reduction="none") * wq).sum(dim=1)  # (E,)

    def adapt_episodes(self, supports: Sequence[ProbeBatch], steps: int | None = None,
                       inputs: Sequence[Tensor] | None = None) -> nn.Module:
        """:meth:`adapt` on E support sets at once: one clone (the predictor; its head for ANIL) whose
        parameters carry a leading episode axis E, slice ``e`` being the adaptation on ``supports[e]``.
        Support sets are zero-padded to (E, N, in) with zero loss weight on padding, one learn2learn
        ``adapt`` per inner step for all episodes (the inner loss is the sum of per-episode losses, so
        each episode's slice gets its own gradient; the torch_func backend batches the same way). Not for
        ``kind="gru"``. ``inputs``: each support set's :meth:`StoppingPredictor.inputs` when computed
        elsewhere (under each episode's own normalisation, maml_stop.evaluate.batched)."""
        if self.predictor.kind == "gru":
            raise ValueError("kind='gru' has no episode-batched form: adapt each support set with fit_support")
        self._check_can_adapt(supports)
        steps = self.inner_steps if steps is None else steps
        outer = torch.is_grad_enabled()
        first_order = self.first_order or not outer
        xs, ys, ws = self._padded(supports, self.inner_kind, inputs)  # (E, Ns, in), (E, Ns), (E, Ns)
        with torch.enable_grad():
            if self.algorithm == "anil":
                emb = self.predictor.embed_inputs(xs)  # (E, Ns, H) shared body, computed once
                if not outer:
                    emb = emb.detach()
                logits_of = lambda head: apply_linear(emb, head).squeeze(-1)  # noqa: E731  (E, Ns)
            else:
                logits_of = lambda net: net.logits_from_inputs(xs)  # noqa: E731  (E, Ns)
            return self._inner_loop(
                lambda m: F.binary_cross_entropy_with_logits(logits_of(m), ys, weight=ws, reduction="sum"),
                steps, first_order, episodes=len(supports))

    def _padded(self, batches: Sequence[ProbeBatch], kind: str,
                inputs: Sequence[Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Inputs (``inputs`` when given), labels and the loss weights of ``kind`` (its stop penalties for
        ``expected_cost``) of several batches, zero-padded: (E, N, in), (E, N), (E, N), in the predictor's
        precision."""
        batches = [b.as_dtype(self.predictor.dtype) for b in batches]
        x = pad_sequence([self.predictor.inputs(b) for b in batches] if inputs is None else list(inputs), batch_first=True)
        y = pad_sequence([b.labels for b in batches], batch_first=True)
        per = stop_penalty if kind == "expected_cost" else (lambda b: loss_weights(b, kind))  # noqa: E731
        w = pad_sequence([per(b) for b in batches], batch_first=True)
        return x, y, w

    def _check_can_adapt(self, supports: Sequence[ProbeBatch]) -> None:
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                "adaptation needs gradients but inference mode is on; run evaluation under "
                "torch.no_grad() instead (Lightning: Trainer(inference_mode=False))"
            )
        if any(len(s) == 0 for s in supports):
            raise DataError("empty support set: the adapter needs at least one labelled probe point")

    def _with_head(self, head: nn.Module) -> StoppingPredictor:
        """A shallow copy of the predictor sharing its body, with ``head`` in place of its head."""
        p = self.predictor
        clone = p.__class__.__new__(p.__class__)
        clone.__dict__ = p.__dict__.copy()
        clone._modules = p._modules.copy()
        clone._modules["head"] = head
        return clone
