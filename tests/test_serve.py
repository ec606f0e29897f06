"""``maml-stop serve`` (issue 27) on the tiny local model: a batch served with mixed policies gives each
request what live stopping gives it alone; bad input gets a 4xx with the reason; the metrics are the
store's counts; a restart rebuilds the online state from SQLite; the dashboard is self-contained."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from serve_helpers import FAMILY, client, make_config, parse_metrics, post_all, questions, service  # noqa: E402
from test_feature_subsets import harvested  # noqa: E402,F401  (a fixture)
from test_generate_cmd import artifact  # noqa: E402,F401  (a fixture)

KEYS = ("answer", "total_tokens", "reasoning_tokens", "stopped_at", "end")


def _alone(harvested, path, qs, never: bool):  # noqa: F811
    """What ``maml-stop generate`` gives each question alone, at the artifact's tau or never stopping."""
    from maml_stop.live.artifact import load_adapted, save_adapted
    from maml_stop.live.generate import InputQuestion, generate_answers
    from maml_stop.live.stopping import LiveStopping
    from tasks import get_family

    _, model, tok = harvested
    if never:
        adapted = load_adapted(path)
        adapted.tau = None
        path = save_adapted(adapted, str(path) + ".never.pt")
    criteria = LiveStopping.from_adapted(path, model, tok)
    try:
        return generate_answers(criteria, model, tok, get_family(FAMILY), [InputQuestion(q.question) for q in qs], 1)
    finally:
        criteria.remove_hooks()


@pytest.fixture(scope="module")
def half_artifact(harvested, artifact, tmp_path_factory):  # noqa: F811
    """The artifact with tau at the median of the 8 test questions' highest probe probabilities: about
    half of them stop."""
    import numpy as np

    from maml_stop.live.artifact import load_adapted, save_adapted
    from maml_stop.live.generate import InputQuestion, generate_answers
    from maml_stop.live.stopping import LiveStopping
    from tasks import get_family

    _, model, tok = harvested
    adapted = load_adapted(artifact)
    adapted.tau = None
    root = tmp_path_factory.mktemp("half")
    never = LiveStopping.from_adapted(save_adapted(adapted, root / "never.pt"), model, tok)
    try:
        generate_answers(never, model, tok, get_family(FAMILY), [InputQuestion(q.question) for q in questions(8)], 8)
    finally:
        never.remove_hooks()
    adapted.tau = float(np.median([max(p for p in row if p is not None) for row in never.probabilities]))
    return str(save_adapted(adapted, root / "half.pt"))


@pytest.mark.parametrize("engine", ["continuous", "generate"])
def test_mixed_batch_gives_each_request_its_own_answer(harvested, half_artifact, tmp_path, engine):  # noqa: F811
    """Rows that stop at tau and feedback runs (never stop, every probe forced) share one batch (the
    continuous decoder's forwards, or one generate()); each answer and bill equals that question's alone;
    a stopped row leaves before the batch ends."""
    from maml_stop.data.accounting import stop_cost
    from maml_stop.serve.config import BatchConfig
    from maml_stop.serve.loop import trace_from_json

    artifact = half_artifact
    qs = questions(8)
    cfg = make_config(harvested, artifact, tmp_path / "s.sqlite", online={"sample_rate": 0.5},
                      batch=BatchConfig(window_ms=50.0, max_wait_ms=100.0, max_batch=8, engine=engine))
    svc = service(harvested, cfg)
    with client(svc) as c:
        out = post_all(c, [q.question for q in qs])
    plans = [o["maml_stop"]["served_by"] for o in out]
    assert set(plans) == {"stop", "feedback"}, plans
    assert svc.worker.batches < len(qs)  # requests met in batches
    stop_alone = _alone(harvested, artifact, qs, never=False)
    never_alone = _alone(harvested, artifact, qs, never=True)
    early = 0
    for o, a, n in zip(out, stop_alone, never_alone):
        m = o["maml_stop"]
        ref = a if m["served_by"] == "stop" else n
        got = {"answer": o["choices"][0]["text"] or None, "total_tokens": o["usage"]["completion_tokens"],
               "reasoning_tokens": m["reasoning_tokens"], "stopped_at": m["stopped_at"], "end": m["end"]}
        assert got == {k: ref[k] if k != "answer" else (ref[k] or None) for k in KEYS}, (m["served_by"], got, ref)
        assert m["feedback_requested"] == (m["served_by"] == "feedback") and not m["fallback"]
        early += m["end"] == "stop"
        row = svc.store.request(o["id"])
        if m["served_by"] == "feedback":  # its stored trace bills what the response says
            trace = trace_from_json(row["trace"])
            assert stop_cost(trace, None)[0] == o["usage"]["completion_tokens"]
            assert row["full_cost"] == trace.reasoning_tokens + (trace.probe_tokens[trace.cap_probe]
                                                                 if trace.cap_probe is not None else 0)
        else:
            assert row["trace"] is None and math.isclose(row["tau"], m["tau"])
    assert early >= 1
    # the stopped rows were answered while the others ran: their latency is below the batch's longest
    rows = [svc.store.request(o["id"]) for o in out]
    stopped = [r["latency_s"] for r in rows if r["end_reason"] == "stop"]
    assert min(stopped) < max(r["latency_s"] for r in rows)


