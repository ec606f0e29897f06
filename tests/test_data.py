"""ProbeBatch / collate_traces / TraceTensors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from maml_stop.data.corpus import Trace, TraceCorpus
from maml_stop.data.batches import COST_FLOOR, DataError, ProbeBatch, TraceTensors, collate_traces, trace_weights


def make_trace(i: int, p: int, f: int = 3, family: str = "fam", final_em: bool = True) -> Trace:
    rng = np.random.default_rng(i)
    return Trace(
        trace_id=f"{family}/{i:05d}#0", family=family, split="train",
        features=rng.normal(size=(p, f)).astype(np.float32),
        labels=(np.arange(p) >= p // 2).astype(np.float32),
        positions=(np.arange(p) + 1) * 10, probe_tokens=np.full(p, 4),
        probe_answers=["x"] * p, logprob_mean=np.zeros(p, np.float32),
        final_em=final_em, reasoning_tokens=10 * p + 5, hit_cap=False,
    )


def test_collate_layout():
    traces = [make_trace(0, 3), make_trace(1, 1), make_trace(2, 4)]
    b = collate_traces(traces).check(3)
    assert b.features.shape == (8, 3) and b.features.dtype == torch.float32
    assert b.trace_index.tolist() == [0, 0, 0, 1, 2, 2, 2, 2]
    assert b.probe_index.tolist() == [0, 1, 2, 0, 0, 1, 2, 3]
    assert b.n_traces == 3 and len(b) == 8
    assert torch.equal(b.features[3], torch.from_numpy(traces[1].features[0]))
    assert torch.equal(b.labels[4:], torch.from_numpy(traces[2].labels))
    assert torch.equal(b.weights, torch.ones(8))


def test_trace_tensors_gather_equals_collate(tiny_corpus):
    corpus = TraceCorpus.load(tiny_corpus)
    traces = [t for f in corpus.families for t in corpus.traces(f)]
    for weighting in ("uniform", "cost"):
        tt = TraceTensors(traces, weighting=weighting)
        subset = [traces[i] for i in (5, 170, 0, 64, 33)]
        a, b = tt.collate(subset), collate_traces(subset, weighting=weighting)
        for f in dataclasses.fields(ProbeBatch):
            assert torch.equal(getattr(a, f.name), getattr(b, f.name)), f.name
        a.check(len(corpus.feature_names))


def test_cost_weights():
    t = make_trace(0, 6, final_em=True)
    w = trace_weights(t, "cost")
    full = t.reasoning_tokens + t.probe_tokens.sum()
    stop = t.positions + np.cumsum(t.probe_tokens)
    expect = np.where(t.labels > 0.5, np.maximum(1 - stop / full, COST_FLOOR), 1.0)
    np.testing.assert_allclose(w, expect, rtol=1e-6)
    w_wrong = trace_weights(make_trace(0, 6, final_em=False), "cost")
    assert np.all(w_wrong[t.labels < 0.5] == COST_FLOOR)
    assert collate_traces([t], weighting="cost").weights.min() >= COST_FLOOR
    with pytest.raises(ValueError, match="valid: uniform, cost"):
        trace_weights(t, "tokens")


def test_errors_nan_width_empty():
    bad = make_trace(0, 3)
    bad.features[1, 2] = np.nan
    with pytest.raises(DataError, match=r"fam/00000#0 has non-finite"):
        collate_traces([make_trace(1, 2), bad])
    with pytest.raises(DataError, match="feature width 4, expected 3"):
        collate_traces([make_trace(1, 2), make_trace(2, 2, f=4)])
    with pytest.raises(DataError, match="empty"):
        collate_traces([])
    with pytest.raises(DataError, match="expects 5"):
        collate_traces([make_trace(1, 2)]).check(5)
    tt = TraceTensors([make_trace(1, 2)])
    with pytest.raises(DataError, match="not among the collated"):
        tt.collate([make_trace(7, 2)])


def test_check_rejects_shuffled_rows():
    b = collate_traces([make_trace(0, 3), make_trace(1, 2)])
    perm = torch.tensor([1, 0, 2, 3, 4])
    shuffled = ProbeBatch(b.features[perm], b.labels[perm], b.trace_index[perm], b.probe_index[perm], b.weights[perm])
    with pytest.raises(DataError, match="contiguous"):
        shuffled.check()
    nan = ProbeBatch(b.features.clone(), b.labels, b.trace_index, b.probe_index, b.weights)
    nan.features[2, 0] = float("inf")
    with pytest.raises(DataError, match=r"rows \[2\]"):
        nan.check()
