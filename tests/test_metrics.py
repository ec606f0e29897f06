"""Metrics against NumPy references, class and functional forms, batched updates."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
import torch

from maml_stop.evaluate import metrics as M


def _np_auc(cost: np.ndarray, em: np.ndarray) -> float:
    """Reference: integrate max{em_j : cost_j <= x} over x in [0, 1] on a fine grid."""
    xs = np.linspace(0, 1, 200001)[:-1] + 0.5 / 200000
    env = np.array([em[cost <= x].max() if (cost <= x).any() else 0.0 for x in xs[::100]])
    return float(env.mean())


@pytest.fixture()
def sweep():
    rng = np.random.default_rng(0)
    b, t = 37, 6
    full_tokens = rng.integers(50, 400, size=b).astype(float)
    full_em = (rng.random(b) < 0.7).astype(float)
    frac = np.sort(rng.random((b, t)), axis=1)[:, ::-1]  # conservative (expensive) -> aggressive
    tokens = np.round(frac * full_tokens[:, None] * 1.1)
    em = (rng.random((b, t)) < np.linspace(0.75, 0.3, t)).astype(float)
    return em, tokens, full_em, full_tokens


def test_mean_metrics_match_numpy():
    rng = np.random.default_rng(1)
    em = (rng.random(50) < 0.6).astype(float)
    tokens, full = rng.integers(1, 100, 50).astype(float), rng.integers(100, 200, 50).astype(float)
    m_em, m_tok, m_sav = M.EMAtStop(), M.TokensUsed(), M.TokenSavings()
    for chunk in np.array_split(np.arange(50), 4):  # batched updates equal one big update
        m_em.update(torch.tensor(em[chunk]))
        m_tok.update(torch.tensor(tokens[chunk]))
        m_sav.update(torch.tensor(tokens[chunk]), torch.tensor(full[chunk]))
    assert float(m_em.compute()) == pytest.approx(em.mean())
    assert float(m_tok.compute()) == pytest.approx(tokens.mean())
    assert float(m_sav.compute()) == pytest.approx(1 - tokens.sum() / full.sum())
    assert float(M.em_at_stop(torch.tensor(em))) == pytest.approx(em.mean())
    assert float(M.tokens_used(torch.tensor(tokens))) == pytest.approx(tokens.mean())
    assert float(M.token_savings(torch.tensor(tokens), torch.tensor(full))) == pytest.approx(1 - tokens.sum() / full.sum())
    assert M.EMAtStop.higher_is_better and not M.TokensUsed.higher_is_better and M.TokenSavings.higher_is_better


def test_curve_matches_numpy(sweep):
    em, tokens, full_em, full_tokens = sweep
    curve = M.em_tokens_curve(*map(torch.tensor, sweep))
    np.testing.assert_allclose(curve["em"].numpy(), em.mean(0))
    np.testing.assert_allclose(curve["savings"].numpy(), 1 - tokens.sum(0) / full_tokens.sum())
    assert float(curve["full_em"]) == pytest.approx(full_em.mean())

    metric = M.EMTokensCurve(n_thresholds=em.shape[1])
    metric.update(*(torch.tensor(x[:20]) for x in sweep))
    metric.update(*(torch.tensor(x[20:]) for x in sweep))
    np.testing.assert_allclose(metric.compute()["em"].numpy(), em.mean(0))


def test_auc_matches_numpy(sweep):
    em, tokens, full_em, full_tokens = sweep
    cost = tokens.sum(0) / full_tokens.sum()
    want = _np_auc(cost, em.mean(0))
    metric = M.CurveAUC(n_thresholds=em.shape[1])
    metric.update(*map(torch.tensor, sweep))
    assert float(metric.compute()) == pytest.approx(want, abs=1e-3)
    assert float(M.curve_auc(*map(torch.tensor, sweep))) == pytest.approx(want, abs=1e-3)
    # a policy that keeps full EM at zero cost has area full_em
    perfect = M.curve_auc(torch.ones(4, 1), torch.zeros(4, 1), torch.ones(4), torch.full((4,), 10.0))
    assert float(perfect) == pytest.approx(1.0)


@pytest.mark.parametrize("delta", [0.0, 0.01, 0.05, 0.2])
def test_savings_at_em_drop_matches_numpy(sweep, delta):
    em, tokens, full_em, full_tokens = sweep
    drop = full_em.mean() - em.mean(0)
    savings = 1 - tokens.sum(0) / full_tokens.sum()
    ok = drop <= delta + 1e-12
    want = max(0.0, savings[ok].max()) if ok.any() else 0.0
    metric = M.SavingsAtEMDrop(n_thresholds=em.shape[1], delta=delta)
    metric.update(*map(torch.tensor, sweep))
    assert float(metric.compute()) == pytest.approx(want)
    assert float(M.savings_at_em_drop(*map(torch.tensor, sweep), delta=delta)) == pytest.approx(want)


def test_savings_at_em_drop_hand_case():
    # threshold 0 keeps EM (savings .15); threshold 1 drops 50 points (savings .65)
    args = (
        torch.tensor([[1.0, 1.0], [1.0, 0.0]]),
        torch.tensor([[80.0, 40.0], [90.0, 30.0]]),
        torch.tensor([1.0, 1.0]),
        torch.tensor([100.0, 100.0]),
    )
    assert float(M.savings_at_em_drop(*args, delta=0.01)) == pytest.approx(0.15)
    assert float(M.savings_at_em_drop(*args, delta=0.5)) == pytest.approx(0.65)
    with pytest.raises(ValueError, match="delta"):
        M.SavingsAtEMDrop(n_thresholds=2, delta=1.5)
    with pytest.raises(ValueError, match="threshold columns"):
        M.SavingsAtEMDrop(n_thresholds=3).update(*args)


def test_brier_and_ece_match_numpy():
    rng = np.random.default_rng(2)
    probs = rng.random(500)
    labels = (rng.random(500) < probs**2).astype(float)
    n_bins = 7
    idx = np.minimum((probs * n_bins).astype(int), n_bins - 1)
    ece = sum(
        (idx == b).mean() * abs(labels[idx == b].mean() - probs[idx == b].mean()) for b in range(n_bins) if (idx == b).any()
    )
    brier, cal = M.BrierScore(), M.ExpectedCalibrationError(n_bins=n_bins)
    for chunk in np.array_split(np.arange(500), 3):
        brier.update(torch.tensor(probs[chunk]), torch.tensor(labels[chunk]))
        cal.update(torch.tensor(probs[chunk]), torch.tensor(labels[chunk]))
    assert float(brier.compute()) == pytest.approx(((probs - labels) ** 2).mean())
    assert float(cal.compute()) == pytest.approx(ece)
    assert float(M.expected_calibration_error(torch.tensor(probs), torch.tensor(labels), n_bins)) == pytest.approx(ece)
    bins = M.calibration_bins(torch.tensor(probs), torch.tensor(labels), n_bins)
    assert bins["count"].sum() == 500 and bins["edges"].shape == (n_bins + 1,)
    b0 = idx == 0
    assert float(bins["frequency"][0]) == pytest.approx(labels[b0].mean())


def test_calibration_rejects_logits():
    with pytest.raises(ValueError, match="probabilities"):
        M.brier_score(torch.tensor([-1.0, 2.0]), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="same number"):
        M.brier_score(torch.tensor([0.1, 0.2]), torch.tensor([0.0]))


def test_reset_and_doctest():
    m = M.EMAtStop()
    m.update(torch.tensor([1.0, 0.0]))
    m.reset()
    m.update(torch.tensor([1.0]))
    assert float(m.compute()) == 1.0
    assert doctest.testmod(M).failed == 0
