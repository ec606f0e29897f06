"""The EM-vs-tokens curve over a threshold sweep, its area, and savings at EM drop <= delta."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from maml_stop.data import accounting
from maml_stop.evaluate.metrics._common import _TOL, _as_float, _check_same_length



def _curve_update(em: Tensor, tokens: Tensor, full_em: Tensor, full_tokens: Tensor) -> tuple[Tensor, ...]:
    em, tokens = _as_float(em), _as_float(tokens)  # (B, T) each
    full_em, full_tokens = _as_float(full_em).reshape(-1), _as_float(full_tokens).reshape(-1)  # (B,)
    if em.ndim != 2 or em.shape != tokens.shape:
        raise ValueError(
            f"em and tokens must both be (traces, thresholds); got {tuple(em.shape)} and {tuple(tokens.shape)}"
        )
    _check_same_length(em=em, tokens=tokens, full_em=full_em, full_tokens=full_tokens)
    count = torch.tensor(em.shape[0], dtype=torch.float64)
    return em.sum(0), tokens.sum(0), full_em.sum(), full_tokens.sum(), count


def _curve_compute(
    em_sum: Tensor, tokens_sum: Tensor, full_em_sum: Tensor, full_sum: Tensor, count: Tensor
) -> dict[str, Tensor]:
    """EM (T,), savings (T,), relative cost (T,) per threshold, and EM of full generation ()."""
    em = em_sum / count
    cost = tokens_sum / full_sum
    return {"em": em, "savings": accounting.savings(tokens_sum, full_sum), "cost": cost, "full_em": full_em_sum / count}


def _auc_from_curve(cost: Tensor, em: Tensor) -> Tensor:
    """Area over relative cost in [0, 1] under the attainable envelope: at budget x, the best EM of any
    threshold costing <= x (0 before the cheapest point). In [0, 1]; higher is better."""
    order = torch.argsort(cost)
    x, y = cost[order].clamp(0.0, 1.0), torch.cummax(em[order], dim=0).values
    right = torch.cat([x[1:], x.new_ones(1)])
    return (y * (right - x)).sum()


def _savings_at_drop(savings: Tensor, em: Tensor, full_em: Tensor, delta: float) -> Tensor:
    """Largest savings whose EM drop is <= delta; full generation itself (savings 0, drop 0) counts."""
    ok = (full_em - em) <= delta + _TOL
    best = savings[ok].max() if bool(ok.any()) else savings.new_tensor(0.0)
    return torch.clamp(best, min=0.0)


def _check_delta(delta: float) -> float:
    if not 0.0 <= float(delta) < 1.0:
        raise ValueError(f"delta is an EM drop as a fraction in [0, 1) (0.01 = 1 point); got {delta}")
    return float(delta)


class _CurveStates(Metric):
    """Per-threshold sums of EM and tokens over traces; subclasses reduce them differently."""

    is_differentiable = False
    full_state_update = False

    def __init__(self, n_thresholds: int) -> None:
        super().__init__()
        if n_thresholds < 1:
            raise ValueError(f"n_thresholds must be >= 1; got {n_thresholds}")
        self.n_thresholds = n_thresholds
        zeros = torch.zeros(n_thresholds, dtype=torch.float64)
        self.add_state("em_sum", default=zeros.clone(), dist_reduce_fx="sum")
        self.add_state("tokens_sum", default=zeros.clone(), dist_reduce_fx="sum")
        self.add_state("full_em_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("full_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, em: Tensor, tokens: Tensor, full_em: Tensor, full_tokens: Tensor) -> None:
        if em.shape[-1] != self.n_thresholds:
            raise ValueError(f"expected {self.n_thresholds} threshold columns; got em of shape {tuple(em.shape)}")
        em_sum, tokens_sum, full_em_sum, full_sum, count = _curve_update(em, tokens, full_em, full_tokens)
        self.em_sum += em_sum
        self.tokens_sum += tokens_sum
        self.full_em_sum += full_em_sum
        self.full_sum += full_sum
        self.count += count

    def _curve(self) -> dict[str, Tensor]:
        return _curve_compute(self.em_sum, self.tokens_sum, self.full_em_sum, self.full_sum, self.count)


class EMTokensCurve(_CurveStates):
    """The EM-vs-tokens curve of a threshold sweep: ``compute()`` returns a dict of (T,) tensors
    ``em``, ``savings``, ``cost`` (tokens / full-generation tokens) and the scalar ``full_em``
    (torchmetrics squeezes one-element results: use ``torch.atleast_1d`` when T may be 1)."""

    higher_is_better = None

    def compute(self) -> dict[str, Tensor]:
        return self._curve()


class CurveAUC(_CurveStates):
    """Area under the attainable EM-vs-relative-cost envelope over cost in [0, 1] (see _auc_from_curve)."""

    higher_is_better = True

    def compute(self) -> Tensor:
        curve = self._curve()
        return _auc_from_curve(curve["cost"], curve["em"])


class SavingsAtEMDrop(_CurveStates):
    """Largest token savings among the swept thresholds whose EM drop against full generation is at
    most ``delta`` (0.01 = 1 point). Best threshold in hindsight: the curve-based headline figure."""

    higher_is_better = True

    def __init__(self, n_thresholds: int, delta: float = 0.01) -> None:
        super().__init__(n_thresholds)
        self.delta = _check_delta(delta)

    def compute(self) -> Tensor:
        curve = self._curve()
        return _savings_at_drop(curve["savings"], curve["em"], curve["full_em"], self.delta)


def em_tokens_curve(em: Tensor, tokens: Tensor, full_em: Tensor, full_tokens: Tensor) -> dict[str, Tensor]:
    """Functional :class:`EMTokensCurve`."""
    return _curve_compute(*_curve_update(em, tokens, full_em, full_tokens))


def curve_auc(em: Tensor, tokens: Tensor, full_em: Tensor, full_tokens: Tensor) -> Tensor:
    """Functional :class:`CurveAUC`."""
    curve = em_tokens_curve(em, tokens, full_em, full_tokens)
    return _auc_from_curve(curve["cost"], curve["em"])


def savings_at_em_drop(
    em: Tensor, tokens: Tensor, full_em: Tensor, full_tokens: Tensor, delta: float = 0.01
) -> Tensor:
    """Functional :class:`SavingsAtEMDrop`."""
    curve = em_tokens_curve(em, tokens, full_em, full_tokens)
    return _savings_at_drop(curve["savings"], curve["em"], curve["full_em"], _check_delta(delta))


def curve_figures(
    em: Tensor, tokens: Tensor, full_em: Tensor, full_tokens: Tensor, delta: float = 0.01
) -> tuple[Tensor, Tensor]:
    """(:func:`savings_at_em_drop`, :func:`curve_auc`) of one sweep, from one curve."""
    curve = em_tokens_curve(em, tokens, full_em, full_tokens)
    return _savings_at_drop(curve["savings"], curve["em"], curve["full_em"], _check_delta(delta)), _auc_from_curve(curve["cost"], curve["em"])
