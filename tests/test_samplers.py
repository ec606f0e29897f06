"""Task samplers: the one split, episodes, family weighting, fixed episodes, leave-families-out split."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest

from maml_stop.data.corpus import TraceCorpus
from maml_stop.data.episodes import EpisodeSampler, FamilySplit, SamplerError, split_support_query


def traces(family: str, n: int, samples: int = 1) -> list:
    return [SimpleNamespace(trace_id=f"{family}/{i:04d}#{s}", family=family) for i in range(n) for s in range(samples)]


def test_split_sizes_disjoint_and_seeded():
    ts = traces("a", 30)
    s, q = split_support_query(ts, 5, 10, np.random.default_rng(0))
    assert len(s) == 5 and len(q) == 10 and not {t.trace_id for t in s} & {t.trace_id for t in q}
    s2, q2 = split_support_query(ts, 5, 10, np.random.default_rng(0))
    assert s == s2 and q == q2
    s3, _ = split_support_query(ts, 5, 10, np.random.default_rng(1))
    assert s3 != s
    s4, rest = split_support_query(ts, 5, None, np.random.default_rng(0))
    assert s4 == s and len(rest) == 25


def test_split_counts_questions_not_traces():
    ts = traces("a", 10, samples=3)  # 10 questions, 3 traces each
    s, q = split_support_query(ts, 2, 3, np.random.default_rng(0))
    assert len(s) == 6 and len(q) == 9
    qs = lambda xs: {t.trace_id.split("#")[0] for t in xs}  # noqa: E731
    assert len(qs(s)) == 2 and len(qs(q)) == 3 and not qs(s) & qs(q)


def test_split_errors_name_family_counts_and_kq():
    with pytest.raises(SamplerError, match=r"family 'gcd' has 7 traces.*K=4 support and Q=5 query.*at least 9"):
        split_support_query(traces("gcd", 7), 4, 5, np.random.default_rng(0))
    with pytest.raises(SamplerError, match=r"3 questions \(6 traces\)"):
        split_support_query(traces("gcd", 3, samples=2), 2, 2, np.random.default_rng(0))
    with pytest.raises(SamplerError, match="K must be >= 1"):
        split_support_query(traces("gcd", 7), 0, 5, np.random.default_rng(0))


def test_sampler_unknown_family_and_too_small():
    by_family = {"a": traces("a", 20), "b": traces("b", 5)}
    with pytest.raises(SamplerError, match=r"unknown family 'c'; valid families: \['a', 'b'\]"):
        EpisodeSampler(by_family, k=2, q=2, families=["a", "c"])
    with pytest.raises(SamplerError, match=r"family 'b' has 5 traces.*K=2.*Q=4"):
        EpisodeSampler(by_family, k=2, q=4)  # fails at construction, not mid-training


def test_family_weighting():
    by_family = {"a": traces("a", 60), "b": traces("b", 20), "c": traces("c", 20)}
    counts = Counter(e.family for e in EpisodeSampler(by_family, 2, 2, family_weights="traces", seed=0).sample_batch(2000))
    assert abs(counts["a"] / 2000 - 0.6) < 0.05
    counts = Counter(e.family for e in EpisodeSampler(by_family, 2, 2, seed=0).sample_batch(3000))
    assert all(abs(c / 3000 - 1 / 3) < 0.05 for c in counts.values())
    counts = Counter(e.family for e in EpisodeSampler(by_family, 2, 2, family_weights={"a": 1.0, "b": 3.0}).sample_batch(400))
    assert counts["c"] == 0 and counts["b"] > counts["a"]
    with pytest.raises(SamplerError, match="valid: uniform, traces"):
        EpisodeSampler(by_family, 2, 2, family_weights="size")


def test_fixed_episodes_do_not_depend_on_history():
    by_family = {"a": traces("a", 40), "b": traces("b", 40)}
    s1, s2 = EpisodeSampler(by_family, 3, 5, seed=0), EpisodeSampler(by_family, 3, 5, seed=9)
    s2.sample_batch(7)
    e1, e2 = s1.fixed_episodes("a", 4, seed=1), s2.fixed_episodes("a", 4, seed=1)
    assert [(e.support, e.query) for e in e1] == [(e.support, e.query) for e in e2]
    assert e1[0].support != e1[1].support  # episodes differ from each other
    assert s1.fixed_episodes("b", 1, seed=1)[0].support[0].family == "b"
    full = s1.fixed_episodes("a", 1, seed=1, k=4, q=None)[0]
    assert len(full.support) == 4 and len(full.query) == 36


def test_random_episodes_reproducible_with_seed(tiny_corpus):
    corpus = TraceCorpus.load(tiny_corpus)
    by_family = {f: corpus.traces(f) for f in corpus.families}
    ids = lambda s: [(e.family, [t.trace_id for t in e.support]) for e in s.sample_batch(5)]  # noqa: E731
    assert ids(EpisodeSampler(by_family, 4, 8, seed=3)) == ids(EpisodeSampler(by_family, 4, 8, seed=3))


def test_family_split():
    fams = ["d", "a", "c", "b"]
    s = FamilySplit.resolve(fams, val=["b"], test=["c"])
    assert s == FamilySplit(train=["a", "d"], val=["b"], test=["c"])
    assert FamilySplit.resolve(fams, fold=3) == FamilySplit(train=["b", "c"], val=["a"], test=["d"])
    assert FamilySplit.resolve(fams, fold=0, n_val=2).val == ["b", "c"]
    with pytest.raises(SamplerError, match=r"unknown test families \['x'\]; families in the corpus: \['a', 'b', 'c', 'd'\]"):
        FamilySplit.resolve(fams, test=["x"])
    with pytest.raises(SamplerError, match=r"\['b'\] are in both the train and the val"):
        FamilySplit.resolve(fams, train=["a", "b"], val=["b"])
    with pytest.raises(SamplerError, match="fold must be in"):
        FamilySplit.resolve(fams, fold=4)
