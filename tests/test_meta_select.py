"""Meta-learned selectors (issue 25): the vectorised engine against the per-candidate code, the
synthetic always-hurts / always-helps families, the cross-family guarantee, and state round-trips."""

from __future__ import annotations

import json

import numpy as np
import pytest

from maml_stop.decide.meta.calibration import conformal_margin, meta_calibrate, needed_margin
from maml_stop.decide.meta.features import FamilyEpisodes, SupportStats, by_family, infer_stopped
from maml_stop.decide.meta.outcomes import CandidateOutcomes, EpisodeSweeps, TraceTable, candidate_outcomes, episode_masks
from maml_stop.decide.meta.rules import EmpiricalBayesSelector, LearnedMapSelector, SupportDrop, SupportLTT
from maml_stop.decide.registry import make_selector, selector_from_state
from maml_stop.decide.selector import SelectorEpisode, SupportSweep
from maml_stop.decide.thresholds import EMTargetThreshold, LTTThreshold

DELTA = 0.01
J = 6


def synthetic_family(rng, n: int, loss: np.ndarray, gain: np.ndarray, p_full: float, k: int, episodes: int) -> EpisodeSweeps:
    """A family's outcomes drawn from per-candidate loss rates (among full-right questions) and gain
    rates (among full-wrong ones), nested across candidates (a question lost at j is lost at every more
    aggressive candidate); candidate j spends 100 - 12 (j + 1) tokens of full generation's 100."""
    full = (rng.random(n) < p_full).astype(float)
    u = rng.random(n)[:, None]
    em = np.where(full[:, None] > 0, (u >= loss[None, :]).astype(float), (u < gain[None, :]).astype(float))
    tokens = np.broadcast_to(100.0 - 12.0 * (np.arange(J) + 1), (n, J)).copy()
    out = CandidateOutcomes(em, tokens, np.ones((n, J), dtype=bool), full, np.full(n, 100.0))
    support = [rng.choice(n, size=k, replace=False) for _ in range(episodes)]
    return EpisodeSweeps(episode_masks(n, support), out)


def fam(sweeps: EpisodeSweeps) -> FamilyEpisodes:
    return FamilyEpisodes.from_sweeps(sweeps)


def drawn_family(rng, k: int = 16, episodes: int = 20) -> EpisodeSweeps:
    """A family from an exchangeable distribution: full EM, and how fast losses grow with aggressiveness."""
    ramp = np.arange(J) / (J - 1)
    loss = 1.0 / (1.0 + np.exp(-(rng.normal(-4.0, 1.5) + rng.uniform(2.0, 7.0) * ramp)))
    gain = rng.uniform(0.0, 0.1) * ramp
    return synthetic_family(rng, 160, loss, gain, rng.uniform(0.1, 0.7), k, episodes)


# -- the engine ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def probe_and_traces(tiny_corpus):
    import torch

    from maml_stop.data.corpus import TraceCorpus
    from maml_stop.decide.policies import ProbePolicy
    from maml_stop.learn.predictor import StoppingPredictor

    torch.manual_seed(0)
    traces = TraceCorpus.load(tiny_corpus).traces("fam_a")
    policy = ProbePolicy(predictor=StoppingPredictor(n_features=8, hidden=8, depth=1),
                         taus=[1.0, 0.9, 0.7, 0.5, 0.3, 0.1])
    return policy, traces


def test_vectorised_outcomes_equal_the_per_candidate_sweep(probe_and_traces):
    from maml_stop.decide.policies import sweep_policy

    policy, traces = probe_and_traces
    reference = sweep_policy(policy, traces)
    out = candidate_outcomes(TraceTable.from_traces(traces, policy.probabilities(traces)), policy.candidates)
    np.testing.assert_array_equal(out.em, reference.em)
    np.testing.assert_array_equal(out.tokens, reference.tokens)
    np.testing.assert_array_equal(out.full_tokens, reference.full_tokens)
    # tau 1.0 never fires (a sigmoid of this untrained probe stays below 1): there the stop inferred from tokens alone is exact
    np.testing.assert_array_equal(infer_stopped(reference.tokens), out.stopped)


