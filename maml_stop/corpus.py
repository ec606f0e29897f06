"""A stored trace corpus in memory, in the form the learning and evaluation code uses.

>>> corpus = TraceCorpus.load("experiments/corpus/qwen05")          # doctest: +SKIP
>>> t = corpus.traces("basic_arithmetic")[0]
>>> t.features.shape, t.labels.shape                                # (n_probes, F), (n_probes,)

A :class:`Trace` holds, per probe point ``i``: the feature vector, the label (the probe's forced answer
is correct: stopping there keeps the answer correct), and the token accounting of ``DESIGN.md``:

* ``positions[i]``: reasoning tokens generated before probe ``i``;
* ``probe_tokens[i]``: what probe ``i`` costs (answer trigger + forced answer tokens);
* stopping at probe ``i`` costs ``positions[i] + sum(probe_tokens[:i + 1])`` tokens in total, of which
  ``positions[i]`` are reasoning tokens; the forced answer is the output;
* running to the end costs ``reasoning_tokens`` (the model's own answer is part of what it generated)
  plus the probes a policy ran on the way (all of them, for a policy that never stops early).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from maml_stop.harvest import store


@dataclass
class Trace:
    trace_id: str
    family: str
    split: str
    features: np.ndarray  # (P, F) float32
    labels: np.ndarray  # (P,) float32 in {0, 1}: probe answer correct
    positions: np.ndarray  # (P,) int64 reasoning tokens before each probe
    probe_tokens: np.ndarray  # (P,) int64 cost of each probe
    probe_answers: list[str]
    logprob_mean: np.ndarray  # (P,) float32 mean log-prob of the forced answer tokens
    final_em: bool
    reasoning_tokens: int
    hit_cap: bool

    @property
    def n_probes(self) -> int:
        return int(self.labels.shape[0])

    def stop_cost(self, index: int | None) -> tuple[int, int]:
        """(total tokens, reasoning tokens) when stopping at probe ``index``; None = run to the end
        having run every probe (what a probing policy that never fires pays)."""
        if index is None:
            return int(self.reasoning_tokens + self.probe_tokens.sum()), int(self.reasoning_tokens)
        return int(self.positions[index] + self.probe_tokens[: index + 1].sum()), int(self.positions[index])

    def stop_em(self, index: int | None) -> bool:
        return self.final_em if index is None else bool(self.labels[index] > 0.5)

    @property
    def full_cost(self) -> int:
        """Cost of plain full generation (no probes): every generated token."""
        return int(self.reasoning_tokens)


class TraceCorpus:
    """Traces of a stored corpus grouped by family, with the corpus metadata."""

    def __init__(self, traces: Sequence[Trace], meta: dict, root: str | None = None) -> None:
        self.meta = meta
        self.root = root
        self.feature_names: list[str] = list(meta["feature_names"])
        self._by_family: dict[str, list[Trace]] = {}
        for t in traces:
            self._by_family.setdefault(t.family, []).append(t)
        for fam in self._by_family.values():
            fam.sort(key=lambda t: t.trace_id)  # order independent of shard layout

    @classmethod
    def load(cls, root: str | Path, families: Iterable[str] | None = None, min_probes: int = 1) -> "TraceCorpus":
        meta = store.read_meta(root)
        table = store.read_table(root, families)
        width = len(meta["feature_names"])
        cols = {c: table.column(c).to_pylist() for c in table.column_names if c not in ("features",)}
        feats = table.column("features").to_pylist()
        traces = []
        for i in range(table.num_rows):
            f = np.asarray(feats[i], dtype=np.float32).reshape(-1, width) if feats[i] else np.zeros((0, width), np.float32)
            if f.shape[0] < min_probes:
                continue
            if not np.isfinite(f).all():
                raise store.CorpusError(f"trace {cols['trace_id'][i]} has non-finite features")
            traces.append(
                Trace(
                    trace_id=cols["trace_id"][i],
                    family=cols["family"][i],
                    split=cols["split"][i],
                    features=f,
                    labels=np.asarray(cols["probe_em"][i], dtype=np.float32),
                    positions=np.asarray(cols["probe_positions"][i], dtype=np.int64),
                    probe_tokens=np.asarray(cols["probe_tokens"][i], dtype=np.int64),
                    probe_answers=list(cols["probe_answers"][i]),
                    logprob_mean=np.asarray(cols["probe_logprob_mean"][i], dtype=np.float32),
                    final_em=bool(cols["final_em"][i]),
                    reasoning_tokens=int(cols["reasoning_tokens"][i]),
                    hit_cap=bool(cols["hit_cap"][i]),
                )
            )
        return cls(traces, meta, str(root))

    @property
    def families(self) -> list[str]:
        return sorted(self._by_family)

    def traces(self, family: str) -> list[Trace]:
        if family not in self._by_family:
            raise store.CorpusError(f"no traces of family {family!r}; families in the corpus: {self.families}")
        return self._by_family[family]

    def __len__(self) -> int:
        return sum(len(v) for v in self._by_family.values())
