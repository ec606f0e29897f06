"""The serve loop without a model (maml_stop.serve.loop): feedback runs step the monitor, which falls
back to full generation when its bound crosses delta and comes back; A/B pairs get one request each and
the always-valid test decides on their rewards; labels from gold or a judgement; the same state when
the log is replayed."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from maml_stop.learn.predictor import StoppingPredictor
from maml_stop.online import ABConfig, MonitorConfig, OnlineConfig
from maml_stop.serve.config import ServeConfig
from maml_stop.serve.loop import Arm, OnlineLoop, labelled, trace_from_json

FAMILY = "basic_arithmetic"


def _family():
    from tasks import get_family

    return get_family(FAMILY)


def _config(**kw) -> ServeConfig:
    online = OnlineConfig(sample_rate=0.0, delta=0.2, monitor=MonitorConfig(window=10, alpha=0.1, bound="lower",
                                                                            min_feedback=3))
    return ServeConfig(model="m", artifact="a", online=online, **kw)


def _loop(config: ServeConfig, arms=("A",)) -> OnlineLoop:
    torch.manual_seed(0)
    made = {n: Arm(n, StoppingPredictor(2, hidden=4, depth=1), 0.5, ["f0", "f1"], "every", config.online) for n in arms}
    return OnlineLoop(made, config, _family())


def _run(answers=("1", "2"), final="2") -> dict:
    """A stored feedback run: two probes (answers ``answers``), its final answer ``final``."""
    return {"id": "r", "family": FAMILY, "n_features": 2, "features": [[0.0, 0.0], [1.0, 1.0]], "positions": [4, 8],
            "probe_tokens": [3, 3], "probe_answers": list(answers), "logprob_mean": [0.0, 0.0],
            "reasoning_tokens": 12, "hit_cap": False, "cap_probe": None}


def _row(gold: str, decision: int | None = 0, final="2", arm="A") -> dict:
    return {"plan": "feedback", "trace": _run(final=final), "answer": final, "gold": gold, "correct": None,
            "decision": decision, "arm": arm}


def test_labels_from_gold_and_from_a_judgement():
    trace, fam = trace_from_json(_run()), _family()
    assert trace.n_probes == 2 and trace.stop_cost(0) == (7, 4) and trace.stop_cost(None) == (18, 12)
    gold = labelled(trace, "2", "2", None, fam)
    assert gold.labels.tolist() == [0.0, 1.0] and gold.final_em
    assert labelled(trace, "2", None, True, fam).labels.tolist() == [0.0, 1.0]  # right: the final is gold
    wrong = labelled(trace, "2", None, False, fam)
    assert wrong.labels.tolist() == [0.0, 0.0] and not wrong.final_em


def test_monitor_falls_back_when_its_bound_crosses_delta_and_comes_back():
    loop = _loop(_config())
    arm = loop.arms["A"]
    assert loop.plan(0).kind == "stop" and math.isclose(loop.plan(0).live_tau, 0.5)
    ds = [loop.learn(_row("2")) for _ in range(3)]  # the early answer "1" loses the final "2": d = 1
    assert ds == [1, 1, 1] and arm.fallback and arm.state()["bound"] > 0.2
    plan = loop.plan(1)
    assert plan.kind == "full" and plan.fallback and math.isinf(plan.live_tau)
    n = 0
    while arm.fallback:  # clean feedback (the decision agrees with a right final answer): d = 0
        assert loop.learn(_row("2", decision=1)) == 0
        n += 1
        assert n <= 10
    assert arm.state()["bound"] <= 0.2 and loop.plan(2).kind == "stop" and arm.monitor.alarms == 1
    from maml_stop.online import clopper_pearson

    first = next(m for m in range(1, 8) if clopper_pearson(3, 3 + m, 0.1, "lower") <= 0.2)
    assert n == first == 4  # 3 losses in 7: the lower bound is under delta again


def test_feedback_runs_are_drawn_by_seq_at_the_sample_rate():
    cfg = _config()
    loop = _loop(dataclasses.replace(cfg, online=dataclasses.replace(cfg.online, sample_rate=0.25)))
    kinds = [loop.plan(s).kind for s in range(400)]
    assert kinds == [loop.plan(s).kind for s in range(400)]  # a restart draws the same
    assert 0.18 < kinds.count("feedback") / 400 < 0.32 and set(kinds) == {"stop", "feedback"}


def test_ab_pairs_split_and_the_sequential_test_decides():
    cfg = _config(artifact_b="b", ab=ABConfig(alpha=0.05, min_pairs=5, t_star=50, max_requests=200))
    loop = _loop(cfg, ("A", "B"))
    arms = [loop.arm_of(s) for s in range(200)]
    assert all(sorted(arms[2 * k:2 * k + 2]) == ["A", "B"] for k in range(100))
    assert arms[0::2].count("A") not in (0, 100)  # the coin, not the parity, picks
    verdict = None
    for seq in range(40):  # A answers right with 10 tokens more than B's wrong answers
        arm = arms[seq]
        out = loop.record_outcome(seq, arm, em=arm == "A", tokens=30 if arm == "A" else 20 + seq % 3)
        verdict = verdict or out
    assert verdict == "A better" and loop.verdict == "A better"
    assert loop.ab.n >= cfg.ab.min_pairs and loop.states()["ab"]["lower"] > 0
    with pytest.raises(ValueError, match="arm B exactly when artifact_b"):
        OnlineLoop({"A": loop.arms["A"]}, cfg, _family())


def test_agreement_feedback_learns_label_free():
    cfg = _config()
    loop = _loop(dataclasses.replace(cfg, online=dataclasses.replace(cfg.online, feedback="agreement")))
    assert loop.learns_from("agreement") and not loop.learns_from("gold")
    row = {**_row(None), "source": "agreement"}
    assert loop.learn(row) == 1  # the early "1" disagrees with the run's own "2"
    assert loop.learn({**_row(None, decision=1), "source": "agreement"}) == 0
