"""``maml-stop evaluate`` end to end on the tiny corpus with a tiny checkpoint; the report recomputed
from the JSON; the report's interval arithmetic."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from maml_stop.evaluate import report as R
from maml_stop.evaluate.command import main
from maml_stop.evaluate.config import EvaluateConfig
from maml_stop.evaluate.protocol import run
from maml_stop.learn.module import CheckpointError
from trace_helpers import write_tiny_checkpoint

ALL = ["full", "first_probe", "budget", "consistency", "confidence", "pooled", "finetuned", "scratch", "maml", "oracle", "oracle_equal_em"]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> str:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.ckpt")


@pytest.fixture(scope="module")
def evaluated(tiny_corpus, tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluate")
    code = main([
        "--corpus", tiny_corpus, "--checkpoint", tiny_checkpoint, "--out", str(out), "--k", "[4, 8]",
        "--episodes", "4", "--pooled_steps", "20", "--scratch_steps", "10", "--finetune_steps", "3",
        "--progress", "false", "--threshold_methods", "[em_target, ltt, fixed]", "--ltt_delta", "0.1",
    ])
    assert code == 0
    return out, json.loads((out / "results.json").read_text())


def test_writes_json_table_and_plots(evaluated):
    out, results = evaluated
    assert results["families"] == ["fam_c"]  # the checkpoint's test family
    assert results["sources"]["fam_c"] == ["fam_a"]  # pooled probe: the checkpoint's training families only
    assert results["methods"] == ALL
    for name in ("results.md", "curves_k4.png", "curves_k8.png", "savings_vs_k.png", "calibration.png"):
        assert (out / name).stat().st_size > 0, name
    cell = results["results"]["fam_c"]["8"]["maml"]
    assert len(cell["thresholds"]["em_target"]["savings"]) == 4
    assert len(cell["curve"]["em"]) == len(results["config"]["taus"])
    assert set(results["calibration"]) == {"pooled", "finetuned", "scratch", "maml"}
    text = (out / "results.md").read_text()
    assert "## Where MAML-adapted probe wins and loses" in text


def test_every_method_sees_the_same_episodes(evaluated):
    _, results = evaluated
    for k in ("4", "8"):
        full = {m: results["results"]["fam_c"][k][m]["thresholds"]["em_target"]["full_em"] for m in ALL}
        tokens = {m: results["results"]["fam_c"][k][m]["thresholds"]["em_target"]["full_tokens"] for m in ALL}
        assert all(v == full["full"] for v in full.values())
        assert all(v == tokens["full"] for v in tokens.values())


def test_accounting_invariants(evaluated):
    _, results = evaluated
    for k in ("4", "8"):
        cells = results["results"]["fam_c"][k]
        full = cells["full"]["thresholds"]["em_target"]
        assert full["savings"] == [0.0] * 4 and full["em_drop"] == [0.0] * 4
        oracle = cells["oracle"]["thresholds"]["em_target"]
        assert all(d <= 0.0 for d in oracle["em_drop"])  # the oracle never loses a correct answer
        equal = cells["oracle_equal_em"]["thresholds"]["em_target"]
        assert all(d <= 0.0 for d in equal["em_drop"])  # as many right as full generation, or more
        # ... and the fewest tokens doing so: never fewer savings than the EM-first oracle
        assert all(e >= o - 1e-12 for e, o in zip(equal["savings"], oracle["savings"]))
        for m in ALL:
            for thr in ("em_target", "ltt", "fixed"):
                f = cells[m]["thresholds"][thr]
                assert all(r <= t + 1e-9 for r, t in zip(f["reasoning_tokens"], f["tokens"]))


def test_table_row_recomputed_from_json(evaluated):
    out, results = evaluated
    text = (out / "results.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| fam_c | maml |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    chosen = results["results"]["fam_c"]["4"]["maml"]["thresholds"]["em_target"]
    # the first such row belongs to the first K table (K=4)
    for col, values in ((2, chosen["savings"]), (3, chosen["em_drop"])):
        x = 100 * np.asarray(values, dtype=float)
        t = {3: 3.182446305284263}[len(x) - 1]  # Student t, 97.5%, 3 degrees of freedom
        want = f"{x.mean():.1f} ± {t * x.std(ddof=1) / math.sqrt(len(x)):.1f}"
        assert cells[col] == want
    oracle = np.mean(results["results"]["fam_c"]["4"]["oracle"]["thresholds"]["em_target"]["savings"])
    assert cells[6] == f"{100 * np.mean(chosen['savings']) / oracle:.0f}%"
    equal = np.mean(results["results"]["fam_c"]["4"]["oracle_equal_em"]["thresholds"]["em_target"]["savings"])
    assert cells[7] == f"{100 * np.mean(chosen['savings']) / equal:.0f}%"


def test_report_only_rebuilds_from_json(evaluated, tmp_path):
    out, results = evaluated
    copy = tmp_path / "results.json"
    copy.write_text(json.dumps(results))
    assert main(["--report_only", str(copy)]) == 0
    assert (tmp_path / "results.md").read_text() == (out / "results.md").read_text()


def test_report_only_reads_a_file_written_before_the_names_k_and_tau(evaluated, tmp_path):
    """Older results.json say shots (K) and config.fixed_tau (tau): read, renamed, rendered the same."""
    out, results = evaluated
    old = json.loads(json.dumps(results))
    old["shots"] = old.pop("k")
    old["config"]["shots"], old["config"]["fixed_tau"] = old["config"].pop("k"), old["config"].pop("tau")
    (tmp_path / "results.json").write_text(json.dumps(old))
    assert main(["--report_only", str(tmp_path / "results.json")]) == 0
    assert (tmp_path / "results.md").read_text() == (out / "results.md").read_text()
    again = json.loads((tmp_path / "results.json").read_text())  # rewritten with today's names
    assert again["k"] == [4, 8] and "shots" not in again and again["config"]["tau"] == 0.5


def test_mean_ci_and_t_quantile():
    x = [0.1, 0.3, 0.2, 0.5, 0.4]
    m, h = R.mean_ci(x)
    assert m == pytest.approx(0.3)
    assert h == pytest.approx(2.7764451051977987 * np.std(x, ddof=1) / math.sqrt(5), rel=1e-6)
    for df, exact in ((3, 3.182446305284263), (10, 2.2281388519649385), (49, 2.009575234489209)):
        assert R.t_quantile_975(df) == pytest.approx(exact, rel=1e-6)
    assert R.mean_ci([0.2]) == (0.2, 0.0)
    assert R.fmt_ci(0.1234, 0.01) == "12.3 ± 1.0"


def test_errors_name_valid_choices(tiny_corpus, tiny_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="valid methods"):
        run(EvaluateConfig(corpus=tiny_corpus, out=str(tmp_path), methods=["full", "magic"], families=["fam_c"]))
    with pytest.raises(ValueError, match="needs a meta-trained checkpoint"):
        run(EvaluateConfig(corpus=tiny_corpus, out=str(tmp_path), families=["fam_c"]))
    with pytest.raises(ValueError, match="seen in meta-training"):
        run(EvaluateConfig(corpus=tiny_corpus, checkpoint=tiny_checkpoint, out=str(tmp_path), families=["fam_a"]))
    with pytest.raises(ValueError, match="not in the corpus"):
        run(EvaluateConfig(corpus=tiny_corpus, out=str(tmp_path), families=["nope"], methods=["full"]))


def test_feature_mismatch_is_refused(tiny_corpus, tmp_path):
    ckpt = write_tiny_checkpoint(tmp_path / "other.ckpt", feature_names=[f"g{i}" for i in range(8)])
    with pytest.raises(CheckpointError, match="other features"):
        run(EvaluateConfig(corpus=tiny_corpus, checkpoint=ckpt, out=str(tmp_path), episodes=1, k=[4]))


def test_config_yaml_parses(tiny_corpus):
    from maml_stop.evaluate.command import _parser

    root = Path(__file__).resolve().parents[1]
    ns = _parser().parse_args(["--config", str(root / "experiments" / "evaluate.yaml"), "--corpus", tiny_corpus])
    assert ns.k == [4, 8, 16, 32] and ns.episodes >= 50 and ns.delta == 0.01
    assert re.fullmatch(r"[a-z_]+", ns.threshold_methods[0])
    from maml_stop.evaluate.methods import build_policies
    from maml_stop.evaluate.protocol import selectors_for

    cfg = EvaluateConfig(**{f: ns[f] for f in EvaluateConfig.__dataclass_fields__})
    assert list(selectors_for(cfg)) == cfg.threshold_methods
    heuristics = [m for m in cfg.methods if m in ("full", "budget", "consistency", "confidence", "oracle")]
    assert set(build_policies(cfg, heuristics, None, None, {"n_features": 8})) == set(heuristics)


# ---- the EM/token evaluation callback ----------------------------------------------------------------


def test_callback_evaluate_figures(tiny_corpus, tiny_checkpoint):
    from maml_stop.evaluate.callbacks import EMTokenEvaluation
    from maml_stop.data.corpus import TraceCorpus
    from maml_stop.learn.module import load_predictor
    from maml_stop.data.episodes import EpisodeSampler

    corpus = TraceCorpus.load(tiny_corpus)
    _, adapter, _ = load_predictor(tiny_checkpoint)
    episodes = EpisodeSampler({"fam_b": corpus.traces("fam_b")}, k=4, q=None).fixed_episodes("fam_b", 3, seed=0)
    callback = EMTokenEvaluation(taus=[0.9, 0.5, 0.1])
    figures, curve = callback.evaluate(adapter, episodes)
    assert set(figures) == {"savings_at_delta", "em_drop", "curve_savings_at_delta", "curve_auc", "oracle_savings", "brier", "ece"}
    assert figures["curve_savings_at_delta"] <= figures["oracle_savings"] + 1e-9
    assert len(curve["em"]) == 3 and 0.0 <= figures["curve_auc"] <= 1.0
    with pytest.raises(ValueError, match="valid: fixed, em_target, ltt"):
        EMTokenEvaluation(threshold_method="magic")


def test_callback_in_a_trainer_logs_and_saves_the_curve(tiny_corpus, tmp_path):
    from lightning.pytorch import Trainer

    from maml_stop.evaluate.callbacks import EMTokenEvaluation
    from maml_stop.data.datamodule import TraceDataModule
    from maml_stop.learn.adapter import AdapterConfig
    from maml_stop.learn.module import MetaStoppingModule
    from maml_stop.learn.predictor import PredictorConfig

    dm = TraceDataModule(corpus=tiny_corpus, val_families=["fam_b"], test_families=["fam_c"], k=4, q=8,
                         meta_batch_size=2, steps_per_epoch=2, val_episodes=2)
    model = MetaStoppingModule(n_features=dm.n_features, feature_names=dm.feature_names,
                               predictor=PredictorConfig(hidden=8, depth=1),
                               adapter=AdapterConfig(inner_steps=1, first_order=True), compare_random_init=False)
    callback = EMTokenEvaluation(taus=[0.9, 0.5, 0.1])
    trainer = Trainer(max_steps=2, inference_mode=False, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      default_root_dir=tmp_path, callbacks=[callback])
    trainer.fit(model, datamodule=dm)
    assert "val/savings_at_delta" in trainer.callback_metrics and "val/em_drop" in trainer.callback_metrics
    assert (tmp_path / "em_tokens" / "epoch=000.png").stat().st_size > 0
    assert callback.state_dict()["history"][0]["epoch"] == 0


@pytest.mark.slow
def test_train_config_meta_trains_one_fold_per_family(tiny_corpus, tmp_path):
    config = tmp_path / "fit.yaml"
    config.write_text(
        "trainer:\n  max_steps: 2\n  inference_mode: false\n  enable_progress_bar: false\n"
        "  logger: {class_path: lightning.pytorch.loggers.CSVLogger, init_args: {save_dir: " + str(tmp_path / "shared")
        + ", name: logs}}\n  enable_model_summary: false\n  num_sanity_val_steps: 0\n"
        "  callbacks:\n    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
        "      init_args: {dirpath: " + str(tmp_path / "shared") + ", save_last: true}\n"
        "model: {predictor: {hidden: 8, depth: 1}, adapter: {inner_steps: 1, first_order: true}, compare_random_init: false}\n"
        "data: {val_families: [fam_a], k: 4, q: 8, meta_batch_size: 2, steps_per_epoch: 2, val_episodes: 1}\n"
    )
    results = run(EvaluateConfig(corpus=tiny_corpus, train_config=str(config), out=str(tmp_path / "out"), k=[4],
                                 episodes=2, pooled_steps=5, scratch_steps=3, progress=False))
    assert results["families"] == ["fam_a", "fam_b", "fam_c"]
    for fam in results["families"]:
        ckpt = Path(results["checkpoints"][fam])
        assert ckpt.is_file() and ckpt.parent == tmp_path / "out" / "folds" / fam / "checkpoints"
        assert fam not in results["sources"][fam]
        assert list((tmp_path / "out" / "folds" / fam / "logs").glob("version_*/metrics.csv"))  # the fold's own logs
    assert not (tmp_path / "shared" / "logs").exists()
    assert results["sources"]["fam_a"] == ["fam_c"]  # fam_b validates the fam_a fold; pooled = train families


def test_source_corpus_gives_a_cross_model_check(tiny_corpus, tiny_checkpoint, tmp_path):
    """Held-out traces from one corpus, meta-training split and pooled-probe sources from another."""
    from conftest import write_tiny_corpus

    other = write_tiny_corpus(tmp_path / "other_model", families=("fam_c",), n=40)
    results = run(EvaluateConfig(
        corpus=other, source_corpus=tiny_corpus, checkpoint=tiny_checkpoint, out=str(tmp_path / "out"),
        k=[4], episodes=2, pooled_steps=5, scratch_steps=3, finetune_steps=2, progress=False,
        methods=["full", "pooled", "maml", "oracle"],
    ))
    assert results["families"] == ["fam_c"] and results["source_corpus"] == tiny_corpus
    assert results["sources"]["fam_c"] == ["fam_a"]  # from the source corpus, which the held-out corpus lacks
    cell = results["results"]["fam_c"]["4"]["full"]["thresholds"]["em_target"]
    assert len(cell["savings"]) == 2
    # without the source corpus, the checkpoint's training family is missing from the held-out corpus
    with pytest.raises(ValueError, match="families in the corpus"):
        run(EvaluateConfig(corpus=other, checkpoint=tiny_checkpoint, out=str(tmp_path / "o2"), k=[4],
                           episodes=1, progress=False, methods=["full", "pooled"]))
    wide = write_tiny_corpus(tmp_path / "wide", families=("fam_c",), n=40, n_features=9)
    with pytest.raises(ValueError, match="other features"):
        run(EvaluateConfig(corpus=wide, source_corpus=tiny_corpus, checkpoint=tiny_checkpoint,
                           out=str(tmp_path / "o3"), k=[4], episodes=1, progress=False))


def test_versus_best_table_recomputed(evaluated):
    """The per-family table against the best baseline within the EM target, checked by hand."""
    out, results = evaluated
    summary = R.summarise(results)["4"]
    m = summary["maml"]["fam_c"]
    rivals = {r: summary[r]["fam_c"] for r in ALL if r not in ("maml", "full", "oracle", "oracle_equal_em")}
    within = {r: s["savings"][0] for r, s in rivals.items() if s["em_drop"][0] <= results["delta"] + 1e-9}
    row = next(line for line in R.versus_best_table(results, 4).splitlines() if line.startswith("| fam_c |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    if m["em_drop"][0] > results["delta"] + 1e-9:
        assert cells[4] == "misses target"
    elif within and max(within.values()) > 1e-9:
        best = max(within, key=within.get)
        assert cells[3] == f"{best} {100 * within[best]:.1f}"
        assert cells[4] == f"{m['savings'][0] / within[best]:.2f}x"
    # the mean row counts a method as within the target only when it is within it on every family
    fams = results["families"]
    ok = {r: all(summary[r][f]["em_drop"][0] <= results["delta"] + 1e-9 for f in fams) for r in rivals}
    mean_row = next(line for line in R.versus_best_table(results, 4).splitlines() if line.startswith("| **mean** |"))
    cells = [c.strip() for c in mean_row.strip("|").split("|")]
    allowed = {r: summary[r]["mean"]["savings"][0] for r in rivals if ok[r]}
    assert cells[3] == ("none" if not allowed else f"{max(allowed, key=allowed.get)} {100 * max(allowed.values()):.1f}")
    if not all(summary["maml"][f]["em_drop"][0] <= results["delta"] + 1e-9 for f in fams):
        assert cells[4].startswith("misses target (")
    assert "against the best baseline" in (out / "results.md").read_text()


def test_within_target_on_the_mean_needs_every_family():
    """A rule that gains EM on one family and misses the target on another is not within it on the mean."""
    summary = {"a": {"f1": {"em_drop": (-0.30, 0.0)}, "f2": {"em_drop": (0.05, 0.0)}, "mean": {"em_drop": (-0.12, 0.0)}},
               "b": {"f1": {"em_drop": (0.0, 0.0)}, "f2": {"em_drop": (0.01, 0.0)}, "mean": {"em_drop": (0.005, 0.0)}}}
    assert R.within_target(summary, "a", "f1", ["f1", "f2"], 0.01)
    assert not R.within_target(summary, "a", "f2", ["f1", "f2"], 0.01)
    assert not R.within_target(summary, "a", "mean", ["f1", "f2"], 0.01)
    assert R.within_target(summary, "b", "mean", ["f1", "f2"], 0.01)
    assert not R.within_target(summary, "c", "f1", ["f1", "f2"], 0.01)  # not evaluated: not within


def test_workers_give_the_serial_results(tiny_corpus, tmp_path):
    """workers=2 (families in forked processes) writes the same per-episode figures, curves and calibration
    as the serial run of the same settings, family by family and in the same order."""
    runs = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        code = main([
            "--corpus", tiny_corpus, "--families", "[fam_a, fam_b]", "--out", str(out), "--k", "[4]",
            "--episodes", "3", "--pooled_steps", "20", "--scratch_steps", "10", "--finetune_steps", "3",
            "--progress", "false", "--methods", json.dumps([m for m in ALL if m != "maml"]),
            "--workers", str(workers),
        ])
        assert code == 0
        runs[workers] = json.loads((out / "results.json").read_text())
    serial, parallel = runs[1], runs[2]
    assert parallel["families"] == serial["families"] == ["fam_a", "fam_b"]
    assert list(parallel["results"]) == list(serial["results"])
    for family in serial["families"]:
        assert parallel["results"][family] == serial["results"][family], family
    assert parallel["calibration"] == serial["calibration"] and serial["calibration"]
    assert parallel["sources"] == serial["sources"]
    with pytest.raises(ValueError, match="workers must be >= 1"):
        run(EvaluateConfig(corpus=tiny_corpus, workers=0, methods=["full"], families=["fam_a"]))


def test_train_config_folds_read_a_feature_shorthand(tmp_path):
    """features: free with train_config meta-trains the folds on the free columns (the shorthand reaches
    `maml-stop fit` as it is: it once arrived JSON-quoted, '"free"', and was refused), and the cost-aware
    methods of such a fold read its columns."""
    from conftest import write_tiny_corpus
    from maml_stop.data import store
    from maml_stop.learn.module import load_predictor

    corpus = write_tiny_corpus(tmp_path / "corpus")
    meta = store.read_meta(corpus)
    meta["feature_names"] = [f"h{i}" if n.startswith("f") else n for i, n in enumerate(meta["feature_names"])]
    paid = {"logprob_mean", "same_as_prev"}  # by name too (maml_stop.probe.features.feature_cost)
    meta["feature_costs"] = {n: "paid" if n in paid else "free" for n in meta["feature_names"]}
    store.write_meta(corpus, meta)
    config = tmp_path / "fit.yaml"
    config.write_text(
        "trainer:\n  max_steps: 2\n  inference_mode: false\n  enable_progress_bar: false\n  enable_model_summary: false\n"
        "  num_sanity_val_steps: 0\n  callbacks:\n    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
        "      init_args: {save_last: true}\n"
        "model: {predictor: {hidden: 8, depth: 1}, adapter: {inner_steps: 1, first_order: true}, compare_random_init: false}\n"
        "data: {val_families: [fam_b], k: 4, q: 8, meta_batch_size: 2, steps_per_epoch: 2, val_episodes: 1}\n"
    )
    results = run(EvaluateConfig(corpus=corpus, train_config=str(config), features="free", families=["fam_a"],
                                 out=str(tmp_path / "out"), k=[4], episodes=1, progress=False,
                                 methods=["full", "maml", "free_probe"], cost_aware_learner="maml"))
    names = load_predictor(results["checkpoints"]["fam_a"])[2]["feature_names"]
    assert names == [n for n in meta["feature_names"] if n not in paid] == results["feature_names"]
    # the cost-aware methods select from the fold's columns (they once indexed the corpus's full list)
    assert results["results"]["fam_a"]["4"]["free_probe"]["thresholds"]["em_target"]["savings"]


def test_results_file_doctest():
    import doctest

    from maml_stop.evaluate import results_file

    assert doctest.testmod(results_file).failed == 0
