"""``maml-stop adapt``: adapt on K traces, choose the threshold on them, save, load, refuse bad input."""

from __future__ import annotations

import pytest
import torch

from maml_stop.live.adapt import AdaptError, adapt, load_adapted, main, save_adapted
from maml_stop.data.corpus import TraceCorpus
from maml_stop.data.batches import collate_traces
from maml_stop.data import store
from maml_stop.decide.policies import DEFAULT_TAUS, ProbePolicy
from maml_stop.decide.registry import selector_from_state
from maml_stop.decide.thresholds import EMTargetThreshold
from trace_helpers import write_tiny_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("adapt") / "tiny.ckpt")


def test_main_saves_a_loadable_adapted_predictor(tiny_corpus, ckpt, tmp_path, capsys):
    out = tmp_path / "fam_c.pt"
    assert main(["--checkpoint", ckpt, "--corpus", tiny_corpus, "--family", "fam_c", "--k", "8",
                 "--threshold_method", "em_target", "--out", str(out)]) == 0
    assert "held-out (52 traces)" in capsys.readouterr().out
    corpus = TraceCorpus.load(tiny_corpus)
    adapted = load_adapted(out, feature_names=corpus.feature_names)
    assert adapted.tau is None or adapted.tau in DEFAULT_TAUS
    assert adapted.meta["family"] == "fam_c" and len(adapted.meta["support_trace_ids"]) == 8

    # the saved predictor is the adapter's adaptation of the same K traces, with the same threshold
    from maml_stop.learn.module import load_predictor

    _, adapter, _ = load_predictor(ckpt)
    support = [t for t in corpus.traces("fam_c") if t.trace_id in set(adapted.meta["support_trace_ids"])]
    policy = ProbePolicy(adapter=adapter, selector=EMTargetThreshold(0.01)).fit(support)
    batch = collate_traces(corpus.traces("fam_c"))
    with torch.no_grad():
        want = torch.sigmoid(policy.model(batch))
    torch.testing.assert_close(adapted.predict_proba(batch), want)
    assert adapted.tau == policy.param
    # the artifact records the rule; rebuilt from its state, it makes the same choice on the same support
    recorded = selector_from_state(adapted.meta["selector"])
    assert recorded.state_dict() == {"name": "em_target", "delta": 0.01}
    assert policy.choose(recorded) == adapted.tau


def test_trace_file_finds_its_corpus_meta(tiny_corpus, ckpt, tmp_path):
    shard = store.shard_paths(tiny_corpus, "fam_b")[0]
    adapted = adapt(ckpt, "fam_b", k=4, traces=str(shard), threshold_method="fixed", tau=0.7)
    assert adapted.tau == 0.7
    path = save_adapted(adapted, tmp_path / "b.pt")
    assert load_adapted(path).feature_names == TraceCorpus.load(tiny_corpus).feature_names


@pytest.mark.parametrize("tau", [0.7, None])
def test_an_artifact_written_before_the_rename_loads(tiny_corpus, ckpt, tmp_path, tau):
    """Format maml_stop.adapted/1 stored tau as "threshold" (issue 31): it loads, migrated, and saves anew."""
    adapted = adapt(ckpt, "fam_b", k=4, corpus=tiny_corpus, threshold_method="fixed", tau=0.7)
    adapted.tau = tau
    blob = torch.load(save_adapted(adapted, tmp_path / "new.pt"), weights_only=True)
    assert blob["format"] == "maml_stop.adapted/2" and blob["tau"] == tau and "threshold" not in blob
    old = {**{k: v for k, v in blob.items() if k != "tau"}, "format": "maml_stop.adapted/1", "threshold": tau}
    torch.save(old, tmp_path / "old.pt")
    again = load_adapted(tmp_path / "old.pt", feature_names=adapted.feature_names)
    assert again.tau == tau and again.meta == adapted.meta and again.recipe == adapted.recipe
    batch = collate_traces(TraceCorpus.load(tiny_corpus).traces("fam_b"))
    torch.testing.assert_close(again.predict_proba(batch), adapted.predict_proba(batch))
    resaved = torch.load(save_adapted(again, tmp_path / "resaved.pt"), weights_only=True)
    assert resaved["format"] == "maml_stop.adapted/2" and resaved["tau"] == tau and "threshold" not in resaved
    with pytest.raises(AdaptError, match="format maml_stop.adapted/2"):  # an unknown format is still refused
        torch.save({**old, "format": "maml_stop.adapted/0"}, tmp_path / "older.pt")
        load_adapted(tmp_path / "older.pt")


