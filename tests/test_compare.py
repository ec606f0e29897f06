"""``maml-stop compare``: the paired bootstrap against NumPy resampling, verdicts on hand-made results
with and without a difference, and results whose episodes differ refused (issue 12 item 5)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from maml_stop import cli
from maml_stop.evaluate import compare as C

REF_RESULTS = Path(__file__).resolve().parents[1] / "runs" / "ref_main" / "evaluate" / "results.json"
N = 40  # episodes per family and K


def _results(figures: dict[str, dict[str, dict[str, list[float]]]], seed: int = 0, full_tokens: float = 100.0) -> dict:
    """A results.json-shaped dict: figures[family][method] = {"savings": [N], "em_drop": [N]} at K = 4."""
    rng = np.random.default_rng(123)  # full generation's per-episode figures: the same for every file
    out: dict = {"families": list(figures), "k": [4], "threshold_methods": ["em_target", "fixed"],
                 "episodes": N, "config": {"corpus": "corpus", "seed": seed, "episodes": N, "query": None,
                                          "splits": None, "min_probes": 1}, "results": {}}
    methods: list[str] = []
    for family, cells in figures.items():
        full_em = np.round(rng.uniform(0.3, 0.9, N), 3).tolist()
        out["results"][family] = {"4": {}}
        for method, fig in cells.items():
            methods += [method] if method not in methods else []
            chosen = {"savings": list(fig["savings"]), "em_drop": list(fig["em_drop"]), "full_em": full_em,
                      "full_tokens": [full_tokens] * N}
            out["results"][family]["4"][method] = {"thresholds": {"em_target": chosen, "fixed": chosen}}
    out["methods"] = methods
    return out


def _pair(shift_savings: float, shift_em: float, seed: int = 0):
    """Results A and B of method 'maml': A = B + shift + symmetric noise (noise mean exactly 0)."""
    rng = np.random.default_rng(seed)
    figs_a, figs_b = {}, {}
    for family in ("fam_a", "fam_b"):
        base_s, base_e = rng.uniform(0.2, 0.6, N), rng.uniform(0.0, 0.05, N)
        noise = rng.normal(0, 0.03, N // 2)
        noise = np.concatenate([noise, -noise])  # mean 0
        figs_b[family] = {"maml": {"savings": base_s.tolist(), "em_drop": base_e.tolist()}}
        figs_a[family] = {"maml": {"savings": (base_s + shift_savings + noise).tolist(),
                                   "em_drop": (base_e + shift_em + noise[::-1] / 3).tolist()}}
    return _results(figs_a), _results(figs_b)


def _rows(table, figure):
    return {r["family"]: r for r in table["rows"] if r["figure"] == figure}


def test_constant_differences_give_a_zero_width_interval():
    a = np.random.default_rng(0).uniform(size=30)
    est, low, high = C.paired_bootstrap(a, a - 0.25, n_resamples=500, seed=3)
    assert est == pytest.approx(0.25, abs=1e-12) and low == pytest.approx(0.25, abs=1e-12) and high == pytest.approx(0.25, abs=1e-12)
    assert C.verdict("savings", low, high) == "A saves more"
    assert C.paired_bootstrap(a, a, 100, 0) == (0.0, 0.0, 0.0)
    assert C.verdict("em_drop", 0.0, 0.0) == "no difference at 95%"


def test_paired_bootstrap_matches_numpy_resampling():
    rng = np.random.default_rng(7)
    a, b = rng.normal(0.4, 0.1, 25), rng.normal(0.35, 0.1, 25)
    est, low, high = C.paired_bootstrap(a, b, n_resamples=2000, seed=11)
    ref_rng = np.random.default_rng(11)
    idx = ref_rng.integers(0, 25, (2000, 25))  # one resample of the episode indices per row, both methods
    dist = (a[idx] - b[idx]).mean(axis=-1)
    np.testing.assert_allclose([est, low, high], [(a - b).mean(), *np.quantile(dist, [0.025, 0.975])], rtol=1e-12)
    # pairing matters: with b strongly tied to a the paired interval is much narrower than an unpaired one
    b_tied = a - 0.05 + rng.normal(0, 0.01, 25)
    _, lo, hi = C.paired_bootstrap(a, b_tied, 2000, 0)
    assert hi - lo < 0.02 and lo > 0


def test_stratified_bootstrap_matches_numpy_resampling():
    rng = np.random.default_rng(1)
    pairs = [(rng.normal(0.5, 0.1, n), rng.normal(0.4, 0.1, n)) for n in (20, 30, 25)]
    est, low, high = C.stratified_paired_bootstrap(pairs, n_resamples=1500, seed=5)
    ref_rng = np.random.default_rng(5)
    means = []
    for a, b in pairs:  # each family resampled on its own, in order, from one generator
        d = a - b
        means.append(d[ref_rng.integers(0, d.size, (1500, d.size))].mean(axis=-1))
    dist = np.mean(means, axis=0)
    want = [np.mean([(a - b).mean() for a, b in pairs]), *np.quantile(dist, [0.025, 0.975])]
    np.testing.assert_allclose([est, low, high], want, rtol=1e-12)


def test_known_difference_is_found():
    a, b = _pair(shift_savings=0.05, shift_em=0.0)
    table = C.compare(a, b, "maml", n_resamples=2000)
    savings, em = _rows(table, "savings"), _rows(table, "em_drop")
    assert set(savings) == {"fam_a", "fam_b", "mean"}
    for row in savings.values():
        assert row["difference"] == pytest.approx(5.0, abs=1e-9)  # points
        assert 0 < row["low"] < 5.0 < row["high"] and row["verdict"] == "A saves more"
    for row in em.values():
        assert row["difference"] == pytest.approx(0.0, abs=1e-9)
        assert row["low"] < 0 < row["high"] and row["verdict"] == "no difference at 95%"
    b_more = C.compare(b, a, "maml", n_resamples=500)
    assert {r["verdict"] for r in b_more["rows"] if r["figure"] == "savings"} == {"B saves more"}
    lossy = C.compare(*_pair(0.0, 0.02), "maml", n_resamples=500)
    assert {r["verdict"] for r in lossy["rows"] if r["figure"] == "em_drop"} == {"A loses more EM"}


def test_no_difference_covers_zero():
    a, b = _pair(shift_savings=0.0, shift_em=0.0)
    table = C.compare(a, b, "maml", n_resamples=2000)
    for row in table["rows"]:
        assert row["low"] < 0 < row["high"] and row["verdict"] == "no difference at 95%"
        assert row["difference"] == pytest.approx(0.0, abs=1e-9)


def test_mismatched_episodes_are_refused():
    a, b = _pair(0.05, 0.0)
    other_seed = copy.deepcopy(b)
    other_seed["config"]["seed"] = 1
    with pytest.raises(ValueError, match=r"same episodes(.|\n)*seed: 0 vs 1"):
        C.compare(a, other_seed, "maml")
    fewer = copy.deepcopy(b)
    fewer["config"]["episodes"] = fewer["episodes"] = N - 1
    for cell in (fewer["results"]["fam_a"]["4"]["maml"]["thresholds"]["em_target"],):
        for key in cell:
            cell[key] = cell[key][:-1]
    with pytest.raises(ValueError, match="episodes"):
        C.compare(a, fewer, "maml")
    other_traces = copy.deepcopy(b)
    other_traces["results"]["fam_b"]["4"]["maml"]["thresholds"]["em_target"]["full_tokens"][3] = 101.0
    with pytest.raises(ValueError, match="fam_b K=4: full generation's full_tokens differs in 1 episodes"):
        C.compare(a, other_traces, "maml")
    other_corpus = copy.deepcopy(b)
    other_corpus["config"]["corpus"] = "elsewhere"
    with pytest.raises(ValueError, match="corpus"):
        C.compare(a, other_corpus, "maml")


def test_choices_are_named():
    a, b = _pair(0.0, 0.0)
    with pytest.raises(ValueError, match="method 'pooled' is not in results A; its methods: maml"):
        C.compare(a, b, "pooled")
    with pytest.raises(ValueError, match="threshold rule 'ltt' is not in results A; its rules: em_target, fixed"):
        C.compare(a, b, "maml", threshold_method="ltt")
    with pytest.raises(ValueError, match=r"K \[8\] not in both results; shared K: \[4\]"):
        C.compare(a, b, "maml", k=[8])
    with pytest.raises(ValueError, match=r"families \['gcd'\] not in both"):
        C.compare(a, b, "maml", families=["gcd"])
    only_a = C.compare(a, b, "maml", families=["fam_a"], n_resamples=200)
    assert {r["family"] for r in only_a["rows"]} == {"fam_a"}  # one family: no mean row


def test_cli_markdown_json_and_one_file(tmp_path, capsys):
    a, b = _pair(0.05, 0.0)
    both = copy.deepcopy(a)  # one file with two methods: maml (= A's) and pooled (= B's maml)
    for family in both["results"]:
        both["results"][family]["4"]["pooled"] = b["results"][family]["4"]["maml"]
    both["methods"].append("pooled")
    paths = {}
    for name, res in (("a", a), ("b", b), ("both", both)):
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(res))
    out = tmp_path / "cmp" / "compare.json"
    assert cli.main(["compare", str(paths["a"]), str(paths["b"]), "--n_resamples", "500", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| 4 | mean | 80 |" in text and "A saves more" in text and "## EM drop" in text
    saved = json.loads(out.read_text())
    assert saved["unit"] == "percentage points" and saved["method_b"] == "maml" and len(saved["rows"]) == 6
    assert cli.main(["compare", str(paths["both"]), "--method_a", "maml", "--method_b", "pooled",
                     "--n_resamples", "500", "--out", str(tmp_path / "one.json")]) == 0
    capsys.readouterr()
    one = json.loads((tmp_path / "one.json").read_text())
    assert [(r["difference"], r["verdict"]) for r in one["rows"]] == [(r["difference"], r["verdict"]) for r in saved["rows"]]
    assert cli.main(["compare", str(paths["a"])]) == 2  # one file, one method: nothing to compare
    bad = copy.deepcopy(b)
    bad["config"]["seed"] = 2
    paths["bad"] = tmp_path / "bad.json"
    paths["bad"].write_text(json.dumps(bad))
    assert cli.main(["compare", str(paths["a"]), str(paths["bad"])]) == 2
    assert "seed: 0 vs 2" in capsys.readouterr().err


@pytest.mark.skipif(not REF_RESULTS.exists(), reason="runs/ref_main/evaluate/results.json is not here")
def test_real_results_same_run_no_difference_and_two_methods():
    res = json.loads(REF_RESULTS.read_text())
    same = C.compare(res, copy.deepcopy(res), "maml", k=[16], n_resamples=500)
    assert all(r["difference"] == 0.0 and r["verdict"] == "no difference at 95%" for r in same["rows"])
    two = C.compare(res, res, "maml", "pooled", k=[16], n_resamples=500)
    assert {r["family"] for r in two["rows"]} == set(res["families"]) | {"mean"}


def test_doctest():
    import doctest

    assert doctest.testmod(C).failed == 0
