"""maml_stop.online: label-free labels, the EM-drop monitor, the online stopper across a family switch,
and the sequential A/B test (hand-made traces, an untrained 2-feature predictor)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from maml_stop.decide.policies import ProbePolicy, evaluate_policy
from maml_stop.decide.registry import make_selector
from maml_stop.learn.adapter import InnerLoopAdapter
from maml_stop.learn.predictor import StoppingPredictor
from maml_stop.online import (ABConfig, DropMonitor, MonitorConfig, OnlineConfig, OnlineStopper, SequentialAB,
                              agreement_labels, clopper_pearson, feedback_trace, probe_labels, run_ab)
from trace_helpers import make_trace

DELTA = 0.05


def family_trace(i: int, family: str, rng: np.random.Generator):
    """Four probes; feature 0 is -1, -1, +1, +1. Family "a": the late probes (x0 = +1) are correct;
    family "b": the early ones (x0 = -1) are. The final answer is always right."""
    labels = [0, 0, 1, 1] if family == "a" else [1, 1, 0, 0]
    feats = np.stack([np.array([-1.0, -1.0, 1.0, 1.0]), rng.normal(0, 0.3, 4)], axis=1)
    return make_trace(labels, features=feats, final_em=True, trace_id=f"{family}/{i:04d}#0", family=family,
                      step=20, probe_cost=5)


@pytest.fixture(scope="module")
def pools():
    rng = np.random.default_rng(0)
    return {f: [family_trace(i, f, rng) for i in range(60)] for f in ("a", "b")}


def make_adapter() -> InnerLoopAdapter:
    torch.manual_seed(0)
    return InnerLoopAdapter(StoppingPredictor(2, hidden=8, depth=1), inner_lr=1.0, inner_steps=20, first_order=True)


def rule_drop(stopper: OnlineStopper, pool) -> float:
    """True EM drop of the rule in force on ``pool`` (0 while full generation is served)."""
    if stopper.fallback or stopper.idle:
        return 0.0
    out = evaluate_policy(stopper.policy, pool, param=stopper.tau)
    return float(out.full_em.mean() - out.em.mean())


CONFIG = OnlineConfig(window=16, refit_every=4, sample_rate=0.5, delta=DELTA, step0=1.0, decay=1000.0, seed=0,
                      monitor=MonitorConfig(window=20, alpha=0.1, bound="lower", min_feedback=5))


@pytest.mark.parametrize("feedback", ["gold", "agreement"])
def test_online_stopper_returns_within_delta_after_a_switch_and_the_frozen_one_does_not(pools, feedback):
    torch.set_num_threads(1)
    adapter = make_adapter()
    support = pools["a"][:8]
    frozen = ProbePolicy(adapter=adapter, selector=make_selector("em_target", delta=DELTA), name="frozen").fit(support)
    stopper = OnlineStopper(adapter, support, OnlineConfig(**{**CONFIG.__dict__, "feedback": feedback}))
    rng = np.random.default_rng(1)
    for t in [pools["a"][i] for i in rng.integers(8, 60, 40)]:  # before the switch: both save, lose nothing
        stopper.serve(t, "42")
    assert rule_drop(stopper, pools["a"][8:]) <= DELTA
    frozen_a = evaluate_policy(frozen, pools["a"][8:])
    assert frozen_a.em.mean() == 1.0 and frozen_a.total_tokens.sum() < frozen_a.full_tokens.sum()
    frozen_b = evaluate_policy(frozen, pools["b"])
    assert frozen_b.full_em.mean() - frozen_b.em.mean() > 0.5  # the frozen policy stops where "b" is wrong
    recovered = saving = None
    for n, t in enumerate(pools["b"][i] for i in rng.integers(0, 60, 150)):
        served = stopper.serve(t, "42")
        assert served.total_tokens >= served.reasoning_tokens
        drop = rule_drop(stopper, pools["b"])
        if recovered is None and drop <= DELTA:
            recovered = n + 1
        if saving is None and drop <= DELTA and not (stopper.fallback or stopper.idle):
            out = evaluate_policy(stopper.policy, pools["b"], param=stopper.tau)
            saving = n + 1 if out.total_tokens.sum() < out.full_tokens.sum() else None
    assert recovered is not None and recovered <= 60, recovered  # within delta (maybe by not stopping)
    assert saving is not None and saving <= 100, saving  # within delta while saving tokens
    assert rule_drop(stopper, pools["b"]) <= DELTA  # and it stays within delta
    # by the end it stops early on "b" again (the early probes are right there): tokens saved, no EM lost
    out = evaluate_policy(stopper.policy, pools["b"], param=stopper.tau)
    assert not stopper.fallback and not stopper.idle
    assert out.em.mean() == 1.0 and out.total_tokens.sum() < out.full_tokens.sum()
    assert stopper.n_refits >= 5
    print(feedback, "recovered after", recovered, saving, "requests; alarms", stopper.monitor.alarms)


def test_serving_charges_tokens_by_the_accounting(pools):
    adapter = make_adapter()
    t = pools["a"][10]
    stopper = OnlineStopper(adapter, pools["a"][:8], OnlineConfig(sample_rate=1.0, delta=DELTA))
    s = stopper.serve(t, "42")  # a feedback request runs to the end with every probe
    assert s.feedback and s.index is None and s.total_tokens == t.stop_cost(None)[0] and s.em == t.final_em
    stopper = OnlineStopper(adapter, pools["a"][:8], OnlineConfig(sample_rate=0.0, delta=DELTA))
    s = stopper.serve(t, "42")
    assert not s.feedback and s.index == s.decision == 2 and s.total_tokens == t.stop_cost(2)[0] == 60 + 15
    stopper.monitor.fallback = True  # fallback: plain full generation, no probes
    s = stopper.serve(t, "42")
    assert s.fallback and s.index is None and s.total_tokens == t.full_cost and s.decision == 2


def test_the_cost_selector_sets_the_threshold_on_the_window(pools):
    adapter = make_adapter()
    cfg = OnlineConfig(rule="cost", refit_every=2, sample_rate=1.0, delta=DELTA, token_price=0.001,
                       wrong_answer_cost=1.0)
    stopper = OnlineStopper(adapter, pools["a"][:8], cfg)
    for t in pools["a"][8:12]:
        stopper.serve(t, "42")
    assert stopper.n_refits == 2
    assert stopper.tau == stopper.policy.choose(make_selector("cost", token_price=0.001, wrong_answer_cost=1.0))
    assert stopper.tau is not None  # stopping at probe 2 is free of errors and cheaper: cost picks a threshold


def test_config_errors_name_the_valid_choices():
    with pytest.raises(ValueError, match="gold, agreement"):
        OnlineConfig(feedback="silver")
    with pytest.raises(ValueError, match="sa, fixed, em_target, ltt, cost"):
        OnlineConfig(rule="best")
    with pytest.raises(ValueError, match="upper, lower"):
        MonitorConfig(bound="middle")


def test_label_free_labels_on_a_hand_made_trace():
    t = make_trace([0, 1, 0, 1], answers=["3", " 7 ", "x", "7"], final_em=False)
    assert agreement_labels(t, "7").tolist() == [0.0, 1.0, 0.0, 1.0]
    assert probe_labels(t, "gold").tolist() == [0.0, 1.0, 0.0, 1.0]  # the stored probe EM
    relabelled = feedback_trace(t, "agreement", "3")
    assert relabelled.labels.tolist() == [1.0, 0.0, 0.0, 0.0] and relabelled.final_em  # no gold used
    assert t.labels.tolist() == [0.0, 1.0, 0.0, 1.0]  # the original is untouched
    nothing = feedback_trace(t, "agreement", "")  # the run stated no answer: nothing agrees, no loss counted
    assert nothing.labels.tolist() == [0.0] * 4 and not nothing.final_em
    assert feedback_trace(t, "gold") is t
    with pytest.raises(ValueError, match="final answer"):
        feedback_trace(t, "agreement")
    with pytest.raises(ValueError, match="gold, agreement"):
        probe_labels(t, "vote")


def test_clopper_pearson_matches_closed_forms():
    for n in (1, 10, 57):
        assert clopper_pearson(0, n, 0.1, "upper") == pytest.approx(1 - 0.1 ** (1 / n))
        assert clopper_pearson(n, n, 0.1, "lower") == pytest.approx(0.1 ** (1 / n))
    assert clopper_pearson(3, 20, 0.05, "upper") == pytest.approx(stats.beta.ppf(0.95, 4, 17))
    assert clopper_pearson(0, 0, 0.1, "upper") == 1.0 and clopper_pearson(0, 5, 0.1, "lower") == 0.0


@pytest.mark.parametrize("net", [False, True])
def test_monitor_falls_back_and_returns(net):
    m = DropMonitor(0.1, MonitorConfig(window=30, alpha=0.1, bound="lower", min_feedback=10, net=net))
    states = [m.update(0) for _ in range(10)]
    assert not any(states)
    states = [m.update(1) for _ in range(12)]
    assert states[-1] and m.fallback and m.alarms == 1
    first_alarm = states.index(True)
    assert first_alarm < 10  # detected within a bounded number of bad feedbacks
    states = [m.update(0) for _ in range(40)]
    assert not states[-1] and states.index(False) < 30  # back once the losses leave the window
    # upper ("certify"): trusted only once enough clean feedback bounds the drop by delta
    u = DropMonitor(0.1, MonitorConfig(window=100, alpha=0.1, bound="upper", min_feedback=5, start_in_fallback=True))
    states = [u.update(0) for _ in range(30)]
    assert states[4] and not states[-1]  # 1 - 0.1 ** (1 / n) <= 0.1 from n = 22
    assert states.index(False) == 21
    assert u.update(1) and u.fallback  # one loss in 31 is above what delta allows at this alpha


def test_net_monitor_counts_gains():
    one_sided = DropMonitor(0.1, MonitorConfig(window=40, bound="lower", min_feedback=10))
    net = DropMonitor(0.1, MonitorConfig(window=40, bound="lower", min_feedback=10, net=True))
    for d in [1, -1] * 20:  # as many losses as gains: no EM drop
        one_sided.update(d)
        net.update(d)
    assert one_sided.fallback and not net.fallback
    assert net.estimate() == 0.0 and one_sided.estimate() == 0.5


def _ab_stream(n: int, seed: int):
    rng = np.random.default_rng(seed)
    return [make_trace([int(rng.random() < 0.2), 1, 1], final_em=bool(rng.random() < 0.7), trace_id=f"q{i}#0")
            for i in range(n)]


def full_generation(trace):
    return bool(trace.final_em), trace.full_cost


def first_probe(trace):  # stops at once: cheap, mostly wrong
    return trace.stop_em(0), trace.stop_cost(0)[0]


def test_ab_picks_the_known_better_policy_within_a_bounded_number_of_requests():
    cfg = ABConfig(alpha=0.05, t_star=200, min_pairs=20, max_requests=2000, token_price=0.001, wrong_answer_cost=1.0)
    res = run_ab(full_generation, first_probe, _ab_stream(2000, 0), cfg)
    assert res.verdict == "A better" and res.n_requests <= 300 and res.lower > 0
    flipped = run_ab(first_probe, full_generation, _ab_stream(2000, 0), cfg)
    assert flipped.verdict == "B better" and flipped.upper < 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ab_says_no_difference_on_identical_policies(seed):
    cfg = ABConfig(alpha=0.05, t_star=200, min_pairs=20, max_requests=2000, seed=seed)
    res = run_ab(full_generation, full_generation, _ab_stream(2000, 10 + seed), cfg)
    assert res.verdict == "no difference" and res.n_requests == 2000 and res.lower <= 0 <= res.upper


def test_sequential_ab_confidence_sequence_covers_at_its_level():
    """The always-valid sequence on N(0.1, 1) differences: it covers the mean at every n from ``min_pairs``
    on in most runs (time-uniform, asymptotically at level 1 - alpha), and shrinks."""
    rng = np.random.default_rng(0)
    covered = 0
    for _ in range(200):
        ab = SequentialAB(ABConfig(alpha=0.1, t_star=100, min_pairs=20, max_requests=40))
        ok = True
        for d in rng.normal(0.1, 1.0, 300):
            ab.update(d, 0.0)
            ok &= ab.n < 20 or ab.lower <= 0.1 <= ab.upper
        covered += ok
    print("coverage", covered / 200)
    assert covered >= 0.85 * 200
    assert ab.upper - ab.lower < 0.5
