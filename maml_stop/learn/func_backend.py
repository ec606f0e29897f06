"""The torch.func adaptation backend: the inner loop of MAML / ANIL / Meta-SGD with torch alone.

``InnerLoopAdapter(..., backend="torch_func")`` (YAML ``model.adapter.backend: torch_func``) runs its inner loop
here instead of through learn2learn, for machines where learn2learn 0.2.0 cannot be built. The update is
learn2learn's, written as a pure function of the fast weights:

    fast_0 = the module's parameters                      (with a leading episode axis E when batched)
    g_k    = d loss_of(module with fast_k) / d fast_k     (create_graph unless first-order)
    fast_{k+1} = fast_k - lr * g_k                        (Meta-SGD: lr is the learned rate tensor)

The forward runs through :func:`torch.func.functional_call` (no module is rebuilt per step); the gradient is
``torch.autograd.grad`` with ``create_graph=not first_order``, exactly as learn2learn's ``MAML.adapt``
takes it, so adapted weights and meta-gradients equal learn2learn's (``tests/test_func_backend.py``).
First-order: ``g_k`` is detached, the query gradient reaches the initialisation through the identity
(FOMAML), and Meta-SGD's rates still get ``-g_k`` times it, as in learn2learn. Episodes are batched the
way the learn2learn path batches them (parameters expanded to (E, ...), :func:`apply_linear` in the
predictor), which needs no ``vmap``.

The result is a shallow copy of the module whose parameters are the adapted tensors
(:func:`with_parameters`): a :class:`~maml_stop.learn.predictor.StoppingPredictor` (or its head) like the
clone learn2learn returns, so callers cannot tell the backends apart.

>>> import torch
>>> from maml_stop.learn.predictor import StoppingPredictor
>>> from maml_stop.data.batches import ProbeBatch
>>> net = StoppingPredictor(4, hidden=8, depth=1)
>>> b = ProbeBatch(torch.randn(6, 4), torch.tensor([0., 1, 1, 0, 1, 0]), torch.zeros(6, dtype=torch.long),
...                torch.arange(6), torch.ones(6))
>>> loss_of = lambda m: torch.nn.functional.binary_cross_entropy_with_logits(m(b), b.labels)
>>> adapted = sgd_adapt(net, loss_of, steps=3, lr=0.1)
>>> bool(loss_of(adapted) < loss_of(net))
True
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

__all__ = ["sgd_adapt", "with_parameters", "metasgd_rates"]


class _Bound(nn.Module):
    """``forward()`` = ``fn(module)``: lets :func:`functional_call` (which only calls ``forward``) run any
    function of the module with swapped-in parameters (keys prefixed ``module.``)."""

    def __init__(self, module: nn.Module, fn: Callable[[nn.Module], Tensor]) -> None:
        super().__init__()
        self.module = module
        self.fn = fn

    def forward(self) -> Tensor:
        return self.fn(self.module)


def metasgd_rates(module: nn.Module, lr: float) -> nn.ParameterList:
    """Meta-SGD's learned rates, one tensor per parameter of ``module`` (in ``parameters()`` order), all
    ``lr``: what ``learn2learn.MetaSGD(module, lr)`` builds, so checkpoint keys ``lrs.0``, ... match."""
    return nn.ParameterList([nn.Parameter(torch.ones_like(p) * lr) for p in module.parameters()])


def sgd_adapt(
    module: nn.Module,
    loss_of: Callable[[nn.Module], Tensor],
    steps: int,
    lr: float | Sequence[Tensor],
    first_order: bool = False,
    episodes: int | None = None,
) -> nn.Module:
    """``steps`` gradient steps on ``loss_of(module with the fast weights)``, from ``module``'s parameters;
    returns a shallow copy of ``module`` holding the adapted weights (still connected to ``module``'s
    parameters and to ``lr``'s tensors; ``module`` itself is untouched).

    ``lr``: one step size, or one rate tensor per parameter (Meta-SGD, broadcast against it).
    ``episodes``: give every fast weight a leading axis of that size first (episode-batched adaptation;
    ``loss_of`` then sums the per-episode losses, so each slice gets its own gradient).
    """
    named = list(module.named_parameters())
    names, fast = [n for n, _ in named], [p for _, p in named]
    if episodes is not None:
        fast = [p.unsqueeze(0).expand(episodes, *p.shape) for p in fast]  # (E, *shape) views
    rates = [lr] * len(fast) if isinstance(lr, (int, float)) else list(lr)
    if len(rates) != len(fast):
        raise ValueError(f"{len(rates)} learning rates for {len(fast)} parameters")
    bound = _Bound(module, loss_of)
    for _ in range(steps):
        loss = functional_call(bound, {f"module.{n}": p for n, p in zip(names, fast)}, ())
        grads = torch.autograd.grad(loss, fast, create_graph=not first_order)
        fast = [p - r * g for p, r, g in zip(fast, rates, grads)]
    return with_parameters(module, dict(zip(names, fast)))


def with_parameters(module: nn.Module, params: Mapping[str, Tensor]) -> nn.Module:
    """A shallow copy of ``module`` and its submodules in which the parameter named ``name`` (as in
    ``module.named_parameters()``) is the tensor ``params[name]``; other parameters and all buffers are
    shared with ``module``. A parameter used under two names is replaced wherever it occurs."""
    by_id = {id(p): params[n] for n, p in module.named_parameters() if n in params}
    return _rebuild(module, by_id)


def _rebuild(module: nn.Module, by_id: dict[int, Tensor]) -> nn.Module:
    clone = module.__class__.__new__(module.__class__)
    clone.__dict__ = module.__dict__.copy()
    clone._parameters = {k: (by_id.get(id(p), p) if p is not None else None) for k, p in module._parameters.items()}
    clone._buffers = module._buffers.copy()
    clone._modules = {k: (_rebuild(m, by_id) if m is not None else None) for k, m in module._modules.items()}
    return clone
