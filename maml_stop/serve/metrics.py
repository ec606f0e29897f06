"""``GET /metrics``: the service's counters and the online state in the Prometheus text format (0.0.4).

Counters come from the store (they survive a restart); gauges from the arms' state on the model
thread. ``maml_stop_policy_savings`` is the paired estimate on feedback runs (what stopping where the
policy in force chose saves against the same run's full generation), not a count of tokens saved on
the requests that stopped: their full length is never seen.

>>> text = render({"delta": 0.05, "arms": {}, "ab": None}, {"requests": 0, "feedback": 0, "by_plan": [],
...               "paired": [], "em": []},
...               {"queued": 0, "generate_calls": 0, "generate_rows": 0, "generate_s": 0.0})
>>> "maml_stop_delta 0.05" in text
True
"""

from __future__ import annotations

import math
from typing import Any

from maml_stop.data.accounting import savings

__all__ = ["render", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _value(x: Any) -> str:
    if x is None:
        return "NaN"
    if isinstance(x, bool):
        return "1" if x else "0"
    x = float(x)
    return "NaN" if math.isnan(x) else ("+Inf" if x == math.inf else repr(x) if x != int(x) else str(int(x)))


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
                     for k, v in labels.items())
    return "{" + inner + "}"


class _Text:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def metric(self, name: str, kind: str, help_text: str, samples: list[tuple[dict[str, str], Any]]) -> None:
        self.lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        self.lines += [f"{name}{_labels(labels)} {_value(v)}" for labels, v in samples]


def render(states: dict[str, Any], totals: dict[str, Any], worker: dict[str, float]) -> str:
    """The exposition text from the model thread's ``states`` (:meth:`OnlineLoop.states`) and counters
    (:meth:`ModelWorker.stats`), and the store's ``totals`` (:meth:`Store.totals`)."""
    t = _Text()
    plans = totals["by_plan"]
    t.metric("maml_stop_requests_total", "counter", "requests served, by arm and plan (stop, full, feedback)",
             [({"arm": r["arm"], "plan": r["plan"]}, r["n"]) for r in plans])
    t.metric("maml_stop_tokens_total", "counter", "tokens spent (reasoning + every forced answer), by arm and plan",
             [({"arm": r["arm"], "plan": r["plan"]}, r["tokens"] or 0) for r in plans])
    t.metric("maml_stop_stopped_early_total", "counter", "requests that live stopping ended before the cap",
             [({"arm": r["arm"], "plan": r["plan"]}, r["stopped"] or 0) for r in plans if r["plan"] == "stop"])
    t.metric("maml_stop_request_seconds_sum", "counter", "sum of request latencies (accepted to answered)",
             [({"arm": r["arm"], "plan": r["plan"]}, r["latency"] or 0.0) for r in plans])
    t.metric("maml_stop_feedback_total", "counter", "feedback received from clients", [({}, totals["feedback"])])
    t.metric("maml_stop_accepted_total", "counter", "requests accepted (also those still running)",
             [({}, totals["requests"])])
    t.metric("maml_stop_em", "gauge", "EM of the served answers that got gold feedback or a judgement",
             [({"arm": r["arm"]}, r["right"] / r["n"] if r["n"] else None) for r in totals["em"]])
    t.metric("maml_stop_policy_savings", "gauge", "paired savings of the policy in force on the feedback runs",
             [({"arm": r["arm"]}, savings(r["stop_cost"], r["full_cost"]) if r["full_cost"] else None)
              for r in totals["paired"]])
    t.metric("maml_stop_delta", "gauge", "the EM-drop target of the monitor", [({}, states["delta"])])
    arms = states["arms"]
    for key, kind, text in (("tau", "gauge", "threshold in force (NaN: never stop early)"),
                            ("fallback", "gauge", "1 while the monitor serves full generation"),
                            ("idle", "gauge", "1 while the policy saves nothing on its window (full generation)"),
                            ("bound", "gauge", "the monitor's one-sided bound on the EM drop"),
                            ("estimate", "gauge", "the monitor's EM-drop estimate on its window"),
                            ("n_window", "gauge", "feedbacks in the monitor's window"),
                            ("alarms", "counter", "times the monitor fell back"),
                            ("n_learned", "counter", "learning steps (feedback runs with feedback)"),
                            ("n_refits", "counter", "re-adaptations on the sliding window")):
        name = f"maml_stop_{key}" + ("_total" if kind == "counter" else "")
        t.metric(name, kind, text, [({"arm": a}, s[key]) for a, s in arms.items()])
    ab = states.get("ab")
    if ab is not None:
        t.metric("maml_stop_ab_pairs", "counter", "A/B pairs with both rewards known", [({}, ab["pairs"])])
        t.metric("maml_stop_ab_difference", "gauge", "mean reward A - B and its always-valid confidence sequence",
                 [({"q": "mean"}, ab["mean"]), ({"q": "lower"}, ab["lower"]), ({"q": "upper"}, ab["upper"])])
        t.metric("maml_stop_ab_verdict", "gauge", "the A/B verdict (1 on the one reached; none until then)",
                 [({"verdict": ab["verdict"]}, 1)] if ab["verdict"] else [])
    t.metric("maml_stop_queue_depth", "gauge", "requests and learning steps waiting for the model thread",
             [({}, worker["queued"])])
    t.metric("maml_stop_generate_calls_total", "counter", "model batches since start: generate() calls (batch.engine generate) or forwards (continuous)", [({}, worker["generate_calls"])])
    t.metric("maml_stop_generate_rows_total", "counter", "rows of those batches (mean rows per forward: rows / calls)",
             [({}, worker["generate_rows"])])
    t.metric("maml_stop_generate_seconds_total", "counter", "wall time inside generate() or the continuous decoder since start",
             [({}, worker["generate_s"])])
    return "\n".join(t.lines) + "\n"
