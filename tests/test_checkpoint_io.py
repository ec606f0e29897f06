"""Checkpoints and adapted predictors load weights-only: garbage, truncated and code-running files are
refused with the file named (and no advice to pass weights_only=False); real ones still load."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from maml_stop.live.adapt import AdaptError, adapt, load_adapted, save_adapted
from maml_stop.learn.checkpoint_io import SAFE_GLOBALS, CheckpointLoadError, CheckpointNotFoundError, safe_load
from maml_stop.learn.module import CheckpointError, load_predictor
from trace_helpers import write_tiny_checkpoint

QUICKSTART = Path(__file__).resolve().parents[1] / "experiments" / "quickstart.yaml"


class WritesMarker:
    """Unpickling this runs code: it creates ``path`` (a stand-in for an attacker's payload)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').close()",))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt_io") / "tiny.ckpt")


def _garbage(tmp_path) -> Path:
    path = tmp_path / "garbage.ckpt"
    path.write_bytes(b"not a checkpoint at all\n" * 20)
    return path


def _truncated(ckpt, tmp_path) -> Path:
    data = Path(ckpt).read_bytes()
    path = tmp_path / "truncated.ckpt"
    path.write_bytes(data[: len(data) // 2])
    return path


def _malicious(tmp_path) -> tuple[Path, Path]:
    marker = tmp_path / "marker"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "maml_stop": WritesMarker(marker)}, path)
    return path, marker


def _refused_everywhere(path: Path, match: str) -> None:
    """safe_load, load_predictor and load_adapted each refuse ``path``, naming it, with no weights_only advice."""
    loaders = ((safe_load, CheckpointLoadError), (load_predictor, CheckpointError), (load_adapted, AdaptError))
    for load, error in loaders:
        with pytest.raises(error, match=match) as info:
            load(path)
        assert str(path) in str(info.value) and "weights_only=False" not in str(info.value)


def test_garbage_file_is_refused_with_its_name(tmp_path):
    _refused_everywhere(_garbage(tmp_path), "not a torch file")


def test_truncated_checkpoint_is_refused_with_its_name(ckpt, tmp_path):
    _refused_everywhere(_truncated(ckpt, tmp_path), "truncated or corrupt")


def test_code_running_pickle_is_refused_and_never_runs(tmp_path):
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(WritesMarker(control)))  # the payload is live: a plain unpickle runs it
    assert control.exists()
    path, marker = _malicious(tmp_path)
    _refused_everywhere(path, r"refusing to load .*'builtins\.exec'")
    raw = tmp_path / "raw.pkl"  # a bare pickle, not a torch.save archive
    raw.write_bytes(pickle.dumps({"x": WritesMarker(marker)}))
    _refused_everywhere(raw, "not a torch file")
    assert not marker.exists()


def test_missing_file_names_it(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="no adapted predictor file at .*nowhere.pt"):
        safe_load(tmp_path / "nowhere.pt", what="adapted predictor")
    with pytest.raises(FileNotFoundError, match="nowhere.ckpt"):
        load_predictor(tmp_path / "nowhere.ckpt")


def test_real_checkpoint_and_adapted_artifact_still_load(ckpt, tiny_corpus, tmp_path):
    assert SAFE_GLOBALS == ()  # what we write needs nothing beyond torch's weights-only allow-list
    assert torch.serialization.get_unsafe_globals_in_checkpoint(ckpt) == []
    predictor, adapter, meta = load_predictor(ckpt)
    assert meta["path"] == ckpt and not predictor.training
    adapted = adapt(ckpt, "fam_c", k=4, corpus=tiny_corpus, threshold_method="fixed")
    path = save_adapted(adapted, tmp_path / "fam_c.pt")
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []
    again = load_adapted(path, feature_names=adapted.feature_names)
    assert again.tau == adapted.tau and again.meta == adapted.meta
    for k, v in adapted.predictor.state_dict().items():
        torch.testing.assert_close(again.predictor.state_dict()[k], v)


def _cli_test(tiny_corpus, tmp_path, *extra: str) -> None:
    from maml_stop.learn.cli import cli_main

    cli_main(["test", "--config", str(QUICKSTART), f"--data.corpus={tiny_corpus}", "--data.fold=null",
              "--data.train_families=null", "--data.val_families=[fam_b]", "--data.test_families=[fam_c]",
              f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false", *extra])


def test_cli_ckpt_path_is_checked_before_lightning_reads_it(tiny_corpus, tmp_path):
    path, marker = _malicious(tmp_path)
    with pytest.raises(CheckpointLoadError, match=f"refusing to load --ckpt_path checkpoint {path}"):
        _cli_test(tiny_corpus, tmp_path, f"--ckpt_path={path}")
    garbage = _garbage(tmp_path)
    with pytest.raises(CheckpointLoadError, match=f"--ckpt_path checkpoint {garbage} is not a torch file"):
        _cli_test(tiny_corpus, tmp_path, f"--ckpt_path={garbage}")
    with pytest.raises(CheckpointNotFoundError, match="missing.ckpt"):
        _cli_test(tiny_corpus, tmp_path, f"--ckpt_path={tmp_path / 'missing.ckpt'}")
    with pytest.raises(ValueError, match="--weights_only false is refused"):
        _cli_test(tiny_corpus, tmp_path, f"--ckpt_path={path}", "--weights_only=false")
    assert not marker.exists()
