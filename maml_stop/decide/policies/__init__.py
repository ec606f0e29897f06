"""Stopping policies (the baselines and the learned probes) behind one interface.

* :mod:`.base`: :class:`StoppingPolicy`, :class:`ThresholdedPolicy`, :class:`StopOutcome`,
  :func:`evaluate_policy`, :func:`sweep_policy` (the accounting: :mod:`maml_stop.data.accounting`);
* :mod:`.baselines`: full generation, first probe, token budget, consistency, confidence, the oracles;
* :mod:`.learned`: :class:`ProbePolicy`, a stopping predictor thresholded at tau (adaptation through
  :meth:`maml_stop.learn.adapter.InnerLoopAdapter.fit_support`);
* :mod:`.cost_aware`: policies that run fewer forced answers and say which (free probe, gated probe,
  sparse schedule, give up early), over :class:`FeatureView` column selections of the traces;
* :mod:`.views`: :class:`FeatureView` (the columns and labels a learned part reads), :func:`subtrace`;
* :mod:`.hybrid`: a policy under a token cap or floor, and either/both combinations of two policies;
* :mod:`.ensemble`: :class:`Ensemble`, the weighted average or vote of several policies' per-probe scores.

>>> from maml_stop.decide import policies as P
>>> from maml_stop.decide.thresholds import FixedThreshold
>>> policy = P.AnswerConsistency(selector=FixedThreshold(2))        # stop once 2 probe answers agree
>>> policy.fit(support).stop_index(trace)                           # doctest: +SKIP
"""

from maml_stop.decide.policies.base import (
    FirstHitPolicy,
    Outcomes,
    StopOutcome,
    StoppingPolicy,
    ThresholdedPolicy,
    _probe_outcome,
    evaluate_policy,
    full_generation_outcome,
    probe_outcome,
    sweep_policy,
)
from maml_stop.decide.policies.baselines import (
    AnswerConfidence,
    AnswerConsistency,
    EqualEMOracle,
    FirstProbe,
    FullGeneration,
    OraclePolicy,
    TokenBudget,
    oracle_at_equal_em,
)
from maml_stop.decide.policies.learned import ProbePolicy
from maml_stop.decide.policies.cost_aware import (
    FeatureView,
    GatedProbe,
    GiveUp,
    SparseSchedule,
    ViewProbe,
    feature_columns,
    free_features,
    subtrace,
)
from maml_stop.decide.policies.ensemble import Ensemble
from maml_stop.decide.policies.hybrid import Both, Capped, Either, Floored, TokenCap, TokenFloor
from maml_stop.decide.rule import DEFAULT_TAUS

__all__ = [
    "StopOutcome",
    "Outcomes",
    "StoppingPolicy",
    "FullGeneration",
    "FirstProbe",
    "OraclePolicy",
    "oracle_at_equal_em",
    "EqualEMOracle",
    "ThresholdedPolicy",
    "FirstHitPolicy",
    "TokenBudget",
    "AnswerConsistency",
    "AnswerConfidence",
    "ProbePolicy",
    "full_generation_outcome",
    "probe_outcome",
    "evaluate_policy",
    "sweep_policy",
    "DEFAULT_TAUS",
    "FeatureView",
    "ViewProbe",
    "GatedProbe",
    "SparseSchedule",
    "GiveUp",
    "feature_columns",
    "free_features",
    "subtrace",
    "TokenCap",
    "TokenFloor",
    "Either",
    "Both",
    "Capped",
    "Floored",
    "Ensemble",
]
