"""Input checks shared by the metric modules."""

from __future__ import annotations

import torch
from torch import Tensor

_TOL = 1e-9  # EM drops equal to delta up to float error count as within delta


def _as_float(x: Tensor | list | float) -> Tensor:
    return torch.as_tensor(x, dtype=torch.float64)


def _check_same_length(**tensors: Tensor) -> None:
    lengths = {name: int(t.shape[0]) for name, t in tensors.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"inputs must have the same number of traces (first dimension); got {lengths}")
