"""`maml-stop fit` writes every file under ``trainer.default_root_dir`` and a rerun never leaves a stale
checkpoint to read (issue 16): ``best.ckpt`` = lowest val/loss, ``last.ckpt`` = final step, no ``-v1``."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import pytest
import torch

from maml_stop.learn.cli import OutputExistsError, cli_main

QUICKSTART = Path(__file__).resolve().parents[1] / "experiments" / "quickstart.yaml"


def fit_args(corpus: str, root: Path, steps: int = 5) -> list[str]:
    """experiments/quickstart.yaml as written (logger, checkpoints) on the tiny corpus, a few meta-steps."""
    return [
        "fit", "--config", str(QUICKSTART), f"--data.corpus={corpus}", "--data.fold=null",
        "--data.train_families=null", "--data.val_families=[fam_b]", "--data.test_families=[fam_c]",
        f"--trainer.default_root_dir={root}", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", f"--trainer.max_steps={steps}", "--data.steps_per_epoch=2",
        "--trainer.check_val_every_n_epoch=1", "--data.k=4", "--data.q=8", "--data.val_episodes=2",
        "--model.predictor.hidden=8", "--model.adapter.inner_steps=1",
    ]


def step_of(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=False)["global_step"]


def max_logged_step(root: Path) -> int:
    with open(root / "logs" / "version_0" / "metrics.csv", newline="") as f:
        return max(int(row["step"]) for row in csv.DictReader(f))


def test_default_root_dir_holds_every_file(tiny_corpus, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the YAML's own paths (runs/quickstart/...) would land here
    cli = cli_main(fit_args(tiny_corpus, tmp_path / "run", steps=5))
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    logs = tmp_path / "run" / "logs" / "version_0"
    assert (logs / "metrics.csv").is_file() and (logs / "config.yaml").is_file()
    assert cli.trainer.log_dir == str(logs)
    # validations at steps 2 and 4; training stops at 5: last.ckpt is the final step, best.ckpt a validation
    assert step_of(tmp_path / "run" / "checkpoints" / "last.ckpt") == cli.trainer.global_step == 5
    assert step_of(tmp_path / "run" / "checkpoints" / "best.ckpt") in (2, 4)
    assert cli.trainer.checkpoint_callback.best_model_path == str(tmp_path / "run" / "checkpoints" / "best.ckpt")


def test_rerun_is_refused_then_overwrite_replaces_every_file(tiny_corpus, tmp_path):
    root = tmp_path / "run"
    cli_main(fit_args(tiny_corpus, root, steps=5))
    assert max_logged_step(root) >= 3
    with pytest.raises(OutputExistsError, match=r"already holds a run .*--overwrite true"):
        cli_main(fit_args(tiny_corpus, root, steps=3))
    assert step_of(root / "checkpoints" / "last.ckpt") == 5  # the refused rerun touched nothing
    stale_plot = root / "logs" / "version_0" / "em_tokens" / "epoch=009.png"
    stale_plot.parent.mkdir(parents=True)
    stale_plot.write_bytes(b"")
    cli_main([*fit_args(tiny_corpus, root, steps=3), "--overwrite=true"])
    assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]  # no last-v1
    assert step_of(root / "checkpoints" / "last.ckpt") == 3 and step_of(root / "checkpoints" / "best.ckpt") == 2
    assert [p.name for p in (root / "logs").iterdir()] == ["version_0"] and not stale_plot.exists()
    assert max_logged_step(root) < 3  # metrics.csv holds the new run alone (the first one logged up to step 4)


def test_resume_keeps_the_root(tiny_corpus, tmp_path):
    """`fit --ckpt_path <root>/checkpoints/last.ckpt` continues in place: no refusal, no -v1."""
    root = tmp_path / "run"
    # validation every 2nd epoch, as in the YAMLs (with 1, EarlyStopping checks at the end of the train epoch,
    # which a run resumed from an end-of-epoch checkpoint reaches before any validation: Lightning refuses)
    every2 = ["--trainer.check_val_every_n_epoch=2"]
    cli_main([*fit_args(tiny_corpus, root, steps=4), *every2])
    cli_main([*fit_args(tiny_corpus, root, steps=8), *every2, f"--ckpt_path={root / 'checkpoints' / 'last.ckpt'}"])
    assert step_of(root / "checkpoints" / "last.ckpt") == 8
    assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert (root / "logs" / "version_0" / "metrics.csv").is_file()  # the first part's metrics survive
    assert (root / "logs" / "version_1" / "metrics.csv").is_file()  # the resumed part


def test_explicit_paths_are_followed_with_a_warning_or_moved_under_the_root(tiny_corpus, tmp_path, caplog):
    elsewhere = tmp_path / "elsewhere"
    args = fit_args(tiny_corpus, tmp_path / "run")[1:] + [
        f"--trainer.logger.init_args.save_dir={elsewhere}", f"--trainer.callbacks.init_args.dirpath={elsewhere}/ck",
    ]
    with caplog.at_level(logging.WARNING, logger="maml_stop.learn.cli"):
        cli = cli_main(args, run=False)
    assert cli.trainer.log_dir == str(elsewhere / "logs" / "version_0")
    assert [cb.dirpath for cb in cli.trainer.checkpoint_callbacks] == [str(tmp_path / "run" / "checkpoints"),
                                                                       str(elsewhere / "ck")]
    assert sum("outside trainer.default_root_dir" in r.message for r in caplog.records) == 2
    cli = cli_main(args, run=False, follow_root=True)  # maml-stop evaluate --train_config: one folder per fold
    assert cli.trainer.log_dir == str(tmp_path / "run" / "logs" / "version_0")
    assert {cb.dirpath for cb in cli.trainer.checkpoint_callbacks} == {str(tmp_path / "run" / "checkpoints")}
    assert all(cb._enable_version_counter is False for cb in cli.trainer.checkpoint_callbacks)


def test_test_subcommand_logs_beside_fit(tiny_corpus, tmp_path):
    """`maml-stop test` on the fit's checkpoint logs to logs/test, leaving the fit's metrics.csv alone."""
    root = tmp_path / "run"
    cli_main(fit_args(tiny_corpus, root, steps=2))
    fit_metrics = (root / "logs" / "version_0" / "metrics.csv").read_text()
    args = fit_args(tiny_corpus, root)[1:] + ["--data.test_episodes=2", f"--ckpt_path={root / 'checkpoints' / 'best.ckpt'}"]
    cli_main(["test", *args])
    assert (root / "logs" / "test" / "metrics.csv").is_file()
    assert (root / "logs" / "version_0" / "metrics.csv").read_text() == fit_metrics


def test_only_the_first_launched_process_checks_and_replaces(monkeypatch):
    """Under a DDP launcher every process re-runs the command: only global rank 0 refuses or deletes."""
    from maml_stop.learn import cli as fit_cli

    for env, rank in [({}, 0), ({"LOCAL_RANK": "1"}, 1), ({"NODE_RANK": "1", "LOCAL_RANK": "0"}, 1),
                      ({"RANK": "3"}, 3), ({"SLURM_PROCID": "0", "LOCAL_RANK": "1"}, 0)]:
        for key in ("RANK", "SLURM_PROCID", "NODE_RANK", "LOCAL_RANK"):
            monkeypatch.delenv(key, raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        assert fit_cli._launched_rank() == rank, env
