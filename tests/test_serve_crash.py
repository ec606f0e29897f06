"""``kill -9`` during a feedback burst loses no acknowledged feedback (issue 27): a real ``maml-stop
serve`` (uvicorn) on 127.0.0.1, a bounded burst of feedback from 4 threads, SIGKILL once some are
acknowledged, then the rows are counted in the SQLite file and again through a restarted service."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("uvicorn")

from serve_helpers import free_port, model_dir, questions  # noqa: E402
from test_feature_subsets import harvested  # noqa: E402,F401  (a fixture)
from test_generate_cmd import artifact  # noqa: E402,F401  (a fixture)

ROOT = Path(__file__).resolve().parents[1]


def _call(url: str, body: dict | None = None, timeout: float = 60.0) -> tuple[int, dict | str]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            text = r.read().decode()
            return r.status, (json.loads(text) if r.headers.get_content_type() == "application/json" else text)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read().decode())


def _start(args: list[str], port: int, log) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "maml_stop.cli", "serve", *args, "--port", str(port)],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"serve exited with {proc.returncode}")
        try:
            if _call(f"http://127.0.0.1:{port}/metrics", timeout=2)[0] == 200:
                return proc
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    proc.kill()
    raise AssertionError("serve did not answer within 180 s")


@pytest.mark.slow
def test_kill_9_loses_no_acknowledged_feedback(harvested, artifact, tmp_path):  # noqa: F811
    db = tmp_path / "crash.sqlite"
    args = ["--model", model_dir(harvested), "--artifact", artifact, "--db", str(db), "--online.sample_rate", "0.3"]
    qs = questions(24, seed=3)
    port = free_port()
    with open(tmp_path / "serve1.log", "wb") as log:
        proc = _start(args, port, log)
        try:
            base = f"http://127.0.0.1:{port}"
            ids = []
            for q in qs:
                status, body = _call(f"{base}/v1/completions", {"prompt": q.question})
                assert status == 200, body
                ids.append((body["id"], q.gold))
            acked: list[str] = []
            lock = threading.Lock()

            def burst(part):
                for rid, gold in part:
                    try:
                        status, _ = _call(f"{base}/feedback", {"request_id": rid, "gold": gold}, timeout=10)
                    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                        return  # the server is gone
                    if status == 200:
                        with lock:
                            acked.append(rid)

            threads = [threading.Thread(target=burst, args=(ids[i::4],)) for i in range(4)]
            for t in threads:
                t.start()
            deadline = time.monotonic() + 60
            while len(acked) < 6 and time.monotonic() < deadline:
                time.sleep(0.002)
            os.kill(proc.pid, signal.SIGKILL)  # mid-burst
            for t in threads:
                t.join(30)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(30)
    with lock:
        acknowledged = set(acked)
    assert 6 <= len(acknowledged) < len(ids), len(acknowledged)  # killed mid-burst
    with sqlite3.connect(db) as con:
        stored = {r[0] for r in con.execute("SELECT request_id FROM feedback WHERE by_client = 1")}
    assert acknowledged <= stored, f"lost {len(acknowledged - stored)} acknowledged feedback rows"
    print(f"killed with {len(acknowledged)} of {len(ids)} feedbacks acknowledged; {len(stored)} rows stored; "
          f"{len(acknowledged - stored)} acknowledged rows lost")
    port = free_port()
    with open(tmp_path / "serve2.log", "wb") as log:
        proc = _start(args, port, log)
        try:
            status, text = _call(f"http://127.0.0.1:{port}/metrics")
            assert f"maml_stop_feedback_total {len(stored)}" in text
            rid = next(iter(acknowledged))
            status, body = _call(f"http://127.0.0.1:{port}/feedback", {"request_id": rid, "gold": "1"})
            assert status == 409 and "already has feedback" in body["error"]["message"]
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
