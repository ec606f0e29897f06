"""Task samplers: episodes (support + query traces of one family) and the leave-families-out split.

>>> from maml_stop.data.corpus import TraceCorpus                                    # doctest: +SKIP
>>> corpus = TraceCorpus.load("experiments/corpus/qwen05")
>>> sampler = EpisodeSampler({f: corpus.traces(f) for f in corpus.families}, k=16, q=64, seed=0)
>>> ep = sampler.sample()                              # random (training)
>>> fixed = sampler.fixed_episodes("gcd", n=50, seed=1)  # the same 50 episodes on every call

:func:`split_support_query` is the one support/query split, used by training, validation, evaluation
and the adaptation script. K and Q count **questions** (labelling costs per question): traces that
share a question id (``"<question id>#<sample>"``) always land on the same side, so a query question is
never seen in the support set. With one trace per question, K and Q count traces.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Mapping, Sequence, TypeVar

import numpy as np

from maml_stop.data.store import question_id_of

__all__ = ["Episode", "EpisodeSampler", "FamilySplit", "QuestionGroups", "split_support_query", "SamplerError",
           "FAMILY_WEIGHTINGS", "rank_share"]

T = TypeVar("T")
FAMILY_WEIGHTINGS = ("uniform", "traces")


class SamplerError(ValueError):
    """An episode that cannot be drawn (too few traces, unknown family, bad K/Q or split)."""


@dataclass
class Episode:
    """One meta-learning task: K support traces and Q query traces of one family."""

    family: str
    support: list  # list[Trace]
    query: list  # list[Trace]


def _question_of(item: Any) -> Any:
    trace_id = getattr(item, "trace_id", None)
    return item if trace_id is None else question_id_of(trace_id)


class QuestionGroups:
    """Traces grouped by question (in first-seen order), built once per family by the sampler so that
    drawing an episode does not regroup hundreds of traces."""

    def __init__(self, traces: Sequence[Any], family: str | None = None) -> None:
        groups: dict[Any, list[Any]] = {}
        for t in traces:
            groups.setdefault(_question_of(t), []).append(t)
        self.groups: list[list[Any]] = list(groups.values())
        self.n_traces = len(traces)
        self.family = family if family is not None else (getattr(traces[0], "family", "?") if traces else "?")

    def __len__(self) -> int:
        return len(self.groups)


def split_support_query(
    traces: Sequence[T] | QuestionGroups, k: int, q: int | None, rng: np.random.Generator, family: str | None = None
) -> tuple[list[T], list[T]]:
    """Draw K support and Q query questions (``q=None``: every other question) from ``traces`` (a list
    of traces, or the same grouped once as :class:`QuestionGroups`).

    Support and query never share a question. Raises :class:`SamplerError` naming the family, the
    counts and the K/Q asked when there are too few questions.
    """
    if k < 1:
        raise SamplerError(f"K must be >= 1 (an empty support set cannot be adapted on); got K={k}")
    if q is not None and q < 1:
        raise SamplerError(f"Q must be >= 1 or None (all remaining questions); got Q={q}")
    grouped = traces if isinstance(traces, QuestionGroups) else QuestionGroups(traces, family)
    n = len(grouped)
    need = k + (1 if q is None else q)
    if n < need:
        fam = family if family is not None else grouped.family
        counted = f"{n} questions ({grouped.n_traces} traces)" if n != grouped.n_traces else f"{n} traces"
        raise SamplerError(
            f"family {fam!r} has {counted}; an episode with K={k} support and "
            f"Q={'all remaining' if q is None else q} query questions needs at least {need}"
        )
    order = rng.permutation(n)
    end = n if q is None else k + q
    groups = grouped.groups
    support = [t for i in order[:k] for t in groups[i]]
    query = [t for i in order[k:end] for t in groups[i]]
    return support, query


def rank_share(items: Sequence[T], rank: int, world_size: int, what: str = "episodes") -> list[T]:
    """The share of ``items`` that process ``rank`` of ``world_size`` takes: every ``world_size``-th
    item from ``rank`` on (``items[rank::world_size]``). The shares of all ranks are disjoint and together
    are ``items``, so a sum over every rank's share is the sum over ``items``: distributed meta-training
    draws the same global meta-batch (or fixed episode list) on every rank and each rank adapts on its
    share (:class:`maml_stop.data.datamodule.TraceDataModule`). Raises :class:`SamplerError` for a rank
    outside ``[0, world_size)`` or when a rank would get nothing (fewer ``what`` than processes).

    >>> rank_share(list("abcde"), 1, 2)
    ['b', 'd']
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise SamplerError(f"rank {rank} of world size {world_size}: need world_size >= 1 and 0 <= rank < world_size")
    if len(items) < world_size:
        raise SamplerError(f"{len(items)} {what} for {world_size} processes: every process needs at least one "
                           f"(raise the number of {what} or use fewer devices/nodes)")
    return list(items[rank::world_size])


