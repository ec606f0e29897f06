"""StoppingPredictor: shapes, normalisation, no look-ahead for every kind."""

from __future__ import annotations

import pytest
import torch

from maml_stop.data.batches import ProbeBatch
from maml_stop.learn.predictor import KINDS, StoppingPredictor


def batch_of(lengths: list[int], f: int = 4, seed: int = 0) -> ProbeBatch:
    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor(lengths)
    ti = torch.repeat_interleave(torch.arange(len(lengths)), lens)
    pi = torch.cat([torch.arange(n) for n in lengths])
    n = int(lens.sum())
    return ProbeBatch(torch.randn(n, f, generator=g), (torch.rand(n, generator=g) > 0.5).float(), ti, pi, torch.ones(n))


@pytest.mark.parametrize("kind", KINDS)
def test_shapes_and_grad(kind):
    torch.manual_seed(0)
    net = StoppingPredictor(4, hidden=8, depth=2, kind=kind)
    b = batch_of([3, 1, 5])
    out = net(b)
    assert out.shape == (9,) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in net.parameters())
    assert net.embed(b).shape == (9, 8)


@pytest.mark.parametrize("kind", KINDS)
def test_no_look_ahead(kind):
    """Changing probe j of a trace changes no logit of an earlier probe, nor of another trace."""
    torch.manual_seed(0)
    net = StoppingPredictor(4, hidden=8, depth=1, kind=kind).eval()
    b = batch_of([4, 6, 3])
    base = net(b)
    j = 4 + 3  # trace 1, probe 3
    moved = ProbeBatch(b.features.clone(), b.labels, b.trace_index, b.probe_index, b.weights)
    moved.features[j:10] += 5.0  # probes 3.. of trace 1
    out = net(moved)
    assert torch.equal(out[:j], base[:j]) and torch.equal(out[10:], base[10:])
    assert not torch.allclose(out[j:10], base[j:10])
    if kind != "mlp":  # the sequence variants do see earlier probes
        moved2 = ProbeBatch(b.features.clone(), b.labels, b.trace_index, b.probe_index, b.weights)
        moved2.features[4] += 5.0  # trace 1, probe 0
        assert not torch.allclose(net(moved2)[5], base[5])


@pytest.mark.parametrize("kind", KINDS)
def test_trace_order_does_not_matter(kind):
    torch.manual_seed(0)
    net = StoppingPredictor(4, hidden=8, depth=1, kind=kind).eval()
    b = batch_of([2, 5])
    swapped = ProbeBatch(
        torch.cat([b.features[2:], b.features[:2]]), b.labels, torch.tensor([0] * 5 + [1] * 2),
        torch.tensor([0, 1, 2, 3, 4, 0, 1]), b.weights,
    )
    a, s = net(b), net(swapped)
    torch.testing.assert_close(torch.cat([s[5:], s[:5]]), a)


def test_normalisation():
    torch.manual_seed(0)
    net = StoppingPredictor(4, hidden=8, depth=1)
    b = batch_of([5])
    base = net(b)
    mean, std = torch.tensor([1.0, -2.0, 0.5, 3.0]), torch.tensor([2.0, 0.5, 1.0, 0.0])
    net.set_normalisation(mean, std)
    assert torch.equal(net.feature_std, torch.tensor([2.0, 0.5, 1.0, 1.0]))  # zero spread: only centred
    shifted = ProbeBatch(b.features * net.feature_std + mean, b.labels, b.trace_index, b.probe_index, b.weights)
    torch.testing.assert_close(net(shifted), base)
    sd = net.state_dict()
    assert torch.equal(sd["feature_mean"], mean)
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        net.set_normalisation(torch.zeros(3), torch.ones(3))
    with pytest.raises(ValueError, match="finite"):
        net.set_normalisation(torch.full((4,), float("nan")), torch.ones(4))


def test_bad_arguments():
    with pytest.raises(ValueError, match="valid kinds: mlp, delta, gru"):
        StoppingPredictor(4, kind="lstm")
    with pytest.raises(ValueError, match="dropout"):
        StoppingPredictor(4, dropout=1.0)
    net = StoppingPredictor(4, hidden=8, depth=0)
    assert net(batch_of([3])).shape == (3,) and len(net.body) == 0
    assert StoppingPredictor.from_config(net.config()).config() == net.config()
    assert StoppingPredictor(**net.config().to_dict()).config() == net.config()  # what checkpoints store
