"""The online loop inside live use: which policy serves a request, what a feedback run teaches, and the
A/B test, rebuilt from the store on restart.

An **arm** is one serving policy: an adapted artifact re-adapted online by an
:class:`~maml_stop.online.OnlineStopper` (given the meta-trained checkpoint and the K support traces:
``maml-stop adapt``'s road, :meth:`~maml_stop.learn.adapter.InnerLoopAdapter.fit_support` on a sliding
window), or the artifact frozen with only its :class:`~maml_stop.online.DropMonitor` learning. Request
``seq`` is served (:meth:`OnlineLoop.plan`):

* ``feedback``: drawn with probability ``sample_rate`` (a coin seeded by ``seq``, so a restart draws the
  same): it runs to its end with every probe forced (live tau inf); the decision the policy in force
  would have made on it is stored with its trace, and its feedback (gold from ``POST /feedback``, or the
  label-free agreement with its own final answer) is one step of the online stopper;
* ``full``: while the monitor holds the fallback (its bound above delta) or the policy saves nothing on
  its window (idle): plain ``generate()``, no probes;
* ``stop``: live stopping at the arm's tau.

With two arms (A/B), the requests are paired (``seq`` 2k and 2k+1), a coin seeded by k sends one to
each, and a pair whose two answers both got gold feedback (or a judgement) is one step of the always-valid
test (:class:`~maml_stop.online.SequentialAB`) on the reward ``-(token_price * tokens + wrong_answer_cost *
(1 - EM))``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from maml_stop.data.accounting import full_cost, stop_cost
from maml_stop.data.corpus import Trace
from maml_stop.live.rule import replay
from maml_stop.online import DropMonitor, OnlineConfig, OnlineStopper, SequentialAB, feedback_trace, reward
from maml_stop.serve.config import ServeConfig
from tasks.base import Question

log = logging.getLogger(__name__)

__all__ = ["Arm", "Plan", "OnlineLoop", "PLANS", "trace_from_json", "labelled"]

PLANS = ("stop", "full", "feedback")


@dataclass(frozen=True)
class Plan:
    """How one request is served (module docstring)."""

    arm: str
    kind: str  # one of PLANS
    live_tau: float  # the tau of its row as LiveStopping takes it (inf: never stops)
    tau: float | None  # the arm's tau in force (None: never stop early), what the store records
    fallback: bool
    idle: bool


class Arm:
    """One serving policy: online (``stopper``) or frozen (the artifact and a monitor)."""

    def __init__(self, name: str, predictor, tau: float | None, feature_names: list[str], mode: str,
                 online: OnlineConfig, stopper: OnlineStopper | None = None) -> None:
        self.name, self.feature_names, self.mode, self.online = name, feature_names, mode, online
        self.stopper = stopper
        self._predictor, self._tau = predictor, tau
        if stopper is None:
            self._monitor = DropMonitor(online.delta, online.monitor,
                                        signed=online.monitor.net and online.feedback == "gold")
        self.n_learned = 0

    @property
    def monitor(self) -> DropMonitor:
        return self.stopper.monitor if self.stopper is not None else self._monitor

    @property
    def tau(self) -> float | None:
        return self.stopper.tau if self.stopper is not None else self._tau

    @property
    def fallback(self) -> bool:
        return self.monitor.fallback

    @property
    def idle(self) -> bool:
        return self.stopper.idle if self.stopper is not None else self._tau is None

    @property
    def n_refits(self) -> int:
        return self.stopper.n_refits if self.stopper is not None else 0

    def predictor(self):
        """The predictor in force (a fresh copy after each re-adaptation)."""
        if self.stopper is not None and self.stopper.n_refits != getattr(self, "_copied_at", None):
            self._predictor, self._copied_at = self.stopper.live_predictor(), self.stopper.n_refits
        return self._predictor

    def decide(self, trace: Trace) -> int | None:
        """The stop index the policy in force chooses on a finished trace (None: it runs to the end)."""
        if self.stopper is not None:
            return self.stopper.decide(trace)
        if self._tau is None:
            return None
        return replay(trace.features, self.feature_names, trace.probe_answers, self._predictor, self._tau,
                      self.mode).stop

    def learn(self, trace: Trace, decision: int | None, final_answer: str | None) -> int:
        """One feedback run labelled (gold) or not (agreement: labelled here); returns ``d``."""
        self.n_learned += 1
        if self.stopper is not None:
            return self.stopper.learn(trace, decision, final_answer)
        fed = feedback_trace(trace, self.online.feedback, final_answer)
        d = int(bool(fed.final_em)) - int(fed.stop_em(decision))
        self.monitor.update(d)
        return d

    def state(self) -> dict[str, Any]:
        m = self.monitor
        return {"tau": self.tau, "fallback": self.fallback, "idle": self.idle, "bound": m.bound() if m.n else None,
                "estimate": m.estimate() if m.n else None, "n_window": m.n, "alarms": m.alarms,
                "n_learned": self.n_learned, "n_refits": self.n_refits, "online": self.stopper is not None}


def trace_from_json(t: dict[str, Any]) -> Trace:
    """A stored feedback run (``decisions.trace``) as a :class:`Trace` (labels 0 until feedback)."""
    p = len(t["positions"])
    feats = np.asarray(t["features"], dtype=np.float32).reshape(p, int(t["n_features"]))
    return Trace(trace_id=t["id"], family=t["family"], split="live", features=feats,
                 labels=np.zeros(p, dtype=np.float32), positions=np.asarray(t["positions"], dtype=np.int64),
                 probe_tokens=np.asarray(t["probe_tokens"], dtype=np.int64), probe_answers=list(t["probe_answers"]),
                 logprob_mean=np.asarray(t["logprob_mean"], dtype=np.float32), final_em=False,
                 reasoning_tokens=int(t["reasoning_tokens"]), hit_cap=bool(t["hit_cap"]), cap_probe=t["cap_probe"])


def labelled(trace: Trace, final_answer: str | None, gold: str | None, correct: bool | None, family) -> Trace:
    """The feedback run labelled by a gold answer (probe EM by the family's checker), or by a judgement of
    its final answer: right makes the final answer the gold one; wrong labels every probe 0 (no credit
    for what it cannot check) with ``final_em`` 0."""

    if gold is None and not correct:
        return dataclasses.replace(trace, labels=np.zeros_like(trace.labels), final_em=False)
    q = Question(trace.trace_id, trace.family, "live", "", gold if gold is not None else (final_answer or ""))
    labels = np.asarray([float(family.score(a, q)) for a in trace.probe_answers], dtype=np.float32)
    return dataclasses.replace(trace, labels=labels, final_em=bool(family.score(final_answer, q)))


class OnlineLoop:
    """Every arm's state, the A/B test, and their replay from the store (module docstring)."""

    def __init__(self, arms: dict[str, Arm], config: ServeConfig, family) -> None:
        if not arms or (len(arms) == 2) != (config.artifact_b is not None) or len(arms) > 2:
            raise ValueError(f"need arm A, and arm B exactly when artifact_b is given; got {sorted(arms)}")
        self.arms, self.config, self.family = arms, config, family
        self.ab = SequentialAB(config.ab) if len(arms) == 2 else None
        self.verdict: str | None = None
        self._rewards: dict[int, float] = {}  # seq -> reward, for A/B pairs not complete yet

    # -- serving ----------------------------------------------------------------------------------
    def arm_of(self, seq: int) -> str:
        if self.ab is None:
            return "A"
        a_first = np.random.default_rng([self.config.online.seed, seq // 2, 1]).random() < 0.5
        return "A" if (seq % 2 == 0) == a_first else "B"

    def plan(self, seq: int) -> Plan:
        arm = self.arms[self.arm_of(seq)]
        sampled = np.random.default_rng([self.config.online.seed, seq]).random() < self.config.online.sample_rate
        fallback, idle, tau = arm.fallback, arm.idle, arm.tau
        if sampled:
            kind, live_tau = "feedback", math.inf
        elif fallback or idle:
            kind, live_tau = "full", math.inf
        else:
            kind, live_tau = "stop", float(tau)
        return Plan(arm.name, kind, live_tau, tau, fallback, idle)

    def finished(self, plan: Plan, trace: Trace | None) -> dict[str, Any]:
        """The decision columns of a feedback run: the policy's counterfactual stop and the paired costs."""
        if plan.kind != "feedback" or trace is None:
            return {}
        decision = self.arms[plan.arm].decide(trace) if trace.n_probes else None
        return {"decision": decision, "full_cost": full_cost(trace), "stop_cost": stop_cost(trace, decision)[0]}

    # -- learning ---------------------------------------------------------------------------------
    def learns_from(self, source: str) -> bool:
        """Does a feedback of ``source`` (gold, judgement, agreement) step the arms? Gold and judgements
        under ``feedback: gold``; the label-free agreement under ``feedback: agreement``."""
        return (source == "agreement") == (self.config.online.feedback == "agreement")

    def learn(self, row: dict[str, Any]) -> int | None:
        """One learning step from a stored feedback run (``row``: its decision with ``trace`` and the
        feedback's ``gold``/``correct``); returns ``d`` (None when the request was not a feedback run, or one
        that ended before its first probe: it tells nothing about stopping)."""
        if row.get("plan") != "feedback" or row.get("trace") is None or not row["trace"]["positions"]:
            return None
        trace = trace_from_json(row["trace"])
        if self.config.online.feedback == "gold":
            trace = labelled(trace, row["answer"], row.get("gold"), row.get("correct"), self.family)
        return self.arms[row["arm"]].learn(trace, row["decision"], row["answer"] or "")

    def record_outcome(self, seq: int, arm: str, em: bool, tokens: int) -> str | None:
        """The EM of a served answer (gold feedback or a judgement): one side of an A/B pair."""
        if self.ab is None:
            return None
        cfg = self.config.ab
        self._rewards[seq] = reward(em, tokens, cfg.token_price, cfg.wrong_answer_cost)
        mate = seq ^ 1
        if mate not in self._rewards:
            return None
        mine, other = self._rewards.pop(seq), self._rewards.pop(mate)
        r_a, r_b = (mine, other) if arm == "A" else (other, mine)
        verdict = self.ab.update(r_a, r_b)
        if verdict is not None and self.verdict is None:
            self.verdict = verdict
            log.info("A/B verdict after %d pairs: %s", self.ab.n, verdict)
        return verdict

    def rebuild(self, store) -> int:
        """Replay the store's feedback in commit order (and the agreement runs in decision order): the
        arms, monitors, windows and the A/B test as they were. Returns the learning steps replayed."""
        steps = 0
        for row in store.feedback_log():
            if row.get("plan") is None:  # the request never finished: nothing to replay
                continue
            if self.learns_from(row["source"]) and self.learn(row) is not None:
                steps += 1
            if row.get("em") is not None:
                self.record_outcome(row["seq"], row["arm"], bool(row["em"]), row["total_tokens"])
        return steps

    def states(self) -> dict[str, Any]:
        """Every arm's state and the A/B test's now (read on the model thread; /metrics shows a copy)."""
        ab = None
        if self.ab is not None:
            ab = {"pairs": self.ab.n, "mean": self.ab.mean if self.ab.n else None, "lower": _num(self.ab.lower),
                  "upper": _num(self.ab.upper), "verdict": self.verdict}
        return {"delta": self.config.online.delta, "arms": {n: a.state() for n, a in self.arms.items()}, "ab": ab}


def _num(x: float) -> float | None:
    return x if math.isfinite(x) else None
