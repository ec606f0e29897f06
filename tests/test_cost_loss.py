"""Cost-sensitive losses (issue 13 item 4) and the decision-aimed query loss (issue 11 item 4):
weights and stop penalties on hand-computed traces, the lambda = 0 limit, lambda moving the fitted stop
earlier, gradients under both adaptation backends, and clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from maml_stop.data.batches import COST_FLOOR, DataError, ProbeBatch, TraceTensors, collate_traces
from maml_stop.data.datamodule import TraceDataModule
from maml_stop.learn.adapter import (AdapterConfig, InnerLoopAdapter, expected_stop_cost, inner_loss, parse_loss,
                                     query_loss)
from maml_stop.learn.predictor import StoppingPredictor
from trace_helpers import make_trace

torch.set_num_threads(1)


def hand_traces():
    # positions 10, 20, 30, 40 (+5 tokens per probe), 50 reasoning tokens: running to the end costs 50 + 20 = 70
    a = make_trace([0, 0, 1, 1], final_em=True, reasoning_tokens=50, trace_id="a")
    # positions 10, 20, 30, 30 reasoning tokens: the end costs 30 + 15 = 45; the full run is wrong
    b = make_trace([0, 1, 0], final_em=False, reasoning_tokens=30, trace_id="b")
    return a, b


SAVED_A = np.array([55, 40, 25, 10]) / 70  # 1 - (position + probes so far) / 70
SAVED_B = np.array([30, 15, 0]) / 45
EM_LOST_A = np.array([1, 1, 0, 0])  # final_em - probe_em
EM_LOST_B = np.array([0, -1, 0])


def test_weights_and_penalties_on_hand_computed_traces():
    a, b = hand_traces()
    lam = 2.0
    batch = collate_traces([a, b], weighting="cost", cost_lambda=lam)
    # correct probes: lambda * tokens at stake; wrong probes: the EM at stake (1 if the full run is right, else floor)
    expect_w = np.concatenate([[1.0, 1.0, lam * SAVED_A[2], lam * SAVED_A[3]],
                               [COST_FLOOR, lam * SAVED_B[1], COST_FLOOR]])
    np.testing.assert_allclose(batch.weights.numpy(), expect_w, rtol=1e-6)
    np.testing.assert_allclose(batch.cost_weights.numpy(), expect_w, rtol=1e-6)
    expect_pen = np.concatenate([EM_LOST_A - lam * SAVED_A, EM_LOST_B - lam * SAVED_B])
    np.testing.assert_allclose(batch.stop_penalty.numpy(), expect_pen, rtol=1e-6, atol=1e-7)
    # a uniform weighting keeps weights at 1 but still carries the cost weights and penalties the query losses read
    uniform = collate_traces([a, b], cost_lambda=lam)
    assert torch.equal(uniform.weights, torch.ones(7))
    assert torch.equal(uniform.cost_weights, batch.cost_weights) and torch.equal(uniform.stop_penalty, batch.stop_penalty)

    # cost loss: the weighted BCE, weights normalised
    logits = torch.tensor([-1.0, 0.5, 2.0, -0.3, 0.0, 1.0, -2.0])
    per = F.binary_cross_entropy_with_logits(logits, batch.labels, reduction="none")
    w = torch.tensor(expect_w, dtype=torch.float32)
    torch.testing.assert_close(inner_loss(logits, uniform, "cost"), (w * per).sum() / w.sum())
    # expected cost: P(first stop at i) = p_i prod_{j<i}(1 - p_j), averaged over the two traces
    p = torch.sigmoid(logits).double().numpy()
    first = lambda q: q * np.concatenate([[1.0], np.cumprod(1 - q)[:-1]])  # noqa: E731
    expect = (first(p[:4]) @ expect_pen[:4] + first(p[4:]) @ expect_pen[4:]) / 2
    assert expected_stop_cost(logits, batch).item() == pytest.approx(expect, rel=1e-5)
    assert query_loss(logits, batch, "expected_cost").item() == pytest.approx(expect, rel=1e-5)
    # certain stop at the first probe of both traces: the mean penalty of those two probes
    sure = torch.tensor([20.0, 0, 0, 0, 20.0, 0, 0])
    assert expected_stop_cost(sure, batch).item() == pytest.approx((expect_pen[0] + expect_pen[4]) / 2, abs=1e-6)
    # never stopping costs nothing
    assert expected_stop_cost(torch.full((7,), -30.0), batch).item() == pytest.approx(0.0, abs=1e-9)
    # TraceTensors gathers the same
    tt = TraceTensors([a, b], weighting="cost", cost_lambda=lam)
    g = tt.collate([b, a])
    assert torch.equal(g.stop_penalty, collate_traces([b, a], "cost", lam).stop_penalty)


def test_lambda_one_is_the_earlier_cost_weighting_and_lambda_zero_the_em_only_limit():
    a, b = hand_traces()
    # lambda = 1 (the default): correct probes weigh the share of tokens saved, as before lambda existed
    one = collate_traces([a, b], weighting="cost")
    np.testing.assert_allclose(one.weights.numpy()[[2, 3, 5]], [SAVED_A[2], SAVED_A[3], SAVED_B[1]], rtol=1e-6)
    zero = collate_traces([a, b], weighting="cost", cost_lambda=0.0)
    # lambda = 0: every correct probe weighs the floor, every wrong probe its EM at stake (floored)
    np.testing.assert_allclose(zero.weights.numpy(), [1, 1, COST_FLOOR, COST_FLOOR, COST_FLOOR, COST_FLOOR, COST_FLOOR])
    # ... and the stop penalty is the EM lost alone: the expected cost is the expected EM drop
    np.testing.assert_allclose(zero.stop_penalty.numpy(), np.concatenate([EM_LOST_A, EM_LOST_B]))
    logits = torch.randn(7, generator=torch.Generator().manual_seed(0))
    p = torch.sigmoid(logits).double().numpy()
    surv = lambda q: np.concatenate([[1.0], np.cumprod(1 - q)[:-1]])  # noqa: E731
    em_drop = ((p[:4] * surv(p[:4])) @ EM_LOST_A + (p[4:] * surv(p[4:])) @ EM_LOST_B) / 2
    assert expected_stop_cost(logits, zero).item() == pytest.approx(em_drop, rel=1e-5)


def ramp_traces(n: int = 40, p: int = 10, seed: int = 0):
    """One feature, the probe's place in the run (0..1); the forced answer turns correct at a random probe."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 1, p)[:, None]
    out = []
    for i in range(n):
        c = int(rng.integers(2, p - 1))
        labels = (np.arange(p) >= c).astype(int)
        out.append(make_trace(labels, final_em=True, features=x + 0.02 * rng.standard_normal((p, 1)),
                              trace_id=f"r{i}", reasoning_tokens=(p + 1) * 10))
    return out