def test_bad_input_gets_a_4xx_with_the_reason(harvested, artifact, tmp_path):  # noqa: F811
    from maml_stop.serve.config import LimitsConfig

    cfg = make_config(harvested, artifact, tmp_path / "e.sqlite", limits=LimitsConfig(max_prompt_tokens=160))
    svc = service(harvested, cfg)
    q = questions(1)[0]
    with client(svc) as c:
        def err(path, status, **kw):
            r = c.post(path, **kw)
            assert r.status_code == status, r.text
            return r.json()["error"]["message"]

        assert "malformed JSON" in err("/v1/completions", 400, content=b'{"prompt": ', headers={"content-type": "application/json"})
        assert "prompt: Field required" in err("/v1/completions", 422, json={"model": "x"})
        msg = err("/v1/completions", 413, json={"prompt": q.question + " and" * 80})
        assert "tokens once rendered; the limit is 160" in msg
        assert "max_tokens is the artifact's token cap here (20)" in err("/v1/completions", 422,
                                                                          json={"prompt": q.question, "max_tokens": 7})
        assert "is not served here" in err("/v1/completions", 404, json={"prompt": q.question, "model": "gpt-x"})
        ok = c.post("/v1/completions", json={"prompt": q.question, "max_tokens": 20, "temperature": 0})
        assert ok.status_code == 200, ok.text
        rid = ok.json()["id"]
        assert "unknown request id 'cmpl-nope'" in err("/feedback", 404, json={"request_id": "cmpl-nope", "gold": "1"})
        assert "exactly one of gold" in err("/feedback", 422, json={"request_id": rid})
        assert "exactly one of gold" in err("/feedback", 422, json={"request_id": rid, "gold": "1", "correct": True})
        assert "Extra inputs" in err("/feedback", 422, json={"request_id": rid, "gold": "1", "note": "x"})
        first = c.post("/feedback", json={"request_id": rid, "gold": q.gold})
        assert first.status_code == 200 and first.json()["committed"]
        assert "already has feedback" in err("/feedback", 409, json={"request_id": rid, "correct": True})
    assert svc.store.count("feedback") == 1


def test_a_model_that_does_not_fit_the_artifact_refuses_to_start(harvested, artifact, tmp_path):  # noqa: F811
    from maml_stop.live.artifact import load_adapted, save_adapted
    from maml_stop.serve.service import ServeError

    adapted = load_adapted(artifact)
    adapted.recipe["featurizer"]["hidden_size"] = 16
    other = str(save_adapted(adapted, tmp_path / "h16.pt"))
    cfg = make_config(harvested, other, tmp_path / "m.sqlite")
    with pytest.raises(ServeError) as err:
        service(harvested, cfg)
    assert cfg.model in str(err.value) and other in str(err.value) and "hidden size 32" in str(err.value)
    both = make_config(harvested, artifact, tmp_path / "m2.sqlite", artifact_b=other)
    with pytest.raises(ServeError, match="does not fit artifact .*h16.pt"):
        service(harvested, both)


