"""The live stopping rule, shared by :class:`~maml_stop.live.stopping.LiveStopping` and by
:func:`replay` over a stored trace (modes ``every``, ``free``, ``gated``; see the semantics in
:mod:`maml_stop.live.stopping`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from torch import nn

from maml_stop.data.batches import ProbeBatch
from maml_stop.decide.rule import reached
from maml_stop.probe.features import answer_key, answer_stability, feature_cost

__all__ = ["StopRule", "replay", "Replay", "MODES"]


MODES = ("every", "free", "gated")
STABILITY = ("answer_empty", "same_as_prev", "run_length", "n_distinct")  # the keys of answer_stability


def _check_probability(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0 and value != float("inf"):
        raise ValueError(f"{name} must lie in [0, 1] (or inf: never), got {value}")


def _columns(all_names: Sequence[str], names: Sequence[str], who: str) -> np.ndarray:
    unknown = [n for n in names if n not in all_names]
    if unknown or not names:
        raise ValueError(f"the {who}'s features differ from the featurizer's: {unknown or 'none given'} are not among "
                         f"its {len(all_names)} features ({list(all_names)[:3]}...)")
    index = {n: i for i, n in enumerate(all_names)}
    return np.asarray([index[n] for n in names])


def _probability(predictor: nn.Module, feats: np.ndarray) -> float:
    """P(correct) of the latest of a row's probes. feats: (P, F) the row's probes so far, in order."""
    x = torch.from_numpy(np.ascontiguousarray(feats, dtype=np.float32))
    p = x.shape[0]
    batch = ProbeBatch(features=x, labels=torch.zeros(p), trace_index=torch.zeros(p, dtype=torch.long),
                       probe_index=torch.arange(p), weights=torch.ones(p))
    with torch.no_grad():
        return float(torch.sigmoid(predictor(batch)[-1]))


@dataclass
class _Row:
    """What :class:`StopRule` keeps per row: feature vectors so far and the probabilities it computed."""

    every: list[np.ndarray] = field(default_factory=list)  # every probe point (paid features NaN where unforced)
    forced: list[np.ndarray] = field(default_factory=list)  # forced probe points only (full vectors)
    stop_p: list[float | None] = field(default_factory=list)  # per probe point: stop predictor's P (None: not asked)
    gate_p: list[float | None] = field(default_factory=list)  # per probe point: gate's P (gated mode only)
    tau: float | None = None  # this row's stop threshold (None: the rule's; serve mixes policies in a batch)


class StopRule:
    """The decision of a row at its probe points in one of :data:`MODES` (module docstring), used by
    :class:`LiveStopping` and by :func:`replay` alike.

    ``feature_names``: the featurizer's (trace's) names; ``predictor_features`` / ``gate_features``:
    the names each predictor reads, in its input order (default: all of them). Per probe point call
    :meth:`before_answer` with the vector whose paid features may be NaN, then, where an answer was
    forced, :meth:`after_answer` with the full vector."""

    def __init__(self, feature_names: Sequence[str], predictor: nn.Module, tau: float, mode: str = "every",
                 predictor_features: Sequence[str] | None = None, gate: nn.Module | None = None,
                 gate_threshold: float = 0.5, gate_features: Sequence[str] | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown live mode {mode!r}; valid: {', '.join(MODES)}")
        _check_probability("tau", tau)
        names = list(feature_names)
        self.mode, self.tau, self.gate_threshold = mode, tau, gate_threshold
        self.predictor = predictor.eval()
        self.predictor_features = list(predictor_features) if predictor_features is not None else names
        self.columns = _columns(names, self.predictor_features, "predictor")
        self.gate = None
        if mode == "free":
            self._check_free(self.predictor_features, "predictor")
        if mode == "gated":
            if gate is None:
                raise ValueError("mode='gated' needs a gate predictor (gate=...) on free features")
            _check_probability("gate_threshold", gate_threshold)
            self.gate = gate.eval()
            self.gate_features = list(gate_features) if gate_features is not None else \
                [n for n in names if feature_cost(n) == "free"]
            self._check_free(self.gate_features, "gate")
            self.gate_columns = _columns(names, self.gate_features, "gate")
        elif gate is not None:
            raise ValueError(f"a gate predictor is used in mode='gated' only, not in mode={mode!r}")

    def _check_free(self, names: list[str], who: str) -> None:
        paid = [n for n in names if feature_cost(n) == "paid"]
        if paid:
            raise ValueError(f"mode={self.mode!r}: the {who} must read free features only "
                             f"(maml_stop.probe.features.feature_cost), but it reads the paid features {paid}")

    def new_row(self, tau: float | None = None) -> _Row:
        """A row's state; ``tau`` overrides the rule's for this row (inf: never stop)."""
        if tau is not None:
            _check_probability("tau", tau)
        return _Row(tau=tau)

    def _tau(self, row: _Row) -> float:
        return self.tau if row.tau is None else row.tau

    def before_answer(self, row: _Row, vec: np.ndarray) -> tuple[bool, bool]:
        """A new probe point whose free features are ``vec``'s: (force its answer?, stop here?)."""
        row.every.append(vec)
        row.stop_p.append(None)
        row.gate_p.append(None)
        if self.mode == "every":
            return True, False
        if self.mode == "free":
            p = row.stop_p[-1] = _probability(self.predictor, np.stack(row.every)[:, self.columns])
            stop = reached(p, self._tau(row))
            return stop, stop
        g = row.gate_p[-1] = _probability(self.gate, np.stack(row.every)[:, self.gate_columns])
        return reached(g, self.gate_threshold), False

    def after_answer(self, row: _Row, vec: np.ndarray) -> bool:
        """The latest probe point's answer was forced; ``vec`` is its full vector: stop here?"""
        row.every[-1] = vec
        row.forced.append(vec)
        if self.mode == "free":  # decided on the free features before the answer
            return False
        seq = row.every if self.mode == "every" else row.forced
        p = row.stop_p[-1] = _probability(self.predictor, np.stack(seq)[:, self.columns])
        return reached(p, self._tau(row))


