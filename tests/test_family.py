"""The fast path's family layouts (maml_stop/data/family.py, issue 26): lists of a registered family's
traces gathered from the family collated once give what the per-list code builds; the fixed baselines'
vectorised outcomes and a probe's scores of a list at once equal the per-trace loop."""

from __future__ import annotations

from dataclasses import fields, replace

import numpy as np
import pytest
import torch

from maml_stop.data.batches import collate_traces
from maml_stop.data.corpus import TraceCorpus
from maml_stop.data.family import family_table, laid_out, rows_of
from maml_stop.data.fastpath import fast_path
from maml_stop.decide import outcomes as V
from maml_stop.decide import policies as P
from maml_stop.decide.rule import first_hit, first_hits, NEVER
from maml_stop.evaluate import metrics as M
from maml_stop.learn.predictor import StoppingPredictor
from trace_helpers import make_trace


@pytest.fixture
def traces(tiny_corpus):
    return TraceCorpus.load(tiny_corpus).traces("fam_a")


def test_rows_of_a_registered_family(traces):
    subset = [traces[5], traces[2], traces[40]]
    with family_table(traces) as table:
        found, rows = rows_of(subset)
        assert found is table and rows.tolist() == [5, 2, 40]
        assert rows_of([replace(traces[5])]) is None  # a copy is another trace
        with fast_path(False):
            assert rows_of(subset) is None
    assert rows_of(subset) is None
    with fast_path(False), family_table(traces) as off:
        assert off is None and rows_of(subset) is None


def test_the_last_family_is_reused_until_its_traces_change(traces):
    with family_table(traces) as first:
        pass
    with family_table(list(traces)) as again:
        assert again is first  # the same trace objects: the same layouts
    changed = [replace(traces[0], features=traces[0].features.copy()), *traces[1:]]
    with family_table(changed) as other:
        assert other is not first and rows_of(changed[:1])[1].tolist() == [0]


def test_laid_out_registers_the_traces_argument(traces):
    @laid_out
    def count(family, traces, other=None):
        return rows_of(traces[:3])[1].tolist()

    assert count("fam_a", traces) == [0, 1, 2] and count("fam_a", traces=traces) == [0, 1, 2]
    with pytest.raises(TypeError, match="traces"):
        laid_out(lambda family: family)


def test_gathered_batch_equals_the_collated_one(traces):
    subset = traces[10:30:3] + traces[:4]
    for weighting, cost_lambda in (("uniform", 1.0), ("cost", 2.0)):
        reference = collate_traces(subset, weighting, cost_lambda)
        with family_table(traces):
            gathered = collate_traces(subset, weighting, cost_lambda)
        for f in fields(reference):
            assert torch.equal(getattr(gathered, f.name), getattr(reference, f.name)), f.name


def test_gathered_arrays_equal_the_built_ones(traces):
    subset = traces[7:19]
    built = V.TraceArrays._build(subset)[1]
    with family_table(traces):
        gathered = V.TraceArrays.of(subset)
    width = built.mask.shape[1]
    assert gathered.mask.shape[1] >= width and not gathered.mask[:, width:].any()  # the family's width
    for f in fields(built):
        a, b = getattr(gathered, f.name), getattr(built, f.name)
        np.testing.assert_array_equal(a[:, :width] if a.ndim == 2 else a, b, err_msg=f.name)
    scores = [np.random.default_rng(i).random(t.n_probes) for i, t in enumerate(subset)]
    np.testing.assert_array_equal(gathered.pad(scores)[:, :width], V.pad_scores(scores))
    with pytest.raises(ValueError, match="probes"):
        gathered.pad(scores[:-1])


@pytest.mark.parametrize("policy", [P.FullGeneration(), P.FirstProbe(), P.OraclePolicy(), P.EqualEMOracle()],
                         ids=lambda p: p.name)
def test_fixed_baselines_vectorised_equal_the_loop(traces, policy):
    extra = [make_trace([], final_em=True, trace_id="none_right"), make_trace([], final_em=False, trace_id="none_wrong"),
             make_trace([0, 0, 0], final_em=False, trace_id="never"), make_trace([0, 1, 1], final_em=False, trace_id="fix"),
             make_trace([1, 0], final_em=True, reasoning_tokens=12, trace_id="cheap")]
    for query in (traces[:40], extra, traces[20:] + extra):
        assert policy.vectorised
        fast = P.evaluate_policy(policy, query)
        with fast_path(False):
            slow = P.evaluate_policy(policy, query)
        for f in fields(slow):
            np.testing.assert_array_equal(getattr(fast, f.name), getattr(slow, f.name), err_msg=f"{policy.name} {f.name}")


def test_first_hits_on_a_large_sweep_equals_one_trace_at_a_time():
    rng = np.random.default_rng(0)
    scores = rng.random((300, 12))
    mask = np.arange(12)[None, :] < rng.integers(0, 13, 300)[:, None]
    taus = np.array([1.1, 0.95, 0.5, 0.1, -np.inf])
    got = first_hits(scores[:, None, :], taus, mask=mask[:, None, :])  # (300, 5): the large branch
    assert got.shape == (300, 5)
    for i in range(300):
        want = [first_hit(scores[i, mask[i]], t) for t in taus]
        assert got[i].tolist() == [NEVER if w is None else w for w in want]


def test_curve_figures_equal_the_two_functionals():
    rng = np.random.default_rng(1)
    em, tokens = torch.from_numpy((rng.random((30, 6)) > 0.3) * 1.0), torch.from_numpy(rng.integers(5, 90, (30, 6)) * 1.0)
    full_em, full = torch.from_numpy((rng.random(30) > 0.2) * 1.0), torch.from_numpy(rng.integers(50, 100, 30) * 1.0)
    saved, auc = M.curve_figures(em, tokens, full_em, full, delta=0.05)
    assert torch.equal(saved, M.savings_at_em_drop(em, tokens, full_em, full, delta=0.05))
    assert torch.equal(auc, M.curve_auc(em, tokens, full_em, full))


def test_a_probe_scores_a_list_at_once_as_the_loop_does(traces):
    torch.manual_seed(0)
    policy = P.ProbePolicy(predictor=StoppingPredictor(n_features=8, hidden=8, depth=1))
    support, query = traces[:8], traces[8:]

    def run():
        policy.fit(support)
        sweep = P.sweep_policy(policy, query)
        flat = policy.flat_probabilities(query)
        one = policy.scores(query[3])  # read by id: the list scored at once moves into the dict
        policy._probs.pop(query[4].trace_id)  # as a gated probe forgets its support scores
        again = policy.probabilities(query)
        return sweep.em, sweep.tokens, flat, one, np.concatenate(again)

    with family_table(traces):
        fast = run()
    with fast_path(False):
        slow = run()
    for a, b in zip(fast, slow):
        np.testing.assert_array_equal(a, b)


def test_adaptations_are_chunked_by_length():
    from maml_stop.evaluate.batched import _chunks

    lengths = [10, 90, 12, 180, 95, 170, 14]  # cross-fit halves and whole support sets of two sizes
    assert _chunks(lengths) == [[0, 2, 6], [1, 4], [5, 3]]  # sorted, a new chunk past 1.5x the chunk's first
    assert [len(c) for c in _chunks([7] * 70)] == [32, 32, 6]
