"""The probe-signal pilot (issue 30) on a synthetic corpus whose states carry a known signal."""

import io

import numpy as np
import pytest
import yaml

from conftest import write_tiny_corpus
from maml_stop.data.corpus import TraceCorpus
from maml_stop.evaluate import probe_signal_study as study
from maml_stop.evaluate.probe_signal import ProbeFit, View, discrimination, fit_probe, hindsight_savings

FAMILIES = ("fam_a", "fam_b", "fam_c")


def _write_states(corpus_root, states, hidden=12):
    """States whose ``answer`` rep at layer 2 carries the probe's label and ``last`` is pure noise."""
    corpus = TraceCorpus.load(corpus_root)
    rng = np.random.default_rng(0)
    for fam in FAMILIES:
        ids, probe, labels = [], [], []
        for t in corpus.traces(fam):
            ids += [t.trace_id] * t.n_probes
            probe += list(range(t.n_probes))
            labels += list(t.labels)
        n, y = len(ids), np.array(labels)
        arrays = {r: rng.normal(size=(n, 2, hidden)).astype(np.float16) for r in ("last", "mean", "trigger", "answer")}
        arrays["answer"][:, 1, 0] += (2.5 * y - 1.0).astype(np.float16)
        (states / fam).mkdir(parents=True)
        np.savez(states / fam / "00000-00059.npz", trace_id=np.array(ids), probe=np.array(probe, dtype=np.int32),
                 answer_match=np.ones(len(corpus.traces(fam)), np.float32), **arrays)


def test_pilot_finds_the_signal_where_it_is_and_not_where_it_is_not(tmp_path):
    root = write_tiny_corpus(tmp_path / "corpus", families=FAMILIES, n=40)
    _write_states(root, tmp_path / "states")
    cfg = {"corpus": root, "states": str(tmp_path / "states"), "out": str(tmp_path / "out"), "families": list(FAMILIES),
           "layers": [1, 2], "probes": {"logistic": {"kind": "logistic"}},
           "views": [{"rep": "answer", "layers": [2]}, {"rep": "last", "layers": [2]},
                     {"rep": "answer", "layers": [1, 2], "projection": "pca", "width": 4}, {"stored": True}]}
    (tmp_path / "pilot.yaml").write_text(yaml.safe_dump(cfg))
    assert study.main(["--config", str(tmp_path / "pilot.yaml")]) == 0
    results = __import__("json").loads((tmp_path / "out" / "results.json").read_text())
    views = results["views"]
    assert views["answer L2 full | logistic"]["correct_roc_auc"] > 0.85
    assert 0.3 < views["last L2 full | logistic"]["correct_roc_auc"] < 0.7
    assert views["answer L2 full | logistic"]["paid"] and not views["last L2 full | logistic"]["paid"]
    assert views["answer L2 full | logistic"]["hindsight_savings"] > views["last L2 full | logistic"]["hindsight_savings"]
    report = (tmp_path / "out" / "report.md").read_text()
    assert study.main(["--config", str(tmp_path / "pilot.yaml"), "--report_only"]) == 0
    assert (tmp_path / "out" / "report.md").read_text() == report  # renders identically from stored figures


def test_hindsight_savings_uses_the_one_accounting_and_keeps_full_generation():
    from types import SimpleNamespace as T

    def trace(em, final_em):
        t = T(positions=np.array([10, 20, 30]), probe_tokens=np.array([5, 5, 5]), reasoning_tokens=40, cap_probe=None,
              labels=np.array(em, dtype=np.float32), final_em=final_em)
        t.stop_em = lambda i, t=t: t.final_em if i is None else bool(t.labels[i] > 0.5)
        t.full_cost = 40
        return t

    traces = [trace([0, 1, 1], True), trace([1, 1, 1], True)]
    perfect = [np.array([0.0, 1.0, 1.0]), np.array([1.0, 1.0, 1.0])]
    # free: stop at probe 1 (20 + 5) and probe 0 (10 + 5): 1 - 40/80; paid: 20 + 10 and 10 + 5: 1 - 45/80
    assert hindsight_savings(traces, perfect, paid=False) == pytest.approx(0.5)
    assert hindsight_savings(traces, perfect, paid=True) == pytest.approx(1 - 45 / 80)
    # the published methods' count (reasoning tokens only, labelled so in the report): 1 - (20 + 10) / 80
    assert hindsight_savings(traces, perfect, paid=True, count_probes=False) == pytest.approx(1 - 30 / 80)
    wrong_first = [np.array([1.0, 0.0, 0.0]), np.array([1.0, 0.0, 0.0])]  # stopping loses trace 0: drop 50 points
    assert hindsight_savings(traces, wrong_first, paid=False) == 0.0  # only full generation is within 1 point


def test_discrimination_matches_a_rank_reference_and_probe_fits_separable_data():
    rng = np.random.default_rng(1)
    y = rng.random(200) < 0.3
    s = (rng.random(200) + 0.3 * y) / 1.3
    pos, neg = s[y], s[~y]
    ref = np.mean(pos[:, None] > neg[None, :])
    assert discrimination(s, y)["roc_auc"] == pytest.approx(ref, abs=1e-4)
    x = rng.normal(size=(300, 5))
    lab = (x[:, 0] > 0).astype(float)
    for kind in ("logistic", "mlp"):
        score = fit_probe(x, lab, ProbeFit(kind=kind, epochs=20))
        assert discrimination(score(x), lab)["roc_auc"] > 0.95


def test_bad_settings_name_the_choices():
    with pytest.raises(ValueError, match="valid: logistic, mlp"):
        ProbeFit(kind="svm")
    with pytest.raises(ValueError, match="valid: full, random, pca"):
        View(projection="umap")
