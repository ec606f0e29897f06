"""Property tests of the inner-loop adapter, in learn2learn's style (tiny nets, exact properties)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from maml_stop.learn.adapter import ALGORITHMS, LOSSES, InnerLoopAdapter, inner_loss, loss_weights
from maml_stop.data.batches import DataError, ProbeBatch
from maml_stop.learn.predictor import KINDS, StoppingPredictor

N_FEATURES = 8


def episode_batch(seed: int, n_traces: int = 6, probes: int = 4, shift: float = 0.0) -> ProbeBatch:
    """Labels follow feature 0 (+ a task-specific shift), so adaptation has something to learn."""
    g = torch.Generator().manual_seed(seed)
    n = n_traces * probes
    x = torch.randn(n, N_FEATURES, generator=g)
    y = (x[:, 0] + shift > 0).float()
    ti = torch.arange(n_traces).repeat_interleave(probes)
    pi = torch.arange(probes).repeat(n_traces)
    return ProbeBatch(x, y, ti, pi, torch.rand(n, generator=g) + 0.5)


def make_adapter(algorithm: str = "maml", kind: str = "mlp", **kw) -> InnerLoopAdapter:
    torch.manual_seed(0)
    return InnerLoopAdapter(StoppingPredictor(N_FEATURES, hidden=16, depth=1, kind=kind), algorithm, **kw)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_clone_computes_same_output(algorithm):
    adapter = make_adapter(algorithm)
    b = episode_batch(0)
    clone = adapter.adapt(b, steps=0)
    assert clone is not adapter.predictor
    assert torch.equal(clone(b), adapter.predictor(b))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_adaptation_lowers_support_loss(algorithm, kind):
    adapter = make_adapter(algorithm, kind, inner_lr=0.5, inner_steps=5)
    support = episode_batch(1, shift=1.0)
    before = adapter.loss(adapter.predictor, support)
    after = adapter.loss(adapter.adapt(support), support)
    assert after < before - 1e-3


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_original_untouched(algorithm):
    adapter = make_adapter(algorithm, inner_lr=0.5)
    state = copy.deepcopy(adapter.state_dict())
    support, query = episode_batch(1), episode_batch(2)
    adapted = adapter.adapt(support)
    assert all(p.grad is None for p in adapter.parameters())  # adapt itself never calls backward
    adapter.loss(adapted, query).backward()
    with torch.no_grad():
        adapter.adapt(support)
    for key, value in adapter.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert all(isinstance(p, torch.nn.Parameter) for p in adapter.parameters())
    assert not torch.equal(adapted.head.weight, adapter.predictor.head.weight)


def _meta_grads(adapter: InnerLoopAdapter, support: ProbeBatch, query: ProbeBatch) -> list[torch.Tensor]:
    params = list(adapter.predictor.parameters())
    return list(torch.autograd.grad(adapter.loss(adapter.adapt(support), query), params))


def _reference_meta_grads(adapter: InnerLoopAdapter, support, query, first_order: bool) -> list[torch.Tensor]:
    """Plain functional SGD (torch.func), independent of learn2learn."""
    net = adapter.predictor
    names, params = zip(*net.named_parameters())
    fast = list(params)
    w = loss_weights(support, adapter.loss_kind)
    for _ in range(adapter.inner_steps):
        out = functional_call(net, dict(zip(names, fast)), (support,))
        grads = torch.autograd.grad(inner_loss(out, support, weights=w), fast, create_graph=not first_order)
        fast = [p - adapter.inner_lr * g for p, g in zip(fast, grads)]
    out = functional_call(net, dict(zip(names, fast)), (query,))
    return list(torch.autograd.grad(inner_loss(out, query, adapter.loss_kind), params))


def test_first_and_second_order_meta_gradients():
    support, query = episode_batch(1, shift=0.5), episode_batch(2, shift=0.5)
    fo = _meta_grads(make_adapter(first_order=True, inner_lr=0.3, inner_steps=3), support, query)
    so = _meta_grads(make_adapter(first_order=False, inner_lr=0.3, inner_steps=3), support, query)
    assert all(g.abs().sum() > 0 for g in fo) and all(g.abs().sum() > 0 for g in so)
    assert max((a - b).abs().max() for a, b in zip(fo, so)) > 1e-4
    for first_order, got in ((True, fo), (False, so)):
        ref = _reference_meta_grads(make_adapter(inner_lr=0.3, inner_steps=3), support, query, first_order)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_anil_adapts_only_the_head():
    adapter = make_adapter("anil", inner_lr=0.5)
    support, query = episode_batch(1), episode_batch(2)
    adapted = adapter.adapt(support)
    assert adapted.body is adapter.predictor.body  # shared, not cloned
    assert not torch.equal(adapted.head.weight, adapter.predictor.head.weight)
    torch.testing.assert_close(adapted.embed(query), adapter.predictor.embed(query))
    adapter.loss(adapted, query).backward()  # the outer loop still trains the body
    assert adapter.predictor.body[0].weight.grad.abs().sum() > 0
    with torch.no_grad():
        detached = adapter.adapt(support)
    assert all(isinstance(p, torch.nn.Parameter) for p in adapter.predictor.body.parameters())
    assert not detached.head.weight.requires_grad
    torch.testing.assert_close(detached(query), adapted(query).detach())


def test_metasgd_learns_rates():
    adapter = make_adapter("metasgd", inner_lr=0.2, inner_steps=2)
    assert any(k.startswith("lrs.") for k in adapter.state_dict())
    assert all(torch.all(lr == 0.2) for lr in adapter.lrs)
    opt = torch.optim.SGD(adapter.parameters(), lr=0.1)
    support, query = episode_batch(1, shift=0.5), episode_batch(2, shift=0.5)
    adapter.loss(adapter.adapt(support), query).backward()
    assert all(lr.grad is not None and lr.grad.abs().sum() > 0 for lr in adapter.lrs)
    opt.step()
    assert any(not torch.all(lr == 0.2) for lr in adapter.lrs)
    fo = make_adapter("metasgd", inner_lr=0.2, inner_steps=2, first_order=True)
    fo.loss(fo.adapt(support), query).backward()  # first-order Meta-SGD still trains the rates
    assert all(lr.grad.abs().sum() > 0 for lr in fo.lrs)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_no_grad_adaptation_is_detached_and_equal(algorithm):
    adapter = make_adapter(algorithm, inner_lr=0.3)
    support, query = episode_batch(1), episode_batch(2)
    with torch.no_grad():
        cheap = adapter.adapt(support)
        out = cheap(query)
    assert not out.requires_grad
    torch.testing.assert_close(out, adapter.adapt(support)(query).detach())


def test_errors():
    adapter = make_adapter()
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match="inference_mode=False"):
            adapter.adapt(episode_batch(0))
    empty = ProbeBatch(torch.zeros(0, N_FEATURES), torch.zeros(0), torch.zeros(0, dtype=torch.long),
                       torch.zeros(0, dtype=torch.long), torch.zeros(0))
    with pytest.raises(DataError, match="empty support set"):
        adapter.adapt(empty)
    with pytest.raises(ValueError, match="valid: maml, anil, metasgd"):
        make_adapter("reptile")
    with pytest.raises(ValueError, match="valid: bce, balanced, cost"):
        make_adapter(loss="focal")


def test_inner_losses_match_numpy_style_reference():
    b = episode_batch(3)
    logits = torch.randn(len(b))
    per = F.binary_cross_entropy_with_logits(logits, b.labels, reduction="none")
    pos = b.labels > 0.5
    torch.testing.assert_close(inner_loss(logits, b, "bce"), per.mean())
    torch.testing.assert_close(inner_loss(logits, b, "balanced"), 0.5 * per[pos].mean() + 0.5 * per[~pos].mean())
    torch.testing.assert_close(inner_loss(logits, b, "cost"), (b.weights * per).sum() / b.weights.sum())
    one_class = ProbeBatch(b.features, torch.ones(len(b)), b.trace_index, b.probe_index, b.weights)
    torch.testing.assert_close(inner_loss(logits, one_class, "balanced"), inner_loss(logits, one_class, "bce"))
    assert set(LOSSES) == {"bce", "balanced", "cost"}


def test_state_dict_keys_are_single():
    keys = list(make_adapter().state_dict())
    assert all(k.startswith("predictor.") for k in keys)
    assert "predictor.feature_mean" in keys


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("algorithm,first_order", [("maml", True), ("maml", False), ("anil", False), ("metasgd", False)])
def test_episode_losses_equal_the_per_episode_loop(algorithm, first_order, kind):
    """The meta-batch-vectorised path gives the per-episode fit_support() results: losses and meta-gradients."""
    episodes = [(episode_batch(s, n_traces=3 + s), episode_batch(10 + s, n_traces=2 + 2 * s, shift=0.3 * s)) for s in range(3)]
    adapter = make_adapter(algorithm, kind, inner_lr=0.3, inner_steps=3, first_order=first_order)
    params = list(adapter.parameters())
    batched = adapter.episode_losses(episodes)
    looped = torch.stack([adapter.loss(adapter.fit_support(s), q) for s, q in episodes])  # the one road
    torch.testing.assert_close(batched, looped, rtol=1e-5, atol=1e-6)
    for a, b in zip(torch.autograd.grad(batched.mean(), params), torch.autograd.grad(looped.mean(), params)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(adapter.episode_losses(episodes), looped.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("algorithm", ["maml", "anil", "metasgd"])
def test_adapt_episodes_slices_are_the_per_episode_adaptations(algorithm):
    supports = [episode_batch(s, n_traces=2 + s) for s in range(3)]
    adapter = make_adapter(algorithm, inner_lr=0.3, inner_steps=3)
    with torch.no_grad():
        batched = dict(adapter.adapt_episodes(supports).named_parameters())
        for e, s in enumerate(supports):
            one = adapter.fit_support(s)
            one = one.head if algorithm == "anil" else one
            for name, p in one.named_parameters():
                torch.testing.assert_close(batched[name][e], p, rtol=1e-5, atol=1e-6)
