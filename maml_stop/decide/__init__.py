"""The decision a deployment runs: the one stopping rule, the stopping policies and the selectors.

* :mod:`.rule`: stop at the first probe whose score reaches tau (scalar and array forms; the default grid);
* :mod:`.scores`: a stopping predictor's probabilities on stored traces (in sample, cross-fitted);
* :mod:`.selector`: :class:`~.selector.StopSelector` (support sweep -> tau or full generation), the sweep;
* :mod:`.thresholds`: today's rules (fixed, em_target, ltt, cost, em_target_backoff);
* :mod:`.registry`: every rule by name (:func:`~.registry.make_selector`, :func:`~.registry.selector_from_state`);
* :mod:`.policies`: the stopping policies (baselines, learned probes, cost-aware, hybrids, ensembles).

It sits below the learner (:mod:`maml_stop.learn` provides the predictors and adapters it is given) and
below the research harness (:mod:`maml_stop.evaluate`) and the runtime (:mod:`maml_stop.live`,
:mod:`maml_stop.online`), which import it.
"""
