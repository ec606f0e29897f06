"""Pooled probes kept between runs, keyed by the content hash of what they are trained from (issue 26 item 3).

Every fold of ``maml-stop evaluate`` that lists ``pooled`` or ``finetuned`` trains a pooled probe on its
source families (300 full-batch steps: 10-45 s here, per fold). The probe is a pure function of the
source traces (ids, features, labels, costs), the predictor's shape, the training settings, the seed and
the precision (``baseline_dtype``: a float32 probe is never read for float64), so :func:`pooled_probe`
stores it under ``cache_dir/pooled/<sha256 of those>.pt`` and reuses it in any
later run with the same inputs (another report, another K, a rerun): the stored weights are the trained
ones, so results do not change (tests/test_evalspeed.py). ``cache_dir`` None: trained every time.

>>> probe = pooled_probe("runs/cache", source_traces, config, 300, 0.5, "balanced", 0, "learn2learn",
...                     torch.float64)  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from maml_stop.data.corpus import Trace
from maml_stop.learn.pooled import train_predictor
from maml_stop.learn.predictor import PredictorConfig, StoppingPredictor

log = logging.getLogger(__name__)

__all__ = ["traces_digest", "pooled_probe"]

_VERSION = 1  # part of every key: bump it when train_predictor's computation changes (old entries are ignored)


def traces_digest(traces: Sequence[Trace]) -> str:
    """sha256 of what a probe trained on ``traces`` reads: ids, features, labels and token costs, in order."""
    h = hashlib.sha256()
    for t in traces:
        h.update(t.trace_id.encode())
        for a in (t.features, t.labels, t.positions, t.probe_tokens):
            a = np.ascontiguousarray(a)
            h.update(str((a.dtype.str, a.shape)).encode())
            h.update(a.tobytes())
        h.update(f"{bool(t.final_em)}|{int(t.reasoning_tokens)}|{t.cap_probe}".encode())
    return h.hexdigest()


def pooled_probe(cache_dir: str | None, traces: Sequence[Trace], config: PredictorConfig, steps: int, lr: float,
                 loss: str = "balanced", seed: int = 0, backend: str = "learn2learn",
                 dtype: torch.dtype = torch.float32) -> StoppingPredictor:
    """:func:`~maml_stop.learn.pooled.train_predictor` with these arguments, read from ``cache_dir`` when a
    probe of the same inputs was trained before (else trained and stored there); in ``dtype``."""
    if cache_dir is None:
        return train_predictor(traces, config, steps, lr, loss, seed=seed, backend=backend, dtype=dtype)
    key = json.dumps({"version": _VERSION, "traces": traces_digest(traces), "config": asdict(config), "steps": steps, "lr": lr,
                      "loss": loss, "seed": seed, "backend": backend, "dtype": str(dtype), "torch": torch.__version__},
                     sort_keys=True)
    path = Path(cache_dir) / "pooled" / f"{hashlib.sha256(key.encode()).hexdigest()}.pt"
    if path.is_file():
        stored = torch.load(path, map_location="cpu", weights_only=True)
        probe = StoppingPredictor.from_config(PredictorConfig(**stored["config"])).to(dtype)  # load_state_dict keeps it
        probe.load_state_dict(stored["state_dict"])
        log.info("pooled probe read from %s", path)
        return probe
    probe = train_predictor(traces, config, steps, lr, loss, seed=seed, backend=backend, dtype=dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # atomic: a reader never sees half a file
    torch.save({"config": asdict(config), "state_dict": probe.state_dict(), "key": json.loads(key)}, tmp)
    os.replace(tmp, path)
    return probe