def mean_first_stop(model, batch, tau: float = 0.5) -> float:
    """Mean probe index of the first p >= tau per trace (the number of probes when none crosses)."""
    with torch.no_grad():
        prob = torch.sigmoid(model(batch)).numpy()
    idx, ti = batch.probe_index.numpy(), batch.trace_index.numpy()
    stops = []
    for t in range(batch.n_traces):
        hit = np.nonzero(prob[ti == t] >= tau)[0]
        stops.append(hit[0] if hit.size else idx[ti == t].max() + 1)
    return float(np.mean(stops))


def fit_predictor(batch, kind: str, steps: int = 300) -> StoppingPredictor:
    torch.manual_seed(0)
    net = StoppingPredictor(1, hidden=4, depth=0)
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        query_loss(net(batch), batch, kind).backward()
        opt.step()
    return net


@pytest.mark.parametrize("kind", ["cost", "expected_cost"])
def test_larger_lambda_stops_earlier(kind):
    traces = ramp_traces()
    stops = [mean_first_stop(fit_predictor(collate_traces(traces, cost_lambda=lam), kind), collate_traces(traces))
             for lam in (0.1, 1.0, 8.0)]
    assert stops[0] > stops[1] > stops[2], stops
    # and through the one adaptation road, with the inner cost loss (weighting from the adapter's config)
    if kind == "cost":
        assert AdapterConfig(loss="cost").weighting == "cost"
        got = []
        for lam in (0.1, 8.0):
            torch.manual_seed(0)
            adapter = InnerLoopAdapter(StoppingPredictor(1, hidden=4, depth=0), inner_lr=0.5, inner_steps=200, loss="cost")
            with torch.no_grad():
                got.append(mean_first_stop(adapter.fit_support(collate_traces(traces, "cost", lam)), collate_traces(traces)))
        assert got[0] > got[1], got