@dataclass
class FamilySplit:
    """Leave-families-out split: meta-train, validation and test families (disjoint)."""

    train: list[str]
    val: list[str]
    test: list[str]

    @classmethod
    def resolve(
        cls,
        available: Sequence[str],
        train: Sequence[str] | None = None,
        val: Sequence[str] | None = None,
        test: Sequence[str] | None = None,
        fold: int | None = None,
        n_val: int = 1,
    ) -> "FamilySplit":
        """Check and complete a split. Explicit lists win; with ``fold`` (leave-one-family-out over the
        sorted families) test = family ``fold`` and val = the next ``n_val`` families (cyclically) unless
        given; train defaults to every family not in val/test."""
        available = sorted(available)
        for name, fams in (("train", train), ("val", val), ("test", test)):
            unknown = [f for f in fams or [] if f not in available]
            if unknown:
                raise SamplerError(f"unknown {name} families {unknown}; families in the corpus: {available}")
        if fold is not None:
            if not 0 <= fold < len(available):
                raise SamplerError(f"fold must be in [0, {len(available)}) for families {available}; got {fold}")
            if test is None:
                test = [available[fold]]
            if val is None:
                val = [available[(fold + 1 + i) % len(available)] for i in range(n_val)]
        val, test = list(val or []), list(test or [])
        if train is None:
            train = [f for f in available if f not in val and f not in test]
        train = list(train)
        lists = {"train": train, "val": val, "test": test}
        for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
            shared = sorted(set(lists[a]) & set(lists[b]))
            if shared:
                raise SamplerError(f"families {shared} are in both the {a} and the {b} split; splits must be disjoint")
        if not train:
            raise SamplerError(f"no meta-training families left (val={val}, test={test}, available={available})")
        return cls(train=train, val=val, test=test)

    @classmethod
    def holding_out(
        cls, available: Sequence[str], family: str, val: Sequence[str] | None = None, n_val: int = 1
    ) -> "FamilySplit":
        """The split of one leave-one-family-out fold, ``family`` held out (test = [family]): validation =
        the families of ``val`` other than ``family``, or, when none is left, the ``n_val`` families after
        it in sorted order (cyclically, the ``fold`` rule of :meth:`resolve`); train = every other family.

        >>> FamilySplit.holding_out(["a", "b", "c", "d"], "b", val=["b"])
        FamilySplit(train=['a', 'd'], val=['c'], test=['b'])
        """
        ordered = sorted(available)
        if family not in ordered:
            raise SamplerError(f"unknown held-out family {family!r}; families in the corpus: {ordered}")
        kept = [f for f in val or [] if f != family]
        return cls.resolve(ordered, val=kept or None, test=[family], fold=ordered.index(family), n_val=n_val)


class EpisodeSampler:
    """Draws episodes from families: random ones for training, seeded fixed ones for evaluation.

    ``family_weights``: ``"uniform"`` (each family equally likely), ``"traces"`` (proportional to its
    number of traces) or a mapping family -> weight.
    """

    def __init__(
        self,
        traces_by_family: Mapping[str, Sequence[Any]],
        k: int,
        q: int | None,
        families: Sequence[str] | None = None,
        family_weights: str | Mapping[str, float] = "uniform",
        seed: int = 0,
    ) -> None:
        self.traces_by_family = dict(traces_by_family)
        self.families = list(families) if families is not None else sorted(self.traces_by_family)
        if not self.families:
            raise SamplerError("EpisodeSampler needs at least one family")
        self._groups = {f: QuestionGroups(self._traces(f), f) for f in self.families}
        self.k, self.q = k, q
        self.weights = self._weights(family_weights)  # (n_families,) sums to 1
        self.rng = np.random.default_rng(seed)
        for f in self.families:  # fail at construction, not mid-training
            self.check(f, k, q)

    def _traces(self, family: str) -> Sequence[Any]:
        if family not in self.traces_by_family:
            raise SamplerError(f"unknown family {family!r}; valid families: {sorted(self.traces_by_family)}")
        return self.traces_by_family[family]

    def _weights(self, family_weights: str | Mapping[str, float]) -> np.ndarray:
        if isinstance(family_weights, str):
            if family_weights == "uniform":
                w = np.ones(len(self.families))
            elif family_weights == "traces":
                w = np.array([len(self._traces(f)) for f in self.families], dtype=float)
            else:
                raise SamplerError(
                    f"unknown family weighting {family_weights!r}; valid: {', '.join(FAMILY_WEIGHTINGS)} or a mapping"
                )
        else:
            extra = sorted(set(family_weights) - set(self.families))
            if extra:
                raise SamplerError(f"family weights for families not sampled {extra}; sampled families: {self.families}")
            w = np.array([float(family_weights.get(f, 0.0)) for f in self.families])
        if (w < 0).any() or w.sum() <= 0 or not np.isfinite(w).all():
            raise SamplerError(f"family weights must be finite, >= 0 and not all 0; got {dict(zip(self.families, w))}")
        return w / w.sum()

    def _grouped(self, family: str) -> QuestionGroups:
        if family not in self._groups:
            self._groups[family] = QuestionGroups(self._traces(family), family)
        return self._groups[family]

    def check(self, family: str, k: int, q: int | None) -> None:
        """Raise :class:`SamplerError` unless ``family`` can give an episode with this K and Q."""
        split_support_query(self._grouped(family), k, q, np.random.default_rng(0), family=family)

    def sample(self, family: str | None = None) -> Episode:
        """A random episode (of ``family``, or of a family drawn by ``family_weights``)."""
        if family is None:
            family = self.families[int(self.rng.choice(len(self.families), p=self.weights))]
        support, query = split_support_query(self._grouped(family), self.k, self.q, self.rng, family=family)
        return Episode(family, support, query)

    def sample_batch(self, n: int) -> list[Episode]:
        return [self.sample() for _ in range(n)]

    def fixed_episodes(
        self, family: str, n: int, seed: int, k: int | None = None, q: int | None = -1
    ) -> list[Episode]:
        """``n`` episodes of ``family``, the same for the same (family, seed, K, Q) whatever else was
        sampled before. ``k``/``q`` default to the sampler's (``q=None``: all remaining questions)."""
        k = self.k if k is None else k
        q = self.q if q == -1 else q
        rng = np.random.default_rng([seed, zlib.crc32(family.encode())])
        grouped = self._grouped(family)
        episodes = []
        for _ in range(n):
            support, query = split_support_query(grouped, k, q, rng, family=family)
            episodes.append(Episode(family, support, query))
        return episodes
