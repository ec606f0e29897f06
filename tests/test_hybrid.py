"""The hybrid criteria (maml_stop.decide.policies.hybrid) on hand-made traces whose right stop and bill
are known: a cap that binds and one that does not, a floor that delays, either/both of two fixed-threshold
parts, the combination's own support sweep, and one evaluate run on a tiny synthetic corpus."""

from __future__ import annotations

import numpy as np
import pytest

from maml_stop.decide import policies as P
from maml_stop.decide.thresholds import FixedThreshold
from trace_helpers import make_trace

# probes at 10, 20, ..., each costing 5 tokens; reasoning (P + 1) * 10


def consistency(k: int = 2) -> P.AnswerConsistency:
    return P.AnswerConsistency(selector=FixedThreshold(k))


def confidence(c: float = 0.95) -> P.AnswerConfidence:
    return P.AnswerConfidence(selector=FixedThreshold(c))


LATE = make_trace([0, 0, 0, 0, 1, 1], answers=["1", "2", "3", "4", "42", "42"])  # consistency k=2 fires at 5


def test_a_cap_that_binds_stops_at_the_last_probe_within_the_budget():
    policy = P.Capped(consistency(), max_tokens=35).fit([LATE])
    out = policy.outcome(LATE)
    assert out.index == 2 and not out.em  # last probe at or before 35 tokens: position 30
    assert out.ran == (0, 1, 2)  # consistency ran 0..2; the cap's probe 2 is paid once
    assert (out.total_tokens, out.reasoning_tokens) == (30 + 3 * 5, 30)


def test_a_cap_that_does_not_bind_is_the_inner_policy():
    inner = consistency().fit([LATE])
    for cap in (70, 100):  # the trace ends within the budget (70 reasoning tokens)
        out = P.Capped(consistency(), max_tokens=cap).fit([LATE]).outcome(LATE)
        assert out == inner.outcome(LATE) and out.index == 5 and out.em
        assert out.total_tokens == 60 + 6 * 5


def test_a_cap_over_a_policy_that_pays_only_its_stop_pays_the_cap_probe_alone():
    support = [make_trace([0] * 6, trace_id=f"s{i}") for i in range(3)]
    policy = P.Capped(P.TokenBudget(selector=FixedThreshold(45)), max_tokens=25).fit(support)
    assert policy.param == 45
    out = policy.outcome(LATE)
    assert out.index == 1 and out.ran == (1,)  # the budget at 45 would answer at probe 3: never run
    assert (out.total_tokens, out.reasoning_tokens) == (20 + 5, 20)
    # no threshold (a selector's "never stop early"): the cap alone, i.e. a token budget at the cap
    assert policy.outcome_at(LATE, None) == P.TokenBudget().outcome_at(LATE, 25.0)


EARLY = make_trace([0, 1, 1, 1], answers=["42"] * 4, final_em=True)  # consistency k=2 fires at 1


def test_a_floor_delays_an_early_stop_to_the_first_probe_past_it():
    out = P.Floored(consistency(), min_tokens=35).fit([EARLY]).outcome(EARLY)
    assert out.index == 3 and out.em  # first probe at or after 35 tokens: position 40
    assert out.ran == (0, 1, 3)  # consistency's probes up to its stop, then the forced answer at the floor
    assert (out.total_tokens, out.reasoning_tokens) == (40 + 3 * 5, 40)


def test_a_floor_below_the_stop_changes_nothing_and_one_past_the_end_runs_to_it():
    inner = consistency().fit([EARLY]).outcome(EARLY)
    assert P.Floored(consistency(), min_tokens=15).fit([EARLY]).outcome(EARLY) == inner
    out = P.Floored(consistency(), min_tokens=100).fit([EARLY]).outcome(EARLY)
    assert out.index is None and out.em == EARLY.final_em
    assert out.ran == (0, 1) and out.total_tokens == 50 + 2 * 5  # the probes consistency ran, paid
    assert P.Floored(consistency(), min_tokens=15).fit([EARLY]).outcome_at(EARLY, None) == P.full_generation_outcome(EARLY)


