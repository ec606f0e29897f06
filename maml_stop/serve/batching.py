"""Dynamic batching on one model thread: requests that arrive within a short window go into one
``generate()`` with live stopping, and a row that stops (or ends) is answered at once while the others go on.

The thread owns the model and the online state: it takes the first waiting request and gathers more
until none came for ``window_ms`` (at most ``max_wait_ms`` after the first, ``max_batch`` in all), and
runs them; learning steps (feedback) queue behind
and run between batches, in the order their feedback was committed, so that the state a restart
replays from the store is the state that served. A batch whose rows follow different policies runs as
one generate() per arm and kind of criterion: rows of one arm that stop at tau and feedback runs (never
stop, every probe forced) share one :class:`~maml_stop.live.stopping.LiveStopping` with per-row
taus (``row_taus``); rows in fallback run a plain generate() without probes. A stopped row
stays in the batch tensor (``generate`` pads it) but its response is sent when it stops.

That is ``batch.engine: generate``. The default, ``continuous``, keeps one
:class:`~maml_stop.serve.decoder.Decoder` instead: waiting requests join the running batch at its next
step (up to ``max_batch`` active rows), rows of every arm and plan share each forward, a row leaves the
batch when it stops or ends, and learning steps run between two steps. When nothing runs, the first
request waits for others as above, so that they share one prefill.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from maml_stop.live.generate import result_row
from maml_stop.live.stopping import LiveStopping
from maml_stop.probe.forcing import eos_ids
from maml_stop.live.rule import StopRule
from maml_stop.serve.config import BatchConfig
from maml_stop.serve.decoder import Decoder, LiveRecord, LiveSpec
from maml_stop.serve.loop import OnlineLoop, Plan, trace_from_json

log = logging.getLogger(__name__)

__all__ = ["Job", "ModelWorker", "QueueFull", "live_trace"]


class QueueFull(RuntimeError):
    """More requests wait for the model than ``limits.max_queue``."""


@dataclass
class Job:
    """One accepted request waiting for the model."""

    request_id: str
    seq: int
    prompt: str  # rendered by the family's template
    prompt_tokens: int
    plan: Plan
    created: float
    future: cf.Future = field(default_factory=cf.Future)


class _Watch(StoppingCriteria):
    """Runs the live criterion (None: plain generation) and reports each row once, when it stops or
    emits EOS, with its generated tokens so far."""

    def __init__(self, inner: LiveStopping | None, width: int, eos: set[int], done: Callable[[int, list[int]], None]):
        self.inner, self.width, self.eos, self.done = inner, width, eos, done
        self.reported: set[int] = set()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        b = input_ids.shape[0]
        stop = self.inner(input_ids, scores) if self.inner is not None else \
            torch.zeros(b, dtype=torch.bool, device=input_ids.device)
        last = input_ids[:, -1].tolist()
        for r in range(b):
            if r not in self.reported and (bool(stop[r]) or last[r] in self.eos):
                self.reported.add(r)
                self.done(r, input_ids[r, self.width:].tolist())
        return stop


def live_trace(criteria: LiveStopping, row: int, result: dict[str, Any], trace_id: str, family: str) -> dict[str, Any]:
    """A feedback run (every probe forced, no stop) as a stored trace: the predictor's feature columns,
    probe positions and costs (trigger + answer tokens), answers, and the run's end (JSON-able)."""
    names = criteria.featurizer.feature_names
    feats = np.asarray(criteria.features[row], dtype=np.float32).reshape(len(criteria.features[row]), len(names))
    k = names.index("answer_tokens")
    lp = feats[:, names.index("logprob_mean")] if "logprob_mean" in names else np.zeros(len(feats))
    reasons = criteria.reasons[row]
    return {"id": trace_id, "family": family, "n_features": len(criteria.rule.columns),
            "features": feats[:, criteria.rule.columns].tolist(),
            "positions": list(criteria.positions[row]),
            "probe_tokens": [int(round(float(v))) + len(criteria.trigger_ids) for v in feats[:, k]],
            "probe_answers": list(criteria.probe_answers[row]), "logprob_mean": lp.tolist(),
            "reasoning_tokens": result["reasoning_tokens"], "hit_cap": result["end"] == "cap",
            "cap_probe": len(reasons) - 1 if reasons and reasons[-1] == "cap" else None}


