"""The meta-select study's episode-adapted methods: MAML through the decision (issue 25 item 3) and its
zero-step twin, under the study's protocol.

Per fold and K (``decision_k``): the decision's probe starts from the fold's pooled probe (the study's
``probe`` recipe, trained on the training families: the held-out family never seen), its zero-step twin
is copied, the decision is meta-trained on the training families' traces
(:meth:`~maml_stop.learn.decision_maml.DecisionMAML.meta_train`), and both are applied to the held-out
family's fixed episodes (the protocol's, :func:`~.simulate.episode_support`, the same ones every selector
of the study sees); the query figures are the hard rule's.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Mapping, Sequence

from maml_stop.decide.meta.relaxed import FamilyTensors
from maml_stop.evaluate.meta_select.simulate import ProbeRecipe, episode_support
from maml_stop.learn.decision_maml import DecisionMAML, DecisionMAMLConfig
from maml_stop.learn.predictor import fresh_copy

log = logging.getLogger(__name__)

__all__ = ["DECISION_METHODS", "decision_fold"]

DECISION_METHODS: dict[str, str] = {"maml_decision": "maml_decision_zero", "maml_decision_margin": "maml_decision_zero",
                                     "maml_decision_zero": "maml_decision_zero"}
# name -> its twin without meta-training (for the summary's paired comparison); maml_decision_margin is the
# ablation that meta-learns the margin alone (learn_init: false), the probe's initialisation staying the pooled probe


def decision_fold(
    by_family: Mapping[str, Sequence],
    tables: Mapping[str, FamilyTensors],
    heldout: Sequence[str],
    train: Sequence[str],
    recipe: ProbeRecipe,
    config: DecisionMAMLConfig,
    ks: Sequence[int],
    taus: Sequence[float],
    delta: float,
    episodes: int,
    seed: int,
    methods: Sequence[str],
) -> tuple[dict, dict]:
    """(family -> K -> method -> per-episode figures, K -> method -> fitted state) of one fold."""
    unknown = [m for m in methods if m not in DECISION_METHODS]
    if unknown:
        raise ValueError(f"unknown decision methods {unknown}; valid: {', '.join(DECISION_METHODS)}")
    n_features = int(next(iter(by_family[train[0]])).features.shape[1])
    pooled = recipe.train([t for f in train for t in by_family[f]], n_features)
    results: dict = {h: {} for h in heldout}
    fitted: dict = {}
    for k in ks:
        started = time.time()
        model = DecisionMAML(fresh_copy(pooled), config, taus, delta)
        models = {"maml_decision_zero": model.zero_step()}
        if "maml_decision_margin" in methods:
            models["maml_decision_margin"] = DecisionMAML(fresh_copy(pooled), replace(config, learn_init=False), taus, delta)
        if "maml_decision" in methods:
            models["maml_decision"] = model
        fitted[str(k)] = {}
        for name, m in models.items():
            begun = time.time()
            history = m.meta_train({f: tables[f] for f in train}, k) if name != "maml_decision_zero" else []
            fitted[str(k)][name] = {**m.state(), "history": history, "seconds": round(time.time() - begun, 1)}
        for h in heldout:
            supports = episode_support(by_family[h], h, k, episodes, seed)
            for name, m in models.items():
                if name in methods:
                    results[h].setdefault(str(k), {})[name] = m.evaluate(tables[h], supports)
        log.info("decision MAML, held out %s, K = %d: %.0f s", list(heldout), k, time.time() - started)
    return results, fitted
