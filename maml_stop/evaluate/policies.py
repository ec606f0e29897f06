"""Stopping policies (the baselines and the learned probes) behind one interface.

A :class:`StoppingPolicy` is fitted on the K support traces of a family, then picks, per trace, the
probe at which to stop (``stop_index``; ``None`` = run to the end). :meth:`StoppingPolicy.outcome`
turns that choice into EM and tokens with the accounting of ``DESIGN.md`` / ``Trace.stop_cost``:
probing policies pay every probe they ran; full generation and the token budget run no probes (a
budget pays the one forced answer at its cut-off); the oracle needs no probe when it runs to the end.

Thresholded policies (:class:`ThresholdedPolicy`) are families indexed by one parameter (the token
budget, the consistency window k, the confidence level, the probe threshold tau), with candidates
ordered from conservative (stops latest) to aggressive; ``fit`` lets a
:class:`~maml_stop.evaluate.thresholds.ThresholdSelector` choose the parameter on support, and ``None`` means
"never stop early" (plain full generation, no probes).

>>> from maml_stop.evaluate.thresholds import FixedThreshold
>>> policy = AnswerConsistency(selector=FixedThreshold(2))          # stop once 2 probe answers agree
>>> policy.fit(support).stop_index(trace)                           # doctest: +SKIP
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from torch import nn

from maml_stop.data.corpus import Trace
from maml_stop.evaluate.thresholds import FixedThreshold, SupportSweep, ThresholdSelector

if TYPE_CHECKING:  # pragma: no cover
    from maml_stop.learn.adapter import InnerLoopAdapter

log = logging.getLogger(__name__)

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
    "evaluate_policy",
    "sweep_policy",
    "train_predictor",
    "fresh_copy",
    "DEFAULT_TAUS",
]

# probe thresholds from conservative to aggressive (tuned grids go in experiments/evaluate.yaml)
DEFAULT_TAUS: tuple[float, ...] = (0.99, 0.97, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)


@dataclass(frozen=True)
class StopOutcome:
    """What a policy's decision on one trace yields."""

    index: int | None  # probe stopped at; None = ran to the end
    em: bool
    total_tokens: int  # reasoning + probes + answer
    reasoning_tokens: int


@dataclass
class Outcomes:
    """Outcomes of one policy on a list of traces, with full generation of the same traces beside them."""

    em: np.ndarray  # (N,) float 0/1
    total_tokens: np.ndarray  # (N,)
    reasoning_tokens: np.ndarray  # (N,)
    full_em: np.ndarray  # (N,)
    full_tokens: np.ndarray  # (N,)
    stopped_early: np.ndarray  # (N,) bool: stopped at a probe


def full_generation_outcome(trace: Trace) -> StopOutcome:
    """Plain full generation: no probes, every generated token, the model's own final answer."""
    return StopOutcome(None, bool(trace.final_em), trace.full_cost, trace.full_cost)


def _probe_outcome(trace: Trace, index: int | None) -> StopOutcome:
    """A probing policy's outcome: stop at probe ``index`` having run probes 0..index (or all of them)."""
    total, reasoning = trace.stop_cost(index)
    return StopOutcome(index, trace.stop_em(index), total, reasoning)


class StoppingPolicy:
    """Fit on the K support traces, then choose a stop index per trace (``None`` = run to the end)."""

    name = "policy"

    def fit(self, support: Sequence[Trace]) -> "StoppingPolicy":
        return self

    def stop_index(self, trace: Trace) -> int | None:
        raise NotImplementedError

    def outcome(self, trace: Trace) -> StopOutcome:
        return _probe_outcome(trace, self.stop_index(trace))

    def prepare(self, traces: Sequence[Trace]) -> None:
        """Precompute per-trace scores for a list of traces in one batch (learned policies)."""


class FullGeneration(StoppingPolicy):
    """Never stop early; run no probes."""

    name = "full"

    def stop_index(self, trace: Trace) -> int | None:
        return None

    def outcome(self, trace: Trace) -> StopOutcome:
        return full_generation_outcome(trace)


