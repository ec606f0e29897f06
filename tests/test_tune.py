"""`maml-stop tune` on the tiny corpus: a few short trials write a YAML that `maml-stop fit` parses, and
no trial ever reads a held-out family."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from maml_stop.data import store
from maml_stop.data.corpus import TraceCorpus
from maml_stop.learn.tune import DEFAULT_SPACE, load_space, tune

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"

# K/Q shrunk to the tiny corpus; a validation every 2 meta-steps, 4 meta-steps a trial
TINY = [
    "--data.k=4", "--data.q=8", "--data.val_episodes=2", "--data.steps_per_epoch=2", "--data.meta_batch_size=2",
    "--trainer.max_steps=4", "--trainer.check_val_every_n_epoch=1", "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


def _args(corpus: str) -> list[str]:
    return [f"--data.corpus={corpus}", "--data.fold=null", "--data.train_families=null",
            "--data.val_families=[fam_b]", "--data.test_families=[fam_c]", *TINY]


def test_tune_writes_a_yaml_that_fit_parses(tiny_corpus, tmp_path):
    from maml_stop.learn.cli import cli_main

    out = tmp_path / "best.yaml"
    result = tune([str(EXPERIMENTS / "quickstart.yaml")], n_trials=3, out=out, space=EXPERIMENTS / "tune.yaml",
                  seed=0, out_dir=tmp_path / "trials", fit_args=_args(tiny_corpus))
    assert result["n_trials"] == 3 and result["held_out"] == ["fam_c"]
    assert set(result["best_params"]) == set(load_space(EXPERIMENTS / "tune.yaml"))
    text = out.read_text()
    assert text.startswith("# maml-stop tune: best of 3 trials") and f"{result['best_value']:.6g}" in text
    best = yaml.safe_load(text)
    assert best["model"]["adapter"]["inner_lr"] == result["best_params"]["model.adapter.inner_lr"]
    assert best["data"]["test_families"] == ["gcd"]  # the base config's keys, untouched outside model.*
    assert (tmp_path / "trials" / "trial_0002").is_dir()
    cli = cli_main(["--config", str(out)] + _args(tiny_corpus) + [f"--trainer.default_root_dir={tmp_path}/fit"], run=False)
    for key, value in result["best_params"].items():
        section, name = key.split(".")[1:]
        assert cli.model.hparams[section][name] == value


def test_tune_never_reads_a_held_out_family(tiny_corpus, tmp_path, monkeypatch):
    """Every shard and family a trial touches is recorded; fam_c (the base config's test family) is not."""
    read: list[str] = []
    asked: list[str] = []
    read_table, traces = store.read_table, TraceCorpus.traces

    def recording_read_table(root, families=None):
        read.extend(p.parent.name for p in store.shard_paths(root) if families is None or p.parent.name in families)
        return read_table(root, families)

    def recording_traces(self, family):
        asked.append(family)
        return traces(self, family)

    monkeypatch.setattr(store, "read_table", recording_read_table)
    monkeypatch.setattr(TraceCorpus, "traces", recording_traces)
    tune([str(EXPERIMENTS / "quickstart.yaml")], n_trials=2, out=tmp_path / "best.yaml",
         space=None, seed=1, out_dir=tmp_path / "trials", fit_args=_args(tiny_corpus))
    assert set(read) == {"fam_a", "fam_b"} and set(asked) == {"fam_a", "fam_b"}
    assert not (tmp_path / "trials" / "corpus" / "shards" / "fam_c").exists()


def test_tune_needs_validation_families(tiny_corpus, tmp_path):
    args = [a for a in _args(tiny_corpus) if not a.startswith("--data.val_families")] + ["--data.val_families=[]"]
    with pytest.raises(ValueError, match="validation families"):
        tune([str(EXPERIMENTS / "quickstart.yaml")], n_trials=1, out=tmp_path / "b.yaml", fit_args=args)


def test_space_errors_name_the_valid_choices(tmp_path):
    assert load_space(None) == DEFAULT_SPACE
    bad = tmp_path / "bad.yaml"
    bad.write_text("space:\n  trainer.max_steps: {low: 1, high: 2}\n")
    with pytest.raises(ValueError, match="tunable keys: model.adapter.inner_lr"):
        load_space(bad)
    bad.write_text("space:\n  model.adapter.loss: {choices: [hinge]}\n")
    with pytest.raises(ValueError, match="valid: bce, balanced, cost"):
        load_space(bad)
    good = tmp_path / "good.yaml"  # a decision-aimed query loss is a valid choice
    good.write_text("space:\n  model.adapter.loss: {choices: [balanced, balanced/expected_cost, balanced/cost]}\n")
    assert load_space(good)["model.adapter.loss"]["choices"][1] == "balanced/expected_cost"


def test_console_script_runs_tune(tiny_corpus, tmp_path, capsys):
    from maml_stop.cli import main

    out = tmp_path / "best.yaml"
    assert main(["tune", "--config", str(EXPERIMENTS / "quickstart.yaml"), "--n_trials", "1", "--out", str(out),
                 "--study_name", "tiny", *_args(tiny_corpus)]) == 0
    assert "best val/loss" in capsys.readouterr().out and "study 'tiny'" in out.read_text()
    assert (tmp_path / "best_trials" / "trial_0000").is_dir()  # default out_dir: next to the YAML
