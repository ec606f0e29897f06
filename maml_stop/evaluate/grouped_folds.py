"""Grouped leave-families-out folds of the meta-learning study (issue 11 item 2).

With many families, DESIGN.md's protocol holds every family out once in a few folds. Families that are
variants of one reasoning-gym generator (``chain_sum`` and ``chain_sum_long``: see
:func:`tasks.reasoning_gym_families.generator_of`) form one **group**, and a group is never split: a
fold holds out whole groups, its validation families are whole groups taken from the others, and
every remaining family meta-trains. A family that is not a reasoning-gym family is a group of its own.

* :func:`grouped_folds` assigns the groups to ``n_folds`` folds, deterministically given ``seed``: the
  groups are shuffled by ``numpy.random.default_rng(seed)``, then, largest first (ties in shuffled
  order), each goes to the fold that holds the fewest families so far (ties: the lowest fold index).
* Validation (per fold): the groups outside the fold, in shuffled order rotated by the fold's index
  (so validation moves from fold to fold), taken whole while they fit in ``n_val`` families; when no
  group is that small, the first of the smallest groups.
* Meta-training order (per fold): the remaining groups in shuffled order, their families interleaved
  round-robin (first family of every group, then the second of those that have one, ...; a group's
  families by name). The first ``n`` families are the ``n``-family subset, so the subsets of one fold
  are nested and span as many generators as ``n`` allows.

>>> folds = grouped_folds(["a", "b", "c", "d", "e", "f"], n_folds=3, n_val=1, seed=0)
>>> sorted(f for fold in folds for f in fold.test)
['a', 'b', 'c', 'd', 'e', 'f']
>>> fold = folds[0]; fold.train_subset(2) == fold.train[:2] and not set(fold.test) & set(fold.train + fold.val)
True
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from maml_stop.data.episodes import FamilySplit
from tasks.base import TaskError
from tasks.reasoning_gym_families import generator_of

__all__ = ["GroupedFold", "group_of", "family_groups", "grouped_folds", "resolve_counts", "ALL"]

log = logging.getLogger(__name__)

ALL = "all"  # the count meaning every remaining family of a fold


def group_of(family: str) -> str:
    """The group of a family: its reasoning-gym generator, or the family itself for any other family."""
    try:
        return generator_of(family)
    except TaskError:
        return family


def family_groups(families: Sequence[str]) -> dict[str, list[str]]:
    """Group name -> its families (sorted), for the given families only, groups sorted by name."""
    groups: dict[str, list[str]] = {}
    for family in sorted(set(families)):
        groups.setdefault(group_of(family), []).append(family)
    return dict(sorted(groups.items()))


@dataclass(frozen=True)
class GroupedFold:
    """One fold: held-out families, validation families, and the meta-training families in nested order."""

    index: int
    test: list[str]  # held out: tested here, never meta-trained or validated on in this fold
    val: list[str]  # validation (early stopping, the best checkpoint): whole groups, apart from both
    train: list[str]  # every other family, in the nested order (train[:n] is the n-family subset)

    def train_subset(self, count: int | str = ALL) -> list[str]:
        """The first ``count`` meta-training families (``"all"``: every one)."""
        if count == ALL:
            return list(self.train)
        if not isinstance(count, int) or not 1 <= count <= len(self.train):
            raise ValueError(f"count must be 'all' or an int in [1, {len(self.train)}] for fold {self.index}; got {count!r}")
        return list(self.train[:count])

    def split(self, count: int | str = ALL) -> FamilySplit:
        """The :class:`FamilySplit` of ``maml-stop fit`` at ``count`` meta-training families (checked disjoint)."""
        train = self.train_subset(count)
        return FamilySplit.resolve(sorted(self.test + self.val + self.train), train=train, val=self.val, test=self.test)


def grouped_folds(families: Sequence[str], n_folds: int = 5, n_val: int = 1, seed: int = 0) -> list[GroupedFold]:
    """``n_folds`` folds over ``families`` (rules in the module docstring); every family is held out in
    exactly one fold. Raises a ``ValueError`` when the groups are too few for the folds, or a fold would
    be left without validation or meta-training families."""
    groups = family_groups(families)
    names = list(groups)
    if n_folds < 2:
        raise ValueError(f"n_folds must be >= 2; got {n_folds}")
    if n_val < 1:
        raise ValueError(f"n_val must be >= 1; got {n_val}")
    if len(names) < max(n_folds, 3):
        raise ValueError(f"{n_folds} folds need at least {max(n_folds, 3)} groups of families (held out, validation "
                         f"and meta-training apart in every fold); got {len(names)}: {groups}")
    rng = np.random.default_rng(seed)
    shuffled = [names[i] for i in rng.permutation(len(names))]
    rank = {g: i for i, g in enumerate(shuffled)}
    members: list[list[str]] = [[] for _ in range(n_folds)]  # groups per fold
    sizes = [0] * n_folds
    for g in sorted(shuffled, key=lambda g: (-len(groups[g]), rank[g])):
        i = min(range(n_folds), key=lambda j: (sizes[j], j))
        members[i].append(g)
        sizes[i] += len(groups[g])
    folds = []
    for i, held in enumerate(members):
        others = [g for g in shuffled if g not in held]
        start = i % len(others)
        candidates = others[start:] + others[:start]
        val_groups: list[str] = []
        n = 0
        for g in candidates:
            if n + len(groups[g]) <= n_val:
                val_groups.append(g)
                n += len(groups[g])
            if n == n_val:
                break
        if not val_groups:  # every group is larger than n_val: the first of the smallest
            val_groups = [min(candidates, key=lambda g: (len(groups[g]), candidates.index(g)))]
        train_groups = [g for g in candidates if g not in val_groups]
        if not train_groups:
            raise ValueError(f"fold {i} holds out {held} and validates on {val_groups}: no group is left to meta-train")
        columns = [groups[g] for g in train_groups]
        train = [col[j] for j in range(max(len(c) for c in columns)) for col in columns if j < len(col)]
        test = sorted(f for g in held for f in groups[g])
        val = sorted(f for g in val_groups for f in groups[g])
        folds.append(GroupedFold(i, test, val, train))
    return folds


def resolve_counts(counts: Sequence[int | str], available: int) -> list[int | str]:
    """The meta-training family counts that exist for a fold with ``available`` remaining families, in
    increasing order: ints above ``available`` are dropped (with a warning), an int equal to it becomes
    ``"all"``, duplicates go. Raises when a count is neither a positive int nor ``"all"``."""
    kept: list[int | str] = []
    for c in counts:
        if c != ALL and (not isinstance(c, int) or isinstance(c, bool) or c < 1):
            raise ValueError(f"a meta-training family count is a positive int or 'all'; got {c!r}")
        if c != ALL and c > available:
            log.warning("count %d dropped: only %d meta-training families remain", c, available)
            continue
        c = ALL if c == available else c
        if c not in kept:
            kept.append(c)
    return sorted(kept, key=lambda c: available if c == ALL else c)