class FirstProbe(StoppingPolicy):
    """Stop at the first probe, whatever it says (a trace without probes runs to the end): the answer
    the model gives before most of its chain of thought. When it keeps EM, stopping needs no predictor."""

    name = "first_probe"

    def stop_index(self, trace: Trace) -> int | None:
        return 0 if trace.n_probes else None


class OraclePolicy(StoppingPolicy):
    """Stop at the earliest probe whose answer is correct; when none is, run to the end if the final
    answer is correct (paying no probes: the oracle knows), else stop at the first probe."""

    name = "oracle"

    def stop_index(self, trace: Trace) -> int | None:
        correct = np.flatnonzero(trace.labels > 0.5)
        if correct.size:
            return int(correct[0])
        if trace.final_em or trace.n_probes == 0:
            return None
        return 0

    def outcome(self, trace: Trace) -> StopOutcome:
        index = self.stop_index(trace)
        return full_generation_outcome(trace) if index is None else _probe_outcome(trace, index)


def oracle_at_equal_em(traces: Sequence[Trace]) -> list[StopOutcome]:
    """The fewest tokens any stopping rule could spend on ``traces`` with as many correct answers as full
    generation (a set-level oracle, unlike :class:`OraclePolicy`, which maximises EM first).

    Every trace first stops at its cheapest point (a probe, or the end without probes); then traces whose
    cheapest point is wrong but which have a correct one move to their cheapest correct point, fewest
    extra tokens first, until as many answers are correct as under full generation. Each move adds one
    correct answer, so taking the cheapest moves first is optimal. :class:`OraclePolicy` also fixes
    answers that full generation gets wrong, which costs tokens: a policy that keeps the full run's EM
    can beat it on savings but never this oracle.
    """
    chosen: list[StopOutcome] = []
    moves: list[tuple[int, int, StopOutcome]] = []
    for i, trace in enumerate(traces):
        options = [full_generation_outcome(trace)] + [_probe_outcome(trace, j) for j in range(trace.n_probes)]
        cheapest = min(options, key=lambda o: o.total_tokens)
        chosen.append(cheapest)
        correct = [o for o in options if o.em]
        if correct and not cheapest.em:
            best = min(correct, key=lambda o: o.total_tokens)
            moves.append((best.total_tokens - cheapest.total_tokens, i, best))
    need = sum(bool(t.final_em) for t in traces) - sum(o.em for o in chosen)
    for _, i, best in sorted(moves, key=lambda m: m[:2])[: max(need, 0)]:
        chosen[i] = best
    return chosen


class EqualEMOracle(StoppingPolicy):
    """:func:`oracle_at_equal_em` as a policy: the choice is made over the whole list of traces it is
    evaluated on (``prepare``), so it is a bound for a query set, not a rule for one trace."""

    name = "oracle_equal_em"

    def __init__(self) -> None:
        self._chosen: dict[int, StopOutcome] = {}

    def prepare(self, traces: Sequence[Trace]) -> None:
        self._chosen = {id(t): o for t, o in zip(traces, oracle_at_equal_em(traces))}

    def stop_index(self, trace: Trace) -> int | None:
        return self.outcome(trace).index

    def outcome(self, trace: Trace) -> StopOutcome:
        if id(trace) not in self._chosen:
            raise ValueError("EqualEMOracle chooses over a set of traces: evaluate it with evaluate_policy(policy, traces)")
        return self._chosen[id(trace)]