def test_episode_sums_give_the_protocols_support_choices(probe_and_traces):
    from maml_stop.decide.policies import sweep_policy

    policy, traces = probe_and_traces
    out = candidate_outcomes(TraceTable.from_traces(traces, policy.probabilities(traces)), policy.candidates)
    rng = np.random.default_rng(0)
    supports = [rng.choice(len(traces), size=30, replace=False) for _ in range(8)]
    stats = SupportStats.from_sums(EpisodeSweeps(episode_masks(len(traces), supports), out).support_sums())
    em_target, ltt = SupportDrop(0.1, family_alpha=None).decide(stats), SupportLTT(0.1, alpha=0.1).decide(stats)
    for e, idx in enumerate(supports):
        sweep = sweep_policy(policy, [traces[i] for i in idx])
        np.testing.assert_allclose(stats.drop[e], sweep.em_drop(), atol=1e-12)
        np.testing.assert_allclose(stats.savings[e], sweep.savings(), atol=1e-12)
        for fast, slow in ((em_target, EMTargetThreshold(0.1)), (ltt, LTTThreshold(0.1, 0.1))):
            chosen = slow.select(policy.candidates, sweep, None)
            assert (None if fast[e] == 0 else policy.candidates[fast[e] - 1]) == chosen
        # the ThresholdSelector road (a deployment's one support sweep) gives the batched choice
        got = SupportDrop(0.1, family_alpha=None).select(policy.candidates, sweep, None)
        assert got == (None if em_target[e] == 0 else policy.candidates[em_target[e] - 1])


# -- synthetic families: always hurts, always helps ----------------------------------------------------


def _selectors(train):
    families = {f"f{i}": fam(sw) for i, sw in enumerate(train)}
    return [SupportDrop(DELTA, family_alpha=None), SupportLTT(DELTA),
            EmpiricalBayesSelector(DELTA, family_alpha=None).fit_families(families),
            LearnedMapSelector(DELTA, family_alpha=None).fit_families(families),
            EmpiricalBayesSelector(DELTA, family_alpha=0.3).fit_families(families)]


def test_a_family_where_stopping_always_hurts_gets_full_generation():
    rng = np.random.default_rng(1)
    hurts = lambda: synthetic_family(rng, 120, np.ones(J), np.zeros(J), 0.6, 16, 20)  # noqa: E731
    train = [hurts() for _ in range(4)]
    new = hurts()
    stats = SupportStats.from_sums(new.support_sums())
    for selector in _selectors(train):
        assert (selector.decide(stats) == 0).all(), selector.name


def test_a_family_where_stopping_always_helps_stops_at_the_first_probe():
    rng = np.random.default_rng(2)
    helps = lambda: synthetic_family(rng, 120, np.zeros(J), np.full(J, 0.5), 0.5, 16, 20)  # noqa: E731
    train = [helps() for _ in range(4)]
    new = helps()
    stats = SupportStats.from_sums(new.support_sums())
    for selector in _selectors(train)[:1] + _selectors(train)[2:]:  # LTT cannot certify anything at K = 16
        assert (selector.decide(stats) == J).all(), selector.name  # J: the most aggressive candidate


def test_the_meta_calibrated_margin_makes_a_hurting_training_set_careful():
    rng = np.random.default_rng(3)
    ramp = np.arange(J) / (J - 1)
    families = {f"f{i}": fam(synthetic_family(rng, 160, 0.05 + 0.3 * ramp, np.zeros(J), 0.3, 16, 20))
                for i in range(9)}
    calib = meta_calibrate(lambda: SupportDrop(DELTA, family_alpha=None), families, alpha=0.1)
    assert calib.margin == max(calib.needed.values()) > 0.0  # rank ceil(10 * 0.9) = 9 of 9: the largest
    selector = SupportDrop(DELTA, family_alpha=0.1).fit_families(families)
    assert selector.margin == calib.margin and selector.calibration["needed"] == calib.needed
    for f, family in families.items():
        chosen = selector.decide(family.stats)
        assert family.query_drop[np.arange(len(chosen)), chosen].mean() <= DELTA + 1e-9, f


# -- the cross-family guarantee ------------------------------------------------------------------------


def test_conformal_margin_ranks():
    assert conformal_margin(np.arange(9.0), alpha=0.1) == 8.0
    assert conformal_margin(np.arange(9.0), alpha=0.2) == 7.0
    assert conformal_margin(np.arange(3.0), alpha=0.1) == np.inf
    with pytest.raises(ValueError, match="alpha"):
        conformal_margin(np.arange(3.0), alpha=1.0)


@pytest.mark.parametrize("alpha, draws", [(0.3, 30), pytest.param(0.2, 150, marks=pytest.mark.slow),
                                          pytest.param(0.3, 150, marks=pytest.mark.slow)])
