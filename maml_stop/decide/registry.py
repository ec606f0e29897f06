"""The one registry of stopping rules: every :class:`~maml_stop.decide.selector.StopSelector` by name.

``maml-stop evaluate`` (``threshold_methods``), ``maml-stop adapt`` (``--threshold_method``), the training
callback and the online stopper all build their selectors here, and an adapted artifact's recorded rule
is rebuilt here (:func:`selector_from_state`). A new rule is one line in :data:`SELECTORS`.

>>> make_selector("ltt", delta=0.05, alpha=0.2).state_dict()
{'name': 'ltt', 'delta': 0.05, 'alpha': 0.2}
>>> selector_from_state({'name': 'em_target_backoff', 'delta': 0.01, 'backoff': 2}).backoff
2
"""

from __future__ import annotations

from typing import Any, Mapping

from maml_stop.decide.meta.rules import META_SELECTORS
from maml_stop.decide.selector import StopSelector
from maml_stop.decide.thresholds import BackoffEMTarget, CostThreshold, EMTargetThreshold, FixedThreshold, LTTThreshold

__all__ = ["SELECTORS", "make_selector", "selector_from_state", "check_selector"]

SELECTORS: dict[str, type[StopSelector]] = {
    "fixed": FixedThreshold,
    "em_target": EMTargetThreshold,
    "ltt": LTTThreshold,
    "cost": CostThreshold,
    "em_target_backoff": BackoffEMTarget,  # back-off 0 until fitted on source families (maml_stop.evaluate.backoff)
    **META_SELECTORS,  # meta-learned (issue 25): em_target_margin, meta_eb, meta_map; fitted across families
}


def check_selector(method: str) -> type[StopSelector]:
    """The selector class registered as ``method``; an error naming the valid ones otherwise."""
    if method not in SELECTORS:
        raise ValueError(f"unknown threshold method {method!r}; valid methods: {', '.join(SELECTORS)}")
    return SELECTORS[method]


def make_selector(method: str, **settings: Any) -> StopSelector:
    """The selector ``method`` built from the ``settings`` it takes (its ``params``: ``fixed`` ``value``,
    ``em_target`` ``delta``, ``ltt`` ``delta`` and ``alpha``, ``cost`` ``token_price`` and
    ``wrong_answer_cost``, ``em_target_backoff`` ``delta``); settings of other rules are passed over, so
    that one set of settings serves every rule, and a setting no rule takes is an error."""
    cls = check_selector(method)
    known = {p for c in SELECTORS.values() for p in c.params}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(f"unknown selector settings {unknown}; the registered rules take {sorted(known)}")
    return cls(**{k: v for k, v in settings.items() if k in cls.params})


def selector_from_state(state: Mapping[str, Any]) -> StopSelector:
    """The selector a :meth:`StopSelector.state_dict` describes (its name, settings and fitted state)."""
    if "name" not in state:
        raise ValueError(f"a selector state names its rule ('name'); got keys {sorted(state)}")
    return check_selector(str(state["name"])).from_state(state)