class ThresholdedPolicy(StoppingPolicy):
    """A family of policies indexed by one parameter, chosen on support by a threshold selector.

    Subclasses give ``candidates`` (conservative -> aggressive), ``default_param`` and
    ``stop_index_at``; learned ones also override ``_fit_scores``.
    """

    def __init__(self, selector: ThresholdSelector | None = None) -> None:
        self.selector = selector if selector is not None else FixedThreshold()
        self.param: float | None = self.default_param
        self.support_sweep: SupportSweep | None = None

    @property
    def candidates(self) -> list[float]:
        raise NotImplementedError

    @property
    def default_param(self) -> float | None:
        raise NotImplementedError

    def stop_index_at(self, trace: Trace, param: float) -> int | None:
        raise NotImplementedError

    def outcome_at(self, trace: Trace, param: float | None) -> StopOutcome:
        if param is None:
            return full_generation_outcome(trace)
        return _probe_outcome(trace, self.stop_index_at(trace, param))

    def outcomes_at(self, trace: Trace, params: Sequence[float]) -> list[StopOutcome]:
        """:meth:`outcome_at` for many parameters (subclasses vectorise it)."""
        return [self.outcome_at(trace, p) for p in params]

    def stop_index(self, trace: Trace) -> int | None:
        return None if self.param is None else self.stop_index_at(trace, self.param)

    def outcome(self, trace: Trace) -> StopOutcome:
        return self.outcome_at(trace, self.param)

    def _fit_scores(self, support: Sequence[Trace]) -> None:
        """Fit whatever the policy learns from support before its parameter is chosen."""

    def fit(self, support: Sequence[Trace]) -> "ThresholdedPolicy":
        if not support:
            raise ValueError(f"{self.name}: cannot fit on an empty support set")
        self._fit_scores(support)
        self.support_sweep = sweep_policy(self, support)  # kept so other selectors can reuse it
        self.param = self.choose(self.selector)
        log.debug("%s: %s chose %s on %d support traces", self.name, self.selector.name, self.param, len(support))
        return self

    def choose(self, selector: ThresholdSelector) -> float | None:
        """The parameter ``selector`` picks from the fitted support sweep (does not change ``param``)."""
        if getattr(self, "support_sweep", None) is None:
            raise RuntimeError(f"{self.name}: call fit(support) before choosing a threshold")
        return selector.select(self.candidates, self.support_sweep, self.default_param)


class FirstHitPolicy(ThresholdedPolicy):
    """Stop at the first probe whose score reaches the parameter: ``scores(trace)`` (P,) says how ready
    each probe is (a probability, a confidence, a run length), computed once for every parameter."""

    def scores(self, trace: Trace) -> np.ndarray:
        raise NotImplementedError

    def stop_index_at(self, trace: Trace, param: float) -> int | None:
        hits = np.flatnonzero(self.scores(trace) >= param)
        return int(hits[0]) if hits.size else None

    def outcomes_at(self, trace: Trace, params: Sequence[float]) -> list[StopOutcome]:
        score = self.scores(trace)  # (P,)
        hit = score[None, :] >= np.asarray(params, dtype=np.float64)[:, None]  # (J, P)
        first = hit.argmax(axis=1)  # (J,) first hit, 0 when none
        any_hit = hit.any(axis=1)
        stop_total = trace.positions + np.cumsum(trace.probe_tokens)  # (P,) total tokens stopping at each probe
        never_total, never_reasoning = trace.stop_cost(None)
        out = []
        for j in range(len(params)):
            if any_hit[j]:
                i = int(first[j])
                out.append(StopOutcome(i, bool(trace.labels[i] > 0.5), int(stop_total[i]), int(trace.positions[i])))
            else:
                out.append(StopOutcome(None, bool(trace.final_em), never_total, never_reasoning))
        return out


