"""Episode-batched adaptation of the learned probes (issue 26 item 1).

Per episode, an adapted probe (``finetuned``, ``scratch``, ``maml``) runs ``fit_support`` on its K
support traces, and with cross-fitting twice more, on each half of them. :func:`prefit` runs every
adaptation of every episode of one family and K in one episode-batched inner loop
(:meth:`~maml_stop.learn.adapter.InnerLoopAdapter.adapt_episodes`: the parameters carry a leading axis of
one slice per adaptation, the loss is the sum of the per-adaptation losses, so each slice gets its own
gradient), scores each half's other half with its slice, and hands each episode its adapted model and
cross-fitted support scores (:meth:`~maml_stop.decide.policies.learned.ProbePolicy.preset`); the
policy's ``fit`` then chooses the threshold as before. A probe trained from scratch renormalises on each
support set first: each slice keeps its own normalisation.

The same computation as the per-episode loop up to the order of floating-point sums in the batched
matrix products: tests/test_evalspeed.py compares the results.json of both paths.

>>> from maml_stop.evaluate.batched import batchable                              # doctest: +SKIP
>>> presets = prefit(policy, [ep.support for ep in episodes]) if batchable(policy) else None
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch
from torch import nn

from maml_stop.data import fastpath
from maml_stop.data.batches import collate_traces
from maml_stop.data.corpus import Trace
from maml_stop.decide.policies import ProbePolicy
from maml_stop.decide.scores import crossfit_halves, trace_probabilities
from maml_stop.learn.func_backend import with_parameters
from maml_stop.learn.adapter import InnerLoopAdapter

log = logging.getLogger(__name__)

__all__ = ["batchable", "adapt_many", "prefit"]

_CHUNK = 32  # adaptations per batched inner loop, of similar lengths (little padding)
_SLACK = 1.5  # a new chunk where an adaptation is this much longer than the chunk's first (cross-fit halves
#               apart from whole support sets: padding every half to a whole set cost about a third more)


def batchable(policy: object, max_steps: int = 100) -> bool:
    """Whether ``policy`` is an adapted probe whose adaptations :func:`prefit` can batch: a plain
    :class:`ProbePolicy` with an :class:`~maml_stop.learn.adapter.InnerLoopAdapter` running MAML or
    Meta-SGD on a predictor without recurrence or dropout, in at most ``max_steps`` inner steps, with the
    fast path on (``experiments/evaluate.yaml``: ``batch_max_steps: 100``, so the probe from scratch too).
    The batched sums' last-bit differences grow with the steps (the bundled corpus, a probe from scratch:
    6e-8 in the weights after 20 steps at lr 0.5, 3e-4 after 100). Measured on the main job (3 held-out
    families, K 4-32, 50 episodes) and on gcd at K = 16: every decision figure of results.md is the same
    with scratch batched at 100 steps as per episode; Brier and ECE differ by at most 2e-8
    (tests/test_evalspeed.py and experiments/bench_evalspeed.py count the differences)."""

    if not fastpath.enabled() or type(policy) is not ProbePolicy or policy.adapter is None:
        return False
    adapter = policy.adapter
    steps = adapter.inner_steps if policy.adapt_steps is None else policy.adapt_steps
    return (isinstance(adapter, InnerLoopAdapter) and adapter.algorithm in ("maml", "metasgd") and steps <= max_steps
            and adapter.predictor.kind != "gru" and float(getattr(adapter.predictor, "dropout", 0.0)) == 0.0)


def adapt_many(adapter, supports: Sequence[Sequence[Trace]], steps: int | None = None,
               renormalise: bool = False) -> list[nn.Module]:
    """``[adapter.fit_support(s, steps, renormalise) for s in supports]`` under ``torch.no_grad()`` (detached
    clones), in episode-batched inner loops. With ``renormalise`` each model keeps the normalisation of its
    own support set, and the predictor is left at the last one's (as the loop leaves it)."""
    predictor = adapter.predictor
    names = [n for n, _ in predictor.named_parameters()]
    batches, inputs, stats = [], [], []
    for s in supports:  # in the given order: each renormalisation is the one the loop would make
        batch = collate_traces(s, weighting=adapter.weighting)
        if renormalise:
            adapter.renormalise(batch)
            stats.append((predictor.feature_mean.clone(), predictor.feature_std.clone()))
        batches.append(batch)
        inputs.append(predictor.inputs(batch))
    models: list[nn.Module | None] = [None] * len(supports)
    for chunk in _chunks([len(b) for b in batches]):
        with torch.no_grad():
            adapted = adapter.adapt_episodes([batches[i] for i in chunk], steps, inputs=[inputs[i] for i in chunk])
        fast = dict(adapted.named_parameters())
        for e, i in enumerate(chunk):
            model = with_parameters(predictor, {n: fast[n][e].detach() for n in names})
            if renormalise:  # its own statistics (with_parameters shares the buffers dict: a copy per model)
                model._buffers = dict(model._buffers, feature_mean=stats[i][0], feature_std=stats[i][1])
            models[i] = model
    return models  # type: ignore[return-value]


def _chunks(lengths: Sequence[int]) -> list[list[int]]:
    """Indices of ``lengths`` in chunks of at most ``_CHUNK``, by increasing length, a new chunk where the
    length passes ``_SLACK`` times the chunk's first (every slice is padded to its chunk's longest)."""
    chunks: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if not chunks or len(chunks[-1]) == _CHUNK or lengths[i] > _SLACK * lengths[chunks[-1][0]]:
            chunks.append([])
        chunks[-1].append(i)
    return chunks


def prefit(policy: ProbePolicy, supports: Sequence[Sequence[Trace]]) -> list[tuple[nn.Module, dict[str, np.ndarray]]]:
    """Per support set: (the model adapted on all of it, its cross-fitted support scores by trace id; empty
    without cross-fitting), every adaptation batched (:func:`adapt_many`). Feed each to
    ``policy.preset(*...)`` before ``policy.fit(support)``."""
    jobs: list[tuple[int, Sequence[Trace], Sequence[Trace] | None]] = []  # (episode, fit on, score)
    for e, support in enumerate(supports):
        if policy.crossfit:
            jobs.extend((e, fit_on, score) for fit_on, score in crossfit_halves(support, policy.seed))
        jobs.append((e, support, None))  # last: the predictor ends at this set's normalisation, as in fit
    models = adapt_many(policy.adapter, [fit_on for _, fit_on, _ in jobs], policy.adapt_steps, policy.renormalise)
    out: list[list] = [[None, {}] for _ in supports]
    for (e, _, score), model in zip(jobs, models):
        if score is None:
            out[e][0] = model
        else:
            out[e][1].update(zip([t.trace_id for t in score], trace_probabilities(model, score)))
    log.debug("%s: %d adaptations of %d episodes batched", policy.name, len(jobs), len(supports))
    return [(m, p) for m, p in out]
