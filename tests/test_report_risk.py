"""The report's risk section: how often each threshold rule misses its EM-drop target (issue 16)."""

from __future__ import annotations

import math

import pytest

from maml_stop.evaluate import report as R
from maml_stop.decide.thresholds import binom_cdf


def test_clopper_pearson_upper_bound_is_the_exact_binomial_tail():
    assert R.clopper_pearson_upper(0, 50) == pytest.approx(1 - 0.05 ** (1 / 50))
    assert R.clopper_pearson_upper(7, 7) == 1.0
    assert math.isnan(R.clopper_pearson_upper(0, 0))
    for x, n in [(1, 10), (4, 50), (30, 150)]:
        upper = R.clopper_pearson_upper(x, n)
        assert x / n < upper < 1
        # the one-sided 95% bound is the rate p at which seeing <= x violations has probability 5%
        assert binom_cdf(x, n, upper) == pytest.approx(0.05, rel=1e-6)


def _cell(drops_by_selector: dict[str, list[float]], params: list | None) -> dict:
    n = len(next(iter(drops_by_selector.values())))
    thresholds = {
        s: {"param": params if params is not None else [None] * n, "em_drop": drops, "savings": [0.1] * n,
            "savings_reasoning": [0.1] * n, "em": [0.5] * n, "stopped": [0.5] * n}
        for s, drops in drops_by_selector.items()
    }
    return {"thresholds": thresholds, "curve_savings": [0.1] * n, "auc": [0.5] * n,
            "curve": {"em": [0.5], "savings": [0.1], "cost": [0.9], "full_em": 0.5}}


def _results() -> dict:
    none = {"em_target": [0.0] * 4, "ltt": [0.0] * 4}
    return {
        "k": [4], "families": ["fa", "fb"], "methods": ["full", "probe"], "episodes": 4,
        "threshold_methods": ["em_target", "ltt"], "delta": 0.01, "ltt_delta": 0.1, "ltt_alpha": 0.1,
        "results": {
            "fa": {"4": {"full": _cell(none, None),
                         "probe": _cell({"em_target": [0.0, 0.01, 0.02, 0.2], "ltt": [0.0, 0.05, 0.1, 0.2]},
                                        [0.5, 0.5, 0.5, 0.5])}},
            "fb": {"4": {"full": _cell(none, None),
                         "probe": _cell({"em_target": [-0.1, 0.03, 0.0, 0.0], "ltt": [0.0, 0.0, 0.0, 0.0]},
                                        [0.5, None, 0.5, 0.5])}},
        },
    }


def test_violation_rates_count_episodes_over_each_rules_own_target():
    res = _results()
    rates = R.violation_rates(res)["4"]
    assert list(rates) == ["probe"]  # full generation chooses no threshold: not listed
    fa, fb, pooled = rates["probe"]["fa"], rates["probe"]["fb"], rates["probe"]["all"]
    assert (fa["em_target"]["violations"], fa["em_target"]["episodes"]) == (2, 4)  # 0.02, 0.2 > 1 pt; 0.01 is within
    assert fa["ltt"]["violations"] == 1  # only 0.2 > 10 pt (0.1 is within)
    assert fb["em_target"]["violations"] == 1
    assert (pooled["em_target"]["violations"], pooled["em_target"]["episodes"]) == (3, 8)
    assert pooled["em_target"]["rate"] == pytest.approx(3 / 8)
    assert pooled["em_target"]["upper"] == pytest.approx(R.clopper_pearson_upper(3, 8))
    # the em_target violation rate is the complement of the "drop within target" share of the tables
    within = R.summarise(res, "em_target")["4"]["probe"]
    for fam in ("fa", "fb"):
        assert rates["probe"][fam]["em_target"]["rate"] == pytest.approx(1 - within[fam]["within_delta"][0])


def test_risk_tables_state_the_promises_and_list_every_rule():
    text = R.risk_tables(_results())
    assert text.startswith("## Risk of the threshold rules")
    assert "promises nothing" in text and "1 - alpha" in text and "(K < 22)" in text
    assert "| probe | em_target (1 pt) | 37.5% (≤ " in text
    assert "| **all** | probe | 37.5% (≤ " in text
    assert "| fa | full |" not in text
    assert text.endswith("|\n") and not text.endswith("\n\n")


def test_write_report_only_appends_the_risk_section(tmp_path, monkeypatch):
    for name in ("plot_curves", "plot_savings_vs_k", "plot_calibration"):
        monkeypatch.setattr(R, name, lambda *a, **k: tmp_path / "x.png")
    res = _results()
    risk = R.risk_tables(res)
    R.write_report(res, tmp_path / "with")
    monkeypatch.setattr(R, "risk_tables", lambda results: "")
    R.write_report(res, tmp_path / "without")
    before = (tmp_path / "without" / "results.md").read_text()
    after = (tmp_path / "with" / "results.md").read_text()
    assert after.startswith(before)
    assert after == before + "\n" + risk  # the sections before it are unchanged