class TokenBudget(ThresholdedPolicy):
    """Stop at a fixed reasoning-token budget B: answer from the last probe at or before B, paying that
    one probe (a trace that ends within B runs to its end; one whose first probe lies beyond B answers
    at its first probe). Candidate budgets are quantiles of the support traces' lengths."""

    name = "budget"

    def __init__(
        self,
        selector: ThresholdSelector | None = None,
        quantiles: Sequence[float] = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1),
        default_quantile: float = 0.5,
    ) -> None:
        if not quantiles or any(not 0.0 <= q <= 1.0 for q in quantiles):
            raise ValueError(f"quantiles must be a non-empty list of fractions in [0, 1]; got {list(quantiles)}")
        self.quantiles = sorted(quantiles, reverse=True)  # large budget = conservative
        self.default_quantile = default_quantile
        self._budgets: list[float] = []
        self._default: float | None = None
        super().__init__(selector)

    @property
    def candidates(self) -> list[float]:
        if not self._budgets:
            raise RuntimeError("TokenBudget: call fit(support) first; its budgets are quantiles of support lengths")
        return self._budgets

    @property
    def default_param(self) -> float | None:
        return self._default

    def _fit_scores(self, support: Sequence[Trace]) -> None:
        lengths = np.array([t.reasoning_tokens for t in support], dtype=np.float64)
        self._budgets = [float(np.quantile(lengths, q)) for q in self.quantiles]
        self._default = float(np.quantile(lengths, self.default_quantile))

    def stop_index_at(self, trace: Trace, param: float) -> int | None:
        if trace.reasoning_tokens <= param or trace.n_probes == 0:
            return None
        before = np.flatnonzero(trace.positions <= param)
        return int(before[-1]) if before.size else 0

    def outcome_at(self, trace: Trace, param: float | None) -> StopOutcome:
        index = None if param is None else self.stop_index_at(trace, param)
        if index is None:
            return full_generation_outcome(trace)
        reasoning = int(trace.positions[index])
        return StopOutcome(index, bool(trace.labels[index] > 0.5), reasoning + int(trace.probe_tokens[index]), reasoning)


class AnswerConsistency(FirstHitPolicy):
    """Stop once the last k probe answers agree (and are not empty): Dynasor-CoT (Fu et al. 2024,
    arXiv:2412.20993) and ES-CoT. The window k is the parameter; larger k is more conservative."""

    name = "consistency"

    def __init__(self, selector: ThresholdSelector | None = None, windows: Sequence[int] = (8, 6, 5, 4, 3, 2)) -> None:
        if not windows or any(int(k) < 1 for k in windows):
            raise ValueError(f"windows must be positive integers; got {list(windows)}")
        self.windows = sorted({int(k) for k in windows}, reverse=True)
        super().__init__(selector)

    @property
    def candidates(self) -> list[float]:
        return [float(k) for k in self.windows]

    @property
    def default_param(self) -> float | None:
        return 3.0

    def scores(self, trace: Trace) -> np.ndarray:
        """(P,) how many consecutive probes up to each one gave this same non-empty answer."""
        answers = [a.strip() for a in trace.probe_answers]
        run = np.zeros(len(answers))
        for i, a in enumerate(answers):
            run[i] = (run[i - 1] + 1 if i > 0 and a == answers[i - 1] else 1) if a else 0
        return run


class AnswerConfidence(FirstHitPolicy):
    """Stop at the first probe whose forced answer is confident: exp(mean answer-token log-prob) >= c
    (DEER, Yang et al. 2025, arXiv:2504.15895). Higher c is more conservative."""

    name = "confidence"

    def __init__(
        self,
        selector: ThresholdSelector | None = None,
        levels: Sequence[float] = (0.999, 0.99, 0.98, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5),
    ) -> None:
        if not levels or any(not 0.0 <= c <= 1.0 for c in levels):
            raise ValueError(f"levels must be probabilities in [0, 1]; got {list(levels)}")
        self.levels = sorted(levels, reverse=True)
        super().__init__(selector)

    @property
    def candidates(self) -> list[float]:
        return list(self.levels)

    @property
    def default_param(self) -> float | None:
        return 0.95

    def scores(self, trace: Trace) -> np.ndarray:
        """(P,) exp(mean answer-token log-prob) of each probe answer; -inf where the answer is empty."""
        confidence = np.exp(trace.logprob_mean.astype(np.float64))
        nonempty = np.array([bool(a.strip()) for a in trace.probe_answers], dtype=bool)
        return np.where(nonempty, confidence, -np.inf)


