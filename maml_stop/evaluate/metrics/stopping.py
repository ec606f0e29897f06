"""EM at the stopping point, tokens used, token savings (torchmetrics template; see the package doc)."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from maml_stop.data import accounting
from maml_stop.evaluate.metrics._common import _as_float, _check_same_length



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


