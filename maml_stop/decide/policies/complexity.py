"""Token budgets by question complexity (issue 13 item 2): predict from the question alone how many
reasoning tokens it needs, and stop there.

**What a question needs** (:func:`needed_index`, :func:`needed_tokens`): the equal-EM stop of one trace.
When the full run is right, it is the first probe from which every forced answer is right (the answer is
right there and stays the final answer's); when no such probe exists (the last probe is wrong), the full
length (``reasoning_tokens``). When the full run is wrong, stopping anywhere keeps its EM, so the first
probe (``positions[0]``; the full length for a trace without probes). A budget at ``needed_tokens(t)``
under the :class:`~maml_stop.decide.policies.baselines.TokenBudget` rule stops at ``needed_index(t)``
(or runs to the end) and never loses the full run's EM on ``t``.

The features are :class:`maml_stop.probe.question_features.QuestionFeaturizer`'s (the question text, and
the free features of a probe at position 0 where the corpus has one), looked up by trace id in a
:class:`QuestionTable` (question texts are stored in the shards, not in :class:`Trace`).

Policies (the threshold selectors choose their parameter on the support sweep, like any other):

* :class:`ComplexityBudget` (``complexity_budget``): a ridge regression of ``log1p(needed_tokens)`` on the
  standardised features, fitted on the K support traces; the budget of a trace is ``scale *
  expm1(prediction)``, and ``scale`` is the parameter (candidates from large, conservative, to small).
  With ``crossfit`` the support sweep reads out-of-sample budgets (each half of the support questions
  predicted by the ridge fitted on the other half, :func:`~maml_stop.data.episodes.split_support_query`).
* :class:`ComplexityAdapted` (``complexity_adapted``): the budget as a per-probe classifier P(done by this
  probe | question features, log1p(position)), label ``i >= needed_index`` (:func:`done_labels`), a
  :class:`~maml_stop.learn.predictor.StoppingPredictor` over :class:`ComplexityView` traces. It is
  meta-initialised on the source families (first-order MAML through
  :meth:`~maml_stop.learn.adapter.InnerLoopAdapter.episode_losses`, :func:`meta_initialise`) the first
  time it is fitted for a held-out family, then adapted on the K support traces by the shared adapter's
  ``fit_support``; tau is the parameter (stop at the first probe with P >= tau).

Accounting (DESIGN.md "Honest accounting", :mod:`.cost_aware`'s free-probe convention): both decide on
free information (the question, the prompt's forward pass, the token count), so a stop at probe ``i``
pays one forced answer, at ``i`` (``StopOutcome.ran == (i,)``), and a trace that ends within its budget
(or a classifier that never fires) costs plain full generation. A per-question cap on another policy is
``hybrid.Either(inner, ComplexityBudget(selector=FixedThreshold(scale)))`` (``complexity_capped_maml``).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import replace
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from maml_stop.data import store
from maml_stop.data.batches import collate_traces
from maml_stop.data.corpus import Trace, TraceCorpus
from maml_stop.data.episodes import EpisodeSampler, QuestionGroups, split_support_query
from maml_stop.decide.policies.base import StopOutcome, ThresholdedPolicy, full_generation_outcome, probe_outcome
from maml_stop.decide.policies.baselines import TokenBudget
from maml_stop.decide.policies.cost_aware import ViewProbe
from maml_stop.decide.policies.learned import ProbePolicy
from maml_stop.decide.selector import StopSelector
from maml_stop.probe.features import feature_cost
from maml_stop.probe.question_features import QuestionFeaturizer

log = logging.getLogger(__name__)

__all__ = ["start_features", "needed_index", "needed_tokens", "done_labels", "QuestionTable", "ComplexityFeatures", "RidgeRegressor",
           "ComplexityBudget", "ComplexityView", "ComplexityAdapted", "meta_initialise", "DEFAULT_SCALES",
           "load_corpus"]

# budget scales from conservative (large budgets) to aggressive (tuned grids: experiments/complexity_evaluate.yaml)
DEFAULT_SCALES: tuple[float, ...] = (4.0, 2.0, 1.5, 1.0, 0.75, 0.5)


def needed_index(trace: Trace) -> int | None:
    """The probe from which the trace is done at equal EM (see the module docstring); None: run to the end."""
    if trace.n_probes == 0:
        return None
    if not trace.final_em:
        return 0
    right = np.asarray(trace.labels) > 0.5  # (P,)
    if not right[-1]:
        return None
    wrong = np.flatnonzero(~right)
    return int(wrong[-1]) + 1 if wrong.size else 0


def needed_tokens(trace: Trace) -> float:
    """The reasoning tokens a trace needs: ``positions[needed_index]``, or ``reasoning_tokens`` (the end)."""
    i = needed_index(trace)
    return float(trace.reasoning_tokens if i is None else trace.positions[i])


def done_labels(trace: Trace) -> np.ndarray:
    """Per probe: 1 where stopping keeps the full run's EM from there on (``i >= needed_index``). (P,) float32"""
    i = needed_index(trace)
    out = np.zeros(trace.n_probes, dtype=np.float32)
    if i is not None:
        out[i:] = 1.0
    return out


