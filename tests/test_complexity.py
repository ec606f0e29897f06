"""Token budgets by question complexity (maml_stop.decide.policies.complexity, issue 13 item 2) on hand-made
traces whose right budget is known: a question of m words needs exactly m reasoning tokens (its forced answer
is right from the probe at position m on), so the fitted budget recovers it; the bill of a budget stop; the
per-probe classifier meta-initialised on other families; a bad config; one evaluate run on tiny_corpus."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from maml_stop.decide import policies as P
from maml_stop.decide.policies.complexity import (
    ComplexityAdapted,
    ComplexityBudget,
    ComplexityFeatures,
    ComplexityView,
    QuestionTable,
    done_labels,
    needed_index,
    needed_tokens,
)
from maml_stop.decide.thresholds import EMTargetThreshold, FixedThreshold
from maml_stop.probe.question_features import TEXT_FEATURES, QuestionFeaturizer, text_features
from trace_helpers import make_trace

STEP, N_PROBES = 10, 12  # probes at 10, 20, ..., 120, each costing 5 tokens; reasoning 130


def question(m: int) -> str:
    return " ".join(["x"] * m)


def length_traces(family: str, needs: list[int], start: int = 0) -> tuple[list, dict[str, str]]:
    """Traces whose question has ``10 * n`` words and whose answer is right from probe ``n - 1`` (position
    ``10 * n``) on, final answer right: needed_tokens == number of words."""
    traces, questions = [], {}
    for j, n in enumerate(needs):
        tid = f"{family}/{start + j:04d}#0"
        traces.append(make_trace([0] * (n - 1) + [1] * (N_PROBES - n + 1), step=STEP, trace_id=tid, family=family))
        questions[tid] = question(STEP * n)
    return traces, questions


def features_of(questions: dict[str, str]) -> ComplexityFeatures:
    return ComplexityFeatures(QuestionFeaturizer(["a", "b"]), QuestionTable(questions))


def test_needed_index_is_where_the_answer_becomes_right_and_stays():
    assert needed_index(make_trace([0, 1, 0, 1, 1])) == 3  # a lucky probe 1 does not count: wrong again at 2
    assert needed_index(make_trace([1, 1, 1])) == 0
    late_wrong = make_trace([1, 1, 0], reasoning_tokens=77)
    assert needed_index(late_wrong) is None and needed_tokens(late_wrong) == 77  # the end
    wrong = make_trace([0, 1, 0], final_em=False)
    assert needed_index(wrong) == 0 and needed_tokens(wrong) == 10  # a wrong run loses nothing at its first probe
    assert done_labels(make_trace([0, 1, 0, 1, 1])).tolist() == [0, 0, 0, 1, 1]
    assert done_labels(late_wrong).tolist() == [0, 0, 0]


def test_text_features_count_what_they_say():
    f = dict(zip(TEXT_FEATURES, text_features("Compute 12 + 3.5 * 1000, then (x - 2) = ?").tolist()))
    assert f["n_numbers"] == pytest.approx(np.log1p(4))  # 12, 3.5, 1000, 2
    assert f["max_number"] == pytest.approx(np.log10(1001))
    assert f["n_operators"] == pytest.approx(np.log1p(3))  # + * -
    assert f["n_brackets"] == pytest.approx(np.log1p(2)) and f["n_comparisons"] == pytest.approx(np.log1p(1))
    assert f["n_digits"] == pytest.approx(np.log1p(9))
    assert text_features("").tolist() == [0.0] * len(TEXT_FEATURES)


def test_the_start_probe_is_read_only_where_the_trace_has_one():
    featurizer = QuestionFeaturizer(["h0", "logprob_mean"], start_features=["h0"])
    with_start = make_trace([0, 1], features=np.array([[0.25, -1.0], [0.5, -2.0]]))
    with_start.positions[:] = [0, 16]
    without = make_trace([0, 1], features=np.array([[0.25, -1.0], [0.5, -2.0]]))  # positions 10, 20
    assert featurizer(with_start, "1 + 1")[-2:].tolist() == [1.0, 0.25]
    assert featurizer(without, "1 + 1")[-2:].tolist() == [0.0, 0.0]
    assert featurizer.names[-2:] == ["has_start", "start_h0"]
    with pytest.raises(ValueError, match="start features"):
        QuestionFeaturizer(["h0"], start_features=["m7"])


def test_the_fitted_budget_recovers_the_tokens_a_question_needs():
    support, questions = length_traces("fam", [1, 3, 5, 8, 11])
    query, more = length_traces("fam", [2, 4, 6, 7, 9, 10], start=100)
    feats = features_of({**questions, **more})
    policy = ComplexityBudget(feats, EMTargetThreshold(delta=0.0), scales=[2.0, 1.04, 0.5], alpha=1e-8).fit(support)
    for t in query:
        assert policy.budget(t) == pytest.approx(needed_tokens(t), rel=0.03)
    assert policy.param == 1.04  # the most aggressive scale that keeps every support answer
    outs = [policy.outcome(t) for t in query]
    assert [o.index for o in outs] == [needed_index(t) for t in query]
    assert all(o.em for o in outs)
    assert policy.outcome_at(query[0], 0.5).em is False  # half the budget: stopped before the answer is right


def test_a_budget_stop_pays_one_forced_answer_and_a_run_within_budget_pays_none():
    support, questions = length_traces("fam", [3, 3, 3])  # every question needs 30 tokens
    feats = features_of(questions)
    policy = ComplexityBudget(feats, FixedThreshold(1.0), scales=[1.0], alpha=1.0).fit(support)
    assert policy.budget(support[0]) == pytest.approx(30.0)
    out = policy.outcome(support[0])
    assert out.index == 2 and out.ran == (2,) and out.em
    assert (out.total_tokens, out.reasoning_tokens) == (30 + 5, 30)  # position 30 + the one forced answer
    short = make_trace([0, 1], trace_id=support[0].trace_id)  # probes at 10, 20; ends at 30 = the budget
    end = policy.outcome(short)
    assert end.index is None and (end.total_tokens, end.reasoning_tokens) == (30, 30)  # plain full generation
    assert policy.outcome_at(support[0], None) == P.full_generation_outcome(support[0])


def test_a_budget_cap_on_another_policy_pays_each_probe_once():
    support, questions = length_traces("fam", [3, 3, 3])
    cap = ComplexityBudget(features_of(questions), FixedThreshold(1.0), scales=[1.0])
    never = P.AnswerConfidence(selector=FixedThreshold(0.99))  # confidence 0.5 everywhere: never fires
    out = P.Either(never, cap, name="capped").fit(support).outcome(support[1])
    assert out.index == 2 and out.ran == (0, 1, 2)  # confidence ran probes 0..2; the cap's probe 2 paid once
    assert out.total_tokens == 30 + 3 * 5


def _classifier(view: ComplexityView, sources) -> ComplexityAdapted:
    from maml_stop.learn.adapter import InnerLoopAdapter
    from maml_stop.learn.predictor import StoppingPredictor

    torch.manual_seed(0)
    adapter = InnerLoopAdapter(StoppingPredictor(view.width, hidden=16, depth=1), inner_lr=0.1, inner_steps=5,
                               first_order=True)
    probe = P.ProbePolicy(adapter=adapter, selector=FixedThreshold(0.5), taus=[0.9, 0.5, 0.1], name="cx")
    return ComplexityAdapted(probe, view, sources, meta=dict(steps=60, lr=0.03, k=4, q=8, seed=0))


def test_the_adapted_classifier_is_meta_initialised_on_other_families_and_stops_where_the_question_is_done():
    rng = np.random.default_rng(0)
    source, questions, asked = {}, {}, []
    for f, fam in enumerate(("src_a", "src_b")):
        source[fam], q = length_traces(fam, rng.integers(1, 12, size=30).tolist())
        questions.update(q)
    support, q_support = length_traces("held", [2, 5, 8, 11])
    query, q_query = length_traces("held", [1, 3, 4, 6, 7, 9, 10], start=100)
    view = ComplexityView(features_of({**questions, **q_support, **q_query}))

    def sources(family):
        asked.append(family)
        return source

    policy = _classifier(view, sources).fit(support)
    assert asked == ["held"] and policy.initialised_for == "held"
    assert policy.meta_losses[-1] < 0.5 * policy.meta_losses[0]
    outs = [policy.outcome(t) for t in query]
    exact = [o.index == needed_index(t) for o, t in zip(outs, query)]
    assert np.mean(exact) >= 0.85
    unmeta = _classifier(view, None).fit(support)  # the same 5 inner steps from the untrained initialisation
    assert np.mean([unmeta.outcome(t).index == needed_index(t) for t in query]) < np.mean(exact)
    assert all(o.index is None or o.ran == (o.index,) for o in outs)  # one forced answer, at the stop
    policy.fit(support)  # the same family again: no second meta-initialisation
    assert asked == ["held"]


def test_bad_complexity_settings_name_the_problem(tiny_corpus):
    from maml_stop.evaluate.config import EvaluateConfig
    from maml_stop.evaluate.methods import build_policies
    from maml_stop.learn.predictor import PredictorConfig

    config = PredictorConfig(n_features=8, hidden=8, depth=1)
    bad = EvaluateConfig(corpus=tiny_corpus, complexity_scales=[1.0, -0.5])
    with pytest.raises(ValueError, match="scales must be a non-empty list of positive"):
        build_policies(bad, ["complexity_budget"], None, None, config)
    with pytest.raises(ValueError, match="'complexity_capped_maml' needs a checkpoint"):
        build_policies(EvaluateConfig(corpus=tiny_corpus), ["complexity_capped_maml"], None, None, config)
    with pytest.raises(KeyError, match="no question text for trace 'nowhere#0'"):
        QuestionTable({"a#0": "1 + 1"})["nowhere#0"]


def test_evaluate_runs_the_complexity_methods(tiny_corpus, tmp_path):
    from maml_stop.evaluate.config import EvaluateConfig
    from maml_stop.evaluate.methods import COMPLEXITY_METHODS, DEFAULT_METHODS
    from maml_stop.evaluate.protocol import run
    from trace_helpers import write_tiny_checkpoint

    assert not set(COMPLEXITY_METHODS) & set(DEFAULT_METHODS)  # run only when listed
    ckpt = write_tiny_checkpoint(tmp_path / "tiny.ckpt")  # test family fam_c, validation fam_b
    methods = ["full", "budget", "maml", *COMPLEXITY_METHODS, "oracle"]
    cfg = EvaluateConfig(corpus=tiny_corpus, out=str(tmp_path / "out"), checkpoint=ckpt, k=[4], episodes=2,
                         methods=methods, progress=False, crossfit=True, predictor={"hidden": 8, "depth": 1},
                         complexity_meta_steps=5, complexity_meta_k=4)
    cells = run(cfg)["results"]["fam_c"]["4"]
    assert list(cells) == methods
    for m in COMPLEXITY_METHODS:
        for fig in cells[m]["thresholds"].values():
            assert len(fig["savings"]) == 2 and all(np.isfinite(fig["savings_reasoning"]))
    for m in ("complexity_budget", "complexity_adapted"):  # at most one forced answer (6 tokens) per question
        fig = cells[m]["thresholds"]["em_target"]
        assert all(t - r <= 6 + 1e-9 for t, r in zip(fig["tokens"], fig["reasoning_tokens"]))
    assert "complexity_adapted" in (tmp_path / "out" / "results.md").read_text()
