"""One home per rule in the evaluation (issue 14): the EM/token callback evaluates on exactly the
datamodule's validation episodes; the datamodule's fixed episodes are the seeded ones they always were;
the fold split of ``maml-stop evaluate --train_config`` is FamilySplit's; calibration bins come from the
metric's function; the method registry names every method once."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from maml_stop.data.datamodule import TraceDataModule
from maml_stop.data.episodes import EpisodeSampler, FamilySplit


def _ids(episodes):
    return [(e.family, [t.trace_id for t in e.support], [t.trace_id for t in e.query]) for e in episodes]


def _dm(corpus: str, **kw) -> TraceDataModule:
    args = dict(corpus=corpus, val_families=["fam_b"], test_families=["fam_c"], k=4, q=8, meta_batch_size=2,
                steps_per_epoch=2, val_episodes=3, test_episodes=2, seed=5)
    return TraceDataModule(**{**args, **kw})


def test_datamodule_eval_episodes_are_the_seeded_fixed_episodes(tiny_corpus):
    """val: seed + 1, test: seed + 2, K = k, query = eval_q (what checkpoints were validated on)."""
    dm = _dm(tiny_corpus)
    dm.setup("fit")
    by_family = {f: dm.corpus.traces(f) for f in dm.corpus.families}
    sampler = EpisodeSampler(by_family, 4, None, families=["fam_b", "fam_c"])
    assert _ids(dm.eval_episodes("val")) == _ids(sampler.fixed_episodes("fam_b", 3, seed=6))
    assert _ids(dm.eval_episodes("test")) == _ids(sampler.fixed_episodes("fam_c", 2, seed=7))
    # the loaders collate exactly these episodes
    val = [ep for batch in dm.val_dataloader() for ep in batch]
    want = [dm.collate(e.query) for e in dm.eval_episodes("val")]
    assert len(val) == 3 and all(torch.equal(v.query.features, w.features) for v, w in zip(val, want))
    with pytest.raises(ValueError, match="valid stages: val, test"):
        dm.eval_episodes("train")


def test_callback_evaluates_the_datamodules_validation_episodes(tiny_corpus, tmp_path):
    from lightning.pytorch import Trainer

    from maml_stop.evaluate.callbacks import EMTokenEvaluation
    from maml_stop.learn.adapter import AdapterConfig
    from maml_stop.learn.module import MetaStoppingModule
    from maml_stop.learn.predictor import PredictorConfig

    dm = _dm(tiny_corpus)
    model = MetaStoppingModule(n_features=dm.n_features, feature_names=dm.feature_names,
                               predictor=PredictorConfig(hidden=8, depth=1),
                               adapter=AdapterConfig(inner_steps=1, first_order=True), compare_random_init=False)
    callback = EMTokenEvaluation(taus=[0.9, 0.5, 0.1], save_plot=False)
    seen = []
    evaluate = callback.evaluate
    callback.evaluate = lambda adapter, episodes, steps=None: (seen.append(list(episodes)), evaluate(adapter, episodes, steps))[1]
    trainer = Trainer(max_steps=2, inference_mode=False, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      default_root_dir=tmp_path, callbacks=[callback])
    trainer.fit(model, datamodule=dm)
    assert seen and _ids(seen[0]) == _ids(dm.eval_episodes("val"))
    assert _ids(EMTokenEvaluation.episodes(trainer)) == _ids(dm.eval_episodes("val"))


def test_fold_split_is_familysplits_rule():
    fams = ["a", "b", "c", "d"]
    assert FamilySplit.holding_out(fams, "b", val=["d"]) == FamilySplit(train=["a", "c"], val=["d"], test=["b"])
    # the validation family held out: the next family (cyclically), as FamilySplit.resolve(fold=...)
    assert FamilySplit.holding_out(fams, "d", val=["d"]).val == ["a"]
    assert FamilySplit.holding_out(fams, "b").val == ["c"]
    assert FamilySplit.holding_out(fams, "b", n_val=2).val == ["c", "d"]
    assert FamilySplit.holding_out(fams, "d") == FamilySplit.resolve(fams, fold=3)
    with pytest.raises(ValueError, match="families in the corpus"):
        FamilySplit.holding_out(fams, "x")


def test_fold_data_settings_follow_repeated_configs(tmp_path):
    from maml_stop.evaluate.folds import data_settings

    (tmp_path / "a.yaml").write_text("data: {val_families: [x], k: 4}\n")
    (tmp_path / "b.yaml").write_text("trainer: {max_steps: 2}\ndata: {val_families: [y]}\n")
    assert data_settings([tmp_path / "a.yaml", tmp_path / "b.yaml"]) == {"val_families": ["y"], "k": 4}


def test_calibration_section_is_the_metrics_calibration_bins():
    from maml_stop.evaluate import metrics as M
    from maml_stop.evaluate.protocol import calibration_section

    rng = np.random.default_rng(0)
    pairs = [(torch.from_numpy(rng.random(n)), torch.from_numpy((rng.random(n) < 0.5).astype(np.float64))) for n in (7, 12)]
    section = calibration_section({"maml": pairs, "scratch": []}, n_bins=5)
    assert set(section) == {"maml"}
    probs, labels = torch.cat([p for p, _ in pairs]), torch.cat([y for _, y in pairs])
    bins = M.calibration_bins(probs, labels, 5)
    assert section["maml"]["count"] == bins["count"].tolist()
    np.testing.assert_allclose(section["maml"]["confidence"], bins["confidence"].numpy())
    assert section["maml"]["ece"] == pytest.approx(float(M.ExpectedCalibrationError(5)(probs, labels)))


def test_method_registry():
    from maml_stop.evaluate.config import EvaluateConfig
    from maml_stop.evaluate.methods import METHODS, build_policies

    from maml_stop.evaluate.config import DEFAULT_METHODS

    old = ("full", "first_probe", "budget", "consistency", "confidence", "pooled", "finetuned",
           "scratch", "maml", "oracle", "oracle_equal_em")
    assert METHODS[: len(old)] == old and tuple(DEFAULT_METHODS) == old  # new methods come after, only when listed
    cfg = EvaluateConfig(corpus="unused")
    policies = build_policies(cfg, ["oracle", "full"], None, None, {"n_features": 8})
    assert list(policies) == ["oracle", "full"]  # the order asked
    with pytest.raises(ValueError, match="valid methods: full, first_probe"):
        build_policies(cfg, ["magic"], None, None, {"n_features": 8})
    with pytest.raises(ValueError, match="needs a checkpoint"):
        build_policies(cfg, ["maml"], None, None, {"n_features": 8})


def test_episode_figures_take_only_the_outcomes():
    """Issue 14: ``_figures`` had a ``delta`` parameter it never used."""
    import inspect

    from maml_stop.evaluate import protocol

    assert list(inspect.signature(protocol._figures).parameters) == ["out"]


def test_cost_rule_reads_its_prices_from_the_config():
    """Issue 12: the evaluation passes token_price and wrong_answer_cost to the cost threshold rule."""
    from maml_stop.evaluate import protocol
    from maml_stop.evaluate.config import EvaluateConfig

    cfg = EvaluateConfig(corpus="unused", threshold_methods=["em_target", "cost"], token_price=0.5, wrong_answer_cost=7.0)
    rule = protocol.selectors_for(cfg)["cost"]
    assert vars(rule).get("token_price") == 0.5 and vars(rule).get("wrong_answer_cost") == 7.0
