"""``fork_map``: a map over forked worker processes that share what the parent has loaded.

The protocol evaluates held-out families side by side (``workers``) and the grouped folds fit their
checkpoints side by side (``fit_workers``); both hand the job's shared objects (corpora, policies,
configs) to the workers by forking, so a pool sends nothing but each item.

>>> fork_map(lambda scale, x: scale * x, [1, 2, 3], 1, 10)
[10, 20, 30]
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, Sequence

import torch

__all__ = ["fork_map"]

_SHARED: tuple[Callable, tuple, list] | None = None  # (fn, shared, items) of the running fork_map (a forked worker inherits it)


def fork_map(fn: Callable, items: Sequence, workers: int, *shared: Any) -> list:
    """``[fn(*shared, x) for x in items]``, in ``workers`` forked processes (one thread each) when more
    than one; the results in the order of ``items``, whatever order they finished in. A worker receives
    only an item's index: ``fn``, ``shared`` and ``items`` reach it by the fork, never pickled."""
    items = list(items)
    if workers <= 1 or len(items) <= 1:
        return [fn(*shared, x) for x in items]
    global _SHARED
    _SHARED = (fn, shared, items)
    try:
        with ProcessPoolExecutor(min(workers, len(items)), mp_context=multiprocessing.get_context("fork")) as pool:
            return list(pool.map(_call, range(len(items))))
    finally:
        _SHARED = None


def _call(i: int) -> Any:
    """Item ``i`` in a forked worker: ``fn(*shared, items[i])`` of the :func:`fork_map` that forked it."""
    fn, shared, items = _SHARED
    torch.set_num_threads(1)
    return fn(*shared, items[i])
