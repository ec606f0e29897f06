"""Every LightningCLI YAML in experiments/ parses and instantiates (data path -> the tiny corpus)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from maml_stop.learn.cli import cli_main

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def _is_cli_config(path: Path) -> bool:
    """LightningCLI configs have a trainer section or model/data sections (harvest recipes do not)."""
    cfg = yaml.safe_load(path.read_text()) or {}
    return "trainer" in cfg or isinstance(cfg.get("model"), dict) or isinstance(cfg.get("data"), dict)


CONFIGS = sorted(p for p in EXPERIMENTS.glob("*.yaml") if _is_cli_config(p))


def tiny_args(config: Path, corpus: str, tmp_path) -> list[str]:
    return [
        "--config", str(config), f"--data.corpus={corpus}", "--data.fold=null", "--data.train_families=null",
        "--data.val_families=[fam_b]", "--data.test_families=[fam_c]", f"--trainer.default_root_dir={tmp_path}",
    ]


def test_configs_found():
    names = {p.name for p in CONFIGS}
    assert {"quickstart.yaml", "lofo.yaml"} <= names


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_config_instantiates(config, tiny_corpus, tmp_path):
    # K/Q shrunk to the tiny corpus's 60 traces per family; everything else as in the YAML
    data = (yaml.safe_load(config.read_text()) or {}).get("data") or {}
    extra = []
    if data.get("features") not in (None, "all"):  # a feature subset of its own corpus (the tiny one has f0..f7)
        import json

        from maml_stop.data.datamodule import resolve_features

        meta = json.loads((EXPERIMENTS.parent / data["corpus"] / "meta.json").read_text())
        assert resolve_features(data["features"], meta["feature_names"], meta.get("feature_costs"))
        extra = ["--data.features=all"]
    cli = cli_main(tiny_args(config, tiny_corpus, tmp_path) + ["--data.k=4", "--data.q=8", *extra], run=False)
    assert cli.model.predictor.n_features == 8  # linked from the data
    assert cli.model.feature_names == cli.datamodule.feature_names
    assert cli.trainer.validate_loop.inference_mode is False
    assert cli.trainer.test_loop.inference_mode is False
    cli.datamodule.setup("fit")  # the split, K/Q and episode counts fit the tiny corpus
    cli.model.configure_optimizers()


def test_inference_mode_true_is_refused(tiny_corpus, tmp_path):
    args = tiny_args(EXPERIMENTS / "quickstart.yaml", tiny_corpus, tmp_path) + ["--trainer.inference_mode=true"]
    with pytest.raises(ValueError, match="inference_mode must be false"):
        cli_main(args, run=False)


def test_cli_fit_then_test_from_checkpoint(tiny_corpus, tmp_path):
    """`maml-stop fit` then `maml-stop test --ckpt_path` through the console-script dispatcher."""
    from maml_stop.cli import main

    common = tiny_args(EXPERIMENTS / "quickstart.yaml", tiny_corpus, tmp_path) + [
        "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        "--data.k=4", "--data.q=8", "--data.val_episodes=2", "--data.test_episodes=2",
    ]
    ckpt_cb = f"[{{class_path: lightning.pytorch.callbacks.ModelCheckpoint, init_args: {{dirpath: {tmp_path}/ck, save_last: true}}}}]"
    assert main(["fit", *common, "--trainer.max_steps=4", "--data.steps_per_epoch=2",
                 "--trainer.check_val_every_n_epoch=1", f"--trainer.callbacks={ckpt_cb}"]) == 0
    assert (tmp_path / "ck" / "last.ckpt").is_file()
    assert main(["test", *common, "--trainer.callbacks=[]", f"--ckpt_path={tmp_path}/ck/last.ckpt"]) == 0


def test_quickstart_is_deterministic(tiny_corpus, tmp_path):
    """Two runs of the quick config (a few steps on the tiny corpus) give identical metrics."""
    def run(sub: str) -> dict[str, float]:
        args = tiny_args(EXPERIMENTS / "quickstart.yaml", tiny_corpus, tmp_path / sub) + [
            "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
            "--trainer.callbacks=[]", "--trainer.enable_checkpointing=false", "--trainer.max_steps=6",
            "--data.steps_per_epoch=3", "--trainer.check_val_every_n_epoch=1", "--data.k=4", "--data.q=8",
            "--data.val_episodes=3", "--model.predictor.dropout=0.2",
        ]
        cli = cli_main(["fit", *args])
        return {k: float(v) for k, v in cli.trainer.callback_metrics.items()}

    first, second = run("a"), run("b")
    assert {"train/loss", "val/loss", "val/loss_random_init"} <= set(first)
    assert first == second
