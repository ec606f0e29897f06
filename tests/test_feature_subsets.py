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
    args = dict(checkpoint=ckpt, k=[4], episodes=2, pooled_steps=10, scratch_steps=5, finetune_steps=2,
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
    args = dict(families=["fam_c"], k=[4], episodes=2, pooled_steps=10, scratch_steps=5, finetune_steps=2,
                progress=False, methods=["full", "pooled", "scratch", "oracle"])
    subset = run(EvaluateConfig(corpus=tiny_corpus, out=str(tmp_path / "a"), features=SUBSET, **args))
    plain = run(EvaluateConfig(corpus=narrow, out=str(tmp_path / "b"), **args))
    assert _figures(subset) == _figures(plain)
    assert json.loads((tmp_path / "a" / "results.json").read_text())["feature_names"] == SUBSET
    with pytest.raises(DataError, match=r"features: unknown feature names \['h0'\]"):
        run(EvaluateConfig(corpus=tiny_corpus, out=str(tmp_path / "c"), features=["h0"], **args))


# ---- the adapted artifact carries the probe recipe; LiveStopping.from_adapted rebuilds live stopping -----
LIVE_PROMPTS = ["Think step by step. First add 12 + 30, then subtract 4.", "Question: What is 3 + 4?\nAnswer:",
                "Calculate 7 * 6 please now."]
MAX_NEW = 20
FAMILY = "basic_arithmetic"


@pytest.fixture(scope="module")
def harvested(tmp_path_factory):
    """A corpus harvested with the tiny local model (mid-layer summary, start and cap probes), and the model."""
    import torch

    import tiny_lm
    from maml_stop.harvest.cli import harvest
    from maml_stop.harvest.model import load_model

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("recipe")
    model_dir = tiny_lm.save_tiny(root / "tiny_lm")
    harvest(out=str(root / "corpus"), model=model_dir, families=[FAMILY], n_per_family=8, dtype="float32",
            batch_size=4, shard_size=8, max_new_tokens=MAX_NEW, every_n=4, boundary=True, align=2, max_probes=10,
            proj_dim=8, mid_layer=1, probe_at_start=True, probe_at_cap=True, hash_weights=False)
    model, tok = load_model(model_dir, dtype="float32")
    return str(root / "corpus"), model, tok


def _artifact(harvested, tmp_path, names, name="a.pt"):
    """An artifact adapted on the harvested corpus from a checkpoint on ``names``, with a threshold at the
    median probability of the corpus's probes (so that some rows stop, some do not)."""
    import torch

    from maml_stop.data.batches import collate_traces
    from maml_stop.data.corpus import TraceCorpus
    from maml_stop.data.datamodule import select_features
    from maml_stop.live.adapt import adapt, save_adapted

    corpus = harvested[0]
    ckpt = write_tiny_checkpoint(tmp_path / f"{name}.ckpt", feature_names=names)
    adapted = adapt(ckpt, FAMILY, k=4, corpus=corpus, threshold_method="fixed", tau=0.5)
    traces = select_features(TraceCorpus.load(corpus), names).traces(FAMILY)
    probs = adapted.predict_proba(collate_traces(traces))
    adapted.tau = float(torch.quantile(probs, 0.5))
    return save_adapted(adapted, tmp_path / name), adapted


def _generate(model, tok, criteria):
    from transformers import StoppingCriteriaList

    tok.padding_side = "left"
    enc = tok(LIVE_PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)
    try:
        return model.generate(**enc, max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=tok.pad_token_id,
                              stopping_criteria=StoppingCriteriaList([criteria]))
    finally:
        criteria.remove_hooks()


def _by_hand(harvested, adapted, mode):
    from maml_stop.live.stopping import LiveStopping
    from maml_stop.probe.features import ProbeFeaturizer
    from maml_stop.probe.schedule import ProbeSchedule
    from tasks import get_family

    _, model, tok = harvested
    featurizer = ProbeFeaturizer(model.config.hidden_size, proj_dim=8, mid_layer=1)
    schedule = ProbeSchedule(every_n=4, boundary=True, align=2, max_probes=10, at_start=True, at_cap=True)
    return LiveStopping(model, tok, adapted.predictor, adapted.live_tau, None, adapted.feature_names, featurizer,
                        schedule, answer_trigger="\nFinal answer:", answer_max_tokens=12, family=get_family(FAMILY),
                        mode=mode, max_new_tokens=MAX_NEW)


def test_artifact_records_the_recipe_and_the_subset(harvested, tmp_path):
    from maml_stop.data import store
    from maml_stop.live.artifact import load_adapted

    corpus, model, _ = harvested
    meta = store.read_meta(corpus)
    names = [n for n in meta["feature_names"] if n != "n_distinct"]
    path, _ = _artifact(harvested, tmp_path, names)
    loaded = load_adapted(path)
    assert loaded.feature_names == names and loaded.predictor.n_features == len(names)
    r = loaded.recipe
    assert r["schedule"] == meta["schedule"] and r["answer_trigger"] == meta["prompt"]["answer_trigger"]
    assert (r["answer_max_tokens"], r["max_new_tokens"]) == (12, MAX_NEW)
    assert r["featurizer"] == {"hidden_size": model.config.hidden_size, "proj_dim": 8, "proj_seed": 0,
                               "summary": "mean", "mid_layer": 1}
    assert r["extraction"] == {"family": FAMILY, "answer_kind": "number"} and r["mode"] == "every"


def test_from_adapted_reproduces_the_stops_of_a_hand_built_criterion(harvested, tmp_path):
    from maml_stop.live.stopping import LiveStopping

    from maml_stop.data import store
    from maml_stop.live.artifact import save_adapted

    _, model, tok = harvested
    names = store.read_meta(harvested[0])["feature_names"]
    path, adapted = _artifact(harvested, tmp_path, names)
    # a threshold between the two highest per-row maxima of a never-stopping run: one row stops, two do not
    adapted.tau = None
    never = LiveStopping.from_adapted(save_adapted(adapted, tmp_path / "never.pt"), model, tok)
    _generate(model, tok, never)
    assert never.stopped_at == [None] * len(LIVE_PROMPTS)
    best = sorted({max(p for p in row if p is not None) for row in never.probabilities}, reverse=True)
    adapted.tau = (best[0] + best[1]) / 2
    path = save_adapted(adapted, path)
    built = LiveStopping.from_adapted(path, model, tok)
    assert built.mode == "every" and built.max_new_tokens == MAX_NEW and built.tau == adapted.tau
    out = _generate(model, tok, built)
    hand = _by_hand(harvested, adapted, "every")
    want = _generate(model, tok, hand)
    assert built.stopped_at == hand.stopped_at and built.answers == hand.answers
    assert built.reasons == hand.reasons and built.probabilities == hand.probabilities
    assert np.array_equal(out.numpy(), want.numpy())
    assert any(s is not None for s in built.stopped_at) and any(s is None for s in built.stopped_at), built.stopped_at


def test_free_feature_artifact_runs_in_free_mode(harvested, tmp_path):
    from maml_stop.data import store
    from maml_stop.live.stopping import LiveStopping
    from maml_stop.probe.features import feature_cost

    _, model, tok = harvested
    free = [n for n in store.read_meta(harvested[0])["feature_names"] if feature_cost(n) == "free"]
    path, adapted = _artifact(harvested, tmp_path, free, "free.pt")
    assert adapted.recipe["mode"] == "free"
    built = LiveStopping.from_adapted(path, model, tok)
    assert built.mode == "free"
    _generate(model, tok, built)
    hand = _by_hand(harvested, adapted, "free")
    _generate(model, tok, hand)
    assert built.stopped_at == hand.stopped_at and built.forced == hand.forced and built.answers == hand.answers
    # free mode forces an answer only where a row stops, or at the cap
    for r in range(len(LIVE_PROMPTS)):
        paid = [i for i, f in enumerate(built.forced[r]) if f]
        stops = [len(built.forced[r]) - 1] if built.stopped_at[r] is not None or built.reasons[r][-1] == "cap" else []
        assert paid == stops, (r, built.forced[r], built.reasons[r])


def test_from_adapted_refuses_what_does_not_fit(harvested, tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from maml_stop.data import store
    from maml_stop.live.artifact import AdaptError, load_adapted, save_adapted
    from maml_stop.live.stopping import LiveStopping

    _, model, tok = harvested
    names = store.read_meta(harvested[0])["feature_names"]
    path, _ = _artifact(harvested, tmp_path, names)
    # a model of another hidden size
    torch.manual_seed(0)
    other = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1)).eval()
    with pytest.raises(AdaptError, match="the model has hidden size 16.*hidden size 32"):
        LiveStopping.from_adapted(path, other, tok)
    # a feature subset the recipe's featurizer does not make (here: the mid-layer summary m0..)
    adapted = load_adapted(path)
    adapted.recipe["featurizer"]["mid_layer"] = None
    bad = save_adapted(adapted, tmp_path / "bad.pt")
    with pytest.raises(AdaptError, match=r"feature subset of .* does not fit its recipe: \['m0', 'm1'"):
        LiveStopping.from_adapted(bad, model, tok)
    # an artifact written before recipes: loads, but from_adapted names what is missing
    adapted.recipe = None
    old = save_adapted(adapted, tmp_path / "old.pt")
    assert load_adapted(old).recipe is None
    with pytest.raises(AdaptError, match=r"no complete probe recipe: missing \['schedule', 'answer_trigger'"):
        LiveStopping.from_adapted(old, model, tok)
