"""Hand-made traces for the policy, threshold and evaluation tests (build Trace objects directly)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from conftest import TINY_FEATURES
from maml_stop.data.corpus import Trace


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


def write_tiny_checkpoint(path: Path, feature_names=TINY_FEATURES, test=("fam_c",), val=("fam_b",)) -> str:
    """A MetaStoppingModule checkpoint in Lightning's layout, without a Trainer (fast)."""
    from maml_stop.learn.adapter import AdapterConfig
    from maml_stop.learn.module import MetaStoppingModule
    from maml_stop.learn.predictor import PredictorConfig

    module = MetaStoppingModule(n_features=len(feature_names), feature_names=list(feature_names),
                                predictor=PredictorConfig(hidden=8, depth=1),
                                adapter=AdapterConfig(inner_lr=0.3, inner_steps=2, first_order=True))
    ckpt = {
        "state_dict": module.state_dict(),
        "hyper_parameters": dict(module.hparams),
        "datamodule_hyper_parameters": {"train_families": None, "val_families": list(val),
                                        "test_families": list(test), "fold": None, "n_val_families": 1},
    }
    module.on_save_checkpoint(ckpt)
    torch.save(ckpt, path)
    return str(path)


def results_differences(a, b, path=()) -> list[tuple]:
    """(path, a, b) of every leaf where two results.json trees ``a`` and ``b`` differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [(path, sorted(a), sorted(b))]
        return [d for k in a for d in results_differences(a[k], b[k], (*path, k))]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in results_differences(x, y, (*path, i))]
    return [] if a == b else [(path, a, b)]
