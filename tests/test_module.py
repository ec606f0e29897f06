"""MetaStoppingModule + TraceDataModule on the tiny corpus: fit, validate, checkpoints, determinism, errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer

from maml_stop.data.corpus import TraceCorpus
from maml_stop.data.batches import DataError
from maml_stop.data.datamodule import TraceDataModule
from maml_stop.data import store
from maml_stop.learn.module import CheckpointError, MetaStoppingModule, load_predictor, migrate_hyper_parameters
from maml_stop.learn.predictor import PredictorConfig
from maml_stop.data.episodes import SamplerError

FAMS = dict(val_families=["fam_b"], test_families=["fam_c"])


def make_dm(corpus: str, **kw) -> TraceDataModule:
    args = dict(k=4, q=8, meta_batch_size=2, steps_per_epoch=3, val_episodes=2, test_episodes=2, **FAMS)
    args.update(kw)
    return TraceDataModule(corpus, **args)


def make_model(dm: TraceDataModule, **kw) -> MetaStoppingModule:
    """Flat keyword overrides (``algorithm="metasgd"``) go to their config through the migration."""
    args = migrate_hyper_parameters({**dict(hidden=16, depth=1, inner_steps=2, inner_lr=0.3), **kw})
    return MetaStoppingModule(n_features=dm.n_features, feature_names=dm.feature_names, **args)


def make_trainer(tmp_path, **kw) -> Trainer:
    args = dict(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, default_root_dir=tmp_path, inference_mode=False,
                num_sanity_val_steps=0, accelerator="cpu", devices=1)
    args.update(kw)
    return Trainer(**args)


def fit_metrics(corpus, tmp_path, **model_kw) -> dict[str, float]:
    torch.manual_seed(0)
    dm = make_dm(corpus)
    trainer = make_trainer(tmp_path)
    trainer.fit(make_model(dm, **model_kw), datamodule=dm)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


@pytest.mark.parametrize("algorithm", ["maml", "anil", "metasgd"])
def test_fit_logs_losses(tiny_corpus, tmp_path, algorithm):
    m = fit_metrics(tiny_corpus, tmp_path, algorithm=algorithm)
    assert {"train/loss", "val/loss", "val/loss_unadapted", "val/loss_random_init"} <= set(m)
    assert all(np.isfinite(v) for v in m.values())


def test_two_runs_identical(tiny_corpus, tmp_path):
    assert fit_metrics(tiny_corpus, tmp_path / "a", dropout=0.1) == fit_metrics(tiny_corpus, tmp_path / "b", dropout=0.1)


def test_normalisation_from_training_families_only(tiny_corpus, tmp_path):
    dm = make_dm(tiny_corpus)
    corpus = TraceCorpus.load(tiny_corpus)
    feats = np.concatenate([t.features for t in corpus.traces("fam_a")])  # the only training family
    mean, std = dm.normalisation_stats()
    np.testing.assert_allclose(mean.numpy(), feats.mean(0), rtol=1e-5, atol=1e-6)
    model = make_model(dm)
    make_trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(model, datamodule=dm)
    torch.testing.assert_close(model.predictor.feature_mean, mean)


def test_checkpoint_roundtrip_and_load_predictor(tiny_corpus, tmp_path):
    dm = make_dm(tiny_corpus)
    model = make_model(dm, algorithm="metasgd")
    trainer = make_trainer(tmp_path)
    trainer.fit(model, datamodule=dm)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    predictor, adapter, meta = load_predictor(path)
    assert meta["feature_names"] == dm.feature_names and meta["schema_version"] == 1
    assert adapter.config() == model.adapter.config() and not predictor.training
    assert meta["data"]["val_families"] == ["fam_b"] and meta["data"]["test_families"] == ["fam_c"]
    batch = dm.collate(dm.corpus.traces("fam_b")[:5])
    model.eval()
    torch.testing.assert_close(predictor(batch), model.predictor(batch))
    torch.testing.assert_close(predictor.feature_std, model.predictor.feature_std)
    with torch.no_grad():
        torch.testing.assert_close(adapter.adapt(batch)(batch), model.adapter.adapt(batch)(batch))
    # validate reloads it and reproduces the metrics
    first = make_trainer(tmp_path).validate(model, datamodule=dm)
    again = make_trainer(tmp_path).validate(make_model(dm, algorithm="metasgd"), datamodule=make_dm(tiny_corpus), ckpt_path=path)
    assert first == again


def test_checkpoint_against_other_feature_names(tiny_corpus, tmp_path):
    dm = make_dm(tiny_corpus)
    model = make_model(dm)
    trainer = make_trainer(tmp_path, max_steps=1, limit_val_batches=0)
    trainer.fit(model, datamodule=dm)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    other = tmp_path / "renamed"
    shutil.copytree(tiny_corpus, other)
    meta = json.loads((other / store.META_FILE).read_text())
    meta["feature_names"] = [f"g{i}" for i in range(len(meta["feature_names"]))]
    (other / store.META_FILE).write_text(json.dumps(meta))
    dm2 = make_dm(str(other))
    with pytest.raises(CheckpointError, match=r"(?s)checkpoint \(8\): \['f0'.*corpus     \(8\): \['g0'"):
        make_trainer(tmp_path).validate(make_model(dm2), datamodule=dm2, ckpt_path=tmp_path / "m.ckpt")


def test_inference_mode_is_refused(tiny_corpus, tmp_path):
    dm = make_dm(tiny_corpus)
    with pytest.raises(RuntimeError, match="inference_mode=False"):
        make_trainer(tmp_path, inference_mode=True).validate(make_model(dm), datamodule=dm)


def test_data_errors(tiny_corpus, tmp_path):
    with pytest.raises(store.CorpusError, match="no trace corpus at .*meta.json is missing"):
        TraceDataModule(str(tmp_path / "nowhere")).n_features
    with pytest.raises(ValueError, match="k must be >= 1"):
        make_dm(tiny_corpus, k=0)
    with pytest.raises(SamplerError, match=r"family 'fam_a' has 60 traces.*K=40"):
        make_dm(tiny_corpus, k=40, q=30).setup("fit")
    with pytest.raises(SamplerError, match=r"unknown val families \['nope'\]"):
        make_dm(tiny_corpus, val_families=["nope"]).setup("fit")
    dm = make_dm(tiny_corpus)
    wrong = MetaStoppingModule(n_features=5, predictor=PredictorConfig(hidden=8, depth=1))
    with pytest.raises(DataError, match="corpus has 8 features"):
        make_trainer(tmp_path).fit(wrong, datamodule=dm)


def test_nan_features_rejected(tmp_path):
    from conftest import make_trace_rows

    rows = make_trace_rows("fam_a", 10, seed=0)
    rows[3]["features"][1][2] = float("nan")
    store.write_meta(tmp_path, {"feature_names": [f"f{i}" for i in range(8)]})
    store.write_shard(tmp_path, "fam_a", "all", rows)
    with pytest.raises(ValueError, match=r"shard .*fam_a/all-00000.parquet, trace fam_a/00003#0: non-finite"):
        TraceDataModule(str(tmp_path), k=2, q=2).setup("fit")


def test_meta_training_beats_random_init(tiny_corpus, tmp_path):
    """On the tiny corpus, the meta-learned initialisation adapts better than the random one."""
    dm = make_dm(tiny_corpus, k=8, q=16, meta_batch_size=4, steps_per_epoch=50, val_episodes=10)
    model = make_model(dm, hidden=32, inner_steps=3, inner_lr=0.1)
    trainer = make_trainer(tmp_path, max_steps=100)
    trainer.fit(model, datamodule=dm)
    m = trainer.callback_metrics
    assert m["val/loss"] < m["val/loss_random_init"]


def test_cost_loss_needs_cost_weights(tiny_corpus, tmp_path):
    dm = make_dm(tiny_corpus)
    with pytest.raises(ValueError, match="set data.weighting: cost"):
        make_trainer(tmp_path).fit(make_model(dm, loss="cost"), datamodule=dm)
    dm = make_dm(tiny_corpus, weighting="cost")
    make_trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(make_model(dm, loss="cost"), datamodule=dm)


def test_resumed_fit_draws_the_same_episodes(tiny_corpus, tmp_path):
    """Two epochs in one go, and one epoch then a resume from its checkpoint, end with equal weights:
    the checkpoint carries the training sampler's RNG (without it the resumed epoch repeats epoch 1's
    episodes)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def trainer(root, **kw):
        ckpt = ModelCheckpoint(dirpath=root, save_last=True, save_top_k=0)
        return make_trainer(root, max_steps=-1, limit_val_batches=0, enable_checkpointing=True,
                            callbacks=[ckpt], **kw)

    torch.manual_seed(0)
    dm = make_dm(tiny_corpus)
    whole = make_model(dm)
    trainer(tmp_path / "whole", max_epochs=2).fit(whole, datamodule=dm)

    torch.manual_seed(0)
    dm1 = make_dm(tiny_corpus)
    first = make_model(dm1)
    trainer(tmp_path / "first", max_epochs=1).fit(first, datamodule=dm1)
    state = torch.load(tmp_path / "first" / "last.ckpt", weights_only=True)["TraceDataModule"]
    assert set(state) == {"train_sampler_rng"}

    torch.manual_seed(0)
    dm2 = make_dm(tiny_corpus)
    resumed = make_model(dm2)
    trainer(tmp_path / "resumed", max_epochs=2).fit(resumed, datamodule=dm2, ckpt_path=tmp_path / "first" / "last.ckpt")
    for (name, a), b in zip(whole.adapter.state_dict().items(), resumed.adapter.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    # the second epoch moved the weights, so the equality above says something
    assert not torch.equal(next(first.adapter.parameters()), next(whole.adapter.parameters()))


def test_one_road_policy_adapt_command_and_module_give_the_same_weights(tiny_corpus, tmp_path):
    """The learned policy, ``maml-stop adapt`` and the module's episode path all adapt through
    ``InnerLoopAdapter.fit_support``: on the same support set they give the same adapted weights."""
    from maml_stop.data.corpus import TraceCorpus
    from maml_stop.data.datamodule import EpisodeBatch
    from maml_stop.decide.policies import ProbePolicy
    from maml_stop.live.adapt import adapt
    from trace_helpers import write_tiny_checkpoint

    ckpt = write_tiny_checkpoint(tmp_path / "tiny.ckpt")
    adapted = adapt(ckpt, "fam_c", k=8, corpus=tiny_corpus, threshold_method="fixed")  # maml-stop adapt
    traces = TraceCorpus.load(tiny_corpus).traces("fam_c")
    by_id = {t.trace_id: t for t in traces}
    support = [by_id[i] for i in adapted.meta["support_trace_ids"]]  # in the order adapt drew them
    query = [t for t in traces if t.trace_id not in set(adapted.meta["support_trace_ids"])][:8]
    _, adapter, meta = load_predictor(ckpt)
    steps = meta["hyper_parameters"].get("eval_inner_steps")
    with torch.no_grad():
        road = {k: v.detach().clone() for k, v in adapter.fit_support(support, steps=steps).state_dict().items()}
    policy = ProbePolicy(adapter=adapter, adapt_steps=steps, name="maml").fit(support)  # the evaluation's probe
    module = MetaStoppingModule(**meta["hyper_parameters"])  # meta-training's episode path
    module.load_state_dict(torch.load(ckpt, weights_only=True)["state_dict"])
    dm = make_dm(tiny_corpus)
    episode = EpisodeBatch("fam_c", dm.collate(support), dm.collate(query))
    with torch.no_grad():
        via_module = module.adapt_episode(episode, "val").state_dict()
        batched = dict(module.adapter.adapt_episodes([episode.support], module.inner_steps_at("val")).named_parameters())
    for name, want in road.items():
        assert torch.equal(policy.model.state_dict()[name], want), name
        assert torch.equal(adapted.predictor.state_dict()[name], want), name
        assert torch.equal(via_module[name], want), name
        if name in batched:  # the episode-batched fast path: equal up to float rounding
            torch.testing.assert_close(batched[name][0], want, rtol=1e-5, atol=1e-6)


# ---- feature subsets (issue 10): data.features narrows every trace; the checkpoint records the subset -----
SUBSET = ["logprob_mean", "f1", "probe_index"]


def test_feature_subset_selects_columns_and_is_recorded(tiny_corpus, tmp_path):
    dm = make_dm(tiny_corpus, features=SUBSET)
    assert dm.feature_names == SUBSET and dm.n_features == 3 and len(dm.corpus_feature_names) == 8
    dm.setup("fit")
    full = TraceCorpus.load(tiny_corpus)
    cols = [full.feature_names.index(n) for n in SUBSET]
    for mine, theirs in zip(dm.corpus.traces("fam_a"), full.traces("fam_a")):
        np.testing.assert_array_equal(mine.features, theirs.features[:, cols])
    mean, _ = dm.normalisation_stats()
    feats = np.concatenate([t.features for t in full.traces("fam_a")])[:, cols]
    np.testing.assert_allclose(mean.numpy(), feats.mean(0), rtol=1e-5, atol=1e-6)
    model = make_model(dm)
    trainer = make_trainer(tmp_path)
    trainer.fit(model, datamodule=dm)
    trainer.save_checkpoint(tmp_path / "sub.ckpt")
    predictor, _, meta = load_predictor(tmp_path / "sub.ckpt")
    assert meta["feature_names"] == SUBSET and predictor.n_features == 3 and meta["data"]["features"] == SUBSET
    # the same checkpoint against the data without the subset: a clear error naming both lists
    full_dm = make_dm(tiny_corpus)
    with pytest.raises(CheckpointError, match=r"(?s)checkpoint \(3\): \['logprob_mean'.*corpus     \(8\).*data.features"):
        make_trainer(tmp_path).validate(make_model(full_dm), datamodule=full_dm, ckpt_path=tmp_path / "sub.ckpt")


def test_feature_subset_errors(tiny_corpus):
    with pytest.raises(DataError, match=r"unknown feature names \['h7'\]; the corpus has 8 features: \['f0'"):
        make_dm(tiny_corpus, features=["f0", "h7"]).feature_names
    with pytest.raises(DataError, match="more than once"):
        make_dm(tiny_corpus, features=["f0", "f0"]).feature_names
    with pytest.raises(DataError, match="unknown shorthand 'cheap'; give one of all, free, paid"):
        make_dm(tiny_corpus, features="cheap").feature_names
    # 'f0' has no cost class (the tiny corpus records no feature_costs): the shorthand cannot be resolved
    with pytest.raises(DataError, match="cost class of every feature.*'f0'"):
        make_dm(tiny_corpus, features="free").feature_names
    assert make_dm(tiny_corpus, features="all").feature_names == make_dm(tiny_corpus).feature_names


def test_old_flat_checkpoint_loads_through_the_migration(tmp_path):
    """A checkpoint of before the nested configs (flat ``hidden``, ``inner_lr``, ..., ``backend`` in its
    hyper-parameters, as the 0.5B main run's best.ckpt has) loads: ``load_predictor`` gives the nested
    hyper-parameters, and the module they build takes the checkpoint's weights and predicts alike."""
    from trace_helpers import write_tiny_checkpoint

    path = tmp_path / "old.ckpt"
    write_tiny_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    hp = {k: v for k, v in ckpt["hyper_parameters"].items() if k not in ("predictor", "adapter")}
    flat = {"hidden": 8, "depth": 1, "kind": "mlp", "dropout": 0.0, "algorithm": "maml", "inner_lr": 0.3,
            "inner_steps": 2, "first_order": True, "loss": "balanced", "backend": "learn2learn"}
    ckpt["hyper_parameters"] = {**hp, **flat}  # the old layout, key for key
    torch.save(ckpt, path)
    predictor, adapter, meta = load_predictor(path)
    assert meta["hyper_parameters"]["predictor"] == {"hidden": 8, "depth": 1, "kind": "mlp", "dropout": 0.0}
    assert meta["hyper_parameters"]["adapter"]["inner_steps"] == 2 and "hidden" not in meta["hyper_parameters"]
    module = MetaStoppingModule(**meta["hyper_parameters"])
    module.load_state_dict(ckpt["state_dict"])
    assert module.predictor_config == predictor.config() and module.adapter_config == adapter.config()
    assert migrate_hyper_parameters(meta["hyper_parameters"]) == meta["hyper_parameters"]  # new layout: as it is
    with pytest.raises(ValueError, match="model.predictor.n_features=5 but the data has 8"):
        MetaStoppingModule(n_features=8, predictor=PredictorConfig(n_features=5))
