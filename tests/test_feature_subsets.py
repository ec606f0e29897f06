"""Feature subsets and cost classes (issue 10): a subset selected by name or cost class, recorded by
checkpoints and adapted artifacts, evaluated on the columns it was trained on; the adapted artifact
carries the probe recipe, and ``LiveStopping.from_adapted`` rebuilds live stopping from it alone."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import TINY_FEATURES, make_trace_rows
from maml_stop.data import store
from maml_stop.data.batches import DataError
from maml_stop.data.datamodule import resolve_features
from maml_stop.evaluate.config import EvaluateConfig
from maml_stop.evaluate.protocol import run
from maml_stop.learn.module import CheckpointError
from trace_helpers import write_tiny_checkpoint

SUBSET = ["logprob_mean", "f1", "probe_index"]  # in the predictor's input order (not the corpus's)
METHODS = ["full", "pooled", "finetuned", "scratch", "maml", "oracle"]


def write_narrowed_corpus(root, names: list[str], families=("fam_a", "fam_b", "fam_c"), n: int = 60) -> str:
    """The tiny corpus (conftest.write_tiny_corpus) as if it had been harvested with only ``names``."""
    cols = [TINY_FEATURES.index(c) for c in names]
    store.write_meta(root, {"feature_names": names, "model": {"name": "synthetic"}})
    for k, fam in enumerate(families):
        rows = make_trace_rows(fam, n, seed=k, shift=0.3 * k)
        for row in rows:
            row["features"] = [[v[c] for c in cols] for v in row["features"]]
        store.write_shard(root, fam, "all", rows)
    return str(root)


def _figures(results: dict) -> dict:
    return {m: results["results"]["fam_c"]["4"][m]["thresholds"] for m in results["results"]["fam_c"]["4"]}


def test_resolve_features_by_name_and_cost_class():
    names = ["h0", "h1", "m0", "logprob_mean", "run_length", "entropy_mean", "probe_index"]
    assert resolve_features(None, names) == names == resolve_features("all", names)
    assert resolve_features("free", names) == ["h0", "h1", "m0", "entropy_mean", "probe_index"]
    assert resolve_features("paid", names) == ["logprob_mean", "run_length"]
    assert resolve_features(["probe_index", "h1"], names) == ["probe_index", "h1"]
    # the corpus's recorded cost classes win over the rule
    assert resolve_features("paid", ["a", "b"], {"a": "paid", "b": "free"}) == ["a"]
    with pytest.raises(DataError, match=r"unknown feature names \['h9'\]; the corpus has 7 features"):
        resolve_features(["h0", "h9"], names)
    with pytest.raises(DataError, match="selects no feature"):
        resolve_features("paid", ["h0", "h1"])


def test_checkpoint_on_a_subset_is_evaluated_on_its_columns(tiny_corpus, tmp_path):
    """The whole protocol on a subset checkpoint over the full corpus equals the protocol on a corpus
    that holds only those columns: the held-out traces and the pooled/scratch probes read the subset."""
    ckpt = write_tiny_checkpoint(tmp_path / "sub.ckpt", feature_names=SUBSET)
    narrow = write_narrowed_corpus(tmp_path / "narrow", SUBSET)
    args = dict(checkpoint=ckpt, shots=[4], episodes=2, pooled_steps=10, scratch_steps=5, finetune_steps=2,
                progress=False, methods=METHODS)
    on_full = run(EvaluateConfig(corpus=tiny_corpus, out=str(tmp_path / "a"), **args))
    on_narrow = run(EvaluateConfig(corpus=narrow, out=str(tmp_path / "b"), **args))
    assert _figures(on_full) == _figures(on_narrow)
    assert on_full["feature_names"] == SUBSET and on_full["feature_subsets"] == {"fam_c": SUBSET}
    assert "feature_subsets" not in on_narrow  # reads every column of its corpus: recorded as before
    # features: agreeing with the checkpoint is accepted, another subset refused
    again = run(EvaluateConfig(corpus=tiny_corpus, out=str(tmp_path / "c"), features=SUBSET, **args))
    assert _figures(again) == _figures(on_full)
    with pytest.raises(ValueError, match=r"(?s)other features than the checkpoint.*features   \(2\)"):
        run(EvaluateConfig(corpus=tiny_corpus, out=str(tmp_path / "d"), features=["f0", "f1"], **args))
    # a corpus that lacks a column of the checkpoint's subset
    other = write_narrowed_corpus(tmp_path / "other", ["f0", "f1", "probe_index"])
    with pytest.raises(CheckpointError, match=r"other features.*lacks \['logprob_mean'\]"):
        run(EvaluateConfig(corpus=other, out=str(tmp_path / "e"), **args))


def test_features_key_without_checkpoint(tiny_corpus, tmp_path):
    narrow = write_narrowed_corpus(tmp_path / "narrow", SUBSET)
    args = dict(families=["fam_c"], shots=[4], episodes=2, pooled_steps=10, scratch_steps=5, finetune_steps=2,
                progress=False, methods=["full", "pooled", "scratch", "oracle"])
    subset = run(EvaluateConfig(corpus=tiny_corpus, out=str(tmp_path / "a"), features=SUBSET, **args))
    plain = run(EvaluateConfig(corpus=narrow, out=str(tmp_path / "b"), **args))
    assert _figures(subset) == _figures(plain)
    assert json.loads((tmp_path / "a" / "results.json").read_text())["feature_names"] == SUBSET
    with pytest.raises(DataError, match=r"features: unknown feature names \['h0'\]"):
        run(EvaluateConfig(corpus=tiny_corpus, out=str(tmp_path / "c"), features=["h0"], **args))
