"""A stored trace corpus in memory, in the form the learning and evaluation code uses.

>>> corpus = TraceCorpus.load("experiments/corpus/qwen05")          # doctest: +SKIP
>>> t = corpus.traces("basic_arithmetic")[0]
>>> t.features.shape, t.labels.shape                                # (n_probes, F), (n_probes,)

A :class:`Trace` holds, per probe point ``i``: the feature vector, the label (the probe's forced answer
is correct: stopping there keeps the answer correct), and the token accounting of ``DESIGN.md``
(the formulas live in :mod:`maml_stop.data.accounting`; ``Trace.stop_cost`` and ``Trace.full_cost`` call it):

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
import pyarrow as pa

from maml_stop.data import accounting, store
from maml_stop.probe.labels import cap_probe_index


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
    # the probe whose forced answer is this capped run's answer (corpus cap_answer "forced"), else None
    cap_probe: int | None = None

    @property
    def n_probes(self) -> int:
        return int(self.labels.shape[0])

    def stop_cost(self, index: int | None) -> tuple[int, int]:
        """(total tokens, reasoning tokens) when stopping at probe ``index``; None = run to the end
        having run every probe (what a probing policy that never fires pays). See
        :func:`maml_stop.data.accounting.stop_cost`, the one home of the formula."""
        return accounting.stop_cost(self, index)

    def stop_em(self, index: int | None) -> bool:
        return self.final_em if index is None else bool(self.labels[index] > 0.5)

    @property
    def full_cost(self) -> int:
        """Cost of plain full generation (no probes): :func:`maml_stop.data.accounting.full_cost`."""
        return accounting.full_cost(self)


# per-probe list columns of the stored schema: one entry per probe point, like the rows of ``features``
PER_PROBE_COLUMNS = tuple(
    f.name for f in store.TRACE_SCHEMA if pa.types.is_list(f.type) and f.name != "features"
)


def find_shard(root: str | Path, family: str, trace_id: str) -> Path | None:
    """The shard of ``root`` that stores ``trace_id`` (searched among ``family``'s shards; only called
    to name the file in an error, so loading stays one read per shard)."""
    import pyarrow.parquet as pq

    for path in store.shard_paths(root, family):
        if trace_id in pq.read_table(path, columns=["trace_id"]).column(0).to_pylist():
            return path
    return None


def _where(root: str | Path, cols: dict, i: int) -> str:
    """``"shard <path>, trace <id>"`` for row ``i`` of a corpus table (the shard found by its trace id)."""
    tid, family = cols["trace_id"][i], cols["family"][i]
    path = find_shard(root, family, tid)
    return f"shard {path if path is not None else Path(root, store.SHARD_DIR, family, '*.parquet')}, trace {tid}"


def _read_trace_file(path: Path) -> pa.Table:
    """One parquet file in the stored schema, checked as ``store.read_table`` checks each shard."""
    import pyarrow.parquet as pq

    if not path.is_file():
        raise store.CorpusError(f"no trace file at {path}")
    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for damaged files
        raise store.CorpusError(f"corrupt trace file {path}: {err}") from err
    names = table.schema.names
    n = len(store.TRACE_COLUMNS)
    if names[:n] != store.TRACE_COLUMNS or not set(names[n:]) <= set(store.OPTIONAL_COLUMNS):
        raise store.CorpusError(f"{path} has columns {names}, expected {store.TRACE_COLUMNS} "
                                f"(optionally followed by some of {store.OPTIONAL_COLUMNS})")
    return table.select(store.TRACE_COLUMNS).cast(store.TRACE_SCHEMA)  # optional columns are not read here


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
        return cls._from_table(table, meta, str(root), min_probes, lambda cols, i: _where(root, cols, i))

    @classmethod
    def load_file(cls, path: str | Path, meta: dict, min_probes: int = 1) -> "TraceCorpus":
        """The traces of one parquet file in the stored schema (a shard, or traces labelled elsewhere),
        described by ``meta`` (a corpus ``meta.json``'s content; ``feature_names`` is what is read)."""
        if "feature_names" not in meta:
            raise store.CorpusError(f"the metadata for {path} lacks 'feature_names'; keys present: {sorted(meta)}")
        table = _read_trace_file(Path(path))
        store.refuse_duplicates(path, {Path(path): table.column("trace_id").to_pylist()})
        return cls._from_table(table, meta, None, min_probes, lambda cols, i: f"file {path}, trace {cols['trace_id'][i]}")

    @classmethod
    def _from_table(cls, table: pa.Table, meta: dict, root: str | None, min_probes: int, where) -> "TraceCorpus":
        """Traces from rows in the stored schema; ``where(cols, i)`` names row ``i`` in errors."""
        width = len(meta["feature_names"])
        forced_cap = meta.get("generation", {}).get("cap_answer", "text") == "forced"
        cols = {c: table.column(c).to_pylist() for c in table.column_names if c not in ("features",)}
        feats = table.column("features").to_pylist()
        per_probe = [c for c in PER_PROBE_COLUMNS if c in cols]
        traces = []
        for i in range(table.num_rows):
            lengths = {c: len(cols[c][i] or ()) for c in per_probe}
            lengths["features"] = len(feats[i] or ())
            if len(set(lengths.values())) > 1:
                raise store.CorpusError(
                    f"{where(cols, i)}: per-probe columns of different lengths ("
                    + ", ".join(f"{c} {n}" for c, n in lengths.items())
                    + "); every per-probe list must have one entry per probe. Delete the shard and resume the harvest."
                )
            widths = sorted({len(v) for v in feats[i] or ()} - {width})
            if widths:
                raise store.CorpusError(
                    f"{where(cols, i)}: feature vectors of width {widths}; meta.json names {width} features"
                )
            f = np.asarray(feats[i], dtype=np.float32).reshape(-1, width) if feats[i] else np.zeros((0, width), np.float32)
            if f.shape[0] < min_probes:
                continue
            if not np.isfinite(f).all():
                bad = np.flatnonzero(~np.isfinite(f).all(axis=1))[:5].tolist()
                names = [meta["feature_names"][j] for j in np.flatnonzero(~np.isfinite(f).all(axis=0))[:5]]
                raise store.CorpusError(
                    f"{where(cols, i)}: non-finite (NaN/inf) features at probes {bad} (features {names})"
                )
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
                    cap_probe=(cap_probe_index(bool(cols["hit_cap"][i]), cols["probe_reasons"][i],
                                               cols["probe_positions"][i], int(cols["reasoning_tokens"][i]))
                               if forced_cap else None),
                )
            )
        return cls(traces, meta, root)

    @property
    def families(self) -> list[str]:
        return sorted(self._by_family)

    def traces(self, family: str) -> list[Trace]:
        if family not in self._by_family:
            raise store.CorpusError(f"no traces of family {family!r}; families in the corpus: {self.families}")
        return self._by_family[family]

    def __len__(self) -> int:
        return sum(len(v) for v in self._by_family.values())