# consistency (k=2) fires at 4, confidence (0.95) at 1
TWO = make_trace([0, 0, 0, 1, 1], answers=["1", "2", "3", "42", "42"], confidence=[0.5, 0.99, 0.5, 0.5, 0.5])


def test_either_stops_at_the_first_part_that_fires():
    out = P.Either(consistency(), confidence()).fit([TWO]).outcome(TWO)
    assert out.index == 1 and not out.em
    assert out.ran == (0, 1) and out.total_tokens == 20 + 2 * 5  # both parts read probes 0, 1: paid once
    swapped = P.Either(confidence(), consistency()).fit([TWO]).outcome(TWO)
    assert swapped == out


def test_both_stops_where_the_later_part_fires():
    out = P.Both(consistency(), confidence()).fit([TWO]).outcome(TWO)
    assert out.index == 4 and out.em
    assert out.ran == (0, 1, 2, 3, 4) and out.total_tokens == 50 + 5 * 5
    # confidence never fires at 0.999: both never have, so the run goes to the end paying what was run
    never = P.Both(consistency(), confidence(0.999)).fit([TWO]).outcome(TWO)
    assert never.index is None and never.total_tokens == 60 + 5 * 5
    # without a threshold the first part never fires: Both is full generation, Either the second part
    assert P.Both(consistency(), confidence()).fit([TWO]).outcome_at(TWO, None) == P.full_generation_outcome(TWO)
    assert P.Either(consistency(), confidence()).fit([TWO]).outcome_at(TWO, None) == confidence().fit([TWO]).outcome(TWO)


def test_the_selector_chooses_the_first_part_on_the_combinations_sweep():
    support = [TWO, LATE, EARLY]
    policy = P.Either(P.AnswerConsistency(windows=(3, 2)), confidence()).fit(support)
    assert policy.candidates == [3.0, 2.0] and policy.param == 3.0  # FixedThreshold(): the first part's default
    expected = [[policy.outcome_at(t, k).total_tokens for k in policy.candidates] for t in support]
    assert policy.support_sweep.tokens.tolist() == expected
    assert "_fit_scores" not in policy.first.__dict__  # the fit hook is removed
    with pytest.raises(TypeError, match="ThresholdedPolicy"):
        P.Either(P.FirstProbe(), confidence())  # type: ignore[arg-type]


def test_evaluate_runs_the_hybrid_methods(tmp_path):
    from conftest import make_trace_rows
    from maml_stop.data import store
    from maml_stop.evaluate.config import EvaluateConfig
    from maml_stop.evaluate.methods import DEFAULT_METHODS, HYBRID_METHODS
    from maml_stop.evaluate.protocol import run

    assert not set(HYBRID_METHODS) & set(DEFAULT_METHODS)  # run only when listed
    root = tmp_path / "corpus"
    names = ["h0", "h1", "h2", "h3", "logprob_mean", "same_as_prev", "tokens_so_far", "probe_index"]
    store.write_meta(root, {"feature_names": names, "model": {"name": "synthetic"}})
    for k, fam in enumerate(("fam_a", "fam_b", "fam_c")):
        store.write_shard(root, fam, "all", make_trace_rows(fam, 40, seed=k, shift=0.3 * k))
    methods = ["full", "consistency", *HYBRID_METHODS, "oracle"]
    cfg = EvaluateConfig(corpus=str(root), out=str(tmp_path / "out"), families=["fam_c"], k=[4], episodes=2,
                         methods=methods, scratch_steps=10, progress=False, crossfit=True,
                         hybrid_inner="scratch", hybrid_max_tokens=48, hybrid_min_tokens=32)
    cells = run(cfg)["results"]["fam_c"]["4"]
    assert list(cells) == methods
    for m in HYBRID_METHODS:
        fig = cells[m]["thresholds"]["em_target"]
        assert len(fig["savings"]) == 2 and all(np.isfinite(fig["savings_reasoning"]))
    # probes every 16 tokens: under a 48-token cap no trace reasons past 48 tokens
    assert all(r <= 48 + 1e-9 for r in cells["hybrid_budget"]["thresholds"]["em_target"]["reasoning_tokens"])
    assert "hybrid_budget" in (tmp_path / "out" / "results.md").read_text()
