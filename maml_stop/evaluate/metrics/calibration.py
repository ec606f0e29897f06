"""Calibration of the stopping predictor: Brier score, expected calibration error."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from maml_stop.evaluate.metrics._common import _as_float, _check_same_length
from maml_stop.evaluate.metrics.stopping import _mean_compute



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
