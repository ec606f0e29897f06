"""Online stopping on a stream of requests (issue 12): the adapted predictor keeps learning after deployment.

* :mod:`.labels`: per-probe feedback labels of a request that ran to its end: ``gold`` (probe EM) or
  ``agreement`` (label-free: the probe's answer agrees with the final answer);
* :mod:`.monitor`: :class:`DropMonitor`, a rolling EM-drop estimate with a one-sided Clopper-Pearson
  bound that falls back to full generation while the bound is above ``delta``;
* :mod:`.stopper`: :class:`OnlineStopper` (:class:`OnlineConfig`): serves each request, takes feedback on
  a sampled fraction, re-adapts on a sliding window (``InnerLoopAdapter.fit_support``) and moves
  tau by its ``rule`` (stochastic approximation, or a selector of :mod:`maml_stop.decide.thresholds` on the window);
* :mod:`.abtest`: :func:`run_ab`, an online A/B test of two serving policies with an always-valid
  confidence sequence on the per-pair difference in reward ``-(token_price * tokens + wrong_answer_cost * (1 - EM))``.

``experiments/drift_simulation.py`` runs them on a stream whose family switches.
"""

from maml_stop.online.abtest import ABConfig, ABResult, SequentialAB, reward, run_ab
from maml_stop.online.labels import FEEDBACK, agreement_labels, feedback_trace, probe_labels
from maml_stop.online.monitor import BOUNDS, DropMonitor, MonitorConfig, clopper_pearson
from maml_stop.online.stopper import RULES, OnlineConfig, OnlineStopper, Served, refuse_moved_keys

__all__ = ["FEEDBACK", "agreement_labels", "feedback_trace", "probe_labels", "BOUNDS", "DropMonitor",
           "MonitorConfig", "clopper_pearson", "RULES", "OnlineConfig", "OnlineStopper", "Served", "refuse_moved_keys",
           "ABConfig", "ABResult", "SequentialAB", "reward", "run_ab"]
