"""The ensembles (maml_stop.decide.policies.ensemble) on hand-made traces whose right stop is known: the
weighted average of two parts, weights fitted on a support set where one part is informative and the
other noise, a weighted vote of three parts, and one evaluate run on a tiny synthetic corpus."""

from __future__ import annotations

import numpy as np
import pytest

from maml_stop.decide import policies as P
from maml_stop.decide.policies.ensemble import fit_weights, part_scores, roc_auc
from maml_stop.decide.thresholds import FixedThreshold
from trace_helpers import make_trace

# probes at 10, 20, ..., each costing 5 tokens; reasoning (P + 1) * 10


def consistency(k: int = 2) -> P.AnswerConsistency:
    return P.AnswerConsistency(selector=FixedThreshold(k), windows=(4, 3, 2))


def confidence(c: float = 0.9) -> P.AnswerConfidence:
    return P.AnswerConfidence(selector=FixedThreshold(c))


# consistency runs 1, 1, 2, 3 -> scores (window 3) 1/3, 1/3, 2/3, 1; confidence 0.9, 0.3, 0.6, 0.9
AVG = make_trace([0, 1, 1, 1], answers=["1", "42", "42", "42"], confidence=[0.9, 0.3, 0.6, 0.9], trace_id="avg")


def test_part_scores_lie_in_the_unit_interval():
    cons, conf = consistency(), confidence()
    assert np.allclose(part_scores(cons, cons.scores(AVG), window=3), [1 / 3, 1 / 3, 2 / 3, 1])
    assert np.allclose(part_scores(cons, np.array([5.0, 0.0]), window=3), [1.0, 0.0])  # capped; empty answer 0
    assert np.allclose(part_scores(conf, conf.scores(AVG)), [0.9, 0.3, 0.6, 0.9])
    assert part_scores(conf, np.array([-np.inf]))[0] == 0.0  # empty forced answer


def test_the_average_of_two_parts_stops_where_the_weighted_mean_reaches_tau():
    policy = P.Ensemble([consistency(), confidence()], combine="average", window=3,
                        selector=FixedThreshold(0.62)).fit([AVG])
    policy.weights = np.array([0.5, 0.5])  # known weights
    assert np.allclose(policy.scores(AVG), [0.6167, 0.3167, 0.6333, 0.95], atol=1e-4)
    out = policy.outcome(AVG)
    assert policy.param == 0.62 and out.index == 2 and out.em
    assert out.ran is None and out == P.probe_outcome(AVG, 2)  # every probe up to the stop, the default
    assert (out.total_tokens, out.reasoning_tokens) == (30 + 3 * 5, 30)
    assert policy.stop_index_at(AVG, 0.9) == 3 and policy.stop_index_at(AVG, 0.6) == 0
    assert policy.stop_index_at(AVG, 0.99) is None
    assert policy.outcome_at(AVG, 0.99).total_tokens == 50 + 4 * 5  # ran to the end: every probe paid
    policy.weights = np.array([2 / 3, 1 / 3])  # more weight on consistency: 0.52, 0.32, 0.64, 0.97
    assert policy.stop_index_at(AVG, 0.6) == 2
    assert [o.index for o in policy.outcomes_at(AVG, [0.99, 0.9, 0.6])] == [None, 3, 2]


def test_the_weights_go_to_the_informative_part():
    rng = np.random.default_rng(0)
    support = []
    for i in range(16):  # K = 16: stopping is right exactly once the answer has repeated; confidence is noise
        answers = [str(a) for a in rng.integers(0, 2, size=8)]
        labels = [int(j > 0 and answers[j] == answers[j - 1]) for j in range(8)]
        support.append(make_trace(labels, answers=answers, confidence=rng.uniform(0.05, 0.95, size=8), trace_id=f"s{i}"))
    policy = P.Ensemble([consistency(), confidence()], window=2).fit(support)
    w = policy.weights
    assert np.isclose(w.sum(), 1.0) and w[0] > 0.8 and w[0] > 5 * w[1]
    assert policy._support_raw == {} and "_fit_scores" not in policy.parts[0].__dict__  # hooks and caches gone
    assert policy.support_sweep.em.shape == (16, len(policy.candidates))
    # the rule itself: weight proportional to AUC - 0.5; a part at chance (or worse) gets none; one class: uniform
    labels = np.array([0, 0, 1, 1])
    assert roc_auc(np.array([0.1, 0.2, 0.3, 0.4]), labels) == 1.0
    assert np.allclose(fit_weights([np.array([0.1, 0.2, 0.3, 0.4]), np.array([0.4, 0.3, 0.2, 0.1])], labels), [1, 0])
    assert np.allclose(fit_weights([np.array([0.1, 0.2]), np.array([0.3, 0.1])], np.array([1, 1])), [0.5, 0.5])


