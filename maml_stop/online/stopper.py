"""The online stopper: serve a stream of requests, learn from feedback, keep the EM drop within ``delta``.

Per request (a finished :class:`~maml_stop.data.corpus.Trace` replayed as if it were being generated):

1. **decide**: the current adapted predictor and threshold give a stop index (the first probe whose
   P(correct) reaches tau: :class:`~maml_stop.decide.policies.ProbePolicy`, the same decision as live
   stopping's ``every`` mode, :func:`maml_stop.live.rule.replay`, which sees no later probe);
2. **serve** and charge it by :mod:`maml_stop.data.accounting`: while the monitor holds the fallback,
   or while the policy at tau saves no tokens on the window (``idle``: a probing policy that seldom
   fires pays more than full generation), plain full generation (``full_cost``); a request drawn for feedback (probability ``sample_rate``) runs
   to its end with every probe forced (``stop_cost(trace, None)``) and returns the final answer; any
   other stops where the policy says (``stop_cost(trace, i)``: the probes up to ``i`` are paid);
3. **feedback** (drawn requests only): the trace labelled by :func:`~maml_stop.online.labels.feedback_trace`
   (``gold`` or label-free ``agreement``); the paired difference ``d`` = (final right) - (early answer
   right) of step 1's decision (made also on fallback and idle requests, counterfactually) feeds the
   :class:`~maml_stop.online.monitor.DropMonitor` and the threshold step; the labelled trace joins a
   sliding window of the last ``window`` ones;
4. **re-adapt** every ``refit_every`` feedbacks: :meth:`InnerLoopAdapter.fit_support` on the window,
   always from the meta-trained initialisation (the adapter's predictor is never changed);
5. **tau**: ``rule="sa"`` moves logit(tau) by a Robbins-Monro step
   ``step_t * (d - target)`` on each feedback, ``step_t = step0 / (1 + t / decay)`` (``t`` restarts when the monitor raises an alarm, so the step
   grows back after a detected change), so the feedback drop tracks ``target`` (default ``delta / 2``);
   any other value names a selector of :mod:`maml_stop.decide.thresholds` (``em_target``, ``ltt``,
   ``cost``, ``fixed``) that chooses tau from ``taus`` on the window at each re-adaptation.

The stopper starts from the K-shot deployment of ``maml-stop adapt``: adapted on K gold-labelled support
traces, tau chosen there by ``em_target`` at ``delta`` (``tau0`` overrides it); that window seeds the
sliding one.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from maml_stop.data.accounting import full_cost, savings, stop_cost
from maml_stop.data.corpus import Trace
from maml_stop.decide.policies.base import evaluate_policy
from maml_stop.decide.policies.learned import ProbePolicy
from maml_stop.decide.registry import SELECTORS, make_selector
from maml_stop.decide.rule import DEFAULT_TAUS
from maml_stop.decide.thresholds import FixedThreshold
from maml_stop.learn.adapter import InnerLoopAdapter
from maml_stop.learn.predictor import fresh_copy
from maml_stop.online.labels import FEEDBACK, feedback_trace
from maml_stop.online.monitor import DropMonitor, MonitorConfig

log = logging.getLogger(__name__)

__all__ = ["RULES", "MOVED_KEYS", "OnlineConfig", "OnlineStopper", "Served", "refuse_moved_keys"]

RULES = ("sa",) + tuple(SELECTORS)  # how tau moves online (OnlineConfig.rule)
# OnlineConfig keys that moved -> their new name (issue 31: ``threshold`` named the rule, not tau)
MOVED_KEYS = {"threshold": "rule"}


def refuse_moved_keys(section: Mapping[str, Any] | None, where: str = "online") -> None:
    """A ``ValueError`` naming the new key for every old key of an ``online`` mapping (YAML, flags)."""
    moved = [k for k in (section or {}) if k in MOVED_KEYS]
    if moved:
        raise ValueError("these online keys were renamed: " +
                         ", ".join(f"{where}.{k} -> {where}.{MOVED_KEYS[k]}" for k in moved))


@dataclass(frozen=True)
class OnlineConfig:
    """How the online stopper learns (tuned values in ``experiments/drift.yaml``)."""

    window: int = 64  # labelled traces kept for re-adaptation (the K-shot support seeds it)
    refit_every: int = 8  # feedbacks between re-adaptations
    feedback: str = "gold"  # gold (probe EM) | agreement (label-free: agrees with the final answer)
    sample_rate: float = 0.2  # share of requests run to the end for feedback
    delta: float = 0.01  # EM-drop target (0.01 = 1 point): monitor bound, initial em_target threshold
    rule: str = "sa"  # how tau moves: sa (stochastic approximation) | a selector name: em_target, ltt, cost, fixed
    target: float | None = None  # sa: the feedback drop tau tracks (None: delta / 2)
    step0: float = 1.0  # sa: first step on logit(tau)
    decay: float = 50.0  # sa: step_t = step0 / (1 + t / decay)
    restart_on_alarm: bool = True  # sa: t restarts at 0 when the monitor falls back
    tau0: float | None = None  # initial tau (None: em_target at delta on the K-shot support)
    taus: tuple[float, ...] = DEFAULT_TAUS  # selector candidates; sa keeps tau within [min, max] of them
    alpha: float = 0.1  # ltt's risk level
    token_price: float = 0.001  # cost selector: price of a token
    wrong_answer_cost: float = 1.0  # cost selector: price of a wrong answer
    adapt_steps: int | None = None  # inner steps (None: the adapter's)
    crossfit: bool = False  # selectors read out-of-sample window scores (crossfit_probabilities)
    idle_when_not_saving: bool = True  # serve full generation while tau saves nothing on the window
    seed: int = 0  # draws of the feedback requests
    monitor: MonitorConfig = field(default_factory=MonitorConfig)

    def __post_init__(self) -> None:
        if self.feedback not in FEEDBACK:
            raise ValueError(f"unknown feedback mode {self.feedback!r}; valid: {', '.join(FEEDBACK)}")
        if self.rule not in RULES:
            raise ValueError(f"unknown online rule {self.rule!r}; valid: {', '.join(RULES)}")
        if not 0.0 <= self.sample_rate <= 1.0:
            raise ValueError(f"sample_rate is a share of requests in [0, 1]; got {self.sample_rate}")
        if self.window < 1 or self.refit_every < 1:
            raise ValueError(f"need window >= 1 and refit_every >= 1; got {self.window}, {self.refit_every}")
        if not 0.0 < self.delta < 1.0:
            raise ValueError(f"delta is an EM drop as a fraction in (0, 1); got {self.delta}")
        if self.step0 < 0 or self.decay <= 0:
            raise ValueError(f"need step0 >= 0 and decay > 0; got {self.step0}, {self.decay}")
        if not self.taus or any(not 0.0 < t < 1.0 for t in self.taus):
            raise ValueError(f"taus must lie in (0, 1); got {list(self.taus)}")

    @property
    def sa_target(self) -> float:
        return self.delta / 2 if self.target is None else self.target


@dataclass(frozen=True)
class Served:
    """What serving one request gave and cost."""

    index: int | None  # probe stopped at (None: ran to the end)
    decision: int | None  # the policy's stop index (what it would have done, also on fallback/feedback requests)
    em: bool  # EM of the answer served (gold, for reporting)
    total_tokens: int  # reasoning + every forced answer run
    reasoning_tokens: int
    feedback: bool  # ran to the end for feedback
    fallback: bool  # served by full generation because the monitor said so
    idle: bool  # served by full generation because the policy at tau saves nothing on the window
    tau: float | None  # threshold in force (None: never stop early)
    d: int | None = None  # feedback requests: (final right) - (early answer right) of ``decision``


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


class OnlineStopper:
    """Serve, learn from feedback, re-adapt and move tau (module docstring).

    ``adapter`` holds the meta-trained predictor (``load_predictor``); ``support`` are the K gold-labelled
    traces of the initial deployment. Feed requests in order to :meth:`serve`."""

    def __init__(self, adapter: InnerLoopAdapter, support: Sequence[Trace], config: OnlineConfig | None = None) -> None:
        if not support:
            raise ValueError("the online stopper starts from a K-shot adaptation: support must not be empty")
        self.adapter = adapter
        self.config = cfg = config if config is not None else OnlineConfig()
        self.rng = np.random.default_rng(cfg.seed)
        self.window: deque[Trace] = deque(support, maxlen=cfg.window)
        self.monitor = DropMonitor(cfg.delta, cfg.monitor, signed=cfg.monitor.net and cfg.feedback == "gold")
        self.t = 0  # sa clock: feedbacks since start or the last alarm
        self.n_requests = self.n_feedback = self.n_refits = 0
        self._since_refit = 0
        first = ProbePolicy(adapter=adapter, selector=make_selector("em_target", delta=cfg.delta), taus=cfg.taus,
                            adapt_steps=cfg.adapt_steps, name="online").fit(list(support))
        self.policy = first
        self.tau: float | None = cfg.tau0 if cfg.tau0 is not None else first.param
        if cfg.rule == "sa" and self.tau is None:
            self.tau = self._hi  # "never" as the most conservative candidate: sa can move away from it
        self.idle = False
        self._update_idle()

    @property
    def _lo(self) -> float:
        return min(self.config.taus)

    @property
    def _hi(self) -> float:
        return max(self.config.taus)

    @property
    def fallback(self) -> bool:
        return self.monitor.fallback

    def decide(self, trace: Trace) -> int | None:
        """The policy's stop index on ``trace`` at the current tau (None: run to the end)."""
        return None if self.tau is None else self.policy.stop_index_at(trace, self.tau)

    def serve(self, trace: Trace, final_answer: str | None = None) -> Served:
        """Serve one request (``final_answer``: its run's final answer, needed by agreement feedback)."""
        cfg = self.config
        self.n_requests += 1
        decision = self.decide(trace)
        fallback, idle, tau = self.fallback, self.idle, self.tau
        sampled = bool(self.rng.random() < cfg.sample_rate)
        if sampled:  # runs to the end with every probe forced, returns the final answer
            (total, reasoning), index, em = stop_cost(trace, None), None, bool(trace.final_em)
        elif fallback or idle:  # plain full generation, no probes
            total = reasoning = full_cost(trace)
            index, em = None, bool(trace.final_em)
        else:
            (total, reasoning), index, em = stop_cost(trace, decision), decision, trace.stop_em(decision)
        d = self._learn(trace, decision, final_answer) if sampled else None
        return Served(index, decision, em, int(total), int(reasoning), sampled, fallback and not sampled,
                      idle and not fallback and not sampled, tau, d)

    def _learn(self, trace: Trace, decision: int | None, final_answer: str | None) -> int:
        cfg = self.config
        labelled = feedback_trace(trace, cfg.feedback, final_answer)
        d = int(bool(labelled.final_em)) - int(labelled.stop_em(decision))
        was = self.monitor.fallback
        if self.monitor.update(d) and not was and cfg.restart_on_alarm:
            self.t = 0
        if cfg.rule == "sa" and self.tau is not None:
            step = cfg.step0 / (1.0 + self.t / cfg.decay)
            x = _logit(self.tau) + step * (d - cfg.sa_target)
            self.tau = float(min(max(_sigmoid(x), self._lo), self._hi))
        self.t += 1
        self.n_feedback += 1
        self.window.append(labelled)
        self._since_refit += 1
        if self._since_refit >= cfg.refit_every:
            self.refit()
        return d

    def refit(self) -> None:
        """Re-adapt on the window from the meta-trained initialisation; selectors re-choose tau there."""
        cfg = self.config
        if cfg.rule == "sa":
            selector = FixedThreshold(self.tau)
        else:
            selector = make_selector(cfg.rule, delta=cfg.delta, alpha=cfg.alpha, value=cfg.tau0,
                                     token_price=cfg.token_price, wrong_answer_cost=cfg.wrong_answer_cost)
        self.policy = ProbePolicy(adapter=self.adapter, selector=selector, taus=cfg.taus,
                                  adapt_steps=cfg.adapt_steps, crossfit=cfg.crossfit, seed=cfg.seed + self.n_refits,
                                  name="online").fit(list(self.window))
        if cfg.rule != "sa":
            self.tau = self.policy.param
        self.n_refits += 1
        self._since_refit = 0
        self._update_idle()

    def _update_idle(self) -> None:
        """Idle while tau saves no tokens on the window (accounting as :func:`evaluate_policy` charges it)."""
        if self.tau is None:
            self.idle = True
        elif self.config.idle_when_not_saving:
            out = evaluate_policy(self.policy, list(self.window), param=self.tau)
            self.idle = not savings(out.total_tokens.sum(), out.full_tokens.sum()) > 0.0
        else:
            self.idle = False

    def learn(self, trace: Trace, decision: int | None, final_answer: str | None = None) -> int:
        """Feedback on a request served live (``maml_stop.serve``): ``trace`` ran to its end with every probe
        forced, ``decision`` is the stop index the policy in force chose on it before any feedback. The
        feedback step of :meth:`serve` (monitor, tau, window, re-adaptation); returns ``d``."""
        self.n_requests += 1
        return self._learn(trace, decision, final_answer)

    def live_predictor(self):
        """The predictor in force as a plain :class:`~maml_stop.learn.predictor.StoppingPredictor` (what
        :class:`~maml_stop.live.stopping.LiveStopping` runs)."""
        return fresh_copy(self.policy.model).eval()
