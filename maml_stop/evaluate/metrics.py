"""EM/token metrics of a stopping policy, and calibration of a stopping predictor (torchmetrics).

Every metric follows the torchmetrics template: class flags, states added with ``dist_reduce_fx``,
``update`` returns nothing, ``compute`` is pure, and the math lives in private ``_update``/``_compute``
functions shared with the functional API at the bottom of each section.

Inputs are per-trace tensors (the accounting and the savings formula are :mod:`maml_stop.data.accounting`):

* ``em``: (B,) EM of the answer the policy returns (1.0 correct);
* ``tokens``: (B,) tokens the policy spent (total with probes, or reasoning only);
* ``full_em``, ``full_tokens``: (B,) EM and cost of plain full generation of the same traces.

Curve metrics take one column per threshold of a sweep: ``em`` and ``tokens`` are (B, T).
EM and EM drops are fractions (0.01 = 1 point); savings are fractions of the full-generation tokens.

>>> import torch
>>> m = SavingsAtEMDrop(n_thresholds=2, delta=0.01)
>>> m.update(torch.tensor([[1.0, 1.0], [1.0, 0.0]]), torch.tensor([[80.0, 40.0], [90.0, 30.0]]),
...          torch.tensor([1.0, 1.0]), torch.tensor([100.0, 100.0]))
>>> round(float(m.compute()), 3)   # only the first threshold keeps EM: 1 - 170/200
0.15
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from maml_stop.data import accounting

__all__ = [
    "EMAtStop",
    "TokensUsed",
    "TokenSavings",
    "EMTokensCurve",
    "CurveAUC",
    "SavingsAtEMDrop",
    "BrierScore",
    "ExpectedCalibrationError",
    "em_at_stop",
    "tokens_used",
    "token_savings",
    "em_tokens_curve",
    "curve_auc",
    "savings_at_em_drop",
    "brier_score",
    "expected_calibration_error",
    "calibration_bins",
]

_TOL = 1e-9  # EM drops equal to delta up to float error count as within delta


def _as_float(x: Tensor | list | float) -> Tensor:
    return torch.as_tensor(x, dtype=torch.float64)


def _check_same_length(**tensors: Tensor) -> None:
    lengths = {name: int(t.shape[0]) for name, t in tensors.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"inputs must have the same number of traces (first dimension); got {lengths}")


# ---------------------------------------------------------------------------------------------------
# EM at the stopping point, tokens used, token savings


def _mean_update(values: Tensor) -> tuple[Tensor, Tensor]:
    values = _as_float(values).reshape(-1)
    return values.sum(), torch.tensor(values.numel(), dtype=torch.float64)


def _mean_compute(total: Tensor, count: Tensor) -> Tensor:
    return total / count if count > 0 else torch.tensor(float("nan"), dtype=torch.float64)


def _savings_update(tokens: Tensor, full_tokens: Tensor) -> tuple[Tensor, Tensor]:
    tokens, full_tokens = _as_float(tokens).reshape(-1), _as_float(full_tokens).reshape(-1)
    _check_same_length(tokens=tokens, full_tokens=full_tokens)
    return tokens.sum(), full_tokens.sum()


def _savings_compute(tokens_sum: Tensor, full_sum: Tensor) -> Tensor:
    """1 - spent / full: the fraction of full-generation tokens saved (negative when probes cost more);
    NaN when there is nothing to save (:func:`maml_stop.data.accounting.savings`, the one formula)."""
    return accounting.savings(tokens_sum, full_sum)


class _MeanMetric(Metric):
    """Mean of a per-trace value over every update (shared by :class:`EMAtStop` and :class:`TokensUsed`)."""

    is_differentiable = False
    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, values: Tensor) -> None:
        total, count = _mean_update(values)
        self.total += total
        self.count += count

    def compute(self) -> Tensor:
        return _mean_compute(self.total, self.count)


class EMAtStop(_MeanMetric):
    """Exact match of the answer returned at the stopping point (mean over traces); ``update(em)``."""

    higher_is_better = True


class TokensUsed(_MeanMetric):
    """Mean tokens per trace (feed total tokens, probes included, or reasoning tokens alone); ``update(tokens)``."""

    higher_is_better = False


class TokenSavings(Metric):
    """Fraction of full-generation tokens saved: 1 - sum(tokens) / sum(full_tokens)."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("tokens_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("full_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, tokens: Tensor, full_tokens: Tensor) -> None:
        tokens_sum, full_sum = _savings_update(tokens, full_tokens)
        self.tokens_sum += tokens_sum
        self.full_sum += full_sum

    def compute(self) -> Tensor:
        return _savings_compute(self.tokens_sum, self.full_sum)


def em_at_stop(em: Tensor) -> Tensor:
    """Functional :class:`EMAtStop`."""
    return _mean_compute(*_mean_update(em))


def tokens_used(tokens: Tensor) -> Tensor:
    """Functional :class:`TokensUsed`."""
    return _mean_compute(*_mean_update(tokens))


def token_savings(tokens: Tensor, full_tokens: Tensor) -> Tensor:
    """Functional :class:`TokenSavings`."""
    return _savings_compute(*_savings_update(tokens, full_tokens))


# ---------------------------------------------------------------------------------------------------
# The EM-vs-tokens curve over a threshold sweep, its area, and savings at EM drop <= delta


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


# ---------------------------------------------------------------------------------------------------
# Calibration of the stopping predictor: Brier score, expected calibration error


def _check_probs(probs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    probs, labels = _as_float(probs).reshape(-1), _as_float(labels).reshape(-1)
    _check_same_length(probs=probs, labels=labels)
    if probs.numel() and (probs.min() < 0 or probs.max() > 1):
        raise ValueError("probs must be probabilities in [0, 1] (apply a sigmoid to logits first)")
    return probs, labels


def _brier_update(probs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    probs, labels = _check_probs(probs, labels)
    return ((probs - labels) ** 2).sum(), torch.tensor(probs.numel(), dtype=torch.float64)


def _bins_update(probs: Tensor, labels: Tensor, n_bins: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per equal-width bin of [0, 1]: count (n_bins,), sum of probs (n_bins,), sum of labels (n_bins,)."""
    probs, labels = _check_probs(probs, labels)
    index = torch.clamp((probs * n_bins).long(), max=n_bins - 1)  # (N,) bin of each probability
    count = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, index, torch.ones_like(probs))
    prob_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, index, probs)
    label_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, index, labels)
    return count, prob_sum, label_sum


def _ece_compute(count: Tensor, prob_sum: Tensor, label_sum: Tensor) -> Tensor:
    total = count.sum()
    if total == 0:
        return torch.tensor(float("nan"), dtype=torch.float64)
    safe = count.clamp(min=1.0)
    gap = (label_sum / safe - prob_sum / safe).abs()
    return (count / total * gap).sum()


class BrierScore(Metric):
    """Mean squared error of the predicted stopping probability against the probe label."""

    is_differentiable = True
    higher_is_better = False
    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, probs: Tensor, labels: Tensor) -> None:
        total, count = _brier_update(probs, labels)
        self.total += total
        self.count += count

    def compute(self) -> Tensor:
        return _mean_compute(self.total, self.count)


class ExpectedCalibrationError(Metric):
    """Expected calibration error over ``n_bins`` equal-width probability bins:
    sum_b (n_b / N) |mean label_b - mean prob_b|."""

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, n_bins: int = 10) -> None:
        super().__init__()
        if n_bins < 1:
            raise ValueError(f"n_bins must be >= 1; got {n_bins}")
        self.n_bins = n_bins
        zeros = torch.zeros(n_bins, dtype=torch.float64)
        self.add_state("count", default=zeros.clone(), dist_reduce_fx="sum")
        self.add_state("prob_sum", default=zeros.clone(), dist_reduce_fx="sum")
        self.add_state("label_sum", default=zeros.clone(), dist_reduce_fx="sum")

    def update(self, probs: Tensor, labels: Tensor) -> None:
        count, prob_sum, label_sum = _bins_update(probs, labels, self.n_bins)
        self.count += count
        self.prob_sum += prob_sum
        self.label_sum += label_sum

    def compute(self) -> Tensor:
        return _ece_compute(self.count, self.prob_sum, self.label_sum)


def brier_score(probs: Tensor, labels: Tensor) -> Tensor:
    """Functional :class:`BrierScore`."""
    return _mean_compute(*_brier_update(probs, labels))


def expected_calibration_error(probs: Tensor, labels: Tensor, n_bins: int = 10) -> Tensor:
    """Functional :class:`ExpectedCalibrationError`."""
    return _ece_compute(*_bins_update(probs, labels, n_bins))


def calibration_bins(probs: Tensor, labels: Tensor, n_bins: int = 10) -> dict[str, Tensor]:
    """Reliability-diagram data per bin: ``count``, mean predicted ``confidence`` and observed
    ``frequency`` (NaN for empty bins), and the bin ``edges`` (n_bins + 1,)."""
    count, prob_sum, label_sum = _bins_update(probs, labels, n_bins)
    empty = count == 0
    safe = count.clamp(min=1.0)
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    return {
        "count": count,
        "confidence": torch.where(empty, nan, prob_sum / safe),
        "frequency": torch.where(empty, nan, label_sum / safe),
        "edges": torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64),
    }