def test_the_cross_family_guarantee_holds_its_stated_rate(alpha, draws):
    """Over many draws of 9 + 1 exchangeable families, the held-out family's mean query drop is within
    delta at least 1 - alpha of the time (binomial slack of two standard errors)."""
    rng = np.random.default_rng(4)
    held = []
    for _ in range(draws):
        families = {f"f{i}": fam(drawn_family(rng)) for i in range(10)}
        new = families.pop("f9")
        margin = meta_calibrate(lambda: SupportDrop(DELTA, family_alpha=None), families, alpha).margin
        held.append(needed_margin(SupportDrop(DELTA, family_alpha=None), new) <= margin)
    rate = float(np.mean(held))
    assert rate >= 1 - alpha - 2 * np.sqrt(alpha * (1 - alpha) / draws), rate
    assert rate < 1.0  # the margin is not trivially full generation


@pytest.mark.slow
def test_the_guarantee_with_a_fitted_selector_over_draws():
    """The same with the empirical-Bayes selector fitted on the other families (the jackknife road)."""
    rng = np.random.default_rng(5)
    alpha, draws, held = 0.3, 40, []
    for _ in range(draws):
        families = {f"f{i}": fam(drawn_family(rng, episodes=10)) for i in range(8)}
        new = families.pop("f7")
        selector = EmpiricalBayesSelector(DELTA, family_alpha=alpha).fit_families(families)
        held.append(needed_margin(selector, new) <= selector.margin)
    assert np.mean(held) >= 1 - alpha - 2 * np.sqrt(alpha * (1 - alpha) / draws)


# -- state round-trips: the same decision offline and from a restored state --------------------------


@pytest.mark.parametrize("cls", [EmpiricalBayesSelector, LearnedMapSelector, SupportDrop])
def test_a_fitted_selector_round_trips_through_the_registry(cls):
    rng = np.random.default_rng(6)
    families = {f"f{i}": fam(drawn_family(rng)) for i in range(5)}
    selector = cls(DELTA, family_alpha=0.3).fit_families(families)
    state = json.loads(json.dumps(selector.state_dict()))
    restored = selector_from_state(state)
    assert type(restored) is cls and restored.margin == selector.margin
    stats = fam(drawn_family(rng)).stats
    np.testing.assert_array_equal(selector.decide(stats), restored.decide(stats))
    assert make_selector(cls.name, delta=0.05).delta == 0.05  # selectable by name, like today's rules


def _episodes(family: str, sweeps: EpisodeSweeps) -> list[SelectorEpisode]:
    """The protocol's form of a simulation: one support and one query sweep per episode."""
    o, out = sweeps.out, []
    for mask in sweeps.support:
        parts = []
        for idx in (np.flatnonzero(mask), np.flatnonzero(1 - mask)):
            sweep = SupportSweep(o.em[idx], o.tokens[idx], o.full_em[idx], o.full_tokens[idx])
            sweep.stopped = o.stopped[idx]  # what a first-hit policy knows; without it, inferred from tokens
            parts.append(sweep)
        out.append(SelectorEpisode(family, *parts))
    return out


def test_fit_on_the_protocols_episodes_equals_fit_on_the_simulation():
    rng = np.random.default_rng(7)
    sims = {f"f{i}": drawn_family(rng, episodes=6) for i in range(4)}
    episodes = [ep for f, sw in sims.items() for ep in _episodes(f, sw)]
    grouped = by_family(episodes)
    for f, sw in sims.items():
        np.testing.assert_allclose(grouped[f].stats.drop, fam(sw).stats.drop)
        np.testing.assert_allclose(grouped[f].query_drop, fam(sw).query_drop, atol=1e-12)
    candidates = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]
    a = LearnedMapSelector(DELTA, family_alpha=0.3).fit(candidates, episodes)
    b = LearnedMapSelector(DELTA, family_alpha=0.3).fit_families({f: fam(sw) for f, sw in sims.items()})
    np.testing.assert_allclose(a.weights, b.weights)
    assert a.margin == b.margin


def test_select_on_one_support_sweep_equals_the_batched_decision():
    rng = np.random.default_rng(8)
    selector = EmpiricalBayesSelector(DELTA, family_alpha=None).fit_families(
        {f"f{i}": fam(drawn_family(rng)) for i in range(5)})
    new = drawn_family(rng)
    batched = selector.decide(fam(new).stats)
    candidates = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]
    for e, ep in enumerate(_episodes("new", new)):
        chosen = selector.select(candidates, ep.support, None)
        assert chosen == (None if batched[e] == 0 else candidates[batched[e] - 1])


