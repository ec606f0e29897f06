"""Every YAML in experiments/ is parsed by the command it belongs to (LightningCLI configs are also
instantiated, in tests/test_configs.py); a YAML no command claims fails here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from test_configs import CONFIGS

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
ALL = sorted([*EXPERIMENTS.glob("*.yaml"), *EXPERIMENTS.glob("studies/*.yaml")])


def config_chain(path: Path, command: str) -> list[str]:
    """The config files (names in experiments/) that ``path``'s usage comment reads, in order, ending with
    ``path`` itself: ``maml-stop <command> --config experiments/a.yaml --config experiments/<path>``."""
    text = " ".join(line.lstrip("# ").rstrip("\\ ") for line in path.read_text().splitlines() if line.startswith("#"))
    for match in re.finditer(rf"maml-stop {command}((?: --config experiments/\S+)+)", text):
        names = re.findall(r"--config experiments/(\S+)", match.group(1))
        if names[-1] == path.name:
            return names
    raise AssertionError(f"{path.name}: no usage line `maml-stop {command} --config ... --config experiments/{path.name}`")


def _kind(path: Path) -> str:
    cfg = yaml.safe_load(path.read_text()) or {}
    if path in CONFIGS:
        return "lightning"
    if isinstance(cfg.get("folds"), dict):
        return "meta study"  # grouped folds x meta-training family counts (maml_stop/evaluate/grouped.py, issue 11)
    if "k" in cfg and "methods" in cfg:
        return "evaluate"
    if "targets" in cfg and "generation" in cfg:
        return "benchmark"  # experiments/benchmark.py (the one benchmark suite)
    if "selectors" in cfg or {"alpha", "train_episodes"} <= set(cfg):
        return "meta select"  # maml-stop meta-select (issue 25: maml_stop/evaluate/meta_select)
    from dataclasses import fields

    from maml_stop.evaluate.config import EvaluateConfig

    if cfg and set(cfg) <= {f.name for f in fields(EvaluateConfig)}:
        return "evaluate override"  # read after experiments/evaluate.yaml (and others: repeated --config)
    if "families" in cfg and isinstance(cfg.get("model"), str):
        return "harvest"
    if "space" in cfg:
        return "tune"  # maml-stop tune --space (the Optuna search space)
    if "max_cap_share" in cfg:
        return "pilot"  # experiments/studies/corpus_v2_pilot.py (the family choice of corpus v2)
    if "states" in cfg and "views" in cfg:
        return "probe signal"  # python -m maml_stop.evaluate.probe_signal_study (issue 30's pilot)
    if "stream" in cfg and "online" in cfg:
        return "drift"  # experiments/drift_simulation.py (online stopping under domain drift)
    if "artifact" in cfg and "online" in cfg:
        return "serve"  # maml-stop serve --config (issue 27)
    if "serve_config" in cfg and "stream" in cfg:
        return "serve drift"  # experiments/serve_drift.py (live drift through the service)
    return "unknown"


@pytest.mark.parametrize("path", ALL, ids=[str(p.relative_to(EXPERIMENTS)) for p in ALL])
def test_every_experiment_yaml_is_claimed_and_parses(path, tiny_corpus):
    kind = _kind(path)
    assert kind != "unknown", f"{path.name}: no maml-stop command reads this YAML"
    if kind == "evaluate":
        from maml_stop.evaluate.command import _parser

        ns = _parser().parse_args(["--config", str(path), "--corpus", tiny_corpus])
        assert ns.episodes >= 50 and ns.delta == 0.01
    elif kind == "evaluate override":
        from maml_stop.evaluate.command import _parser

        chain = config_chain(path, "evaluate")
        assert chain[0] == "evaluate.yaml", f"{path.name}: overrides are read after experiments/evaluate.yaml"
        args = [a for name in chain for a in ("--config", str(EXPERIMENTS / name))]
        ns = _parser().parse_args(args)
        assert ns.episodes >= 50 and ns.delta == 0.01
        base = _parser().parse_args(args[:-2])
        assert ns.out != base.out, f"{path.name} writes into the folder of the configs it overrides"
    elif kind == "meta select":
        from maml_stop.evaluate.meta_select.study import MetaSelectConfig

        cfg = MetaSelectConfig.from_yaml(path)
        assert cfg.delta == 0.01 and 16 in cfg.k and cfg.episodes >= 20 and 0 < cfg.alpha < 1  # issue 25
        assert f"maml-stop meta-select --config experiments/{path.name}" in path.read_text()
    elif kind == "pilot":
        from experiment_scripts import load_script

        module = load_script("corpus_v2_pilot")
        cfg = module.PilotConfig.load(path)
        assert cfg.min_families >= 30 and cfg.max_cap_share <= 0.2  # issue 11
    elif kind == "probe signal":
        from maml_stop.evaluate.probe_signal_study import PilotConfig

        cfg = PilotConfig.from_yaml(path)  # builds every View and ProbeFit: checks every value
        assert len(cfg.families) >= 4 and cfg.delta == 0.01 and cfg.views and cfg.probes
        assert f"--config experiments/{path.name}" in path.read_text()
    elif kind == "benchmark":
        from experiment_scripts import load_script

        module = load_script("benchmark")
        for quick in (False, True):
            cfg = module.BenchmarkConfig.load(path, quick=quick)
            assert cfg.adaptation.k == 16 and cfg.targets.adapt_ms == 50 and cfg.targets.decision_ms == 1  # issue 5
        assert f"python experiments/benchmark.py --config experiments/{path.name}" in path.read_text()
    elif kind == "meta study":  # an evaluate YAML of grouped folds, read after experiments/evaluate.yaml
        from maml_stop.evaluate.command import parse_config

        chain = config_chain(path, "evaluate")
        assert chain[:2] == ["evaluate.yaml", "meta_study.yaml"], f"{path.name}: read after evaluate.yaml, meta_study.yaml"
        cfg = parse_config([a for name in chain for a in ("--config", str(EXPERIMENTS / name))])
        assert cfg.folds.kind == "grouped" and "all" in cfg.folds.counts and cfg.delta == 0.01
        assert all((EXPERIMENTS.parent / p).is_file() for p in cfg.train_configs)
        if path.name == "meta_study.yaml":  # issue 11
            assert cfg.folds.n == 5 and cfg.folds.counts == [6, 12, "all"] and cfg.k == [4, 8, 16, 32]
            assert {"maml", "anil", "metasgd"} <= set(cfg.algorithms) and cfg.zero_step
        assert f"python experiments/meta_study.py --config experiments/evaluate.yaml --config experiments/meta_study.yaml" in path.read_text()
    elif kind == "drift":
        from experiment_scripts import load_script

        module = load_script("drift_simulation")
        cfg = module.DriftConfig.load(path)  # builds OnlineConfig, MonitorConfig, ABConfig: checks every value
        assert f"python experiments/drift_simulation.py --config experiments/{path.name}" in path.read_text()
        assert set(cfg.stream.families) <= {"gcd", "gsm_symbolic", "letter_counting"}  # held out of meta-training
        assert len(cfg.stream.families) >= 4 and cfg.online.feedback in ("gold", "agreement")
        assert all(a in module.SERVERS and b in module.SERVERS for a, b in cfg.ab_pairs)
    elif kind == "serve":
        pytest.importorskip("fastapi")
        from maml_stop.serve.cli import parse_config

        cfg = parse_config(["--config", str(path)])  # builds the nested configs: checks every value
        assert f"maml-stop serve --config experiments/{path.name}" in path.read_text()
        assert cfg.online.sample_rate == 0.2 and cfg.corpus and cfg.batch.max_batch >= 8
    elif kind == "serve drift":
        from experiment_scripts import load_script

        module = load_script("serve_drift")
        cfg = module.ServeDriftConfig.load(path)
        assert f"python experiments/serve_drift.py --config experiments/{path.name}" in path.read_text()
        assert (EXPERIMENTS.parent / cfg.serve_config).is_file() and len(set(cfg.stream.families)) == 3
    elif kind == "tune":
        from maml_stop.learn.tune import load_space

        space = load_space(path)
        assert {"model.adapter.inner_lr", "model.adapter.inner_steps", "model.predictor.hidden", "model.adapter.loss"} <= set(space)
        assert f"maml-stop tune --config experiments/quickstart.yaml --space experiments/{path.name}" in path.read_text()
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


def test_main_fit_config_is_the_quickstart_plus_overrides(tiny_corpus, tmp_path):
    """experiments/main.yaml holds only what differs from experiments/quickstart.yaml (read first)."""
    from maml_stop.learn.cli import cli_main

    from test_configs import tiny_args

    chain = config_chain(EXPERIMENTS / "main.yaml", "fit")
    assert chain == ["quickstart.yaml", "main.yaml"]
    assert "quickstart.yaml --config experiments/main.yaml" in (Path(__file__).resolve().parents[1] / "scripts" / "main.sh").read_text()
    main = yaml.safe_load((EXPERIMENTS / "main.yaml").read_text())
    assert set(main) <= {"trainer", "data"} and "model" not in main  # the model is the quickstart's
    # the tiny corpus and its families, K and Q given after both files, as in tests/test_configs.py
    args = ["--config", str(EXPERIMENTS / "quickstart.yaml")] + tiny_args(EXPERIMENTS / "main.yaml", tiny_corpus, tmp_path)
    cli = cli_main(args + ["--data.k=4", "--data.q=8"], run=False)
    quick = yaml.safe_load((EXPERIMENTS / "quickstart.yaml").read_text())
    for key, value in quick["model"].items():  # nested sections (predictor, adapter) key by key
        if key != "optimizer":
            got = cli.model.hparams[key]
            assert ({k: got[k] for k in value} if isinstance(value, dict) else got) == value, key
    assert cli.trainer.max_steps == quick["trainer"]["max_steps"]
    names = [type(c).__name__ for c in cli.trainer.callbacks]
    assert "EMTokenEvaluation" in names and "EarlyStopping" in names


def test_lofo_evaluate_trains_folds_with_the_composed_main_config():
    cfg = yaml.safe_load((EXPERIMENTS / "lofo_evaluate.yaml").read_text())
    assert cfg["train_config"] == ["experiments/quickstart.yaml", "experiments/main.yaml"]
    assert all((EXPERIMENTS.parent / p).is_file() for p in cfg["train_config"])
