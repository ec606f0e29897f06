"""MAML through the decision (issue 25 item 3): the smoothed first-hit rule (gradient signs, its hard
limit), synthetic families where stopping always hurts (full generation) and always helps (the first
probe), and the study running it by name."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from maml_stop.decide.meta.relaxed import FamilyTensors, episode_figures, hard_outcome, relaxed_outcome
from maml_stop.learn.decision_maml import DecisionMAML, DecisionMAMLConfig
from maml_stop.learn.predictor import StoppingPredictor

TAUS = [0.99, 0.9, 0.7, 0.5, 0.3, 0.1]
P = 4


def synthetic(rng, n: int, label: float, full_em: float) -> FamilyTensors:
    """A family whose every probe answer has EM ``label`` and whose full run has EM ``full_em``; probe i
    of a trace stops after 12 (i + 1) tokens, never firing costs 58, full generation 50. The first
    feature says the label (plus noise), the other two are noise."""
    labels = np.full((n, P), label)
    feats = (0.2 * rng.normal(size=(n, P, 3))).astype(np.float32)
    feats[..., 0] += 4.0 * labels - 2.0
    return FamilyTensors.from_arrays(labels, np.broadcast_to(12.0 * (np.arange(P) + 1), (n, P)), np.full(n, 58.0),
                                     np.full(n, full_em), np.full(n, 50.0), np.full(n, P), features=feats)


def _grad(table: FamilyTensors, probs: np.ndarray, tau: float) -> tuple[float, float]:
    """d(mean drop)/d tau and d(mean tokens)/d tau of the smoothed rule."""
    t = torch.tensor([tau], dtype=torch.float64, requires_grad=True)
    em, tokens, _ = relaxed_outcome(table, torch.tensor(probs)[None], t, 0.05)
    drop = (table.full_em - em[0]).mean()
    (g_drop,) = torch.autograd.grad(drop, t, retain_graph=True)
    (g_tokens,) = torch.autograd.grad(tokens[0].mean(), t)
    return float(g_drop), float(g_tokens)


def test_raising_tau_lowers_the_drop_where_stopping_hurts_and_costs_tokens_where_it_is_free():
    rng = np.random.default_rng(0)
    probs = rng.uniform(0.3, 0.7, size=(20, P))
    hurts = synthetic(rng, 20, label=0.0, full_em=1.0)
    g_drop, g_tokens = _grad(hurts, probs, 0.5)
    assert g_drop < -1e-3  # raising tau stops less often at wrong answers: the drop falls
    free = synthetic(rng, 20, label=1.0, full_em=1.0)
    g_drop, g_tokens = _grad(free, probs, 0.5)
    assert abs(g_drop) < 1e-12 and g_tokens > 1e-3  # nothing to lose, only tokens to spend
    fixes = synthetic(rng, 20, label=1.0, full_em=0.0)
    assert _grad(fixes, probs, 0.5)[0] > 1e-3  # stops that fix a wrong full answer: raising tau loses them


def test_the_smoothed_rule_tends_to_the_hard_rule():
    rng = np.random.default_rng(1)
    n = 30
    labels = (rng.random((n, P)) < 0.5).astype(float)
    table = FamilyTensors.from_arrays(labels, np.cumsum(rng.integers(5, 20, (n, P)), 1), np.full(n, 90.0),
                                      (rng.random(n) < 0.5).astype(float), np.full(n, 80.0), rng.integers(1, P + 1, n))
    probs = rng.uniform(0, 1, size=(2, n, P))
    taus = np.array([[0.9, 0.55, 0.2], [0.8, 0.45, 0.15]])
    probs = np.where(np.abs(probs[:, None] - taus[..., None, None]).min(1) < 0.02, 0.0, probs)  # none close to a tau
    em, tokens, fired = hard_outcome(table, probs, taus)
    soft = relaxed_outcome(table, torch.tensor(probs), torch.tensor(taus), 1e-4)
    for hard, relaxed in zip((em, tokens, fired), soft):
        np.testing.assert_allclose(relaxed.numpy(), hard, atol=2e-4)  # h is clamped at 1 - 1e-6 (x 90 tokens)
    drop, saved = episode_figures(table, em, tokens, np.ones((2, n)))
    assert drop.shape == saved.shape == (2, 3)


def _trained(families: dict, k: int = 8) -> DecisionMAML:
    torch.manual_seed(0)
    model = DecisionMAML(StoppingPredictor(3, depth=0), DecisionMAMLConfig(outer_steps=3, meta_batch=2, inner_steps=5),
                         TAUS, delta=0.01)
    history = model.meta_train(families, k)
    assert len(history) == 2 and all(np.isfinite(h["loss"]) for h in history)
    return model


def _supports(rng, n: int, k: int = 8, episodes: int = 5) -> list[np.ndarray]:
    return [rng.choice(n, size=k, replace=False) for _ in range(episodes)]


def test_a_family_where_stopping_always_hurts_gets_full_generation():
    rng = np.random.default_rng(2)
    model = _trained({f"f{i}": synthetic(rng, 40, 0.0, 1.0) for i in range(2)})
    for m in (model, model.zero_step()):
        out = m.evaluate(synthetic(rng, 40, 0.0, 1.0), _supports(rng, 40))
        assert out["tau"] == [None] * 5 and out["savings"] == [0.0] * 5 and out["em_drop"] == [0.0] * 5


def test_a_family_where_stopping_always_helps_stops_at_the_first_probe():
    rng = np.random.default_rng(3)
    model = _trained({f"f{i}": synthetic(rng, 40, 1.0, 0.5) for i in range(2)})
    out = model.evaluate(synthetic(rng, 40, 1.0, 0.5), _supports(rng, 40))
    assert all(t is not None for t in out["tau"])
    # every support trace stops at its first probe (the rule breaks ties towards the conservative tau, so an
    # odd query trace scored just under it stops at a later probe): savings within 1/32 of the first probe's
    first = 1.0 - 12.0 / 50.0
    assert min(out["savings"]) >= first - 0.03 and max(out["savings"]) == pytest.approx(first)
    assert max(out["em_drop"]) < 0  # and fixed every wrong full answer


def test_meta_training_moves_the_parameters_and_keeps_the_twin():
    rng = np.random.default_rng(4)
    torch.manual_seed(0)
    model = DecisionMAML(StoppingPredictor(3, depth=0), DecisionMAMLConfig(outer_steps=2, meta_batch=2), TAUS)
    twin = model.zero_step()
    families = {"hurts": synthetic(rng, 30, 0.0, 1.0), "helps": synthetic(rng, 30, 1.0, 1.0)}
    model.meta_train(families, 8)
    before = dict(twin.named_parameters())
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert set(model.state()["lambdas"]) == {"hurts", "helps"}
    torch.manual_seed(0)
    frozen = DecisionMAML(StoppingPredictor(3, depth=0), DecisionMAMLConfig(outer_steps=2, meta_batch=2, learn_init=False),
                          TAUS)
    frozen.meta_train(families, 8)
    assert all(torch.equal(p, before[n]) for n, p in frozen.named_parameters() if n != "margin")


def test_errors_name_the_bad_value():
    with pytest.raises(ValueError, match="temperature"):
        DecisionMAMLConfig(temperature=0.0)
    with pytest.raises(ValueError, match="kind 'mlp'"):
        DecisionMAML(StoppingPredictor(3, kind="gru"), DecisionMAMLConfig(), TAUS)
    from maml_stop.evaluate.meta_select.study import MetaSelectConfig

    with pytest.raises(ValueError, match="maml_decision_zero"):
        MetaSelectConfig(selectors=["em_target", "maml_decision"])
    with pytest.raises(ValueError, match="decision_k"):
        MetaSelectConfig(selectors=["em_target", "maml_decision", "maml_decision_zero"], k=[16], decision_k=[8])


def test_a_study_yaml_with_the_old_k_names_is_refused_naming_the_new(tmp_path):
    from maml_stop.evaluate.meta_select.study import MetaSelectConfig

    (tmp_path / "old.yaml").write_text("shots: [16]\ndecision_shots: [16]\n")
    with pytest.raises(ValueError, match="'shots' is now 'k'; 'decision_shots' is now 'decision_k'"):
        MetaSelectConfig.from_yaml(tmp_path / "old.yaml")
    (tmp_path / "new.yaml").write_text("k: [8, 16]\ndecision_k: [16]\n")
    assert MetaSelectConfig.from_yaml(tmp_path / "new.yaml").k == [8, 16]


def test_the_study_runs_the_decision_by_name(tiny_corpus, tmp_path):
    from maml_stop.evaluate.meta_select.study import MetaSelectConfig, run

    cfg = MetaSelectConfig(corpus=tiny_corpus, out=str(tmp_path), k=[4, 8], decision_k=[8], episodes=3,
                           train_episodes=3, probe={"depth": 0, "steps": 20},
                           selectors=["em_target", "em_target_cal", "maml_decision", "maml_decision_margin",
                                      "maml_decision_zero"],
                           against=["em_target_cal"], decision={"outer_steps": 2, "meta_batch": 2})
    results = run(cfg)
    row = results["summary"]["8"]["maml_decision"]
    assert row["twin"] == "maml_decision_zero" and "vs_em_target_cal" in row
    assert "maml_decision" not in results["summary"]["4"]
    fitted = results["fitted"]["fam_a"]["8"]["maml_decision"]
    assert set(fitted["lambdas"]) == {"fam_b", "fam_c"}
    assert "vs em_target_cal" in (tmp_path / "results.md").read_text()
    margin_only = results["fitted"]["fam_a"]["8"]["maml_decision_margin"]
    assert margin_only["config"]["learn_init"] is False and results["summary"]["8"]["maml_decision_margin"]["twin"] == "maml_decision_zero"
