"""The service's start-up: load the model and the adapted artifact(s), refuse a mismatch naming both,
build the arms (online when the corpus of the K support traces is given), open the store and rebuild
the online state from it, and start the model thread."""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import threading
import time
import uuid
from typing import Any

from maml_stop.live.artifact import AdaptError, load_adapted
from maml_stop.live.recipe import live_parts
from maml_stop.live.stopping import LiveStopping
from maml_stop.online import OnlineStopper
from maml_stop.serve.batching import Job, ModelWorker
from maml_stop.serve.config import ServeConfig
from maml_stop.serve.loop import Arm, OnlineLoop
from maml_stop.serve.store import Store
from maml_stop.data.corpus import TraceCorpus
from maml_stop.data.datamodule import select_features
from maml_stop.learn.module import load_predictor
from tasks.base import Question, question_id, split_of
from maml_stop.harvest.model import load_model

log = logging.getLogger(__name__)

__all__ = ["Service", "ServeError"]


class ServeError(ValueError):
    """A configuration the service refuses to start with (the message names the parts that clash)."""


def _family(parts: dict[str, Any], path: str):
    family = parts["family"]
    if family is None:
        raise ServeError(f"artifact {path} names a family outside the task registry: serve needs it to render prompts")
    return family


def _arm(name: str, path: str, parts: dict[str, Any], config: ServeConfig, family) -> Arm:
    adapted = load_adapted(path)
    names = list(parts["feature_names"])
    if config.corpus is None:
        return Arm(name, parts["predictor"], adapted.tau, names, parts["mode"], config.online)
    if parts["mode"] != "every":
        raise ServeError(f"online re-adaptation decides as live mode 'every'; artifact {path} runs in mode "
                         f"{parts['mode']!r}: serve it without --corpus (frozen, monitored)")

    checkpoint = config.checkpoint or adapted.meta.get("checkpoint")
    if not checkpoint:
        raise ServeError(f"artifact {path} records no checkpoint: pass --checkpoint for online re-adaptation")
    _, adapter, _ = load_predictor(checkpoint)
    ids = set(adapted.meta.get("support_trace_ids") or [])
    support = [t for t in select_features(TraceCorpus.load(config.corpus), names).traces(family.name)
               if t.trace_id in ids]
    if not support:
        raise ServeError(f"corpus {config.corpus} holds none of the {len(ids)} support traces of artifact {path}")
    online = config.online if config.online.tau0 is not None else dataclasses.replace(config.online,
                                                                                        tau0=adapted.tau)
    stopper = OnlineStopper(adapter, support, online)
    return Arm(name, stopper.live_predictor(), stopper.tau, names, parts["mode"], online, stopper)


class Service:
    """Everything ``maml-stop serve`` runs (``model``/``tokenizer`` given: already loaded, e.g. in tests)."""

    def __init__(self, config: ServeConfig, model=None, tokenizer=None) -> None:
        self.config = config
        if model is None:

            model, tokenizer = load_model(config.model, config.dtype, device=config.device)
        self.model, self.tokenizer = model, tokenizer
        paths = {"A": config.artifact, **({"B": config.artifact_b} if config.artifact_b else {})}
        parts = {name: _parts(config, path, model, tokenizer) for name, path in paths.items()}
        self.family = _family(parts["A"], config.artifact)
        if "B" in parts:
            for key in ("max_new_tokens", "reasoning_format"):
                if parts["A"][key] != parts["B"][key]:
                    raise ServeError(f"artifacts {config.artifact} and {config.artifact_b} differ in {key} "
                                     f"({parts['A'][key]!r} vs {parts['B'][key]!r}): an A/B test needs the same")
            if _family(parts["B"], config.artifact_b).name != self.family.name:
                raise ServeError(f"artifacts {config.artifact} ({self.family.name}) and {config.artifact_b} "
                                 f"({parts['B']['family'].name}) were adapted on different families")
        self.store = Store(config.db)
        arms = {name: _arm(name, paths[name], parts[name], config, self.family) for name in paths}
        self.loop = OnlineLoop(arms, config, self.family)
        started = time.monotonic()
        self.replayed = self.loop.rebuild(self.store)
        log.info("rebuilt the online state from %s: %d learning steps in %.1f s", config.db, self.replayed,
                 time.monotonic() - started)
        try:
            self.worker = ModelWorker(model, tokenizer, self.family, parts, self.loop, self.store, config.batch,
                                      config.limits.max_queue)
        except ValueError as err:  # e.g. a generation config the continuous decoder cannot follow
            raise ServeError(f"model {config.model}: {err}") from None
        # the HTTP threads render and count prompts with their own copy: a fast tokenizer used from two
        # threads at once fails ("Already borrowed"), and the model thread uses this one throughout generate
        self._prompt_tok = copy.deepcopy(tokenizer)
        self._prompt_lock = threading.Lock()
        self._seq_lock = threading.Lock()
        self._next_seq = self.store.next_seq()
        self.model_name = config.model

    def start(self) -> None:
        self.worker.start()

    def stop(self) -> None:
        """Stop the model thread (the queued learning steps run first); the store stays readable."""
        self.worker.stop()

    def close(self) -> None:
        self.stop()
        self.store.close()

    def accept(self, question: str) -> Job:
        """Render, number, plan and store one request; the job to submit (the caller checks its size)."""
        with self._prompt_lock:
            prompt = self.family.render_prompt(_question(self.family, question), self._prompt_tok,
                                               self.worker.parts["A"][2]["reasoning_format"])
            n_tokens = len(self._prompt_tok(prompt, add_special_tokens=False)["input_ids"])
        with self._seq_lock:
            seq = self._next_seq
            self._next_seq += 1
            plan = self.loop.plan(seq)
            request_id = f"cmpl-{uuid.uuid4().hex[:20]}"
            created = time.time()
            job = Job(request_id, seq, prompt, n_tokens, plan, created)
        return job

    def record(self, job: Job, question: str) -> None:
        self.store.add_request(job.request_id, job.seq, job.created, job.plan.arm, question)


def _parts(config: ServeConfig, path: str, model, tokenizer) -> dict[str, Any]:
    try:
        parts = live_parts(path, model)
    except (AdaptError, FileNotFoundError) as err:
        raise ServeError(f"model {config.model} does not fit artifact {path}: {err}") from None
    rest = {k: v for k, v in parts.items() if k not in ("predictor", "tau", "feature_names", "featurizer",
                                                        "schedule")}
    try:  # a trial criterion: a mid layer or trigger the model cannot give fails now, not on a request
        LiveStopping(model, tokenizer, parts["predictor"], math.inf, None, parts["feature_names"],
                     parts["featurizer"], parts["schedule"], **rest).remove_hooks()
    except ValueError as err:
        raise ServeError(f"model {config.model} does not fit artifact {path}: {err}") from None
    return parts


def _question(family, text: str):

    return Question(question_id(family.name, text), family.name, split_of(text), text, "")