# consistency k=2 fires at 2, consistency k=4 at 4, confidence 0.9 at 3 (and stays fired)
VOTE = make_trace([0, 1, 1, 1, 1, 1], answers=["1", "42", "42", "42", "42", "42"],
                  confidence=[0.5, 0.5, 0.5, 0.95, 0.5, 0.5], trace_id="vote")


def test_a_vote_of_three_parts_stops_when_the_required_weight_share_has_fired():
    parts = [consistency(2), consistency(4), confidence(0.9)]
    support = [make_trace([1] * 4, trace_id="right")]  # labels of one class: no AUC, uniform weights
    policy = P.Ensemble(parts, combine="vote", shares=(1.0, 0.5, 0.3), selector=FixedThreshold(0.5)).fit(support)
    assert [p.param for p in policy.parts] == [2, 4, 0.9]  # each part's own threshold, from its own selector
    assert np.allclose(policy.weights, 1 / 3)
    assert policy.fired(VOTE).tolist() == [[False, False, True, True, True, True],
                                           [False, False, False, False, True, True],
                                           [False, False, False, True, True, True]]
    assert policy.outcome(VOTE) == P.probe_outcome(VOTE, 3)  # a majority (2 of 3) by probe 3
    assert [o.index for o in policy.outcomes_at(VOTE, [1.0, 0.5, 0.3])] == [4, 3, 2]
    policy.weights = np.array([0.6, 0.2, 0.2])  # the first part alone is a weighted majority
    assert policy.stop_index_at(VOTE, 0.5) == 2 and policy.stop_index_at(VOTE, 1.0) == 4
    policy.parts[1].param = None  # a part whose selector says "never stop early" never fires
    assert policy.stop_index_at(VOTE, 1.0) is None and policy.stop_index_at(VOTE, 0.8) == 3


def test_bad_ensembles_are_refused():
    with pytest.raises(ValueError, match="valid: average, vote"):
        P.Ensemble([consistency(), confidence()], combine="median")
    with pytest.raises(TypeError, match="FirstHitPolicy"):
        P.Ensemble([consistency(), P.FullGeneration()])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="at least two"):
        P.Ensemble([consistency()])
    with pytest.raises(ValueError, match="shares"):
        P.Ensemble([consistency(), confidence()], combine="vote", shares=(0.0,))


def test_evaluate_runs_the_ensemble_methods(tmp_path):
    from conftest import make_trace_rows
    from maml_stop.data import store
    from maml_stop.evaluate.config import EvaluateConfig
    from maml_stop.evaluate.methods import DEFAULT_METHODS, ENSEMBLE_METHODS, build_policies
    from maml_stop.evaluate.protocol import run

    assert not set(ENSEMBLE_METHODS) & set(DEFAULT_METHODS)  # run only when listed
    with pytest.raises(ValueError, match="ensemble_learner='scratch'"):
        build_policies(EvaluateConfig(corpus="unused"), ["ensemble_vote"], None, None, {"n_features": 8})
    root = tmp_path / "corpus"
    names = ["h0", "h1", "h2", "h3", "logprob_mean", "same_as_prev", "tokens_so_far", "probe_index"]
    store.write_meta(root, {"feature_names": names, "model": {"name": "synthetic"}})
    for k, fam in enumerate(("fam_a", "fam_b", "fam_c")):
        store.write_shard(root, fam, "all", make_trace_rows(fam, 40, seed=k, shift=0.3 * k))
    methods = ["full", "consistency", *ENSEMBLE_METHODS, "oracle"]
    cfg = EvaluateConfig(corpus=str(root), out=str(tmp_path / "out"), families=["fam_c"], k=[4], episodes=2,
                         methods=methods, scratch_steps=10, progress=False, crossfit=True,
                         ensemble_learner="scratch", ensemble_shares=[1.0, 0.5, 0.25])
    cells = run(cfg)["results"]["fam_c"]["4"]
    assert list(cells) == methods
    for m in ENSEMBLE_METHODS:
        fig = cells[m]["thresholds"]["em_target"]
        assert len(fig["savings"]) == 2 and all(np.isfinite(fig["savings_reasoning"]))
    assert "ensemble_vote" in (tmp_path / "out" / "results.md").read_text()
