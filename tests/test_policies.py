"""Every baseline on hand-made traces where the right stopping index is known."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from maml_stop.decide import policies as P
from maml_stop.decide.thresholds import EMTargetThreshold, FixedThreshold, LTTThreshold
from maml_stop.learn.adapter import InnerLoopAdapter
from maml_stop.learn.pooled import train_predictor
from maml_stop.learn.predictor import fresh_copy
from trace_helpers import make_trace


def test_full_generation_pays_no_probes():
    t = make_trace([0, 1, 1], final_em=True, reasoning_tokens=57)
    out = P.FullGeneration().fit([t]).outcome(t)
    assert out == P.StopOutcome(None, True, 57, 57)


def test_oracle_earliest_correct_probe():
    t = make_trace([0, 0, 1, 1])  # positions 10, 20, 30, 40; probes cost 5
    out = P.OraclePolicy().outcome(t)
    assert out.index == 2 and out.em
    assert out.total_tokens == 30 + 3 * 5 and out.reasoning_tokens == 30


def test_first_probe_stops_at_once():
    t = make_trace([0, 1, 1], reasoning_tokens=50)  # positions 10, 20, 30; probes cost 5
    assert P.FirstProbe().outcome(t) == P.StopOutcome(0, False, 15, 10)
    bare = make_trace([], final_em=True, reasoning_tokens=20)  # no probe point: runs to the end
    assert P.FirstProbe().outcome(bare) == P.StopOutcome(None, True, 20, 20)


def test_oracle_without_correct_probe():
    right = make_trace([0, 0], final_em=True, reasoning_tokens=33)
    wrong = make_trace([0, 0], final_em=False, reasoning_tokens=33)
    assert P.OraclePolicy().outcome(right) == P.StopOutcome(None, True, 33, 33)  # runs to the end, no probes
    assert P.OraclePolicy().outcome(wrong) == P.StopOutcome(0, False, 15, 10)  # cheapest: first probe


def test_oracle_at_equal_em_spends_the_cheapest_fixes():
    a = make_trace([0, 0, 1], final_em=True, reasoning_tokens=40, trace_id="a")  # correct from probe 2 (45 tok)
    b = make_trace([0, 1], final_em=True, reasoning_tokens=40, trace_id="b")  # correct from probe 1 (30 tok)
    c = make_trace([1, 1], final_em=False, reasoning_tokens=40, trace_id="c")  # right at once, wrong at the end
    d = make_trace([0, 0], final_em=False, reasoning_tokens=40, trace_id="d")  # never right
    out = P.oracle_at_equal_em([a, b, c, d])
    # full generation gets 2 right; c is right at its cheapest point, so one fix is bought: b's (+15), not a's (+30)
    assert [o.em for o in out] == [False, True, True, False]
    assert [o.total_tokens for o in out] == [15, 30, 15, 15]
    # OraclePolicy buys every fix it can: more correct answers, more tokens
    most = [P.OraclePolicy().outcome(t) for t in (a, b, c, d)]
    assert sum(o.em for o in most) == 3 and sum(o.total_tokens for o in most) == 45 + 30 + 15 + 15
    # a trace that full generation gets right and no probe does keeps its full run
    e = make_trace([0, 0], final_em=True, reasoning_tokens=33)
    assert P.oracle_at_equal_em([e]) == [P.StopOutcome(None, True, 33, 33)]
    assert P.oracle_at_equal_em([]) == []


def test_oracle_at_equal_em_matches_brute_force():
    import itertools

    rng = np.random.default_rng(0)
    for trial in range(30):
        traces = [make_trace(rng.integers(0, 2, rng.integers(1, 4)).tolist(), final_em=bool(rng.integers(0, 2)),
                             reasoning_tokens=int(rng.integers(45, 60)), trace_id=str(i)) for i in range(4)]
        need = sum(t.final_em for t in traces)
        options = [[P.full_generation_outcome(t)] + [P._probe_outcome(t, j) for j in range(t.n_probes)] for t in traces]
        best = min(sum(o.total_tokens for o in combo) for combo in itertools.product(*options)
                   if sum(o.em for o in combo) >= need)
        got = P.oracle_at_equal_em(traces)
        assert sum(o.em for o in got) >= need, trial
        assert sum(o.total_tokens for o in got) == best, trial


def test_token_budget_cuts_at_last_probe_before_budget():
    t = make_trace([0, 1, 1, 0], reasoning_tokens=50)  # positions 10..40
    policy = P.TokenBudget(selector=FixedThreshold(25.0)).fit([t])
    assert policy.stop_index(t) == 1
    assert policy.outcome(t) == P.StopOutcome(1, True, 20 + 5, 20)  # pays one probe only
    assert policy.outcome_at(t, 60.0) == P.StopOutcome(None, True, 50, 50)  # ends within budget
    assert policy.stop_index_at(t, 5.0) == 0  # budget before the first probe: first forced answer


def test_token_budget_candidates_from_support_quantiles():
    support = [make_trace([1], reasoning_tokens=n, trace_id=str(n)) for n in (100, 200, 300)]
    policy = P.TokenBudget(quantiles=(1.0, 0.5, 0.0)).fit(support)
    assert policy.candidates == [300.0, 200.0, 100.0]
    assert policy.param == 200.0  # fixed selector: median budget by default


def test_consistency_window():
    t = make_trace([0, 0, 1, 1, 1], answers=["", "3", "4", "4", "4"])
    policy = P.AnswerConsistency()
    assert policy.stop_index_at(t, 1) == 1  # first non-empty answer
    assert policy.stop_index_at(t, 2) == 3
    assert policy.stop_index_at(t, 3) == 4
    assert policy.stop_index_at(t, 4) is None
    empty = make_trace([0, 0, 1], answers=["", "", "5"])
    assert policy.stop_index_at(empty, 2) is None  # empty answers never count as agreement


def test_consistency_never_firing_pays_every_probe():
    t = make_trace([0, 1, 1], answers=["1", "2", "3"], final_em=True, reasoning_tokens=40)
    out = P.AnswerConsistency(selector=FixedThreshold(2)).fit([t]).outcome(t)
    assert out == P.StopOutcome(None, True, 40 + 15, 40)


def test_confidence_threshold():
    t = make_trace([0, 1, 1], answers=["7", "", "42"], confidence=[0.5, 0.999, 0.97])
    policy = P.AnswerConfidence()
    assert policy.stop_index_at(t, 0.95) == 2  # probe 1 is confident but has no answer
    assert policy.stop_index_at(t, 0.4) == 0
    assert policy.stop_index_at(t, 0.99) is None


def test_em_target_tunes_consistency_window_on_support():
    # k=2 stops on a wrong repeated answer in the second trace; k=3 keeps every answer correct
    support = [
        make_trace([0, 1, 1, 1], answers=["1", "42", "42", "42"], trace_id="a", reasoning_tokens=200),
        make_trace([0, 0, 1, 1, 1], answers=["5", "5", "42", "42", "42"], trace_id="b", reasoning_tokens=200),
    ]
    policy = P.AnswerConsistency(selector=EMTargetThreshold(delta=0.0), windows=(4, 3, 2)).fit(support)
    assert policy.param == 3.0
    assert [policy.stop_index(t) for t in support] == [3, 4]


def test_ltt_falls_back_to_full_generation_with_few_shots():
    support = [make_trace([1, 1, 1], answers=["42"] * 3, trace_id=str(i)) for i in range(4)]
    policy = P.AnswerConsistency(selector=LTTThreshold(delta=0.01, alpha=0.1)).fit(support)
    assert policy.param is None
    t = support[0]
    assert policy.stop_index(t) is None and policy.outcome(t) == P.full_generation_outcome(t)


class FirstFeature(nn.Module):
    """A fixed 'predictor': logit = 10 * (feature 0 - 0.5)."""

    def forward(self, batch):
        return 10.0 * (batch.features[:, 0] - 0.5)


class RecordingAdapter:
    """Stands in for InnerLoopAdapter: records the support batch and returns a fixed model (the road,
    ``fit_support``, is the real one: it collates and calls ``adapt``)."""

    fit_support = InnerLoopAdapter.fit_support
    weighting = "uniform"

    def __init__(self, model: nn.Module) -> None:
        self.predictor = model
        self.calls: list = []

    def adapt(self, support, steps=None):
        self.calls.append((support, steps))
        return self.predictor


def _feature_trace(probs, **kw):
    f = np.zeros((len(probs), 2))
    f[:, 0] = probs
    return make_trace([1] * len(probs), features=f, **kw)


def test_probe_policy_first_probe_over_tau():
    t = _feature_trace([0.1, 0.45, 0.6, 0.9])
    policy = P.ProbePolicy(predictor=FirstFeature(), selector=FixedThreshold(0.5)).fit([t])
    assert policy.stop_index(t) == 2
    p = policy.probabilities([t])[0]
    np.testing.assert_allclose(p, torch.sigmoid(10 * (torch.tensor([0.1, 0.45, 0.6, 0.9]) - 0.5)).numpy(), rtol=1e-5)
    assert policy.stop_index_at(t, 0.999) is None


def test_probe_policy_adapts_on_support_through_the_adapter():
    support = [_feature_trace([0.1, 0.9], trace_id="s0"), _feature_trace([0.2, 0.8, 0.9], trace_id="s1")]
    adapter = RecordingAdapter(FirstFeature())
    policy = P.ProbePolicy(adapter=adapter, adapt_steps=3, name="maml").fit(support)
    (batch, steps), = adapter.calls
    assert steps == 3 and batch.features.shape == (5, 2) and batch.n_traces == 2
    assert policy.stop_index(support[1]) == 1


def test_evaluate_policy_arrays():
    traces = [make_trace([0, 1], trace_id="x", reasoning_tokens=30), make_trace([0, 0], final_em=False, trace_id="y")]
    out = P.evaluate_policy(P.OraclePolicy(), traces)
    np.testing.assert_array_equal(out.em, [1.0, 0.0])
    np.testing.assert_array_equal(out.total_tokens, [20 + 10, 10 + 5])
    np.testing.assert_array_equal(out.full_tokens, [30, 30])
    np.testing.assert_array_equal(out.stopped_early, [True, True])


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="empty support"):
        P.AnswerConsistency().fit([])
    with pytest.raises(RuntimeError, match="fit"):
        P.TokenBudget().candidates
    with pytest.raises(ValueError, match="predictor or an adapter"):
        P.ProbePolicy()


def _auc(p, y):
    pos, neg = p[y > 0.5], p[y < 0.5]
    return (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()


def test_train_predictor_learns_the_synthetic_signal(tiny_corpus):
    from maml_stop.data.corpus import TraceCorpus

    corpus = TraceCorpus.load(tiny_corpus)
    pooled = train_predictor(corpus.traces("fam_a") + corpus.traces("fam_b"), {"n_features": 8, "hidden": 16, "depth": 1},
                               steps=100, lr=0.5)
    held_out = corpus.traces("fam_c")
    probs = np.concatenate(P.ProbePolicy(predictor=pooled).fit(held_out[:4]).probabilities(held_out))
    labels = np.concatenate([t.labels for t in held_out])
    assert _auc(probs, labels) > 0.8
    again = train_predictor(corpus.traces("fam_a"), {"n_features": 8, "hidden": 16, "depth": 1}, steps=3, lr=0.5, seed=7)
    same = train_predictor(corpus.traces("fam_a"), {"n_features": 8, "hidden": 16, "depth": 1}, steps=3, lr=0.5, seed=7)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), same.state_dict().values()))


def test_maml_policy_adapts_a_clone_with_the_real_adapter(tiny_corpus):
    from maml_stop.learn.adapter import InnerLoopAdapter
    from maml_stop.data.corpus import TraceCorpus
    from maml_stop.learn.predictor import StoppingPredictor

    traces = TraceCorpus.load(tiny_corpus).traces("fam_b")
    torch.manual_seed(0)
    predictor = StoppingPredictor(8, hidden=8, depth=1)
    before = {k: v.clone() for k, v in predictor.state_dict().items()}
    adapter = InnerLoopAdapter(predictor, inner_lr=0.5, inner_steps=5)
    maml = P.ProbePolicy(adapter=adapter, name="maml").fit(traces[:8])
    plain = P.ProbePolicy(predictor=predictor, name="pooled").fit(traces[:8])
    p_adapted = np.concatenate(maml.probabilities(traces[8:]))
    p_plain = np.concatenate(plain.probabilities(traces[8:]))
    assert not np.allclose(p_adapted, p_plain)
    assert all(torch.equal(before[k], v) for k, v in predictor.state_dict().items())  # predictor untouched
    copy = fresh_copy(maml.model)
    np.testing.assert_allclose(np.concatenate(P.ProbePolicy(predictor=copy).fit(traces[:1]).probabilities(traces[8:])), p_adapted, rtol=1e-6)


def test_vectorised_sweep_matches_one_parameter_at_a_time():
    rng = np.random.default_rng(3)
    traces = []
    for n in range(20):
        p = int(rng.integers(1, 8))
        answers = [str(a) if a else "" for a in rng.integers(0, 3, p)]
        f = rng.random((p, 2))
        traces.append(make_trace(rng.integers(0, 2, p).tolist(), answers=answers, confidence=rng.random(p).tolist(),
                                 final_em=bool(rng.integers(0, 2)), features=f, trace_id=str(n)))
    for policy in (P.AnswerConsistency(), P.AnswerConfidence(), P.ProbePolicy(predictor=FirstFeature())):
        policy.fit(traces[:3])
        for t in traces:
            assert policy.outcomes_at(t, policy.candidates) == [policy.outcome_at(t, c) for c in policy.candidates]


def test_crossfit_scores_support_out_of_sample():
    support = [_feature_trace([0.1, 0.9], trace_id=f"s{i}") for i in range(6)]
    adapter = RecordingAdapter(FirstFeature())
    policy = P.ProbePolicy(adapter=adapter, crossfit=True).fit(support)
    sizes = [batch.n_traces for batch, _ in adapter.calls]
    assert sizes == [3, 3, 6]  # each half adapted on the other, then the final model on all K
    assert policy._probs == {}  # out-of-sample support scores are not kept for later scoring
    assert policy.support_sweep.em.shape == (6, len(P.DEFAULT_TAUS))


def test_crossfit_changes_selection_with_the_real_adapter(tiny_corpus):
    from maml_stop.learn.adapter import InnerLoopAdapter
    from maml_stop.data.corpus import TraceCorpus
    from maml_stop.learn.predictor import StoppingPredictor

    traces = TraceCorpus.load(tiny_corpus).traces("fam_a")[:16]
    torch.manual_seed(0)
    adapter = InnerLoopAdapter(StoppingPredictor(8, hidden=8, depth=1), inner_lr=0.5, inner_steps=30)
    plain = P.ProbePolicy(adapter=adapter, selector=EMTargetThreshold(0.0)).fit(traces)
    cross = P.ProbePolicy(adapter=adapter, selector=EMTargetThreshold(0.0), crossfit=True).fit(traces)
    # same final model; the support sweep differs because support scores are out of sample
    np.testing.assert_allclose(np.concatenate(plain.probabilities(traces)), np.concatenate(cross.probabilities(traces)))
    assert not np.array_equal(plain.support_sweep.em, cross.support_sweep.em) or not np.array_equal(
        plain.support_sweep.tokens, cross.support_sweep.tokens)
