"""Task families (one family = one domain). Episodes over stored traces are drawn by
:mod:`maml_stop.data.episodes`.

>>> from tasks import get_family, list_families
>>> fam = get_family("basic_arithmetic")
>>> q = fam.questions("train", n=1, seed=0)[0]
>>> fam.score(q.gold, q)
True
"""

from tasks.base import Question, TaskFamily, get_family, list_families, register_family

# the implementations register their families on import (base.py imports none of them: no import circle)
from tasks import dataset_family, reasoning_gym_families  # noqa: E402,F401  isort: skip

__all__ = ["Question", "TaskFamily", "get_family", "list_families", "register_family"]
