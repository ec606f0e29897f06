"""The switch of the fast evaluation path (issue 26): on by default; off, every stage takes its reference
code (per-trace loops, nothing kept between calls), which gives the same results (tests/test_evalspeed.py).

It lives in ``data/`` (the earliest stage that has a fast path: per-trace rows kept by ``collate_traces``,
a family laid out once by ``data/family.py``) so that every later stage can read it:
``decide/outcomes.py`` (vectorised candidates and baselines), ``decide/policies/learned.py`` (a list scored
at once) and ``evaluate/batched.py`` (episode-batched adaptation). ``maml-stop evaluate`` sets it from
``batched:``.

>>> with fast_path(False):
...     enabled()
False
>>> enabled()
True
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

__all__ = ["enabled", "fast_path"]

_ENABLED = [True]  # a list: set in place by fast_path


def enabled() -> bool:
    """Whether the fast path is on (the default)."""
    return _ENABLED[0]


@contextmanager
def fast_path(on: bool) -> Iterator[None]:
    """Within the block, the fast path is on (``True``) or every stage takes its reference code."""
    before = _ENABLED[0]
    _ENABLED[0] = bool(on)
    try:
        yield
    finally:
        _ENABLED[0] = before
