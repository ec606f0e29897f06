"""Two models' traces of the same questions, paired by question id, and what each model's token costs
(issue 28: the 0.5B -> 1.5B cascade).

A :class:`PairedTrace` holds the small model's and the large model's trace of one question
(:func:`~maml_stop.data.store.question_id_of`, the one parser of trace ids). :func:`load_pairs` reads
two stored corpora and keeps the questions both hold; a family missing from either corpus is an error
that names the corpus and the families it has.

:class:`CostModel` weighs tokens by each model's measured cost per token, in units of the small model's
token: ``cost = small_tokens + ratio * large_tokens`` (``ratio``: the large model's cost per token over
the small one's, measured by ``experiments/benchmark_cascade.py`` on wall time, CPU time, or counted as
FLOPs from the configs; a ``cascade_cost.json`` file, named by the evaluation's ``cascade.cost`` or found beside
the paired corpus).

>>> CostModel(ratio=2.5).cost(100, 40)
200.0
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from maml_stop.data import store
from maml_stop.data.corpus import Trace, TraceCorpus

__all__ = ["PairedTrace", "load_pairs", "paired_traces", "CostModel", "COST_FILE", "COST_BASES"]

COST_FILE = "cascade_cost.json"  # the benchmark's figures (default place: beside the large model's paired corpus)
COST_BASES = ("wall", "cpu", "flops")


@dataclass(frozen=True)
class PairedTrace:
    """The small and the large model's trace of one question."""

    small: Trace
    large: Trace

    @property
    def trace_id(self) -> str:
        """The small trace's id: episodes group pairs by its question (``split_support_query``)."""
        return self.small.trace_id

    @property
    def question_id(self) -> str:
        return store.question_id_of(self.small.trace_id)

    @property
    def family(self) -> str:
        return self.small.family


def _families(root: str | Path) -> list[str]:
    return sorted({p.parent.name for p in store.shard_paths(root)})


def load_pairs(small_root: str | Path, large_root: str | Path, families: Iterable[str] | None = None,
               min_probes: int = 1) -> dict[str, list[PairedTrace]]:
    """family -> the pairs of every question both corpora hold (sorted by question id). ``families``:
    default, every family of the large corpus. A family either corpus lacks is a :class:`CorpusError`
    naming it, the corpus and the families there; a family with no shared question is one too."""
    have = {"small": _families(small_root), "large": _families(large_root)}
    wanted = list(families) if families is not None else have["large"]
    for which, root in (("small", small_root), ("large", large_root)):
        missing = [f for f in wanted if f not in have[which]]
        if missing:
            raise store.CorpusError(f"families {missing} are missing from the {which} model's corpus {root} "
                                    f"(families there: {have[which]})")
    small = TraceCorpus.load(small_root, wanted, min_probes)
    large = TraceCorpus.load(large_root, wanted, min_probes)
    out: dict[str, list[PairedTrace]] = {}
    for family in wanted:
        by_q = {store.question_id_of(t.trace_id): t for t in large.traces(family)}
        pairs = [PairedTrace(t, by_q[q]) for t in small.traces(family)
                 if (q := store.question_id_of(t.trace_id)) in by_q]
        if not pairs:
            raise store.CorpusError(f"family {family!r}: no question id is in both {small_root} and {large_root}")
        out[family] = sorted(pairs, key=lambda p: p.question_id)
    return out


@dataclass(frozen=True)
class CostModel:
    """Cost of a cascade in small-model tokens: ``small_tokens + ratio * large_tokens``."""

    ratio: float  # the large model's cost per token / the small model's
    basis: str = "wall"  # what the ratio measures: one of COST_BASES

    def __post_init__(self) -> None:
        if not self.ratio > 0:
            raise ValueError(f"the cost ratio must be > 0; got {self.ratio}")
        if self.basis not in COST_BASES:
            raise ValueError(f"unknown cost basis {self.basis!r}; valid: {', '.join(COST_BASES)}")

    def cost(self, small_tokens: float, large_tokens: float) -> float:
        return float(small_tokens) + self.ratio * float(large_tokens)

    @classmethod
    def load(cls, path: str | Path, basis: str = "wall") -> "CostModel":
        """The ratio on ``basis`` from a benchmark file (``cascade_cost.json``, or the folder holding it)."""
        path = Path(path)
        path = path / COST_FILE if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"no cost file at {path}: run python experiments/benchmark_cascade.py")
        ratios = json.loads(path.read_text()).get("ratios", {})
        if basis not in ratios:
            raise ValueError(f"{path} has no {basis!r} ratio; ratios there: {sorted(ratios)}")
        return cls(float(ratios[basis]), basis)


def paired_traces(pairs: Sequence[PairedTrace], which: str) -> list[Trace]:
    """The ``"small"`` or ``"large"`` traces of ``pairs``, in order."""
    if which not in ("small", "large"):
        raise ValueError(f"which must be 'small' or 'large'; got {which!r}")
    return [getattr(p, which) for p in pairs]
