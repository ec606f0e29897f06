"""Shared pieces of the serve tests: a Service on the tiny harvested model (test_feature_subsets'
fixtures) with the artifact of test_generate_cmd, and its TestClient."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from test_feature_subsets import FAMILY  # noqa: F401


def model_dir(harvested) -> str:
    return str(Path(harvested[0]).parent / "tiny_lm")


def make_config(harvested, artifact: str, db, **overrides):
    from maml_stop.online import MonitorConfig, OnlineConfig
    from maml_stop.serve.config import BatchConfig, ServeConfig

    online = overrides.pop("online", {})
    monitor = online.pop("monitor", {})
    base = ServeConfig(model=model_dir(harvested), artifact=artifact, db=str(db),
                       batch=BatchConfig(window_ms=50.0, max_wait_ms=100.0, max_batch=8),
                       online=OnlineConfig(**{"sample_rate": 0.0, "window": 8, "refit_every": 2, "delta": 0.2,
                                              "monitor": MonitorConfig(**{"window": 10, "min_feedback": 3,
                                                                          "bound": "lower", **monitor}),
                                              **online}))
    return dataclasses.replace(base, **overrides)


def service(harvested, config):
    from maml_stop.serve.service import Service

    _, model, tok = harvested
    return Service(config, model, tok)


def client(svc):
    from fastapi.testclient import TestClient

    from maml_stop.serve.app import create_app

    return TestClient(create_app(svc))


def questions(n: int, seed: int = 1):
    from tasks import get_family

    return get_family(FAMILY).questions("test", n, seed=seed)


def post_all(c, prompts: list[str]) -> list[dict]:
    """POST the prompts at once (one thread each: they meet in the batching window)."""
    import threading

    out: list = [None] * len(prompts)

    def go(i: int) -> None:
        r = c.post("/v1/completions", json={"prompt": prompts[i]})
        assert r.status_code == 200, r.text
        out[i] = r.json()

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_metrics(text: str) -> dict[str, dict[str, float]]:
    """Prometheus text -> {name: {labels: value}}; checks every sample's metric has HELP and TYPE."""
    declared, out = set(), {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            declared.add(line.split()[2])
        elif line and not line.startswith("#"):
            head, value = line.rsplit(" ", 1)
            name, _, labels = head.partition("{")
            assert name in declared, f"sample of undeclared metric {name}"
            out.setdefault(name, {})[labels.rstrip("}")] = float(value)
    return out
