"""What a learned part of a cost-aware policy reads of a trace: a :class:`FeatureView` (columns selected
by name, labels of a target), and :func:`subtrace`, a trace with only some of its probe points (the others
hidden as if never probed, the answer-stability features recomputed over the kept answers).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

from maml_stop.data.corpus import Trace
from maml_stop.probe.features import answer_key, answer_stability, feature_cost

__all__ = ["FeatureView", "feature_columns", "free_features", "subtrace", "STABILITY", "TARGETS"]

STABILITY = ("answer_empty", "same_as_prev", "run_length", "n_distinct")  # keys of answer_stability
TARGETS = ("probe", "final")  # what a view's labels say: this probe's answer is right / the full run is


def feature_columns(feature_names: Sequence[str], names: Sequence[str]) -> np.ndarray:
    """Column indices of ``names`` in ``feature_names`` (in the order of ``names``).

    >>> feature_columns(["h0", "h1", "logprob_mean"], ["logprob_mean", "h0"]).tolist()
    [2, 0]
    """
    index = {n: i for i, n in enumerate(feature_names)}
    unknown = [n for n in names if n not in index]
    if unknown or not len(names):
        raise ValueError(f"features {unknown or 'none given'} are not among the traces' {len(index)} features "
                         f"({list(feature_names)[:4]}...)")
    return np.asarray([index[n] for n in names], dtype=np.int64)


def free_features(feature_names: Sequence[str]) -> list[str]:
    """The names of ``feature_names`` that need no forced answer (:func:`~maml_stop.probe.features.feature_cost`)."""
    return [n for n in feature_names if feature_cost(n) == "free"]


@dataclass(frozen=True)
class FeatureView:
    """What a predictor reads of a trace: the columns ``columns`` of its features and the labels of
    ``target``. ``fill=None`` selects the columns (a predictor as wide as the view); otherwise the
    predictor reads every column and the unread ones are set to ``fill`` (``(F,)``: e.g. the
    meta-trained predictor's source means, which normalise to 0, so it sees nothing of them)."""

    columns: np.ndarray  # (C,) int64 columns read
    fill: np.ndarray | None = None  # (F,) values of the unread columns; None: select the columns
    target: str = "probe"  # one of TARGETS

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"unknown view target {self.target!r}; valid: {', '.join(TARGETS)}")

    @classmethod
    def of(cls, feature_names: Sequence[str], names: Sequence[str] | None = None, width: int | None = None,
           fill: np.ndarray | None = None, target: str = "probe") -> "FeatureView":
        """The view reading ``names`` (default: all) of traces with ``feature_names``, for a predictor of
        ``width`` inputs: the selected columns when ``width`` is their number (or None), the full vector
        with the others at ``fill`` when ``width`` is every feature."""
        names = list(feature_names) if names is None else list(names)
        columns = feature_columns(feature_names, names)
        if width is None or width == len(names):
            return cls(columns, None, target)
        if width != len(feature_names) or fill is None:
            raise ValueError(f"a predictor of {width} inputs cannot read {len(names)} of {len(feature_names)} "
                             "features: give a predictor of either width (and fill values for the full one)")
        return cls(columns, np.asarray(fill, dtype=np.float32), target)

    def __call__(self, trace: Trace) -> Trace:
        if self.fill is None:
            feats = trace.features[:, self.columns]
        else:
            feats = np.broadcast_to(self.fill, trace.features.shape).copy()  # (P, F)
            feats[:, self.columns] = trace.features[:, self.columns]
        labels = trace.labels if self.target == "probe" else np.full(trace.n_probes, float(trace.final_em), np.float32)
        return replace(trace, features=np.ascontiguousarray(feats, dtype=np.float32), labels=labels)


def subtrace(trace: Trace, keep: Sequence[int], feature_names: Sequence[str]) -> Trace:
    """``trace`` with only the probe points ``keep`` (increasing): the others hidden, as if never probed.
    The answer-stability features are recomputed over the kept answers
    (:func:`~maml_stop.probe.features.answer_stability`, as the live rule does over forced answers), so
    the accounting of the sub-trace (``stop_cost(sub, j)``) is the trace's with ``ran = keep[:j + 1]``."""
    keep = np.asarray(keep, dtype=np.int64)
    feats = trace.features[keep].copy()  # (len(keep), F)
    cols = {n: i for i, n in enumerate(feature_names) if n in STABILITY}
    keys: list[str] = []
    for row, i in enumerate(keep):
        key = answer_key(trace.probe_answers[i])
        stab = answer_stability(keys, key)
        keys.append(key)
        for name, col in cols.items():
            feats[row, col] = stab[name]
    cap = getattr(trace, "cap_probe", None)  # the capped run's forced answer, when kept: its index in the sub-trace
    cap = int(np.flatnonzero(keep == cap)[0]) if cap is not None and cap in keep else None
    return replace(trace, features=feats, labels=trace.labels[keep], positions=trace.positions[keep],
                   probe_tokens=trace.probe_tokens[keep], probe_answers=[trace.probe_answers[i] for i in keep],
                   logprob_mean=trace.logprob_mean[keep], cap_probe=cap)