@dataclass
class Replay:
    """What :func:`replay` finds for one trace."""

    stop: int | None  # index of the probe where the rule stops (None: the trace runs to its end)
    forced: list[int]  # probes whose answer the rule forced (paid), up to the stop
    stop_probabilities: list[float | None]  # per probe up to the stop: the stop predictor's P (None: not asked)
    gate_probabilities: list[float | None]  # per probe up to the stop: the gate's P (gated mode only)


def replay(trace_features: np.ndarray, feature_names: Sequence[str], probe_answers: Sequence[str | None],
           predictor: nn.Module, tau: float, mode: str = "every", *,
           predictor_features: Sequence[str] | None = None, gate: nn.Module | None = None,
           gate_threshold: float = 0.5, gate_features: Sequence[str] | None = None) -> Replay:
    """The live decision rule of ``mode`` replayed over a harvested trace (its probes' stored features
    ``(P, F)`` with names ``feature_names``, and their extracted answers): where :class:`LiveStopping`
    with the same predictors, schedule, featurizer and answer extraction stops on that prompt.

    The harvester forces every probe; the replay reads a probe's paid features only where the rule
    forces its answer, with the stability features recomputed over the forced answers (module
    docstring). A trace that hit the token cap also pays its cap probe's answer (its output) when the
    rule did not force it. Tested against live runs in ``tests/test_live_engine.py``."""
    rule = StopRule(feature_names, predictor, tau, mode, predictor_features, gate, gate_threshold, gate_features)
    names = list(feature_names)
    feats = np.asarray(trace_features, dtype=np.float32)
    if feats.ndim != 2 or feats.shape[1] != len(names) or feats.shape[0] != len(probe_answers):
        raise ValueError(f"trace_features must be (P, {len(names)}) with one answer per probe; got "
                         f"{feats.shape} and {len(probe_answers)} answers")
    paid = [i for i, n in enumerate(names) if feature_cost(n) == "paid"]
    stab = [names.index(k) for k in STABILITY]
    row, keys, forced = rule.new_row(), [], []
    for i, stored in enumerate(feats):
        vec = stored.copy()
        vec[paid] = np.nan
        force, stop = rule.before_answer(row, vec)
        if force:
            key = answer_key(probe_answers[i])
            full = stored.copy()
            full[stab] = [answer_stability(keys, key)[k] for k in STABILITY]
            keys.append(key)
            forced.append(i)
            stop = rule.after_answer(row, full) or stop
        if stop:
            return Replay(i, forced, row.stop_p, row.gate_p)
    return Replay(None, forced, row.stop_p, row.gate_p)


# -- the criterion ----------------------------------------------------------------------------------
