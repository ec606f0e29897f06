"""The meta-learning study of issue 11: grouped folds, the zero-step checkpoint, the study's criterion and
report (the study run by maml-stop evaluate with grouped folds: tests/test_grouped.py).

The paired bootstrap the study reports is :func:`maml_stop.evaluate.compare.compare`, checked against
hand-made examples and a NumPy resampling in tests/test_compare.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from maml_stop.evaluate.grouped_folds import ALL, family_groups, group_of, grouped_folds, resolve_counts

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"

# real registered names: three chain_sum variants, two products variants, two gcd variants, and two
# families that are not reasoning-gym ones (a group of their own each)
FAMILIES = ["chain_sum", "chain_sum_long", "chain_sum_3digit", "products", "products_1x2", "gcd", "gcd_3",
            "lcm", "count_bits", "letter_counting", "base_conversion", "simple_equations", "gsm_symbolic",
            "my_dataset", "fam_x"]


def test_groups_follow_the_generator():
    assert group_of("chain_sum_long") == group_of("chain_sum_3digit") == group_of("chain_sum") == "chain_sum"
    assert group_of("my_dataset") == "my_dataset"  # not a reasoning-gym family: its own group
    groups = family_groups(FAMILIES)
    assert groups["chain_sum"] == ["chain_sum", "chain_sum_3digit", "chain_sum_long"]
    assert groups["products"] == ["products", "products_1x2"] and groups["fam_x"] == ["fam_x"]


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_every_family_is_held_out_once_and_siblings_stay_together(seed):
    folds = grouped_folds(FAMILIES, n_folds=5, n_val=1, seed=seed)
    assert len(folds) == 5
    held = [f for fold in folds for f in fold.test]
    assert sorted(held) == sorted(FAMILIES)  # every family tested, exactly once
    groups = family_groups(FAMILIES)
    for fold in folds:
        assert sorted(fold.test + fold.val + fold.train) == sorted(FAMILIES)  # nothing lost, nothing twice
        assert not set(fold.test) & set(fold.train) and not set(fold.test) & set(fold.val)
        assert not set(fold.val) & set(fold.train) and len(fold.val) >= 1 and fold.train
        for members in groups.values():  # a group lies wholly in one of test, val, train
            where = {("test" if f in fold.test else "val" if f in fold.val else "train") for f in members}
            assert len(where) == 1, (fold.index, members, where)
    sizes = sorted(len(fold.test) for fold in folds)
    assert sizes[-1] - sizes[0] <= 2  # balanced up to the largest group (3 chain_sum variants)


def test_folds_are_deterministic_and_validation_moves():
    a, b = grouped_folds(FAMILIES, seed=3), grouped_folds(FAMILIES, seed=3)
    assert a == b
    assert grouped_folds(FAMILIES, seed=4) != a
    assert len({tuple(f.val) for f in a}) > 1  # validation rotates over the folds


def test_the_bundled_corpus_splits_into_five_folds_of_two():
    families = json.loads((EXPERIMENTS / "corpus" / "qwen05" / "meta.json").read_text())["families"]
    folds = grouped_folds(families, n_folds=5, n_val=1, seed=0)
    assert [len(f.test) for f in folds] == [2] * 5 and all(len(f.val) == 1 and len(f.train) == 7 for f in folds)


def test_meta_training_subsets_are_nested_and_span_generators():
    for fold in grouped_folds(FAMILIES, n_folds=3, n_val=1, seed=0):
        subsets = [fold.train_subset(c) for c in (1, 3, 6)] + [fold.train_subset(ALL)]
        for small, big in zip(subsets, subsets[1:]):
            assert big[: len(small)] == small
        n_groups = len({group_of(f) for f in fold.train})
        first = fold.train[:n_groups]  # round-robin: one family per generator before any second one
        assert len({group_of(f) for f in first}) == n_groups
        split = fold.split(3)
        assert split.train == fold.train[:3] and split.val == fold.val and split.test == fold.test
        with pytest.raises(ValueError, match="count must be"):
            fold.train_subset(len(fold.train) + 1)


def test_counts_that_do_not_exist_are_dropped():
    assert resolve_counts([6, 12, ALL], 20) == [6, 12, ALL]
    assert resolve_counts([6, 12, ALL], 7) == [6, ALL]
    assert resolve_counts([3, 6, ALL], 6) == [3, ALL]  # 6 = all remaining
    with pytest.raises(ValueError, match="positive int or 'all'"):
        resolve_counts([0, ALL], 5)


def test_too_few_groups_are_refused():
    with pytest.raises(ValueError, match="at least 5 groups"):
        grouped_folds(["chain_sum", "chain_sum_long", "gcd", "lcm", "products"], n_folds=5)


# ---------------------------------------------------------------------------------------------------
# the zero-step checkpoint


def _fit_args(corpus: str, root: Path, *extra: str) -> list[str]:
    return ["--config", str(EXPERIMENTS / "quickstart.yaml"), "--config", str(EXPERIMENTS / "main.yaml"),
            f"--data.corpus={corpus}", "--data.fold=null", "--data.train_families=[fam_a]",
            "--data.val_families=[fam_b]", "--data.test_families=[fam_c]", "--data.k=4", "--data.q=8",
            f"--trainer.default_root_dir={root}", *extra]


@pytest.mark.parametrize("algorithm", ["maml", "metasgd"])
def test_zero_step_checkpoint_is_the_init_with_the_training_normalisation(tiny_corpus, tmp_path, algorithm):
    from maml_stop.data.corpus import TraceCorpus
    from maml_stop.learn.module import MetaStoppingModule, load_predictor
    from maml_stop.learn.zero_step import save_zero_step

    torch.set_num_threads(1)
    path = save_zero_step(_fit_args(tiny_corpus, tmp_path / "ignored", f"--model.adapter.algorithm={algorithm}"),
                          tmp_path / "zero" / "zero_step.ckpt")
    assert sorted(p.name for p in (tmp_path / "zero").iterdir()) == ["zero_step.ckpt"]  # no logs, no other file
    predictor, adapter, meta = load_predictor(path)
    assert meta["global_step"] == 0 and meta["data"]["train_families"] == ["fam_a"]
    assert adapter.config().algorithm == algorithm
    # the initialisation: a fresh module of the quickstart's model settings (same init_seed)
    model = {k: v for k, v in yaml.safe_load((EXPERIMENTS / "quickstart.yaml").read_text())["model"].items() if k != "optimizer"}
    model["adapter"] = {**model["adapter"], "algorithm": algorithm}
    fresh = MetaStoppingModule(n_features=8, **model).adapter.state_dict()
    state = adapter.state_dict()
    params = [k for k in fresh if not k.endswith(("feature_mean", "feature_std"))]
    assert params and all(torch.equal(state[k], fresh[k]) for k in params)
    if algorithm == "metasgd":
        assert all(torch.allclose(v, torch.full_like(v, model["adapter"]["inner_lr"])) for k, v in state.items() if k.startswith("lrs"))
    # the normalisation: mean and std over every probe point of the meta-training family alone
    feats = np.concatenate([t.features for t in TraceCorpus.load(tiny_corpus).traces("fam_a")])
    assert np.allclose(predictor.feature_mean.numpy(), feats.mean(axis=0), atol=1e-5)
    assert np.allclose(predictor.feature_std.numpy(), feats.std(axis=0), atol=1e-5)
    everything = np.concatenate([t.features for f in ("fam_a", "fam_b", "fam_c") for t in TraceCorpus.load(tiny_corpus).traces(f)])
    assert not np.allclose(predictor.feature_mean.numpy(), everything.mean(axis=0), atol=1e-3)  # not all families'


def test_zero_step_differs_from_one_optimiser_step(tiny_corpus, tmp_path):
    """What the old ablation row ran (one AdamW step) is not the initialisation."""
    from maml_stop.learn.cli import cli_main
    from maml_stop.learn.module import load_predictor
    from maml_stop.learn.zero_step import save_zero_step

    torch.set_num_threads(1)
    zero = load_predictor(save_zero_step(_fit_args(tiny_corpus, tmp_path), tmp_path / "zero" / "z.ckpt"))[1].state_dict()
    quiet = ["--trainer.max_steps=1", "--trainer.callbacks=[]", "--trainer.logger=false",
             "--trainer.enable_progress_bar=false", "--trainer.enable_checkpointing=false"]
    cli = cli_main(_fit_args(tiny_corpus, tmp_path / "one", *quiet), run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    one = cli.model.adapter.state_dict()
    assert cli.trainer.global_step == 1
    assert not torch.equal(one["predictor.head.weight"], zero["predictor.head.weight"])
    assert torch.equal(one["predictor.feature_mean"], zero["predictor.feature_mean"])


# ---------------------------------------------------------------------------------------------------
# the study's summary, report and criterion (experiments/meta_study.py; the study itself: tests/test_grouped.py)


def _study_module():
    from experiment_scripts import load_script

    return load_script("meta_study")


def _hand_made_study() -> dict:
    """A study of one count, K in 8/16/32, two variants against zero_step and pooled (hand-made numbers)."""
    def pair(v, b, k, diff, low, high):
        return [{"count": "all", "k": k, "variant": v, "baseline": b, "method_b": b, "family": "mean", "figure": "savings",
                 "difference": diff, "low": low, "high": high, "verdict": "A" if low > 0 else "tie"},
                {"count": "all", "k": k, "variant": v, "baseline": b, "method_b": b, "family": "mean", "figure": "em_drop",
                 "difference": 0.1, "low": -0.2, "high": 0.4, "verdict": "tie"}]

    paired = []
    for k in (8, 16, 32):
        paired += pair("maml", "zero_step", k, 4.0, 1.0, 7.0) + pair("maml", "pooled", k, 3.5, 0.5, 6.5)
        paired += pair("anil", "zero_step", k, 5.0, -0.5, 10.0) + pair("anil", "pooled", k, 6.0, 2.0, 9.0)
    within = {"8": False, "16": True, "32": True}  # maml within the target at K = 16 and 32 only
    methods = ["full", "pooled", "maml", "anil", "zero_step_maml", "zero_step_anil"]
    curve = {"all": {str(k): {m: {"savings": 10.0, "savings_ci": 1.0, "em_drop": 0.5, "within_delta": 90.0,
                                  "query_loss": 0.5, "within_target": within[str(k)] if m == "maml" else True}
                              for m in methods} for k in (8, 16, 32)}}
    return {"config": {"corpus": "c", "seed": 0, "val_families": 1, "fit_configs": ["a.yaml"],
                       "baselines": ["zero_step", "pooled"], "n_resamples": 99},
            "evaluate": {"episodes": 5, "delta": 0.01}, "threshold": "em_target", "seconds": 1.0,
            "folds": [{"index": 0, "test": ["x"], "val": ["y"], "train": ["z"]}], "counts": ["all"],
            "n_train": {"all": [1]}, "k": [8, 16, 32], "methods": methods, "variants": ["maml", "anil"],
            "curve": curve, "paired": paired}


def test_criterion_needs_the_target_and_both_intervals_above_zero_at_small_k():
    study = _study_module()
    rows = {(r["variant"], r["k"]): (r["met"], r["met_on_mean"]) for r in study.criterion(_hand_made_study())}
    # K = 32 is not judged; maml misses the target on some family at K = 8 (its mean EM drop, 0.5 points, is
    # within it) and meets it at 16 (+4.0 [1, 7], +3.5 [0.5, 6.5]); anil saves more but its interval against
    # zero_step includes 0
    assert rows == {("maml", 8): (False, True), ("maml", 16): (True, True), ("anil", 8): (False, False),
                    ("anil", 16): (False, False)}
    report = study.report_markdown(_hand_made_study())
    assert "Met by some variant: **yes**; on the mean EM drop: **yes**." in report
    assert "| maml | 16 | +4.0 [+1.0, +7.0] (+0.1) | +3.5 [+0.5, +6.5] (+0.1) |" in report  # the compact table
    small = _hand_made_study()
    for r in small["paired"]:
        if r["variant"] == "maml" and r["baseline"] == "pooled":
            r["difference"] = 2.9  # under 3 points: not met, though its interval excludes 0
    assert not any(r["met"] or r["met_on_mean"] for r in study.criterion(small))
    assert "Met by some variant: **no**; on the mean EM drop: **no**." in study.report_markdown(small)
    for k in ("8", "16"):
        small["curve"]["all"][k]["maml"].update(em_drop=1.5, within_target=False)  # over the 1-point target on the mean
    small["paired"] = _hand_made_study()["paired"]
    assert [r["met_on_mean"] for r in study.criterion(small) if r["variant"] == "maml"] == [False, False]


def test_report_only_renders_a_committed_study_from_its_stored_figures(tmp_path):
    """A committed study keeps only its results.json (not the per-count ones): --report_only renders
    report.md and the plots from it, unchanged."""
    study = _study_module()
    stored = _hand_made_study()
    path = tmp_path / "results.json"
    path.write_text(json.dumps(stored))
    assert study.main(["--report_only", str(path)]) == 0
    assert (tmp_path / "report.md").read_text() == study.report_markdown(stored)
    assert (tmp_path / "savings_vs_families.png").is_file() and (tmp_path / "query_loss_vs_families.png").is_file()
    assert json.loads(path.read_text()) == stored


def test_the_committed_report_renders_byte_identical_from_its_stored_figures(tmp_path):
    """experiments/results/meta_study/report.md is what --report_only renders from the results.json beside it."""
    study = _study_module()
    committed = EXPERIMENTS / "results" / "meta_study"
    path = tmp_path / "results.json"
    path.write_bytes((committed / "results.json").read_bytes())
    assert study.main(["--report_only", str(path)]) == 0
    assert (tmp_path / "report.md").read_bytes() == (committed / "report.md").read_bytes()
