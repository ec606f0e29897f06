"""Threshold selection: hand cases, the binomial bound, and the Learn-then-Test guarantee checked
empirically over many random support/test splits."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from torch import nn

from maml_stop.decide import policies as P
from maml_stop.decide import thresholds as T
from maml_stop.decide.registry import SELECTORS, make_selector
from maml_stop.decide.selector import SupportSweep
from maml_stop.data.corpus import TraceCorpus

REAL_CORPUS = Path(__file__).resolve().parents[1] / "experiments" / "corpus" / "qwen05"


def _sweep(em, tokens, full_em, full_tokens):
    return SupportSweep(em=np.array(em), tokens=np.array(tokens), full_em=np.array(full_em), full_tokens=np.array(full_tokens))


def test_binom_cdf_matches_exact_sum():
    for n, p in [(10, 0.1), (50, 0.01), (200, 0.3)]:
        for s in (0, 1, 3, n // 2, n):
            want = sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(s + 1))
            assert T.binom_cdf(s, n, p) == pytest.approx(want, rel=1e-9, abs=1e-300)
    assert T.binom_cdf(-1, 5, 0.5) == 0.0


def test_min_certifiable_k():
    assert T.min_certifiable_k(0.01, 0.1) == 230  # 0.99**230 <= 0.1 < 0.99**229
    assert 0.99**230 <= 0.1 < 0.99**229
    with pytest.raises(ValueError):
        T.min_certifiable_k(0.0, 0.1)


def test_fixed_uses_value_or_default():
    sweep = _sweep([[1, 1]], [[5, 5]], [1], [10])
    assert T.FixedThreshold(0.7).select([0.9, 0.5], sweep, default=0.5) == 0.7
    assert T.FixedThreshold().select([0.9, 0.5], sweep, default=0.5) == 0.5


def test_em_target_largest_savings_within_delta():
    # candidate 0 keeps EM (savings .2), 1 drops 1/4 (savings .5), 2 drops 1/2 (savings .8)
    em = [[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 1]]
    tokens = [[80, 50, 20]] * 4
    sweep = _sweep(em, tokens, [1, 1, 1, 1], [100] * 4)
    cands = [0.9, 0.5, 0.1]
    assert T.EMTargetThreshold(0.0).select(cands, sweep, None) == 0.9
    assert T.EMTargetThreshold(0.25).select(cands, sweep, None) == 0.5
    assert T.EMTargetThreshold(0.5).select(cands, sweep, None) == 0.1


def test_em_target_never_stops_when_nothing_saves_tokens():
    sweep = _sweep([[1, 1]], [[120, 110]], [1], [100])  # probes make every candidate dearer
    assert T.EMTargetThreshold(0.5).select([0.9, 0.1], sweep, None) is None


def test_ltt_fixed_sequence_stops_at_first_failure():
    n = 60
    em = np.ones((n, 3))
    em[:20, 1] = 0  # candidate 1: a third of the questions lost
    tokens = np.tile([80.0, 50.0, 20.0], (n, 1))  # candidate 2 is clean and cheapest, yet untestable
    sweep = _sweep(em, tokens, np.ones(n), np.full(n, 100.0))
    selector = T.LTTThreshold(delta=0.1, alpha=0.1)
    p = selector.p_values(sweep)
    assert p[0] <= 0.1 and p[1] > 0.1 and p[2] <= 0.1
    assert selector.select([0.9, 0.5, 0.1], sweep, None) == 0.9


def test_ltt_loss_counts_only_questions_full_generation_gets_right():
    sweep = _sweep([[0], [1]], [[1], [1]], [0, 1], [2, 2])
    np.testing.assert_array_equal(sweep.losses()[:, 0], [0, 0])


def test_ltt_falls_back_when_k_too_small():
    n = 32
    sweep = _sweep(np.ones((n, 2)), np.tile([50.0, 20.0], (n, 1)), np.ones(n), np.full(n, 100.0))
    assert T.LTTThreshold(delta=0.01, alpha=0.1).select([0.9, 0.1], sweep, None) is None  # needs 230
    assert T.LTTThreshold(delta=0.1, alpha=0.1).select([0.9, 0.1], sweep, None) == 0.1  # needs 22


def test_doctest():
    import doctest

    assert doctest.testmod(T).failed == 0


def test_make_selector_errors():
    assert isinstance(make_selector("ltt", delta=0.05, alpha=0.2), T.LTTThreshold)
    with pytest.raises(ValueError, match="valid methods: fixed, em_target, ltt"):
        make_selector("best")
    with pytest.raises(ValueError, match="alpha"):
        T.LTTThreshold(alpha=1.5)


def _cost_sweep():
    # candidate 0 keeps EM (80 tokens), 1 keeps EM (50 tokens), 2 loses 1 question of 4 (20 tokens)
    em = [[1, 1, 0], [1, 1, 1], [1, 1, 1], [1, 1, 1]]
    return _sweep(em, [[80, 50, 20]] * 4, [1, 1, 1, 1], [100] * 4)


def test_cost_picks_the_analytic_minimum():
    # mean cost per question at price 1/token: full 100, c0 80, c1 50, c2 20 + W/4
    cands, sweep = [0.9, 0.5, 0.1], _cost_sweep()
    assert T.CostThreshold(1.0, 200.0).select(cands, sweep, None) == 0.5  # c2 = 70 > 50
    assert T.CostThreshold(1.0, 100.0).select(cands, sweep, None) == 0.1  # c2 = 45 < 50
    assert T.CostThreshold(1.0, 120.0).select(cands, sweep, None) == 0.5  # c2 = 50 = c1: the conservative one
    assert T.CostThreshold(1.0, 0.0).select(cands, sweep, None) == 0.1  # wrong answers free: fewest tokens
    np.testing.assert_allclose(T.CostThreshold(1.0, 100.0).costs(sweep), [100, 80, 50, 45])
    # only the ratio matters
    assert T.CostThreshold(0.001, 0.2).select(cands, sweep, None) == T.CostThreshold(1.0, 200.0).select(cands, sweep, None)


def test_cost_full_generation_is_best():
    cands = [0.9, 0.1]
    # the probes make every candidate dearer at the same EM
    assert T.CostThreshold(1.0, 10.0).select(cands, _sweep([[1, 1]], [[120, 110]], [1], [100]), None) is None
    # cheaper candidates lose the answer, and a wrong answer is worth more than the tokens saved
    lossy = _sweep([[0, 0], [1, 0]], [[50, 20], [50, 20]], [1, 1], [100, 100])
    assert T.CostThreshold(1.0, 1000.0).select(cands, lossy, None) is None  # full 100, c0 550, c1 1020
    assert T.CostThreshold(1.0, 60.0).select(cands, lossy, None) == 0.9  # c0 = 50 + 30 = 80 < 100
    # tokens free: full generation ties with every candidate that keeps EM and wins the tie
    assert T.CostThreshold(0.0, 1.0).select(cands, _sweep([[1, 1]], [[50, 20]], [1], [100]), None) is None


def test_cost_prefers_a_stop_that_fixes_an_answer():
    # question 0: full generation is wrong, stopping at candidate 0 is right (overthinking)
    sweep = _sweep([[1, 0], [1, 1]], [[150, 20], [150, 20]], [0, 1], [100, 100])
    assert T.CostThreshold(0.0, 1.0).select([0.9, 0.1], sweep, None) == 0.9  # EM alone counts
    assert T.CostThreshold(1.0, 1.0).select([0.9, 0.1], sweep, None) == 0.1  # tokens dominate


def test_cost_matches_brute_force_on_random_sweeps():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n, j = int(rng.integers(1, 12)), int(rng.integers(1, 6))
        em, full_em = rng.integers(0, 2, (n, j)), rng.integers(0, 2, n)
        tokens, full_tokens = rng.integers(1, 6, (n, j)) * 10, rng.integers(1, 6, n) * 10  # ties are common
        price, wrong = float(rng.choice([0.0, 0.5, 1.0])), float(rng.choice([0.0, 10.0, 40.0]))
        cands = [float(x) for x in np.linspace(0.9, 0.1, j)]
        options = [(None, full_tokens, full_em)] + [(cands[c], tokens[:, c], em[:, c]) for c in range(j)]
        costs = [sum(price * t + wrong * (1 - e) for t, e in zip(tk, ems)) / n for _, tk, ems in options]
        want = options[min(range(len(options)), key=lambda i: (round(costs[i], 9), i))][0]
        got = T.CostThreshold(price, wrong).select(cands, _sweep(em, tokens, full_em, full_tokens), None)
        assert got == want


def test_cost_registered_beside_the_others():
    assert list(SELECTORS)[:4] == ["fixed", "em_target", "ltt", "cost"]  # the existing order is kept
    sel = make_selector("cost", token_price=0.002, wrong_answer_cost=3.0)
    assert isinstance(sel, T.CostThreshold) and (sel.token_price, sel.wrong_answer_cost) == (0.002, 3.0)
    with pytest.raises(ValueError, match="token_price"):
        T.CostThreshold(token_price=-1.0)
    with pytest.raises(ValueError, match="wrong_answer_cost"):
        T.CostThreshold(wrong_answer_cost=float("nan"))
    with pytest.raises(ValueError, match="columns"):
        T.CostThreshold().select([0.9], _cost_sweep(), None)


def test_cost_runs_in_evaluate(tiny_corpus, tmp_path):
    from maml_stop.evaluate.config import EvaluateConfig
    from maml_stop.evaluate.protocol import run

    results = run(EvaluateConfig(corpus=tiny_corpus, out=str(tmp_path), methods=["full", "consistency", "budget"],
                                 families=["fam_c"], k=[4], episodes=2, threshold_methods=["em_target", "cost"],
                                 progress=False))
    cell = results["results"]["fam_c"]["4"]["consistency"]["thresholds"]["cost"]
    assert len(cell["savings"]) == 2 and (tmp_path / "results.md").exists()


class FirstFeature(nn.Module):
    """A fixed scorer of the synthetic corpus: feature f0 carries the 'already solved' signal."""

    def forward(self, batch):
        return 1.5 * batch.features[:, 0] - 1.0


def _violation_rate(traces, policy, k, delta, n_splits, seed, selector):
    """Fraction of random support/test splits where the chosen parameter's test EM drop > delta, and
    the fraction of splits where the selector chose an early-stopping parameter at all."""
    policy.fit(traces[:1])  # the scorer is fixed: fitting learns nothing from support
    full = P.sweep_policy(policy, traces)  # (N, J) for every trace once
    cands = policy.candidates
    rng = np.random.default_rng(seed)
    violations = certified = 0
    for _ in range(n_splits):
        perm = rng.permutation(len(traces))
        s, q = perm[:k], perm[k:]
        sub = SupportSweep(full.em[s], full.tokens[s], full.full_em[s], full.full_tokens[s])
        chosen = selector.select(cands, sub, None)
        if chosen is None:
            continue
        certified += 1
        j = cands.index(chosen)
        drop = full.full_em[q].mean() - full.em[q, j].mean()
        violations += drop > delta
    return violations / n_splits, certified / n_splits


def test_ltt_guarantee_on_tiny_corpus(tiny_corpus):
    corpus = TraceCorpus.load(tiny_corpus)
    traces = [t for fam in corpus.families for t in corpus.traces(fam)]  # 180 traces
    policy = P.ProbePolicy(predictor=FirstFeature(), taus=(0.99, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1))
    ltt = T.LTTThreshold(delta=0.1, alpha=0.2)
    rate, certified = _violation_rate(traces, policy, k=90, delta=0.1, n_splits=400, seed=0, selector=ltt)
    assert certified > 0.5  # the check is not vacuous: LTT does stop early on most splits
    assert rate <= 0.2
    # the plain EM target on the same splits violates more often (the check can fail)
    naive, _ = _violation_rate(traces, policy, k=90, delta=0.1, n_splits=400, seed=0, selector=T.EMTargetThreshold(0.1))
    assert naive > rate


@pytest.mark.slow
@pytest.mark.skipif(not REAL_CORPUS.exists(), reason="experiments/corpus/qwen05 not harvested yet")
def test_ltt_guarantee_on_real_corpus():
    corpus = TraceCorpus.load(REAL_CORPUS)
    families = [f for f in corpus.families if len(corpus.traces(f)) >= 150]
    if not families:
        pytest.skip(f"no family of {REAL_CORPUS} has 150 traces yet (harvest in progress)")
    for family in families:
        traces = corpus.traces(family)
        policy = P.AnswerConfidence()
        ltt = T.LTTThreshold(delta=0.05, alpha=0.1)
        rate, _ = _violation_rate(traces, policy, k=len(traces) // 2, delta=0.05, n_splits=300, seed=1, selector=ltt)
        assert rate <= 0.1 + 3 * math.sqrt(0.1 * 0.9 / 300), family


def test_backoff_steps_toward_the_conservative_end():
    # em_target picks candidate 1 (0.5): 40% saved, no support loss; candidate 2 loses a question
    sweep = _sweep([[1, 1, 0], [1, 1, 1]], [[90, 50, 10], [80, 60, 20]], [1, 1], [100, 100])
    cands = [0.9, 0.5, 0.1]
    assert T.EMTargetThreshold(0.01).select(cands, sweep, None) == 0.5
    assert T.BackoffEMTarget(0.01, backoff=0).select(cands, sweep, None) == 0.5
    assert T.BackoffEMTarget(0.01, backoff=1).select(cands, sweep, None) == 0.9
    assert T.BackoffEMTarget(0.01, backoff=2).select(cands, sweep, None) is None  # past the first: never stop
    nothing = _sweep([[1], [1]], [[100], [100]], [1, 1], [100, 100])  # saves nothing: em_target never stops
    assert T.BackoffEMTarget(0.01, backoff=0).select([0.9], nothing, None) is None
    assert isinstance(make_selector("em_target_backoff", delta=0.02), T.BackoffEMTarget)
    with pytest.raises(ValueError, match="non-negative integer; got -1"):
        T.BackoffEMTarget(0.01, backoff=-1)


def test_backoff_figures_and_choice_by_hand():
    from maml_stop.decide.thresholds import backoff_figures, choose_backoff

    # query of 4 traces (full: 3 right, 100 tokens each); candidate j keeps 3, 3, 2 right at 80, 50, 20 tokens
    em = [[1, 1, 1], [1, 1, 1], [1, 1, 0], [0, 0, 0]]
    tokens = [[80, 50, 20]] * 4
    sweep = _sweep(em, tokens, [1, 1, 1, 0], [100] * 4)
    drop, saved = backoff_figures(sweep, index=2)  # back-off 0: candidate 2, 1: candidate 1, 2: candidate 0, 3: full
    np.testing.assert_allclose(drop, [0.25, 0.0, 0.0, 0.0])
    np.testing.assert_allclose(saved, [0.8, 0.5, 0.2, 0.0])
    d0, s0 = backoff_figures(sweep, index=None)  # em_target never stopped: full generation at every back-off
    assert not d0.any() and not s0.any()
    # two families: the first is within 1 point from back-off 1, the second only from back-off 2
    assert choose_backoff(np.array([[0.05, 0.0, 0.0, 0.0], [0.05, 0.02, 0.01, 0.0]]), delta=0.01) == 2
    assert choose_backoff(np.array([[0.0, 0.0]]), delta=0.01) == 0
    assert choose_backoff(np.array([[0.3, 0.2]]), delta=0.01) == 1  # nothing within: the last (never stops)


def test_backoff_calibrated_on_source_families_in_evaluate(tiny_corpus, tmp_path):
    """Each fold calibrates the back-off on its source families only, and em_target_backoff applies it."""
    from maml_stop.data.corpus import TraceCorpus
    from maml_stop.evaluate.backoff import calibrate_backoff
    from maml_stop.evaluate.config import EvaluateConfig
    from maml_stop.evaluate.methods import build_policies
    from maml_stop.evaluate.protocol import run
    from maml_stop.learn.predictor import PredictorConfig

    cfg = EvaluateConfig(corpus=tiny_corpus, out=str(tmp_path), methods=["full", "consistency", "scratch"],
                         families=["fam_c"], k=[4], episodes=3, backoff_episodes=2, scratch_steps=5,
                         threshold_methods=["em_target", "em_target_backoff"], progress=False)
    results = run(cfg)
    cell = results["results"]["fam_c"]["4"]
    corpus = TraceCorpus.load(tiny_corpus)
    sources = results["sources"]["fam_c"]
    assert "fam_c" not in sources
    for name in ("consistency", "scratch"):
        calib = cell[name]["backoff"]
        assert calib["families"] == sources and calib["episodes"] == 2
        # recomputed from scratch with the same policy settings: the same figures and back-off
        policy = build_policies(cfg, [name], None, None, PredictorConfig(n_features=len(corpus.feature_names), **cfg.predictor),
                                "balanced", feature_names=corpus.feature_names)[name]
        again = calibrate_backoff(policy, {s: corpus.traces(s) for s in sources}, 4, 2, None, cfg.seed, cfg.delta)
        assert again.backoff == calib["backoff"]
        np.testing.assert_allclose(again.drop, calib["drop"])
        worst = np.max(calib["drop"], axis=0)
        assert worst[calib["backoff"]] <= cfg.delta + 1e-9 and (calib["backoff"] == 0 or worst[calib["backoff"] - 1] > cfg.delta)
        # the chosen back-off applied to the held-out episodes: never more aggressive than em_target
        plain, backed = cell[name]["thresholds"]["em_target"], cell[name]["thresholds"]["em_target_backoff"]
        cands = policy.candidates
        for p, b in zip(plain["param"], backed["param"]):
            if p is None:
                assert b is None
            elif cands.index(p) - calib["backoff"] < 0:
                assert b is None  # stepped past the most conservative candidate: never stops early
            else:
                assert cands.index(b) == cands.index(p) - calib["backoff"]
    assert "backoff" not in cell["full"]
    report = (tmp_path / "results.md").read_text()
    assert "calibrated on each fold's source families" in report
    assert f"| fam_c | 4 | scratch | {cell['scratch']['backoff']['backoff']} |" in report
    assert cell["full"]["thresholds"]["em_target_backoff"]["savings"] == [0.0] * 3