class ProbePolicy(FirstHitPolicy):
    """A stopping predictor: stop at the first probe whose P(stop keeps the answer) >= tau.

    ``adapter=None`` uses ``predictor`` as it is (the pooled probe without adaptation); otherwise
    ``fit`` calls ``adapter.adapt`` on the support probes (MAML-adapted, fine-tuned, or trained from
    scratch: each is an :class:`~maml_stop.learn.adapter.InnerLoopAdapter` around the right initial predictor).
    ``renormalise=True`` first sets the predictor's normalisation from the support features (for a
    predictor trained from scratch, which has no source statistics).

    ``crossfit=True`` scores the support traces for threshold selection out of sample: the support
    questions are split in two halves (with the one split function, seeded by ``seed``), each half is
    scored by the predictor adapted on the other half, and the threshold is chosen on those scores; the
    policy then uses the predictor adapted on all K. Without it, the threshold is chosen on the very
    traces the predictor was adapted on, whose scores are optimistic (see the report).
    """

    def __init__(
        self,
        predictor: nn.Module | None = None,
        adapter: "InnerLoopAdapter | None" = None,
        selector: ThresholdSelector | None = None,
        taus: Sequence[float] = DEFAULT_TAUS,
        default_tau: float = 0.5,
        renormalise: bool = False,
        adapt_steps: int | None = None,
        crossfit: bool = False,
        seed: int = 0,
        name: str = "probe",
    ) -> None:
        if predictor is None and adapter is None:
            raise ValueError("ProbePolicy needs a predictor or an adapter")
        if not taus or any(not 0.0 <= t <= 1.0 for t in taus):
            raise ValueError(f"taus must be probabilities in [0, 1]; got {list(taus)}")
        self.predictor = predictor if predictor is not None else adapter.predictor  # type: ignore[union-attr]
        self.adapter = adapter
        self.taus = sorted(taus, reverse=True)  # high tau = conservative
        self.default_tau = default_tau
        self.renormalise = renormalise
        self.adapt_steps = adapt_steps
        self.crossfit = crossfit
        self.seed = seed
        self.name = name
        self.model: nn.Module | None = None if adapter is not None else self.predictor
        self._probs: dict[str, np.ndarray] = {}
        super().__init__(selector)

    @property
    def candidates(self) -> list[float]:
        return list(self.taus)

    @property
    def default_param(self) -> float | None:
        return self.default_tau

    def _adapt(self, traces: Sequence[Trace]) -> nn.Module:
        from maml_stop.data.batches import collate_traces

        batch = collate_traces(traces, weighting=_adapter_weighting(self.adapter))
        if self.renormalise:
            mean = batch.features.mean(0)  # (F,)
            std = batch.features.std(0, unbiased=False).clamp(min=1e-6)  # (F,)
            self.predictor.set_normalisation(mean, std)
        with torch.no_grad():  # the adapter then runs first-order inner steps and returns a detached clone
            return self.adapter.adapt(batch, steps=self.adapt_steps)

    def _fit_scores(self, support: Sequence[Trace]) -> None:
        self._probs = {}
        if self.adapter is None:
            self.model = self.predictor
            return
        questions = {t.trace_id.split("#", 1)[0] for t in support}
        if self.crossfit and len(questions) >= 2:
            from maml_stop.data.episodes import split_support_query

            half_a, half_b = split_support_query(support, len(questions) // 2, None, np.random.default_rng(self.seed))
            for fit_on, score in ((half_a, half_b), (half_b, half_a)):
                self._probs.update(zip([t.trace_id for t in score], _score(self._adapt(fit_on), score)))
        self.model = self._adapt(support)

    def fit(self, support: Sequence[Trace]) -> "ProbePolicy":
        super().fit(support)
        if self.crossfit:  # the out-of-sample support scores served threshold selection only
            for t in support:
                self._probs.pop(t.trace_id, None)
        return self

    def probabilities(self, traces: Sequence[Trace]) -> list[np.ndarray]:
        """P(stopping here keeps the answer correct) at every probe, per trace: list of (P_i,)."""
        if self.model is None:
            raise RuntimeError(f"{self.name}: call fit(support) before scoring traces")
        missing = [t for t in traces if t.trace_id not in self._probs]
        if missing:
            self._probs.update(zip([t.trace_id for t in missing], _score(self.model, missing)))
        return [self._probs[t.trace_id] for t in traces]

    def prepare(self, traces: Sequence[Trace]) -> None:
        if traces:
            self.probabilities(traces)

    def scores(self, trace: Trace) -> np.ndarray:
        return self.probabilities([trace])[0]


def _score(model: nn.Module, traces: Sequence[Trace]) -> list[np.ndarray]:
    """Probabilities of ``model`` at every probe of each trace (eval mode, no gradients): list of (P_i,)."""
    from maml_stop.data.batches import collate_traces

    batch = collate_traces(traces)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        probs = torch.sigmoid(model(batch)).double().numpy()  # (N,)
    model.train(was_training)
    index = batch.trace_index.numpy()
    return [probs[index == i] for i in range(len(traces))]


def _adapter_weighting(adapter: object) -> str:
    """The probe weighting the adapter's loss expects (``cost`` loss -> cost weights)."""
    weighting = getattr(adapter, "weighting", None)
    if isinstance(weighting, str):
        return weighting
    return "cost" if getattr(adapter, "loss_name", getattr(adapter, "loss_kind", None)) == "cost" else "uniform"


def evaluate_policy(policy: StoppingPolicy, traces: Sequence[Trace]) -> Outcomes:
    """Outcomes of a fitted policy on ``traces`` (with full generation of the same traces)."""
    policy.prepare(traces)
    results = [policy.outcome(t) for t in traces]
    return Outcomes(
        em=np.array([r.em for r in results], dtype=np.float64),
        total_tokens=np.array([r.total_tokens for r in results], dtype=np.float64),
        reasoning_tokens=np.array([r.reasoning_tokens for r in results], dtype=np.float64),
        full_em=np.array([t.final_em for t in traces], dtype=np.float64),
        full_tokens=np.array([t.full_cost for t in traces], dtype=np.float64),
        stopped_early=np.array([r.index is not None for r in results], dtype=bool),
    )


def sweep_policy(
    policy: ThresholdedPolicy, traces: Sequence[Trace], candidates: Sequence[float] | None = None
) -> SupportSweep:
    """EM and total tokens of every candidate parameter on ``traces``: (N, J) arrays."""
    cands = list(policy.candidates if candidates is None else candidates)
    policy.prepare(traces)
    em = np.zeros((len(traces), len(cands)))
    tokens = np.zeros((len(traces), len(cands)))
    for i, t in enumerate(traces):
        for j, r in enumerate(policy.outcomes_at(t, cands)):
            em[i, j], tokens[i, j] = float(r.em), float(r.total_tokens)
    return SupportSweep(
        em=em,
        tokens=tokens,
        full_em=np.array([t.final_em for t in traces], dtype=np.float64),
        full_tokens=np.array([t.full_cost for t in traces], dtype=np.float64),
    )


def fresh_copy(predictor: nn.Module) -> nn.Module:
    """A new StoppingPredictor with ``predictor``'s weights and normalisation as real parameters (an
    adapted clone holds plain tensors, which cannot be adapted again)."""
    from maml_stop.learn.predictor import StoppingPredictor

    new = StoppingPredictor(**predictor.config())
    new.load_state_dict({k: v.detach().clone() for k, v in predictor.state_dict().items()})
    return new


def train_predictor(
    traces: Sequence[Trace],
    predictor_config: dict,
    steps: int,
    lr: float,
    loss: str = "balanced",
    seed: int = 0,
) -> nn.Module:
    """A stopping predictor trained on every probe of ``traces`` (the pooled probe of the protocol):
    normalisation from those features, a seeded random init, then ``steps`` full-batch gradient steps
    through :meth:`InnerLoopAdapter.adapt` (the one adaptation function, used here as plain training)."""
    from maml_stop.learn.adapter import InnerLoopAdapter
    from maml_stop.data.batches import collate_traces
    from maml_stop.learn.predictor import StoppingPredictor

    if not traces:
        raise ValueError("train_predictor needs at least one trace")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        predictor = StoppingPredictor(**predictor_config)
    batch = collate_traces(traces, weighting="cost" if loss == "cost" else "uniform")
    predictor.set_normalisation(batch.features.mean(0), batch.features.std(0, unbiased=False))
    adapter = InnerLoopAdapter(predictor, algorithm="maml", inner_lr=lr, inner_steps=steps, first_order=True, loss=loss)
    with torch.no_grad():
        trained = adapter.adapt(batch)
    return fresh_copy(trained)
