"""Distributed meta-training (issue 15 item 1): `maml-stop fit` on two CPU processes (gloo) gives the
single-process result within ``ATOL``: the same final weights, the same logged losses and EM/token
figures, one set of files.

Why it can agree: every rank draws the same global meta-batch from the same seeded sampler and adapts on
its half (``rank_share``); DDP averages the two half-batch mean gradients, which is the gradient of the
mean over the whole meta-batch. Validation episodes are split without padding and every logged value is
an episode-weighted mean over both ranks (``sync_dist``; the EM/token callback's torchmetrics sum their
states over the ranks). What differs is the order of floating-point sums (two half-batches, then an
all-reduce), hence a tolerance instead of equality.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer

from maml_stop.data.batches import DataError
from maml_stop.data.datamodule import TraceDataModule, _RandomMetaBatches
from maml_stop.data.episodes import SamplerError, rank_share
from maml_stop.learn.cli import cli_main

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
ATOL = 1e-5  # float32 sums in another order (half-batches + all-reduce); observed differences ~1e-7
TWO_CPU_PROCESSES = ["--trainer.accelerator=cpu", "--trainer.devices=2"]


def fit_args(corpus: str, root: Path) -> list[str]:
    """quickstart.yaml + main.yaml (EarlyStopping, the EM/token callback and its plots, best/last
    checkpoints) on the tiny corpus: 4 meta-steps of 4 episodes, validation after steps 2 and 4 on 5 fixed
    episodes (split 3 + 2 over two ranks: uneven shares)."""
    return [
        "fit", "--config", str(EXPERIMENTS / "quickstart.yaml"), "--config", str(EXPERIMENTS / "main.yaml"),
        f"--data.corpus={corpus}", "--data.train_families=null", "--data.val_families=[fam_b]",
        "--data.test_families=[fam_c]", f"--trainer.default_root_dir={root}", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", "--trainer.max_steps=4", "--data.steps_per_epoch=2",
        "--trainer.check_val_every_n_epoch=1", "--trainer.log_every_n_steps=1", "--data.k=4", "--data.q=8",
        "--data.meta_batch_size=4", "--data.val_episodes=5", "--model.predictor.hidden=8", "--model.adapter.inner_steps=2",
    ]


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def adapter_state(path: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    return {k: v for k, v in ckpt["state_dict"].items() if k.startswith("adapter.")}


def logged(root: Path) -> dict[tuple[str, int], float]:
    """(metric, step) -> value of every non-empty cell of metrics.csv."""
    with open(root / "logs" / "version_0" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return {(k, int(r["step"])): float(v) for r in rows for k, v in r.items() if v and k not in ("step", "epoch")}


def assert_same_run(single: Path, multi: Path) -> None:
    assert files_under(multi) == files_under(single)  # one set of files: no per-rank copies, nothing extra
    assert {"checkpoints/best.ckpt", "checkpoints/last.ckpt", "logs/version_0/metrics.csv",
            "logs/version_0/em_tokens/epoch=001.png"} <= set(files_under(single))
    a, b = adapter_state(single / "checkpoints" / "last.ckpt"), adapter_state(multi / "checkpoints" / "last.ckpt")
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=ATOL, rtol=0, msg=name)
    m1, m2 = logged(single), logged(multi)
    assert m1.keys() == m2.keys()
    for key in ("val/loss", "val/loss_unadapted", "val/loss_random_init", "val/savings_at_delta", "train/loss"):
        assert any(k[0] == key for k in m1), key
    for key, value in m1.items():
        assert m2[key] == pytest.approx(value, abs=ATOL), key
    step = lambda p: torch.load(p, map_location="cpu", weights_only=False)["global_step"]  # noqa: E731
    assert step(multi / "checkpoints" / "best.ckpt") == step(single / "checkpoints" / "best.ckpt")


@pytest.fixture(scope="module")
def single_run(tiny_corpus, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("single") / "run"
    cli_main(fit_args(tiny_corpus, root))
    return root


def test_ddp_spawn_two_processes_equal_one(tiny_corpus, single_run, tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the spawned ranks start fresh interpreters
    root = tmp_path / "run"
    cli_main([*fit_args(tiny_corpus, root), "--trainer.strategy=ddp_spawn", *TWO_CPU_PROCESSES])
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in capfd.readouterr().err  # two processes really ran
    assert_same_run(single_run, root)


@pytest.mark.slow
def test_ddp_subprocess_launcher_two_processes_equal_one(tiny_corpus, single_run, tmp_path):
    """`ddp` relaunches the command line itself for rank 1, so it runs as the console script does."""
    root = tmp_path / "run"
    exe = Path(sys.executable).with_name("maml-stop")
    cmd = [str(exe) if exe.exists() else sys.executable, *([] if exe.exists() else ["-m", "maml_stop.cli"]),
           *fit_args(tiny_corpus, root), "--trainer.strategy=ddp", *TWO_CPU_PROCESSES]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in done.stderr
    assert_same_run(single_run, root)


def test_rank_shares_are_disjoint_and_cover_the_meta_batch(tiny_corpus):
    """Fast check of the sharding itself: two ranks' training shares of each step are the single
    process's meta-batch, split; the fixed validation episodes likewise, without padding."""
    def dm():
        return TraceDataModule(tiny_corpus, val_families=["fam_b"], test_families=["fam_c"], k=4, q=8,
                               meta_batch_size=4, steps_per_epoch=3, val_episodes=5)

    def ids(episodes):
        return [tuple(t.trace_id for t in ep.support) for ep in episodes]

    one = dm()
    one.setup()
    full = [one._train_sampler.sample_batch(4) for _ in range(3)]
    shares = []
    for rank in range(2):
        d = dm()
        d.setup()
        shares.append([rank_share(d._train_sampler.sample_batch(4), rank, 2) for _ in range(3)])
    for step in range(3):
        assert ids(shares[0][step]) + ids(shares[1][step]) == ids(full[step][0::2]) + ids(full[step][1::2])
        assert not set(ids(shares[0][step])) & set(ids(shares[1][step]))
    ds = _RandomMetaBatches(one._train_sampler, one._tensors, 4, 3, rank=1, world_size=2)
    assert [len(b) for b in ds] == [2, 2, 2]

    d = dm()
    d.trainer = Trainer(strategy="ddp_spawn", devices=2, accelerator="cpu", logger=False)  # built, not run
    assert d.process() == (0, 2)
    rank0 = [ep for batch in d._eval_batches("val") for ep in batch]
    assert len(rank0) == 3 and all(len(b) <= 2 for b in d._eval_batches("val"))  # 5 episodes: 3 + 2
    assert len(list(d.val_dataloader())) == len(d._eval_batches("val"))  # Lightning adds no sampler to it


def test_meta_batch_must_split_evenly_over_the_processes(tiny_corpus):
    d = TraceDataModule(tiny_corpus, val_families=["fam_b"], test_families=["fam_c"], k=4, q=8, meta_batch_size=3)
    d.trainer = Trainer(strategy="ddp_spawn", devices=2, accelerator="cpu", logger=False)
    with pytest.raises(DataError, match=r"meta_batch_size=3 does not split evenly over 2 processes.*multiple of 2"):
        d.train_dataloader()
    with pytest.raises(SamplerError, match=r"1 episodes for 2 processes"):
        rank_share(["only"], 0, 2)
