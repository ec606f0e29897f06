"""``maml-stop evaluate`` with grouped folds x meta-training family counts x algorithms (issue 11, issue 31
item 6: maml_stop/evaluate/grouped.py), the meta study's settings, and the study run end to end by
experiments/meta_study.py. The folds themselves: tests/test_meta_study.py."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from maml_stop.evaluate.grouped_folds import ALL, grouped_folds

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
# real registered names: variants of three generators and three families of their own group
FAMILIES = ["chain_sum", "chain_sum_long", "products", "products_1x2", "gcd", "gcd_3", "lcm", "count_bits",
            "letter_counting", "my_dataset"]


def _study_module():
    from experiment_scripts import load_script

    return load_script("meta_study")


STUDY = ["--config", str(EXPERIMENTS / "evaluate.yaml"), "--config", str(EXPERIMENTS / "meta_study.yaml")]
QUICK = [*STUDY, "--config", str(EXPERIMENTS / "meta_study_quick.yaml")]


def _quick_args(corpus: str, out: Path, *extra: str) -> list[str]:
    """The quick study on ``corpus``, its fits and pooled probes under ``out/cache``."""
    return [*QUICK, f"--corpus={corpus}", f"--out={out}", f"--cache_dir={out / 'cache'}", *extra]


def test_study_yaml_and_its_quick_chain():
    from maml_stop.evaluate.command import parse_config

    full, quick = parse_config(STUDY), parse_config(QUICK)
    assert full.folds.kind == "grouped" and full.folds.counts == [6, 12, "all"] and full.folds.n == 5  # issue 11
    assert full.corpus == "experiments/corpus/qwen05_v2" and full.folds.families_file == "experiments/corpus_v2_families.json"
    assert quick.folds.counts == [3, 6, "all"] and quick.folds.families_file is None and quick.folds.kind == "grouped"
    assert quick.episodes < full.episodes and quick.progress is False and quick.folds.seed == full.folds.seed  # merged
    assert quick.train_overrides["trainer"]["max_steps"] <= 20 and full.train_overrides == {}
    assert list(quick.algorithms) == list(full.algorithms) == ["maml", "anil", "metasgd", "maml_expected_cost"]
    assert full.zero_step and full.fit_workers == 2 and "maml" not in full.methods


def test_study_families_come_from_the_pilot_and_an_unfinished_harvest_is_refused(tiny_corpus, tmp_path):
    from types import SimpleNamespace

    from maml_stop.data.corpus import TraceCorpus
    from maml_stop.evaluate.command import parse_config
    from maml_stop.evaluate.grouped import study_families

    full = parse_config(STUDY)
    chosen = json.loads((EXPERIMENTS / "corpus_v2_families.json").read_text())
    available = list(chosen["decisions"])  # every piloted family is in the v2 corpus
    v2 = SimpleNamespace(families=available, traces=lambda f: [None] * 200)
    assert study_families(full, v2) == chosen["kept"]
    with pytest.raises(ValueError, match=r"study families \['.*'\] are not in the corpus"):
        study_families(full, SimpleNamespace(families=available[:1], traces=v2.traces))
    corpus = TraceCorpus.load(tiny_corpus)
    quick = parse_config([*QUICK, f"--corpus={tiny_corpus}"])
    assert study_families(quick, corpus) == corpus.families  # no families file: every family
    with pytest.raises(ValueError, match="fewer than min_traces=10000 traces"):
        study_families(parse_config([*QUICK, f"--corpus={tiny_corpus}", "--folds.min_traces=10000"]), corpus)


def test_grouped_settings_are_checked():
    from maml_stop.evaluate.config import EvaluateConfig, FoldsConfig, check_config

    with pytest.raises(ValueError, match="unknown folds.kind 'lofo'; valid: one_out, grouped"):
        check_config(EvaluateConfig(corpus="c", folds=FoldsConfig(kind="lofo")))
    with pytest.raises(ValueError, match="give train_config"):
        check_config(EvaluateConfig(corpus="c", folds={"kind": "grouped"}))
    with pytest.raises(ValueError, match="need folds.kind grouped"):
        check_config(EvaluateConfig(corpus="c", algorithms={"anil": {}}))
    assert EvaluateConfig(corpus="c").folds == FoldsConfig()  # the default: every family held out alone


def test_fit_keys_follow_the_content_of_what_a_fit_reads(tmp_path):
    from maml_stop.evaluate.config import EvaluateConfig
    from maml_stop.evaluate.grouped import fit_jobs

    folds = grouped_folds(FAMILIES, n_folds=3, n_val=1, seed=0)
    (tmp_path / "a.yaml").write_text("model: {}\n")
    configs = tmp_path / "configs"
    configs.mkdir()
    for name in ("train_overrides", "maml"):
        (configs / f"{name}.yaml").write_text("{}\n")
    (configs / "anil.yaml").write_text("model: {adapter: {algorithm: anil}}\n")
    cfg = EvaluateConfig(corpus="c", train_config=[str(tmp_path / "a.yaml")], folds={"kind": "grouped"},
                         algorithms={"maml": {}, "anil": {}}, zero_step=True)
    jobs = fit_jobs(cfg, folds, [3, ALL], configs, "digest")
    assert len(jobs) == 2 * 3 * 2 * 2 and len({j.key for j in jobs}) == len(jobs)  # counts x folds x algorithms x zero
    assert [j.name for j in jobs[:4]] == ["maml", "zero_step_maml", "anil", "zero_step_anil"]
    assert fit_jobs(cfg, folds, [3, ALL], configs, "digest") == jobs  # deterministic
    assert fit_jobs(cfg, folds, [3, ALL], configs, "other corpus")[0].key != jobs[0].key
    (configs / "anil.yaml").write_text("model: {adapter: {algorithm: anil, inner_steps: 5}}\n")  # a fragment changed
    changed = fit_jobs(cfg, folds, [3, ALL], configs, "digest")
    assert [a.key == b.key for a, b in zip(jobs[:4], changed[:4])] == [True, True, False, False]
    train = next(a for a in jobs[0].args if a.startswith("--data.train_families="))
    assert train == f"--data.train_families=[{','.join(folds[0].train[:3])}]"  # the count's nested subset


def test_a_fit_is_reused_only_when_it_finished_with_the_same_key(tmp_path, monkeypatch):
    import maml_stop.evaluate.grouped as grouped

    calls = []

    def fake_fit(args, folder):
        calls.append(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "best.ckpt").write_text("ckpt")
        return str(folder / "best.ckpt")

    monkeypatch.setattr(grouped, "fit_checkpoint", fake_fit)
    job = grouped.FitJob("maml", 0, ALL, ("--data.k=4",), "a" * 64)
    path = grouped.run_fit(tmp_path, job)
    assert path == str(job.folder(tmp_path) / "best.ckpt") and len(calls) == 1
    assert grouped.run_fit(tmp_path, job) == path and len(calls) == 1  # finished, same key: read back
    other = dataclasses.replace(job, key="a" * 16 + "b" * 48)  # the same folder name, another content key
    assert grouped.run_fit(tmp_path, other) == path and len(calls) == 2
    (job.folder(tmp_path) / grouped.FIT_DONE).unlink()  # interrupted (a checkpoint without its record): fitted again
    assert grouped.run_fit(tmp_path, other) == path and len(calls) == 3


@pytest.mark.slow
def test_quick_study_runs_end_to_end_on_the_tiny_corpus(tiny_corpus, tmp_path, capsys, monkeypatch):
    import maml_stop.evaluate.cache as cache
    import maml_stop.evaluate.grouped as grouped

    study = _study_module()
    out = tmp_path / "study"
    backends = []
    real = cache.train_predictor
    monkeypatch.setattr(cache, "train_predictor", lambda *a, **k: backends.append(k["backend"]) or real(*a, **k))
    args = _quick_args(tiny_corpus, out, "--backend=torch_func", "--workers=1")
    assert study.main([*args, "--n_resamples=199"]) == 0
    assert backends and set(backends) == {"torch_func"}  # the pooled probe: the protocol's, backend honoured
    result = json.loads((out / "results.json").read_text())
    assert sorted(f for fold in result["folds"] for f in fold["test"]) == ["fam_a", "fam_b", "fam_c"]
    assert result["counts"] == ["all"] and result["n_train"]["all"] == [1, 1, 1]
    names = {"maml", "anil", "metasgd", "zero_step_maml", "zero_step_anil", "zero_step_metasgd", "pooled", "scratch"}
    assert names <= set(result["methods"])
    for m in ("maml", "zero_step_maml", "pooled"):
        assert result["curve"]["all"]["4"][m]["query_loss"] > 0
    rows = result["paired"]
    assert {(r["variant"], r["baseline"]) for r in rows} == {(v, b) for v in ("maml", "anil", "metasgd", "maml_expected_cost")
                                                            for b in ("pooled", "finetuned", "scratch", "zero_step")}
    assert all(r["low"] - 1e-9 <= r["difference"] <= r["high"] + 1e-9 for r in rows)
    assert {r["k"] for r in rows} == {4, 8} and {r["figure"] for r in rows} == {"savings", "em_drop"}
    per_count = json.loads((out / "n_all" / "results.json").read_text())
    assert per_count["count"] == "all" and per_count["n_train"] == [1, 1, 1] and per_count["folds"] == result["folds"]
    for fold in result["folds"]:  # each family evaluated with its own fold's checkpoints
        fam = fold["test"][0]
        assert per_count["sources"][fam] == fold["train"]
        ckpts = per_count["all_checkpoints"][fam]
        assert ckpts["zero_step_anil"].endswith("zero_step.ckpt") and per_count["checkpoints"][fam] == ckpts["maml"]
    from maml_stop.learn.module import load_predictor

    assert load_predictor(per_count["all_checkpoints"]["fam_a"]["zero_step_maml"])[2]["global_step"] == 0
    maml = load_predictor(per_count["all_checkpoints"]["fam_a"]["maml"])[2]
    fold_a = next(fold for fold in result["folds"] if "fam_a" in fold["test"])
    assert maml["global_step"] > 0 and maml["data"]["train_families"] == fold_a["train"]
    for name in ("report.md", "savings_vs_families.png", "query_loss_vs_families.png", "n_all/results.md"):
        assert (out / name).stat().st_size > 0
    assert "Paired bootstrap" in capsys.readouterr().out
    report = (out / "report.md").read_text()
    assert study.main(["--report_only", str(out / "results.json")]) == 0  # rebuilt from the per-count results alone
    assert json.loads((out / "results.json").read_text())["paired"] == rows and (out / "report.md").read_text() == report

    def no_fit(*a, **k):
        raise AssertionError("a finished fit of the same inputs was fitted again")

    monkeypatch.setattr(grouped, "fit_checkpoint", no_fit)  # a rerun (another output folder, the same cache)
    monkeypatch.setattr(grouped, "save_zero_step", no_fit)
    again = tmp_path / "again"
    assert study.main([*args[:-1], f"--out={again}", "--n_resamples=199"]) == 0
    rerun = json.loads((again / "results.json").read_text())
    assert rerun["paired"] == rows and rerun["curve"] == result["curve"]


@pytest.mark.slow
def test_count_free_methods_are_evaluated_once_and_equal_a_fresh_evaluation(tmp_path, monkeypatch):
    """With two counts, the methods that do not depend on the meta-training families (COUNT_FREE) are
    copied from the fold's first count; their figures equal a fresh evaluation at the second count, and
    the count-dependent pooled probe is evaluated at each count."""
    from conftest import write_tiny_corpus

    import maml_stop.evaluate.grouped as grouped
    from maml_stop.evaluate.command import main

    corpus = write_tiny_corpus(tmp_path / "corpus", families=("fam_a", "fam_b", "fam_c", "fam_d", "fam_e"), n=40)
    runs, count_free = {}, grouped.COUNT_FREE
    for name, free in (("reused", count_free), ("fresh", ())):
        monkeypatch.setattr(grouped, "COUNT_FREE", free)
        out = tmp_path / name
        assert main(_quick_args(corpus, out, "--folds.counts=[1, all]", '--algorithms={"maml": {}}',
                                "--zero_step=false")) == 0
        runs[name] = {c: json.loads((out / f"n_{c}" / "results.json").read_text()) for c in ("1", "all")}
    reused, fresh = ({c: r[c]["results"] for c in r} for r in (runs["reused"], runs["fresh"]))
    methods = [m for m in count_free if m in next(iter(next(iter(fresh["all"].values())).values()))]
    assert "full" in methods and "scratch" in methods
    for family, by_k in fresh["all"].items():
        for k, cells in by_k.items():
            for m in methods:
                assert reused["all"][family][k][m] == cells[m] == reused["1"][family][k][m], (family, k, m)
            assert list(reused["all"][family][k]) == list(cells)  # same methods, same order
    assert runs["reused"]["all"]["calibration"] == runs["fresh"]["all"]["calibration"]
    pooled_differs = any(fresh["all"][f][k]["pooled"] != fresh["1"][f][k]["pooled"] for f in fresh["all"] for k in fresh["all"][f])
    assert pooled_differs  # the pooled probe trains on the count's families


@pytest.mark.slow
def test_fits_side_by_side_give_the_serial_results(tiny_corpus, tmp_path):
    """fit_workers: 2 fits every checkpoint in forked workers first; the results equal a serial run's."""
    from maml_stop.evaluate.command import main

    results = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        assert main(_quick_args(tiny_corpus, out, f"--fit_workers={workers}", "--zero_step=false",
                                '--algorithms={"maml": {}, "anil": {"model": {"adapter": {"algorithm": "anil"}}}}')) == 0
        results[workers] = json.loads((out / "n_all" / "results.json").read_text())
    serial, forked = results[1], results[2]
    assert forked["results"] == serial["results"] and forked["query_loss"] == serial["query_loss"]
    for family, ckpts in serial["all_checkpoints"].items():
        for algo, path in ckpts.items():
            a = torch.load(path, weights_only=False)["state_dict"]
            b = torch.load(forked["all_checkpoints"][family][algo], weights_only=False)["state_dict"]
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_the_quick_study_on_the_bundled_corpus(tmp_path):
    """The documented smoke run, end to end on the bundled v1 corpus: 5 grouped folds of two held-out
    families, counts 3 / 6 / all, every algorithm and its zero-step twin (120 checkpoints; 5 to 10 minutes
    on 2 shared cores), the study's report with the criterion; not a result."""
    study = _study_module()
    out = tmp_path / "quick"
    assert study.main([*QUICK, f"--out={out}", f"--cache_dir={out / 'cache'}", "--n_resamples=199"]) == 0
    result = json.loads((out / "results.json").read_text())
    families = json.loads((EXPERIMENTS / "corpus" / "qwen05" / "meta.json").read_text())["families"]
    assert sorted(f for fold in result["folds"] for f in fold["test"]) == sorted(families)
    assert result["counts"] == ["3", "6", "all"] and result["n_train"] == {"3": [3] * 5, "6": [6] * 5, "all": [7] * 5}
    assert len(list((out / "cache" / "fits").iterdir())) == 5 * 3 * 4 * 2
    for count in result["counts"]:
        per_count = json.loads((out / f"n_{count}" / "results.json").read_text())
        assert per_count["families"] == [f for fold in result["folds"] for f in fold["test"]]
        assert set(per_count["query_loss"]) == set(families) and "zero_step_metasgd" in per_count["methods"]
    assert "## The criterion of issue 11" in (out / "report.md").read_text()
