"""Feedback labels of a request that ran to its end: what the online stopper learns from.

* ``gold``: the question's gold answer is known afterwards; probe ``i`` is labelled by its EM (the
  stored ``probe_em``, ``Trace.labels``) and the final answer by ``final_em``: the trace as it is.
* ``agreement`` (label-free, no gold): on a sampled fraction of requests the system runs to the end
  anyway; probe ``i`` is labelled 1 when its answer agrees with the run's final answer (compared by
  :func:`maml_stop.probe.features.answer_key`, the family-free key live stopping uses: the stream does not
  announce its family). The final answer stands in for gold, so the relabelled trace's ``final_em`` is 1
  when the run states an answer (it agrees with itself) and 0 when it states none (no probe can agree
  with nothing: every label is 0, and stopping is never counted as a loss there).

With agreement labels, "EM drop" becomes the share of requests whose early answer differs from the final
one. That bounds the true EM drop from above: stopping loses a point only where the final answer is right
and the early answer differs from it.

>>> from types import SimpleNamespace as T
>>> import numpy as np
>>> t = T(probe_answers=["3", " 7", "7", ""], labels=np.array([0., 0, 0, 0]))
>>> agreement_labels(t, "7").tolist()
[0.0, 1.0, 1.0, 0.0]
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from maml_stop.data.corpus import Trace
from maml_stop.probe.features import answer_key

__all__ = ["FEEDBACK", "agreement_labels", "probe_labels", "feedback_trace"]

FEEDBACK = ("gold", "agreement")


def _check_mode(mode: str) -> None:
    if mode not in FEEDBACK:
        raise ValueError(f"unknown feedback mode {mode!r}; valid: {', '.join(FEEDBACK)}")


def agreement_labels(trace, final_answer: str | None, key: Callable[[str | None], str] = answer_key) -> np.ndarray:
    """(P,) float32: 1 where probe ``i``'s answer agrees with ``final_answer`` (by ``key``); all 0 when
    the final answer is empty."""
    final = key(final_answer)
    return np.asarray([float(bool(final) and key(a) == final) for a in trace.probe_answers], dtype=np.float32)


def probe_labels(trace: Trace, mode: str, final_answer: str | None = None,
                 key: Callable[[str | None], str] = answer_key) -> np.ndarray:
    """(P,) per-probe feedback labels of a finished trace: probe EM (``gold``) or agreement with the
    final answer (``agreement``, which needs ``final_answer``)."""
    return feedback_trace(trace, mode, final_answer, key).labels


def feedback_trace(trace: Trace, mode: str, final_answer: str | None = None,
                   key: Callable[[str | None], str] = answer_key) -> Trace:
    """The trace as feedback labels it: itself for ``gold``; for ``agreement`` a copy whose ``labels``
    are :func:`agreement_labels` and whose ``final_em`` says whether the run stated an answer."""
    _check_mode(mode)
    if mode == "gold":
        return trace
    if final_answer is None:  # an empty final answer is legitimate (the run stated none): pass ""
        raise ValueError(f"agreement feedback needs the trace's final answer (trace {trace.trace_id}); pass "
                         "final_answer= (\"\" when the run stated none)")
    labels = agreement_labels(trace, final_answer, key)
    return dataclasses.replace(trace, labels=labels, final_em=bool(key(final_answer)))
