"""Every YAML in experiments/ is parsed by the command it belongs to (LightningCLI configs are also
instantiated, in tests/test_configs.py); a YAML no command claims fails here."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from test_configs import CONFIGS

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
ALL = sorted(EXPERIMENTS.glob("*.yaml"))


def _kind(path: Path) -> str:
    cfg = yaml.safe_load(path.read_text()) or {}
    if path in CONFIGS:
        return "lightning"
    if "shots" in cfg and "methods" in cfg:
        return "evaluate"
    from dataclasses import fields

    from maml_stop.evaluate.protocol import EvaluateConfig

    if cfg and set(cfg) <= {f.name for f in fields(EvaluateConfig)}:
        return "evaluate override"  # read after experiments/main_evaluate.yaml (a second --config)
    if "families" in cfg and isinstance(cfg.get("model"), str):
        return "harvest"
    return "unknown"


@pytest.mark.parametrize("path", ALL, ids=[p.name for p in ALL])
def test_every_experiment_yaml_is_claimed_and_parses(path, tiny_corpus):
    kind = _kind(path)
    assert kind != "unknown", f"{path.name}: no maml-stop command reads this YAML"
    if kind == "evaluate":
        from maml_stop.evaluate.protocol import _parser

        ns = _parser().parse_args(["--config", str(path), "--corpus", tiny_corpus])
        assert ns.episodes >= 50 and ns.delta == 0.01
    elif kind == "evaluate override":
        from maml_stop.evaluate.protocol import _parser

        assert f"--config experiments/main_evaluate.yaml --config experiments/{path.name}" in path.read_text()
        ns = _parser().parse_args(["--config", str(EXPERIMENTS / "main_evaluate.yaml"), "--config", str(path)])
        assert ns.episodes >= 50 and ns.out != "runs/main/evaluate"
    elif kind == "harvest":
        from jsonargparse import ArgumentParser

        from maml_stop.harvest.cli import harvest
        from tasks import list_families

        parser = ArgumentParser()
        parser.add_argument("--config", action="config")
        parser.add_function_arguments(harvest)
        ns = parser.parse_args(["--config", str(path)])
        assert set(ns.families) <= set(list_families())
        # the bundled corpus: >= 300 traces per family (issue 4); the cross-model corpora are small by design
        assert ns.n_per_family >= (300 if path.name == "corpus_qwen05.yaml" else 32) and ns.max_new_tokens >= 128
