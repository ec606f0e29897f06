"""experiments/serve_drift.py's figures on hand-built request rows (no model): the recovery point after a
switch, the rolling EM, and report.md + recovery.png rebuilt from results.json with no machine path."""

from __future__ import annotations

import json

import numpy as np


def _module():
    from experiment_scripts import load_script

    return load_script("serve_drift")


def _rows(segment: int, bad_until: int) -> list[dict]:
    """Two families of ``segment`` requests; every 5th a feedback run (full generation, always right); the
    served answers of the second family wrong for its first ``bad_until`` requests, right afterwards."""
    rows = []
    for i in range(2 * segment):
        fam, j = ("gcd", i) if i < segment else ("lcm", i - segment)
        feedback = i % 5 == 0
        em = feedback or not (fam == "lcm" and j < bad_until)
        rows.append({"i": i, "family": fam, "plan": "feedback" if feedback else "stop", "em": bool(em),
                     "tokens": 10, "stopped_early": not feedback, "fallback": False, "tau": 0.3})
    return rows


def test_recovery_is_the_first_window_within_delta_after_the_switch():
    m = _module()
    cfg = m.ServeDriftConfig(delta=0.05, stream=m.StreamConfig(families=("gcd", "lcm"), segment=40, window=10))
    fig = m.report(_rows(40, bad_until=15), cfg)
    # the window [n-10, n) of the second segment holds no wrong served answer from n = 25 on
    assert fig["switches"] == [{"to": "lcm", "recovered_after": 25, "recovered_after_corpus": None}]  # no reference
    assert fig["segments"][0]["served_em"] == 1.0 and fig["segments"][1]["full_em_feedback_runs"] == 1.0
    never = m.report(_rows(40, bad_until=40), cfg)
    assert never["switches"][0]["recovered_after"] is None
    served, full, n_fb = m.rolling(_rows(40, bad_until=15), 10)
    assert len(served) == 80 - 10 + 1 and np.all(n_fb == 2) and np.all(full == 1.0)


def test_report_only_rebuilds_the_report_without_a_machine_path(tmp_path):
    m = _module()
    cfg = m.ServeDriftConfig(stream=m.StreamConfig(families=("gcd", "lcm"), segment=40, window=10))
    rows = _rows(40, bad_until=15)
    (tmp_path / "results.json").write_text(json.dumps({"tiny": False, "model": "/some/machine/models/qwen05",
                                                       **m.report(rows, cfg), "requests": rows}))  # reference {}
    m.write_report(tmp_path, cfg)
    md = (tmp_path / "report.md").read_text()
    assert md.startswith("# Live drift through maml-stop serve (qwen05)") and "/some/machine" not in md
    assert "switch to lcm: rolling served EM within 0.05 of the feedback runs' full EM after 25 requests" in md
    assert (tmp_path / "recovery.png").stat().st_size > 10_000


def test_the_corpus_reference_judges_every_window_against_the_families_full_em():
    m = _module()
    cfg = m.ServeDriftConfig(delta=0.05, stream=m.StreamConfig(families=("gcd", "lcm"), segment=40, window=10))
    rows = _rows(40, bad_until=15)
    # lcm's corpus full EM 0.8: a window of the second segment is within 0.05 from 8 of 10 served right on
    fig = m.report(rows, cfg, {"gcd": {"full_em": 1.0, "traces": 100}, "lcm": {"full_em": 0.8, "traces": 100}})
    # after the switch the wrong answers are j < 15 but every 5th (a feedback run): the window j = 12..21
    # (n = 22) holds 3 of them (7/10 right), j = 13..22 (n = 23) holds 2 (8/10 >= 0.8 - 0.05)
    assert fig["switches"][0]["recovered_after_corpus"] == 23
    assert fig["segments"][1]["corpus_full_em"] == 0.8
    w = fig["windows"]["corpus"]
    assert w["windows"] == 71 and 0 < w["share_within"] < 1 and w["worst_gap"] < -0.05
    assert fig["windows"]["feedback_runs"]["windows"] == 71
