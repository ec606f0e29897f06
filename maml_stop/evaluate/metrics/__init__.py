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

from maml_stop.evaluate.metrics.calibration import BrierScore, ExpectedCalibrationError, brier_score, calibration_bins, expected_calibration_error
from maml_stop.evaluate.metrics.curve import CurveAUC, EMTokensCurve, SavingsAtEMDrop, curve_auc, curve_figures, em_tokens_curve, savings_at_em_drop
from maml_stop.evaluate.metrics.stopping import EMAtStop, TokensUsed, TokenSavings, em_at_stop, token_savings, tokens_used

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
    "curve_figures",
    "savings_at_em_drop",
    "brier_score",
    "expected_calibration_error",
    "calibration_bins",
]
