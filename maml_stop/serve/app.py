"""The HTTP routes of ``maml-stop serve`` (FastAPI): completions, feedback, metrics, the dashboard.

* ``POST /v1/completions``: an OpenAI-style completion request (``prompt``: the question, rendered by
  the artifact's family; ``model``, ``max_tokens``, ``user`` optional) -> an OpenAI-style response whose
  ``choices[0].text`` is the answer, plus a ``maml_stop`` block: the stop point, reasoning and forced
  tokens, the tokens left unspent under the cap, how the request was served (``stop``, ``full`` or a
  ``feedback`` run), the fallback state and tau, and whether feedback is asked for;
* ``POST /feedback``: ``{"request_id": ..., "gold": "42"}`` or ``{"request_id": ..., "correct": true}``,
  acknowledged once it is committed;
* ``GET /metrics``: Prometheus text; ``GET /api/state``: the dashboard's JSON; ``GET /``: the dashboard.

Bad input gets a 4xx whose ``error.message`` says why: malformed JSON (400), a field of the wrong type
or a value out of range (422), an unknown request id (404), a second feedback or one on a request still
running (409), an oversize prompt (413), a full queue (503).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field

from maml_stop.data.accounting import savings
from maml_stop.serve.batching import QueueFull
from maml_stop.serve.dashboard import PAGE
from maml_stop.serve.metrics import CONTENT_TYPE, render
from maml_stop.serve.service import Service
from maml_stop.serve.store import DuplicateFeedback
from tasks.base import Question

log = logging.getLogger(__name__)

__all__ = ["create_app", "CompletionRequest", "FeedbackRequest"]


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI clients send more (temperature, ...): ignored

    prompt: str = Field(min_length=1)
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    user: str | None = None
    stream: bool = False
    n: int = Field(default=1, ge=1)


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(min_length=1)
    gold: str | None = None
    correct: bool | None = None


class _Refused(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


def _response(service: Service, job, row: dict) -> dict:
    cap = service.worker.cap
    finish = {"stop": "early_stop", "eos": "stop", "cap": "length"}[row["end"]]
    return {
        "id": job.request_id, "object": "text_completion", "created": int(job.created), "model": service.model_name,
        "choices": [{"index": 0, "text": row["answer"] or "", "finish_reason": finish, "logprobs": None}],
        "usage": {"prompt_tokens": job.prompt_tokens, "completion_tokens": row["total_tokens"],
                  "total_tokens": job.prompt_tokens + row["total_tokens"]},
        "maml_stop": {
            "stopped_at": row["stopped_at"], "stopped_early": row["stopped_early"], "end": row["end"],
            "reasoning_tokens": row["reasoning_tokens"], "forced_answers": row["forced"], "probes": row["probes"],
            "tokens_saved_vs_cap": max(cap - row["reasoning_tokens"], 0) if row["end"] == "stop" else 0,
            "served_by": row["plan"], "fallback": row["fallback"], "idle": row["idle"], "tau": row["tau"],
            "arm": row["arm"], "feedback_requested": row["plan"] == "feedback", "reasoning": row["reasoning"],
            "latency_s": round(row["latency_s"], 4),
        },
    }


def create_app(service: Service) -> FastAPI:
    """The app around a built :class:`Service` (its model thread starts and stops with the app)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.start()
        yield
        service.stop()

    app = FastAPI(title="maml-stop serve", lifespan=lifespan)
    feedback_lock = threading.Lock()  # the unknown/running/duplicate checks and the commit, together

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        errors = err.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return _error(400, "malformed JSON: " + "; ".join(str(e.get("ctx", {}).get("error", e["msg"]))
                                                               for e in errors))
        parts = [f"{'.'.join(str(x) for x in e['loc'][1:]) or 'body'}: {e['msg']}" for e in errors]
        return _error(422, "; ".join(parts))

    @app.exception_handler(_Refused)
    async def refused(request: Request, err: _Refused) -> JSONResponse:
        return _error(err.status, err.message, err.kind)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        if body.model is not None and body.model != service.model_name:
            raise _Refused(404, f"model {body.model!r} is not served here; this service serves {service.model_name!r}",
                           "model_not_found")
        if body.stream or body.n != 1:
            raise _Refused(422, "stream and n > 1 are not supported: one answer per request, sent whole")
        cap = service.worker.cap
        if body.max_tokens is not None and body.max_tokens != cap:
            raise _Refused(422, f"max_tokens is the artifact's token cap here ({cap}); got {body.max_tokens}")
        job = service.accept(body.prompt)
        limit = service.config.limits.max_prompt_tokens
        if job.prompt_tokens > limit:
            raise _Refused(413, f"the prompt is {job.prompt_tokens} tokens once rendered; the limit is {limit} "
                                "(limits.max_prompt_tokens)")
        service.record(job, body.prompt)
        try:
            future = service.worker.submit(job)
        except QueueFull as err:
            raise _Refused(503, str(err), "overloaded") from None
        try:
            row = await asyncio.wrap_future(future)
        except Exception as err:  # generate failed: logged on the model thread
            raise _Refused(500, f"generation failed: {type(err).__name__}: {err}", "server_error") from None
        return _response(service, job, row)

    @app.post("/feedback")
    async def feedback(body: FeedbackRequest):
        if (body.gold is None) == (body.correct is None):
            raise _Refused(422, "give exactly one of gold (the gold answer) and correct (a judgement of the answer)")
        with feedback_lock:
            req = service.store.request(body.request_id)
            if req is None:
                raise _Refused(404, f"unknown request id {body.request_id!r}", "not_found")
            if req.get("plan") is None:
                raise _Refused(409, f"request {body.request_id} is still running; send feedback after its answer")
            if service.store.has_feedback(body.request_id):
                raise _Refused(409, f"request {body.request_id} already has feedback; a request takes one")
            if body.gold is not None:

                q = Question(body.request_id, service.family.name, "live", req["prompt"], body.gold)
                em, source = bool(service.family.score(req["answer"], q)), "gold"
            else:
                em, source = bool(body.correct), "judgement"
            try:
                n = service.worker.feedback(body.request_id, source, body.gold, body.correct, em)
            except DuplicateFeedback as err:
                raise _Refused(409, str(err)) from None
        return {"request_id": body.request_id, "feedback": n, "em": em, "committed": True,
                "learns": service.loop.learns_from(source) and req["plan"] == "feedback"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(render(service.worker.states, service.store.totals(), service.worker.stats()),
                                 media_type=CONTENT_TYPE)

    @app.get("/api/state")
    async def state():
        states, totals = service.worker.states, service.store.totals()
        paired = {r["arm"]: r for r in totals["paired"]}
        arms = {}
        for name, s in states["arms"].items():
            p = paired.get(name)
            arms[name] = {**s, "policy_savings": savings(p["stop_cost"], p["full_cost"]) if p and p["full_cost"]
                          else None}
        return {"states": {**states, "arms": arms}, "totals": totals, "series": service.store.series()}

    @app.get("/", response_class=HTMLResponse)
    async def dashboard():
        return HTMLResponse(PAGE)

    return app