def start_features(meta: Mapping, feature_names: Sequence[str]) -> list[str]:
    """The free features of the probe at position 0 that a corpus with ``meta`` (its ``meta.json``) has: none
    unless its schedule probes ``at_start`` (corpus v2); cost classes from ``feature_costs``, else
    :func:`~maml_stop.probe.features.feature_cost`."""
    if not (meta.get("schedule") or {}).get("at_start"):
        return []
    costs = meta.get("feature_costs") or {}
    return [n for n in feature_names if (costs.get(n) or feature_cost(n)) == "free"]


class QuestionTable:
    """Question text by trace id (the stored ``question`` column): ``QuestionTable.load(root)``."""

    def __init__(self, questions: Mapping[str, str]) -> None:
        self.questions = dict(questions)

    @classmethod
    def load(cls, *roots: str | Path | None) -> "QuestionTable":
        """The questions of every shard of the corpora ``roots`` (None entries skipped)."""
        import pyarrow.parquet as pq

        out: dict[str, str] = {}
        for root in roots:
            if root is None:
                continue
            for path in store.shard_paths(root):
                table = pq.read_table(path, columns=["trace_id", "question"])
                out.update(zip(table.column(0).to_pylist(), table.column(1).to_pylist()))
        return cls(out)

    def __getitem__(self, trace_id: str) -> str:
        if trace_id not in self.questions:
            raise KeyError(f"no question text for trace {trace_id!r} ({len(self.questions)} questions known, "
                           f"e.g. {list(self.questions)[:3]}): load the QuestionTable from the trace's corpus")
        return self.questions[trace_id] or ""


class ComplexityFeatures:
    """The complexity vector of a trace (its question and its start probe), cached by trace id."""

    def __init__(self, featurizer: QuestionFeaturizer, questions: QuestionTable | Mapping[str, str]) -> None:
        self.featurizer = featurizer
        self.questions = questions if isinstance(questions, QuestionTable) else QuestionTable(questions)
        self._cache: dict[str, np.ndarray] = {}

    @property
    def width(self) -> int:
        return self.featurizer.width

    def __call__(self, trace: Trace) -> np.ndarray:
        if trace.trace_id not in self._cache:
            self._cache[trace.trace_id] = self.featurizer(trace, self.questions[trace.trace_id])
        return self._cache[trace.trace_id]

    def matrix(self, traces: Sequence[Trace]) -> np.ndarray:
        """(N, width) float64"""
        return np.stack([self(t) for t in traces]).astype(np.float64)


class RidgeRegressor:
    """Ridge regression with an unpenalised intercept on standardised inputs (closed form).

    >>> x = np.arange(6.0)[:, None]
    >>> RidgeRegressor(alpha=1e-9).fit(x, 2 * x[:, 0] + 1).predict(np.array([[10.0]])).round(6).tolist()
    [21.0]
    """

    def __init__(self, alpha: float = 1.0) -> None:
        if alpha < 0:
            raise ValueError(f"the ridge penalty alpha must be >= 0; got {alpha}")
        self.alpha = alpha

    def fit(self, x: np.ndarray, y: np.ndarray) -> "RidgeRegressor":
        """``x`` (N, D), ``y`` (N,)."""
        self.mean, std = x.mean(0), x.std(0)
        self.std = np.where(std > 1e-8, std, 1.0)  # constant columns contribute nothing
        z = (x - self.mean) / self.std  # (N, D)
        self.intercept = float(y.mean())
        gram = z.T @ z + self.alpha * np.eye(z.shape[1])  # (D, D)
        self.coef = np.linalg.lstsq(gram, z.T @ (y - self.intercept), rcond=None)[0]  # (D,)
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        """(N, D) -> (N,)"""
        return self.intercept + ((x - self.mean) / self.std) @ self.coef


