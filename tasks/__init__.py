"""Task families (one family = one domain) and task samplers.

>>> from tasks import get_family, list_families
>>> fam = get_family("basic_arithmetic")
>>> q = fam.questions("train", n=1, seed=0)[0]
>>> fam.score(q.gold, q)
True
"""

from tasks.base import Question, TaskFamily, get_family, list_families, register_family

__all__ = ["Question", "TaskFamily", "get_family", "list_families", "register_family"]
