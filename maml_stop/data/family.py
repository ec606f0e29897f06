"""The traces of the family under evaluation, laid out once for every episode (issue 26, the fast path).

Every episode of an evaluation draws its support and query sets from one family's traces, and every
method collates, scores and accounts for those same traces again. ``with family_table(traces):`` (or
:func:`laid_out` on a function of ``traces``: the protocol's ``evaluate_family``; nothing happens with the
fast path off) registers them in a
:class:`FamilyTable`. Within the block :func:`rows_of` maps a list of those trace objects to their rows
in the family, and each stage keeps its family-wide layout in the table (:meth:`FamilyTable.layout`):
the collated probe rows (:class:`~maml_stop.data.batches.TraceTensors`, gathered by
:func:`~maml_stop.data.batches.collate_traces`) and the padded accounting
(:class:`~maml_stop.decide.outcomes.TraceArrays`), built once per family and gathered by row for each
list instead of rebuilt per list. Gathering gives the same arrays as building (tests/test_family.py). The
last family registered is kept after its block, so that a later block over the same trace objects (the
next evaluation of that family) reuses its layouts.

>>> from types import SimpleNamespace as T
>>> a, b, c = T(n=1), T(n=2), T(n=3)
>>> with family_table([a, b, c]):
...     table, rows = rows_of([c, a])
...     rows.tolist(), rows_of([T(n=4)])
([2, 0], None)
>>> rows_of([a]) is None  # outside the block
True
"""

from __future__ import annotations

import functools
import inspect
from contextlib import contextmanager
from operator import is_
from typing import Any, Callable, Iterator, Sequence, TypeVar

import numpy as np

from maml_stop.data import fastpath

__all__ = ["FamilyTable", "RecentLists", "family_table", "laid_out", "rows_of", "same_traces"]

def same_traces(a: Sequence, b: Sequence) -> bool:
    """Whether ``a`` and ``b`` hold the same objects in the same order (identity, not equality)."""
    return len(a) == len(b) and all(map(is_, a, b))


class RecentLists:
    """A value for each of the last ``keep`` lists of traces asked for, found by the trace objects
    themselves (held, so that they stay the same objects): a cheap cache for lists used again."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self._items: list[tuple[tuple, Any]] = []  # (the traces, the value), oldest first

    def get(self, traces: Sequence, default: Any = None) -> Any:
        for held, value in reversed(self._items):
            if same_traces(held, traces):
                return value
        return default

    def put(self, traces: Sequence, value: Any) -> Any:
        self._items.append((tuple(traces), value))
        del self._items[:-self.keep]
        return value


_TABLES: list["FamilyTable"] = []  # the registered families, innermost last
_LAST: list["FamilyTable | None"] = [None]  # the last family registered (evaluations repeat it: methods, K)
_KEEP = 8  # lists whose rows are remembered per table (an episode's support, query and cross-fit halves)
_MISSING = object()


class FamilyTable:
    """A fixed list of traces (the objects themselves: a copy with the same id is another trace) and the
    family-wide layouts that the stages built of it."""

    def __init__(self, traces: Sequence) -> None:
        self.traces = tuple(traces)  # held: the ids below stay valid while the table lives
        self.signature = self.signature_of(self.traces)
        self._row = {id(t): i for i, t in enumerate(self.traces)}
        self._layouts: dict[Any, Any] = {}
        self._recent = RecentLists(_KEEP)  # rows of the last few lists asked for

    def __len__(self) -> int:
        return len(self.traces)

    @staticmethod
    def signature_of(traces: Sequence) -> tuple:
        """The trace objects and their features arrays (a trace given new features is laid out again)."""
        return tuple(map(id, traces)), tuple(id(getattr(t, "features", None)) for t in traces)

    def rows(self, traces: Sequence) -> np.ndarray | None:
        """(N,) int64 rows of ``traces`` in the family; None when one of them is not a trace of it."""
        rows = self._recent.get(traces, _MISSING)
        if rows is _MISSING:
            found = list(map(self._row.get, map(id, traces)))
            rows = self._recent.put(traces, None if None in found else np.asarray(found, dtype=np.int64))
        return rows

    def layout(self, key: Any, build: Callable[[Sequence], Any]) -> Any:
        """The family-wide layout ``key``, ``build(self.traces)`` the first time it is asked for; None
        (and the caller builds per list) when ``build`` raises ``ValueError`` (e.g. duplicate trace ids)."""
        if key not in self._layouts:
            try:
                self._layouts[key] = build(self.traces)
            except ValueError:
                self._layouts[key] = None
        return self._layouts[key]


@contextmanager
def family_table(traces: Sequence) -> Iterator[FamilyTable | None]:
    """Within the block, lists of ``traces`` are gathered from their family's layouts (fast path only:
    with it off the block registers nothing and yields None)."""
    if not fastpath.enabled() or not traces:
        yield None
        return
    table = _LAST[0]
    if table is None or table.signature != FamilyTable.signature_of(traces):
        table = _LAST[0] = FamilyTable(traces)  # the last family is kept: the next block over it reuses it
    _TABLES.append(table)
    try:
        yield table
    finally:
        _TABLES.remove(table)


F = TypeVar("F", bound=Callable[..., Any])


def laid_out(fn: F) -> F:
    """Decorator: each call of ``fn`` runs within ``family_table(traces)``, ``traces`` being its argument of
    that name (:func:`maml_stop.evaluate.protocol.evaluate_family`)."""
    signature = inspect.signature(fn)
    if "traces" not in signature.parameters:
        raise TypeError(f"{fn.__name__} has no argument named traces; its arguments: {list(signature.parameters)}")

    @functools.wraps(fn)
    def within(*args: Any, **kwargs: Any) -> Any:
        with family_table(signature.bind_partial(*args, **kwargs).arguments["traces"]):
            return fn(*args, **kwargs)

    return within  # type: ignore[return-value]


def rows_of(traces: Sequence) -> tuple[FamilyTable, np.ndarray] | None:
    """(the registered table holding every trace of ``traces``, their rows in it), innermost table first;
    None outside a :func:`family_table` block, with the fast path off, or when no table holds them all."""
    if not _TABLES or not traces or not fastpath.enabled():
        return None
    for table in reversed(_TABLES):
        rows = table.rows(traces)
        if rows is not None:
            return table, rows
    return None