class ModelWorker:
    """The model thread (module docstring). ``parts``: per arm, ``LiveStopping``'s constructor arguments
    from its artifact's recipe (:func:`maml_stop.live.recipe.live_parts`; the arms share the token cap)."""

    def __init__(self, model, tokenizer, family, parts: dict[str, dict[str, Any]], loop: OnlineLoop, store,
                 batch: BatchConfig, max_queue: int) -> None:
        self.model, self.tokenizer, self.family, self.loop, self.store = model, tokenizer, family, loop, store
        skip = ("predictor", "tau", "feature_names", "featurizer", "schedule", "mode")
        self.parts = {arm: (p["featurizer"], p["schedule"], {k: v for k, v in p.items() if k not in skip})
                      for arm, p in parts.items()}
        self.batch, self.max_queue = batch, max_queue
        self.cap = int(parts["A"]["max_new_tokens"])
        self.eos = set(eos_ids(model, tokenizer))
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos)
        self.device = next(model.parameters()).device
        tokenizer.padding_side = "left"
        self._q: queue.Queue = queue.Queue()
        self._lock = threading.Lock()  # a feedback's commit and its place in the queue go together
        self._thread = threading.Thread(target=self._run, name="maml-stop-model", daemon=True)
        self.states: dict[str, Any] = loop.states()  # refreshed by the thread after each batch and step
        self.batches = 0  # windows served
        self.generate_calls = self.generate_rows = 0
        self.generate_s = 0.0  # wall time inside generate()
        self.specs = {name: LiveSpec.from_parts(model, tokenizer, loop.arms[name].predictor(), loop.arms[name].feature_names,
                                                f, sched, loop.arms[name].mode, **rest)
                      for name, (f, sched, rest) in self.parts.items()} if batch.engine == "continuous" else {}
        self.decoder = Decoder(model, tokenizer, self.cap, self.eos, self._done, batch.max_batch) \
            if batch.engine == "continuous" else None  # refuses a generation config it cannot follow, now

    # -- from the HTTP threads ------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._q.put(None)
        self._thread.join(timeout)

    def queued(self) -> int:
        return self._q.qsize()

    def stats(self) -> dict[str, float]:
        """The model thread's counters: queue depth, generate() calls, their rows and wall time."""
        return {"queued": self._q.qsize(), "batches": self.batches, "generate_calls": self.generate_calls,
                "generate_rows": self.generate_rows, "generate_s": self.generate_s}

    def submit(self, job: Job) -> cf.Future:
        if self._q.qsize() >= self.max_queue:
            raise QueueFull(f"{self._q.qsize()} requests wait for the model (limits.max_queue = {self.max_queue})")
        self._q.put(job)
        return job.future

    def feedback(self, request_id: str, source: str, gold: str | None, correct: bool | None, em: bool | None) -> int:
        """Commit a feedback, then queue its learning step (run between batches); its number."""
        with self._lock:
            n = self.store.add_feedback(request_id, source, gold, correct, em)
            self._q.put(lambda: self._learn(n))
        return n

    # -- on the model thread --------------------------------------------------------------------
    def _run(self) -> None:
        torch.set_num_threads(max(1, torch.get_num_threads()))
        (self._run_continuous if self.batch.engine == "continuous" else self._run_generate)()

    def _run_generate(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            if not isinstance(item, Job):
                self._task(item)
                continue
            jobs, tasks, stop = self._gather(item)
            self._serve(jobs)
            for task in tasks:
                self._task(task)
            if stop:
                return

    def _gather(self, item: Job) -> tuple[list[Job], list[Callable[[], None]], bool]:
        """The batching window after job ``item``: its jobs, the learning steps that came meanwhile, and
        whether the stop signal came."""
        jobs, tasks, stop = [item], [], False
        first = last = time.monotonic()
        gap, most = self.batch.window_ms / 1000.0, self.batch.max_wait_ms / 1000.0
        while len(jobs) < self.batch.max_batch:
            wait = min(last + gap, first + most) - time.monotonic()
            if wait <= 0:
                break
            try:
                nxt = self._q.get(timeout=wait)
            except queue.Empty:
                break
            if nxt is None:
                stop = True
                break
            if isinstance(nxt, Job):
                jobs.append(nxt)
                last = time.monotonic()
            else:
                tasks.append(nxt)
        return jobs, tasks, stop

    def _run_continuous(self) -> None:
        dec = self.decoder
        waiting: list[Job] = []
        closing = False
        while True:
            tasks: list[Callable[[], None]] = []
            if not dec.rows and not waiting:  # idle: block, then the window for others to share the prefill
                if closing:
                    return
                item = self._q.get()
                if item is None:
                    return
                if not isinstance(item, Job):
                    self._task(item)
                    continue
                jobs, tasks, closing = self._gather(item)
                waiting += jobs
            else:  # running: whatever came since the last step
                while True:
                    try:
                        nxt = self._q.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is None:
                        closing = True
                    elif isinstance(nxt, Job):
                        waiting.append(nxt)
                    else:
                        tasks.append(nxt)
            room = self.batch.max_batch - len(dec.rows)
            if waiting and room > 0:
                take, waiting = waiting[:room], waiting[room:]
                self._decode(dec, lambda: dec.add([self._entry(j) for j in take]), take)
                self.batches += 1
            if dec.rows:
                self._decode(dec, dec.step, [])
            for task in tasks:
                self._task(task)

    def _decode(self, dec: Decoder, call: Callable[[], None], joining: list[Job]) -> None:
        """Run one decoder call; on an error answer every row in the batch (and ``joining``) with it."""
        started = time.perf_counter()
        try:
            call()
        except Exception as err:  # answer every active request, keep serving
            log.exception("the continuous batch failed with %d rows", len(dec.rows))
            for job in dec.fail() + joining:
                if not job.future.done():
                    job.future.set_exception(err)
        self.generate_s += time.perf_counter() - started
        self.generate_calls, self.generate_rows = dec.steps, dec.step_rows

    def _entry(self, job: Job) -> tuple[Job, list[int], LiveRecord | None]:
        """A job as a decoder row: its prompt ids and, unless it runs plain (fallback, idle), its live record
        (the arm's predictor in force, the plan's mode and live tau)."""
        ids = self.tokenizer(job.prompt, add_special_tokens=False)["input_ids"]
        if job.plan.kind == "full":
            return job, ids, None
        arm, spec = self.loop.arms[job.plan.arm], self.specs[job.plan.arm]
        mode = "every" if job.plan.kind == "feedback" else arm.mode
        rule = StopRule(spec.featurizer.feature_names, arm.predictor(), math.inf, mode, arm.feature_names)
        return job, ids, LiveRecord(spec, rule, job.plan.live_tau)

    def _done(self, job: Job, ids: list[int], live: LiveRecord | None) -> None:
        self._finish(job, 0, ids, live)
        self.states = self.loop.states()

    def _task(self, task: Callable[[], None]) -> None:
        try:
            task()
        except Exception:  # a failed learning step is logged; the service goes on serving
            log.exception("a learning step failed")
        self.states = self.loop.states()

    def _learn(self, n: int) -> None:
        row = self.store.feedback_row(n)
        if row is None or row.get("plan") is None:
            return
        d = self.loop.learn(row) if self.loop.learns_from(row["source"]) else None
        if row.get("em") is not None and row["source"] != "agreement":
            self.loop.record_outcome(row["seq"], row["arm"], bool(row["em"]), row["total_tokens"])
        if d is not None:
            s = self.loop.arms[row["arm"]].state()
            self.store.add_state(time.time(), row["arm"], n, d, s["tau"], s["fallback"], s["idle"], s["bound"],
                                 s["n_refits"])

    def _serve(self, jobs: list[Job]) -> None:
        groups: dict[tuple[str, str], list[Job]] = {}
        for job in jobs:
            arm = self.loop.arms[job.plan.arm]
            mode = "plain" if job.plan.kind == "full" else ("every" if job.plan.kind == "feedback" else arm.mode)
            groups.setdefault((job.plan.arm, mode), []).append(job)
        for (arm, mode), group in groups.items():
            try:
                self._generate(arm, mode, group)
            except Exception as err:  # answer every waiting request of the group, keep serving
                log.exception("generate failed for %d requests", len(group))
                for job in group:
                    if not job.future.done():
                        job.future.set_exception(err)
        self.batches += 1
        self.states = self.loop.states()

    def _generate(self, arm_name: str, mode: str, jobs: list[Job]) -> None:
        enc = self.tokenizer([j.prompt for j in jobs], return_tensors="pt", padding=True, add_special_tokens=False)
        enc = enc.to(self.device)
        width = enc["input_ids"].shape[1]
        criteria = None
        if mode != "plain":
            arm = self.loop.arms[arm_name]
            featurizer, schedule, rest = self.parts[arm_name]
            criteria = LiveStopping(self.model, self.tokenizer, arm.predictor(), math.inf, None, arm.feature_names,
                                    featurizer, schedule, **rest, mode=mode)
            criteria.row_taus = [j.plan.live_tau for j in jobs]
        watch = _Watch(criteria, width, self.eos, lambda r, ids: self._finish(jobs[r], r, ids, criteria))
        started = time.perf_counter()
        try:
            with torch.no_grad():
                seqs = self.model.generate(**enc, max_new_tokens=self.cap, do_sample=False, pad_token_id=self.pad,
                                           stopping_criteria=StoppingCriteriaList([watch]))
            self.generate_s += time.perf_counter() - started
            self.generate_calls += 1
            self.generate_rows += len(jobs)
            for r, job in enumerate(jobs):
                if r not in watch.reported:
                    self._finish(job, r, seqs[r, width:].tolist(), criteria)
        finally:
            if criteria is not None:
                criteria.remove_hooks()

    def _finish(self, job: Job, r: int, ids: list[int], criteria: LiveStopping | None) -> None:
        """Account, store and answer one row (a failure answers that request alone with the error)."""
        try:
            self._account(job, r, ids, criteria)
        except Exception as err:
            log.exception("request %s could not be finished", job.request_id)
            if not job.future.done():
                job.future.set_exception(err)

    def _account(self, job: Job, r: int, ids: list[int], criteria: LiveStopping | None) -> None:
        if criteria is not None:
            res = result_row(criteria, r, ids, self.eos, self.family, self.tokenizer, self.cap)
        else:
            first = next((i for i, t in enumerate(ids) if t in self.eos), None)
            n = len(ids) if first is None else first + 1
            text = self.tokenizer.decode(ids[:n], skip_special_tokens=True)
            res = {"answer": self.family.extract_answer(text), "total_tokens": n, "reasoning_tokens": n,
                   "stopped_at": None, "stopped_early": False, "end": "cap" if first is None else "eos", "probes": 0,
                   "forced": 0}
        res["reasoning"] = self.tokenizer.decode(ids[:res["reasoning_tokens"]], skip_special_tokens=True)
        trace = None
        if job.plan.kind == "feedback" and criteria is not None:
            trace = live_trace(criteria, r, res, job.request_id, self.family.name)
        extra = self.loop.finished(job.plan, None if trace is None else trace_from_json(trace))
        now = time.time()
        row = {**res, "arm": job.plan.arm, "plan": job.plan.kind, "tau": job.plan.tau, "fallback": job.plan.fallback,
               "idle": job.plan.idle, "finished": now, "latency_s": now - job.created, "trace": trace, **extra}
        self.store.add_decision(job.request_id, row)
        if trace is not None and self.loop.learns_from("agreement"):  # label-free: learn from its own answer
            self.feedback(job.request_id, "agreement", None, None, None)
        job.future.set_result(row)