class ComplexityBudget(ThresholdedPolicy):
    """A per-question reasoning budget ``scale * expm1(ridge(features))``, the ridge fitted on the support
    traces' ``log1p(needed_tokens)``; stops by the :class:`TokenBudget` rule at that budget, paying the one
    forced answer at the cut-off. The parameter is ``scale`` (candidates ``scales``, largest first)."""

    def __init__(self, features: ComplexityFeatures, selector: StopSelector | None = None,
                 scales: Sequence[float] = DEFAULT_SCALES, default_scale: float = 1.0, alpha: float = 10.0,
                 crossfit: bool = False, seed: int = 0, name: str = "complexity_budget") -> None:
        if not scales or any(not s > 0 for s in scales):
            raise ValueError(f"scales must be a non-empty list of positive budget multipliers; got {list(scales)}")
        if not default_scale > 0:
            raise ValueError(f"default_scale must be > 0; got {default_scale}")
        self.features, self.scales, self.default_scale = features, sorted(scales, reverse=True), float(default_scale)
        self.alpha, self.crossfit, self.seed, self.name = alpha, crossfit, seed, name
        self.model: RidgeRegressor | None = None
        self._support: dict[str, float] = {}  # out-of-sample support budgets (cross-fitting), by trace id
        self._rule = TokenBudget()  # the one home of the budget's cut-off
        super().__init__(selector)

    @property
    def candidates(self) -> list[float]:
        return list(self.scales)

    @property
    def default_param(self) -> float | None:
        return self.default_scale

    def _fit_ridge(self, traces: Sequence[Trace]) -> RidgeRegressor:
        y = np.log1p(np.array([needed_tokens(t) for t in traces], dtype=np.float64))  # (N,)
        return RidgeRegressor(self.alpha).fit(self.features.matrix(traces), y)

    def _fit_scores(self, support: Sequence[Trace]) -> None:
        self._support = {}
        if self.crossfit and len(QuestionGroups(support)) >= 2:
            n = len(QuestionGroups(support))
            half_a, half_b = split_support_query(support, n // 2, None, np.random.default_rng(self.seed))
            for fit_on, score in ((half_a, half_b), (half_b, half_a)):
                pred = self._fit_ridge(fit_on).predict(self.features.matrix(score))
                self._support.update(zip([t.trace_id for t in score], np.expm1(pred).tolist()))
        self.model = self._fit_ridge(support)

    def fit(self, support: Sequence[Trace]) -> "ComplexityBudget":
        super().fit(support)
        self._support = {}  # the out-of-sample support budgets served threshold selection only
        return self

    def budget(self, trace: Trace) -> float:
        """The predicted reasoning tokens of ``trace``'s question (before scaling), >= 0."""
        if trace.trace_id in self._support:
            return max(self._support[trace.trace_id], 0.0)
        if self.model is None:
            raise RuntimeError(f"{self.name}: call fit(support) before asking for a budget")
        return max(float(np.expm1(self.model.predict(self.features.matrix([trace]))[0])), 0.0)

    def stop_index_at(self, trace: Trace, param: float) -> int | None:
        return self._rule.stop_index_at(trace, param * self.budget(trace))

    def outcome_at(self, trace: Trace, param: float | None) -> StopOutcome:
        index = None if param is None else self.stop_index_at(trace, param)
        return full_generation_outcome(trace) if index is None else probe_outcome(trace, index, ran=[index])

    def outcomes_at(self, trace: Trace, params: Sequence[float]) -> list[StopOutcome]:
        budget = self.budget(trace)  # once for every parameter
        out = []
        for p in params:
            index = self._rule.stop_index_at(trace, p * budget)
            out.append(full_generation_outcome(trace) if index is None else probe_outcome(trace, index, ran=[index]))
        return out


class ComplexityView:
    """A trace as the per-probe budget classifier reads it: features ``[complexity vector, log1p(position)]``
    (P, width + 1), labels :func:`done_labels` (the rest of the trace unchanged)."""

    def __init__(self, features: ComplexityFeatures) -> None:
        self.features = features

    @property
    def width(self) -> int:
        return self.features.width + 1

    def __call__(self, trace: Trace) -> Trace:
        q = np.broadcast_to(self.features(trace), (trace.n_probes, self.features.width))  # (P, Q)
        pos = np.log1p(np.asarray(trace.positions, dtype=np.float32))[:, None]  # (P, 1)
        feats = np.ascontiguousarray(np.concatenate([q, pos], axis=1), dtype=np.float32)
        return replace(trace, features=feats, labels=done_labels(trace))


def meta_initialise(adapter, traces_by_family: Mapping[str, Sequence[Trace]], steps: int = 200, lr: float = 0.01,
                    k: int = 8, q: int | None = 32, meta_batch: int = 8, seed: int = 0) -> list[float]:
    """MAML (first- or second-order as ``adapter`` is configured) of ``adapter.predictor`` in place on episodes
    of ``traces_by_family`` (already :class:`ComplexityView` traces): normalisation from all of their
    features, then ``steps`` Adam steps on the mean query loss after adaptation
    (:meth:`InnerLoopAdapter.episode_losses`, tested equal to ``fit_support``). Returns the losses."""
    if steps < 0 or not lr > 0 or k < 1 or meta_batch < 1:
        raise ValueError(f"meta_initialise needs steps >= 0, lr > 0, k >= 1, meta_batch >= 1; got {steps}, {lr}, {k}, "
                         f"{meta_batch}")
    questions = {f: len(QuestionGroups(ts)) for f, ts in traces_by_family.items() if ts}
    usable = {f: list(traces_by_family[f]) for f, n in questions.items() if n > k}
    if not usable:
        raise ValueError(f"meta_initialise: no source family has more than k={k} questions (questions per family: "
                         f"{questions})")
    everything = collate_traces([t for ts in usable.values() for t in ts])
    adapter.predictor.set_normalisation(everything.features.mean(0),
                                        everything.features.std(0, unbiased=False).clamp(min=1e-6))
    smallest = min(questions[f] for f in usable)
    sampler = EpisodeSampler(usable, k, None if q is None else min(q, smallest - k), seed=seed)
    params = [p for p in adapter.parameters() if p.requires_grad]
    optimiser = torch.optim.Adam(params, lr=lr)
    losses: list[float] = []
    with torch.random.fork_rng(), torch.enable_grad():
        torch.manual_seed(seed)
        for _ in range(steps):
            pairs = [(collate_traces(e.support, weighting=adapter.weighting),
                      collate_traces(e.query, weighting=adapter.weighting)) for e in sampler.sample_batch(meta_batch)]
            optimiser.zero_grad()
            loss = adapter.episode_losses(pairs).mean()
            loss.backward()
            optimiser.step()
            losses.append(float(loss.detach()))
    return losses


class ComplexityAdapted(ViewProbe):
    """The per-probe budget classifier thresholded at tau, paying one forced answer at its stop: ``probe``
    (a :class:`ProbePolicy` around an :class:`InnerLoopAdapter`, ``renormalise=False``) is meta-initialised
    on ``sources(held-out family)`` (family -> traces) when first fitted for a family, then adapted on the
    support set (``fit_support``). ``sources=None``: no meta-initialisation (the predictor as given)."""

    def __init__(self, probe: ProbePolicy, view: ComplexityView,
                 sources: Callable[[str], Mapping[str, Sequence[Trace]]] | None = None,
                 meta: Mapping | None = None, name: str = "complexity_adapted") -> None:
        if probe.adapter is None:
            raise ValueError(f"{name}: the classifier is adapted on support: give its ProbePolicy an adapter")
        super().__init__(probe, view, pays="stop", feature_names=None, name=name)
        self.sources, self.meta = sources, dict(meta or {})
        self.initialised_for: str | None = None
        self.meta_losses: list[float] = []
        # the initial weights: each held-out family's meta-initialisation starts from them, never from the
        # one of another family (which had this family among its sources)
        self._initial = {k: v.detach().clone() for k, v in probe.adapter.state_dict().items()}

    def _fit_scores(self, support: Sequence[Trace]) -> None:
        family = support[0].family
        if self.sources is not None and self.initialised_for != family:
            by_family = {f: [self.learned.view(t) for t in ts] for f, ts in self.sources(family).items() if f != family}
            self.learned.probe.adapter.load_state_dict(self._initial)
            self.meta_losses = meta_initialise(self.learned.probe.adapter, by_family, **self.meta)
            self.initialised_for = family
            log.info("%s: meta-initialised for %s on %s (loss %.3f -> %.3f)", self.name, family, sorted(by_family),
                     self.meta_losses[0], self.meta_losses[-1])
        super()._fit_scores(support)


@functools.lru_cache(maxsize=4)
def load_corpus(root: str, min_probes: int = 1) -> TraceCorpus:
    """A corpus loaded once per process (the meta-initialisation's source traces, for every fold)."""
    return TraceCorpus.load(root, min_probes=min_probes)