@pytest.mark.parametrize("loss", ["cost", "balanced/cost", "balanced/expected_cost", "cost/expected_cost"])
@pytest.mark.parametrize("algorithm", ["maml", "anil", "metasgd"])
def test_meta_gradients_flow_and_backends_agree(loss, algorithm):
    pytest.importorskip("learn2learn")
    rng = np.random.default_rng(1)
    traces = [make_trace(rng.integers(0, 2, 6), final_em=bool(i % 3), features=rng.standard_normal((6, 3)),
                         trace_id=f"g{i}") for i in range(12)]
    tt = TraceTensors(traces, weighting="cost", cost_lambda=2.0)
    episodes = [(tt.gather(range(0, 3)), tt.gather(range(3, 7))), (tt.gather(range(7, 9)), tt.gather(range(9, 12)))]
    results = []
    for backend in ("learn2learn", "torch_func"):
        torch.manual_seed(0)
        adapter = InnerLoopAdapter(StoppingPredictor(3, hidden=8, depth=1), algorithm, inner_lr=0.3, inner_steps=2,
                                   loss=loss, backend=backend)
        params = list(adapter.parameters())
        batched = adapter.episode_losses(episodes)
        looped = torch.stack([adapter.loss(adapter.fit_support(s), q) for s, q in episodes])  # the one road
        torch.testing.assert_close(batched, looped, rtol=1e-5, atol=1e-6)
        grads = torch.autograd.grad(batched.mean(), params)
        assert all(torch.isfinite(g).all() for g in grads)
        assert sum(float(g.abs().sum()) for g in grads) > 0
        results.append((batched.detach(), grads))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_loss_specs_and_inner_query_split():
    assert parse_loss("cost") == ("cost", "cost")
    assert parse_loss("balanced/expected_cost") == ("balanced", "expected_cost")
    assert AdapterConfig(loss="balanced/cost").weighting == "uniform"  # the inner kind decides fit_support's weighting
    assert AdapterConfig(loss="cost/expected_cost").weighting == "cost"
    with pytest.raises(ValueError, match="query loss .* use INNER/expected_cost, e.g. balanced/expected_cost"):
        parse_loss("expected_cost")
    with pytest.raises(ValueError, match="unknown loss 'balanced/focal'; valid: bce, balanced, cost, or INNER/QUERY"):
        InnerLoopAdapter(StoppingPredictor(3, hidden=4, depth=1), loss="balanced/focal")
    with pytest.raises(ValueError, match="unknown loss 'expected_cost/bce'"):
        parse_loss("expected_cost/bce")
    hand = ProbeBatch(torch.randn(4, 3), torch.tensor([0.0, 1, 0, 1]), torch.zeros(4, dtype=torch.long),
                      torch.arange(4), torch.ones(4))
    with pytest.raises(DataError, match="expected_cost reads ProbeBatch.stop_penalty"):
        query_loss(torch.zeros(4), hand, "expected_cost")


@pytest.mark.parametrize("bad", [-1.0, -1e-9, float("nan"), float("inf"), "big"])
def test_bad_lambda_is_a_clear_error(bad, tiny_corpus):
    a, _ = hand_traces()
    with pytest.raises(ValueError, match="cost_lambda must be"):
        collate_traces([a], weighting="cost", cost_lambda=bad)
    with pytest.raises(ValueError, match=r"data.cost_lambda must be .*got"):
        TraceDataModule(tiny_corpus, weighting="cost", cost_lambda=bad)


def test_datamodule_lambda_reaches_the_batches_and_a_fit_runs(tiny_corpus, tmp_path):
    from test_module import make_dm, make_model, make_trainer

    dm = make_dm(tiny_corpus, weighting="cost", cost_lambda=3.0)
    dm.setup("fit")
    ep = next(iter(dm.train_dataloader()))[0]
    traces = dm.corpus.traces(ep.family)
    ref = collate_traces(traces, "cost", 3.0)
    assert ep.query.stop_penalty.min() >= ref.stop_penalty.min() and ep.query.weights.max() <= ref.weights.max()
    assert float(ep.query.weights.max()) > 1.0  # lambda 3 lifts tokens at stake above the EM weight
    # the decision-aimed query loss with a balanced inner loss: no data.weighting needed, module checks pass
    dm = make_dm(tiny_corpus, cost_lambda=3.0)
    trainer = make_trainer(tmp_path, max_steps=2, limit_val_batches=1)
    trainer.fit(make_model(dm, loss="balanced/expected_cost"), datamodule=dm)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
