"""Issue 29 (known defect of the first attempt): a resumed harvest compares the model by the sha256 of its
weights, not by the path it was loaded from (committed corpora record an absolute path of the machine that
harvested them). The same weights from another folder resume with a log line; other weights are refused
naming both hashes."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

import tiny_lm
from maml_stop.data import store
from maml_stop.harvest.cli import harvest
from maml_stop.harvest.model import model_identity
from maml_stop.harvest.resume import check_weights


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_lm.save_tiny(tmp_path_factory.mktemp("tiny_lm"))


def _harvest(out, model, **kw):
    args = dict(out=str(out), model=model, families=["gcd"], n_per_family=4, dtype="float32", batch_size=2,
                shard_size=2, max_new_tokens=8, every_n=4, hash_weights=True)
    args.update(kw)
    return harvest(**args)


def test_the_same_weights_from_another_folder_resume(tmp_path, model_dir, caplog):
    out = tmp_path / "c"
    _harvest(out, model_dir, max_shards=1)
    moved = shutil.copytree(model_dir, tmp_path / "elsewhere" / "tiny")  # the same files, another path
    with caplog.at_level(logging.INFO, logger="maml_stop.harvest.resume"):
        summary = _harvest(out, str(moved))
    assert summary["remaining"] == 0
    assert "weights' sha256 agree" in caplog.text and str(moved) in caplog.text
    ids = list(store.load_dataset(out)["trace_id"])
    assert len(ids) == len(set(ids)) == 4
    assert store.read_meta(out)["model_weights"]["spec"] == model_dir  # the recorded identity is kept


def test_other_weights_are_refused_naming_both_hashes(tmp_path, model_dir):
    out = tmp_path / "c"
    _harvest(out, model_dir, max_shards=1)
    other = tiny_lm.save_tiny(tmp_path / "other", seed=1)  # same architecture and width, other weights
    old = model_identity(model_dir)["weights"]["model.safetensors"]
    new = model_identity(other)["weights"]["model.safetensors"]
    assert old != new
    with pytest.raises(store.CorpusError, match="other model weights") as err:
        _harvest(out, other)
    assert old in str(err.value) and new in str(err.value)


def test_a_committed_corpus_meta_resumes_from_another_folder(tmp_path):
    """The stored identity of a committed corpus (an absolute path of the harvesting machine) against the
    same weights found elsewhere: accepted; the hashes decide, not the spec."""
    stored = json.loads(open("experiments/corpus/qwen05/meta.json").read())["model_weights"]
    now = {**stored, "spec": "Qwen/Qwen2.5-Coder-0.5B-Instruct", "hub_id": "Qwen/Qwen2.5-Coder-0.5B-Instruct"}
    now.pop("provenance")
    check_weights(tmp_path, stored, now)  # no error
    with pytest.raises(store.CorpusError, match="other model weights"):
        check_weights(tmp_path, stored, {**now, "weights": {"model.safetensors": "0" * 64}})


def test_without_hashes_the_spec_decides(tmp_path):
    check_weights(tmp_path, {"spec": "/a"}, {"spec": "/a"})
    with pytest.raises(store.CorpusError, match="neither run hashed"):
        check_weights(tmp_path, {"spec": "/a"}, {"spec": "/b"})
    with pytest.raises(store.CorpusError, match="cannot be compared"):
        check_weights(tmp_path, {"spec": "/a", "weights": {"m": "1"}}, {"spec": "/a", "weights": {}})