def test_ltt_with_few_shots_never_stops(tiny_corpus, ckpt):
    adapted = adapt(ckpt, "fam_c", k=4, corpus=tiny_corpus, threshold_method="ltt", delta=0.01)
    assert adapted.tau is None and not adapted.should_stop(0.999)
    assert adapted.live_tau == float("inf")  # LiveStopping's "never stop"


def test_empty_support_is_refused(tiny_corpus, ckpt):
    with pytest.raises(AdaptError, match="empty support"):
        adapt(ckpt, "fam_c", k=0, corpus=tiny_corpus)
    with pytest.raises(store.CorpusError, match="families in the corpus"):
        adapt(ckpt, "fam_z", k=4, corpus=tiny_corpus)
    with pytest.raises(AdaptError, match="60 labelled questions; K=61"):
        adapt(ckpt, "fam_c", k=61, corpus=tiny_corpus)


def test_feature_name_mismatch_is_refused(tiny_corpus, tmp_path, capsys):
    other = write_tiny_checkpoint(tmp_path / "other.ckpt", feature_names=[f"g{i}" for i in range(8)])
    with pytest.raises(AdaptError, match="feature-name mismatch.*missing \\['g0'"):
        adapt(other, "fam_c", k=4, corpus=tiny_corpus)
    assert main(["--checkpoint", other, "--corpus", tiny_corpus, "--family", "fam_c", "--k", "4",
                 "--out", str(tmp_path / "x.pt")]) == 2
    assert "feature-name mismatch" in capsys.readouterr().err


def test_load_checks_names_and_format(tiny_corpus, ckpt, tmp_path):
    adapted = adapt(ckpt, "fam_c", k=4, corpus=tiny_corpus, threshold_method="fixed")
    path = save_adapted(adapted, tmp_path / "c.pt")
    names = list(adapted.feature_names)
    with pytest.raises(AdaptError, match="another order"):
        load_adapted(path, feature_names=names[::-1])
    with pytest.raises(AdaptError, match="missing \\['probe_index'\\]"):
        load_adapted(path, feature_names=names[:-1])
    torch.save({"hello": 1}, tmp_path / "bad.pt")
    with pytest.raises(AdaptError, match="not an adapted predictor"):
        load_adapted(tmp_path / "bad.pt")


def test_bad_threshold_method(tiny_corpus, ckpt):
    with pytest.raises(AdaptError, match="valid methods: fixed, em_target, ltt"):
        adapt(ckpt, "fam_c", k=4, corpus=tiny_corpus, threshold_method="best")
    with pytest.raises(AdaptError, match="exactly one of --corpus"):
        adapt(ckpt, "fam_c", k=4)


def test_subset_checkpoint_adapts_on_its_columns(tiny_corpus, tmp_path):
    """A checkpoint trained on a feature subset adapts on those columns of the traces; the artifact
    records the subset and what the synthetic corpus's meta.json offers of the probe recipe (issue 10)."""
    from maml_stop.data.datamodule import select_features
    from maml_stop.live.artifact import missing_recipe_fields

    subset = ["probe_index", "f0", "logprob_mean"]
    ckpt = write_tiny_checkpoint(tmp_path / "sub.ckpt", feature_names=subset)
    adapted = adapt(ckpt, "fam_c", k=8, corpus=tiny_corpus, threshold_method="fixed", tau=0.6)
    path = save_adapted(adapted, tmp_path / "sub.pt")
    loaded = load_adapted(path, feature_names=subset)
    narrow = select_features(TraceCorpus.load(tiny_corpus), subset)
    batch = collate_traces(narrow.traces("fam_c"))
    torch.testing.assert_close(loaded.predict_proba(batch), adapted.predict_proba(batch))
    assert loaded.recipe["extraction"] == {"family": "fam_c", "answer_kind": None}
    assert loaded.recipe["mode"] == "every"  # f0 has no cost class: counted as paid
    assert missing_recipe_fields(loaded.recipe) == ["schedule", "answer_trigger", "answer_max_tokens",
                                                     "max_new_tokens", "featurizer"]