def test_metrics_count_what_the_store_holds(harvested, artifact, tmp_path):  # noqa: F811
    qs = questions(4)
    cfg = make_config(harvested, artifact, tmp_path / "p.sqlite", online={"sample_rate": 0.5})
    svc = service(harvested, cfg)
    with client(svc) as c:
        out = post_all(c, [q.question for q in qs])
        for o, q in zip(out, qs):
            assert c.post("/feedback", json={"request_id": o["id"], "gold": q.gold}).status_code == 200
        svc.worker.stop()  # the learning steps queued behind the feedback have run
        text = c.get("/metrics")
        state = c.get("/api/state").json()
    assert text.headers["content-type"].startswith("text/plain; version=0.0.4")
    m = parse_metrics(text.text)
    assert sum(m["maml_stop_requests_total"].values()) == len(qs) == m["maml_stop_accepted_total"][""]
    assert m["maml_stop_feedback_total"][""] == len(qs)
    plans = [o["maml_stop"]["served_by"] for o in out]
    assert m["maml_stop_requests_total"].get('arm="A",plan="feedback"', 0) == plans.count("feedback")
    spent = sum(o["usage"]["completion_tokens"] for o in out)
    assert sum(m["maml_stop_tokens_total"].values()) == spent
    assert m["maml_stop_n_learned_total"]['arm="A"'] == plans.count("feedback")
    assert m["maml_stop_delta"][""] == cfg.online.delta
    em = [svc.family.score(o["choices"][0]["text"], q) for o, q in zip(out, qs)]
    assert math.isclose(m["maml_stop_em"]['arm="A"'], sum(em) / len(em))
    assert state["states"]["arms"]["A"]["n_learned"] == plans.count("feedback")
    assert len(state["series"]["decisions"]) == len(qs) and len(state["series"]["states"]) == plans.count("feedback")


def _state(svc) -> dict:
    arm = svc.loop.arms["A"]
    st = arm.stopper
    return {"arm": arm.state(), "window": [t.trace_id for t in st.window], "diffs": list(st.monitor.diffs),
            "t": st.t, "weights": {k: v.tolist() for k, v in arm.predictor().state_dict().items()}}


def test_restart_rebuilds_the_online_state_from_sqlite(harvested, artifact, tmp_path):  # noqa: F811
    """Online arm (re-adapted from the checkpoint on a sliding window): after a stream with gold feedback
    and re-adaptations, a new service on the same database holds the same tau, monitor, window and weights."""
    qs = questions(8)
    db = tmp_path / "r.sqlite"
    cfg = make_config(harvested, artifact, db, corpus=harvested[0], online={"sample_rate": 1.0})
    first = service(harvested, cfg)
    with client(first) as c:
        out = post_all(c, [q.question for q in qs])
        for o, q in zip(out, qs):
            assert c.post("/feedback", json={"request_id": o["id"], "gold": q.gold}).status_code == 200
        first.worker.stop()
    before = _state(first)
    assert before["arm"]["online"] and before["arm"]["n_refits"] == len(qs) // cfg.online.refit_every
    assert before["arm"]["n_learned"] == len(qs)
    again = service(harvested, cfg)
    assert again.replayed == len(qs)
    assert _state(again) == before
    with client(again) as c:  # numbering goes on
        o = c.post("/v1/completions", json={"prompt": qs[0].question}).json()
    assert again.store.request(o["id"])["seq"] == len(qs)


def test_label_free_feedback_runs_learn_without_a_client(harvested, artifact, tmp_path):  # noqa: F811
    qs = questions(4)
    cfg = make_config(harvested, artifact, tmp_path / "a.sqlite", online={"sample_rate": 1.0, "feedback": "agreement"})
    svc = service(harvested, cfg)
    with client(svc) as c:
        out = post_all(c, [q.question for q in qs])
        r = c.post("/feedback", json={"request_id": out[0]["id"], "correct": False})  # a client's, beside it
        assert r.status_code == 200 and not r.json()["learns"]
        svc.worker.stop()
    assert svc.loop.arms["A"].n_learned == len(qs)
    assert svc.store.count("feedback") == len(qs) + 1 and svc.store.totals()["feedback"] == 1
    assert service(harvested, cfg).loop.arms["A"].state() == svc.loop.arms["A"].state()


def test_dashboard_page_is_self_contained(harvested, artifact, tmp_path):  # noqa: F811
    svc = service(harvested, make_config(harvested, artifact, tmp_path / "d.sqlite"))
    with client(svc) as c:
        page = c.get("/")
        state = c.get("/api/state").json()
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for chart in ("tokens", "bound", "tau", "rps"):
        assert f'<svg id="{chart}"' in page.text
    assert "<script src" not in page.text and "http://" not in page.text and "https://" not in page.text
    assert set(state) == {"states", "totals", "series"} and state["states"]["delta"] == 0.2
