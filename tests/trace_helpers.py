"""Hand-made traces for the policy, threshold and evaluation tests (build Trace objects directly)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from maml_stop.corpus import Trace


def make_trace(
    labels: Sequence[int],
    answers: Sequence[str] | None = None,
    confidence: Sequence[float] | None = None,
    final_em: bool = True,
    step: int = 10,
    probe_cost: int = 5,
    reasoning_tokens: int | None = None,
    features: np.ndarray | None = None,
    trace_id: str = "t",
    family: str = "fam",
) -> Trace:
    """A trace with probes every ``step`` tokens (positions step, 2*step, ...), each costing ``probe_cost``."""
    p = len(labels)
    answers = list(answers) if answers is not None else [("42" if y else "0") for y in labels]
    conf = np.asarray(confidence if confidence is not None else [0.5] * p, dtype=np.float64)
    return Trace(
        trace_id=trace_id,
        family=family,
        split="test",
        features=(features if features is not None else np.zeros((p, 2))).astype(np.float32),
        labels=np.asarray(labels, dtype=np.float32),
        positions=(np.arange(1, p + 1) * step).astype(np.int64),
        probe_tokens=np.full(p, probe_cost, dtype=np.int64),
        probe_answers=answers,
        logprob_mean=np.log(conf).astype(np.float32),
        final_em=final_em,
        reasoning_tokens=reasoning_tokens if reasoning_tokens is not None else (p + 1) * step,
        hit_cap=False,
    )