def test_errors_name_the_bad_value():
    with pytest.raises(ValueError, match="delta"):
        SupportDrop(delta=2.0)
    with pytest.raises(ValueError, match="family_alpha"):
        SupportDrop(family_alpha=1.5)
    with pytest.raises(ValueError, match="alpha"):
        SupportLTT(alpha=0.0)
    with pytest.raises(RuntimeError, match="fit"):
        LearnedMapSelector().predicted_drop(fam(drawn_family(np.random.default_rng(0))).stats)


# -- maml-stop evaluate: the meta-learned rules by name, fitted on each fold's source families --------


@pytest.mark.slow
def test_meta_selectors_run_by_name_in_evaluate(tiny_corpus, tmp_path):
    from maml_stop.evaluate.config import EvaluateConfig
    from maml_stop.evaluate.protocol import run

    cfg = EvaluateConfig(corpus=tiny_corpus, out=str(tmp_path), methods=["full", "consistency"],
                         families=["fam_c"], k=[8], episodes=3, backoff_episodes=3,
                         threshold_methods=["em_target", "em_target_margin", "meta_eb", "meta_map"], progress=False)
    results = run(cfg)
    cell = results["results"]["fam_c"]["8"]
    for name in ("consistency",):
        states = cell[name]["selector_states"]
        assert set(states) == {"em_target_margin", "meta_eb", "meta_map"}
        # fitted on the two source families (leave-one-out margins over them)
        assert set(states["meta_eb"]["calibration"]["needed"]) == set(results["sources"]["fam_c"])
        restored = selector_from_state(states["meta_map"])
        assert restored.weights is not None
        params = cell[name]["thresholds"]["meta_map"]["param"]
        assert len(params) == 3
    assert "selector_states" not in cell["full"]


@pytest.mark.parametrize("name", ["meta_select", "meta_select_v2", "meta_select_decision"])
def test_the_committed_report_is_rebuilt_from_its_results(name, tmp_path):
    """Every figure of experiments/results/<name>/results.md comes from its results.json (bootstrap seeded)."""
    from pathlib import Path

    from maml_stop.evaluate.meta_select.summary import write_summary

    folder = Path(__file__).resolve().parents[1] / "experiments" / "results" / name
    if not (folder / "results.json").is_file():
        pytest.skip(f"{folder} not committed")
    results = json.loads((folder / "results.json").read_text())
    from maml_stop.evaluate.meta_select.study import TWINS

    write_summary(results, tmp_path, TWINS)
    assert (tmp_path / "results.md").read_text() == (folder / "results.md").read_text()


# -- maml-stop adapt with a fitted selector: the artifact records it, live decides as offline --------


@pytest.mark.slow
def test_adapt_with_an_exported_selector_state(tiny_corpus, tmp_path):
    from maml_stop.data.corpus import TraceCorpus
    from maml_stop.decide.policies import ProbePolicy
    from maml_stop.evaluate.meta_select.study import MetaSelectConfig, export_state
    from maml_stop.learn.module import load_predictor
    from maml_stop.live.adapt import AdaptError, adapt, load_adapted, save_adapted
    from trace_helpers import write_tiny_checkpoint

    cfg = MetaSelectConfig(corpus=tiny_corpus, families=["fam_a", "fam_b"], episodes=4, train_episodes=4,
                           probe={"depth": 0, "steps": 20}, alpha=0.5)
    path = tmp_path / "state.json"
    state = export_state(cfg, "meta_eb_cal", 8, path)
    assert state["name"] == "meta_eb" and set(state["calibration"]["needed"]) == {"fam_a", "fam_b"}
    ckpt = write_tiny_checkpoint(tmp_path / "tiny.ckpt")
    adapted = adapt(ckpt, "fam_c", k=8, corpus=tiny_corpus, selector_state=str(path))
    assert adapted.meta["threshold_method"] == "meta_eb"
    assert json.loads(json.dumps(adapted.meta["selector"]))["w_loss"] == state["w_loss"]
    # the recorded rule, rebuilt, chooses the artifact's threshold from the same support (offline = live)
    loaded = load_adapted(save_adapted(adapted, tmp_path / "c.pt"))
    corpus = TraceCorpus.load(tiny_corpus)
    support = [t for t in corpus.traces("fam_c") if t.trace_id in set(adapted.meta["support_trace_ids"])]
    _, adapter, _ = load_predictor(ckpt)
    policy = ProbePolicy(adapter=adapter, selector=selector_from_state(loaded.meta["selector"])).fit(support)
    assert policy.param == loaded.tau
    with pytest.raises(AdaptError, match="selector_state"):
        adapt(ckpt, "fam_c", k=8, corpus=tiny_corpus, selector_state=str(tmp_path / "missing.json"))
