"""The service's state on disk: every request, decision, feedback and online state in SQLite (WAL).

Four tables: ``requests`` (one row when a request is accepted, before it runs), ``decisions`` (how it was
served and what it cost; a feedback run also stores its trace as JSON and the decision the policy in
force would have made on it), ``feedback`` (one per request at most: gold answer or a judgement, and
the EM of the answer served), ``states`` (the arm's tau, fallback and monitor bound after each learning
step: the dashboard's time series). A feedback is committed (WAL, ``synchronous=FULL``) before the
service acknowledges it, so that a ``kill -9`` after the reply loses nothing; on restart
:mod:`maml_stop.serve.loop` replays ``feedback`` in order to rebuild every arm.

>>> s = Store(":memory:")
>>> s.add_request("r1", s.next_seq(), 0.0, "A", "what is 2 + 2?")
>>> s.add_feedback("r1", "gold", "4", None, em=True)
1
>>> s.count("feedback")
1
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["Store", "DuplicateFeedback", "SCHEMA"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    seq INTEGER PRIMARY KEY, id TEXT UNIQUE NOT NULL, created REAL NOT NULL, arm TEXT NOT NULL, prompt TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS decisions (
    request_id TEXT PRIMARY KEY REFERENCES requests(id), finished REAL NOT NULL, arm TEXT NOT NULL,
    plan TEXT NOT NULL, tau REAL, fallback INTEGER NOT NULL, idle INTEGER NOT NULL, answer TEXT,
    total_tokens INTEGER NOT NULL, reasoning_tokens INTEGER NOT NULL, stopped_at INTEGER, end_reason TEXT NOT NULL,
    latency_s REAL NOT NULL, decision INTEGER, full_cost INTEGER, stop_cost INTEGER, trace TEXT
);
CREATE TABLE IF NOT EXISTS feedback (
    n INTEGER PRIMARY KEY AUTOINCREMENT, request_id TEXT NOT NULL REFERENCES requests(id),
    created REAL NOT NULL, source TEXT NOT NULL, gold TEXT, correct INTEGER, em INTEGER,
    by_client INTEGER NOT NULL, UNIQUE (request_id, by_client)
);
CREATE TABLE IF NOT EXISTS states (
    n INTEGER PRIMARY KEY AUTOINCREMENT, created REAL NOT NULL, arm TEXT NOT NULL, feedback_n INTEGER,
    d INTEGER, tau REAL, fallback INTEGER NOT NULL, idle INTEGER NOT NULL, bound REAL, n_refits INTEGER NOT NULL
);
"""


class DuplicateFeedback(ValueError):
    """A second feedback for one request (the first one stands)."""


class Store:
    """One SQLite database in WAL mode, shared by the HTTP handlers and the model thread (a lock
    serialises the writes; every write commits at once)."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if self.path != ":memory:" and mode.lower() != "wal":
            raise RuntimeError(f"{self.path}: SQLite refused WAL mode (journal_mode={mode})")
        self._db.execute("PRAGMA synchronous=FULL")  # a commit is on disk before the reply
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _write(self, sql: str, args: tuple) -> sqlite3.Cursor:
        with self._lock:
            return self._db.execute(sql, args)  # autocommit: one transaction per statement

    def _read(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # -- writes -----------------------------------------------------------------------------------
    def next_seq(self) -> int:
        return int(self._read("SELECT COALESCE(MAX(seq) + 1, 0) FROM requests")[0][0])

    def add_request(self, request_id: str, seq: int, created: float, arm: str, prompt: str) -> None:
        self._write("INSERT INTO requests (seq, id, created, arm, prompt) VALUES (?, ?, ?, ?, ?)",
                    (seq, request_id, created, arm, prompt))

    def add_decision(self, request_id: str, row: dict[str, Any]) -> None:
        trace = row.get("trace")
        self._write(
            "INSERT INTO decisions (request_id, finished, arm, plan, tau, fallback, idle, answer, total_tokens, "
            "reasoning_tokens, stopped_at, end_reason, latency_s, decision, full_cost, stop_cost, trace) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (request_id, row["finished"], row["arm"], row["plan"], _finite(row["tau"]), int(row["fallback"]),
             int(row["idle"]), row["answer"], row["total_tokens"], row["reasoning_tokens"], row["stopped_at"],
             row["end"], row["latency_s"], row.get("decision"), row.get("full_cost"), row.get("stop_cost"),
             None if trace is None else json.dumps(trace)))

    def add_feedback(self, request_id: str, source: str, gold: str | None, correct: bool | None,
                     em: bool | None, created: float | None = None) -> int:
        """Commit one feedback (``source``: gold, judgement, or the service's own label-free agreement);
        its number (the replay order). Raises :class:`DuplicateFeedback` for a client's second one."""
        try:
            cur = self._write("INSERT INTO feedback (request_id, created, source, gold, correct, em, by_client) "
                              "VALUES (?, ?, ?, ?, ?, ?, ?)",
                              (request_id, time.time() if created is None else created, source, gold,
                               None if correct is None else int(correct), None if em is None else int(em),
                               int(source != "agreement")))
        except sqlite3.IntegrityError:
            raise DuplicateFeedback(f"request {request_id} already has feedback; a request takes one") from None
        return int(cur.lastrowid)

    def add_state(self, created: float, arm: str, feedback_n: int | None, d: int | None, tau: float | None,
                  fallback: bool, idle: bool, bound: float | None, n_refits: int) -> None:
        self._write("INSERT INTO states (created, arm, feedback_n, d, tau, fallback, idle, bound, n_refits) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (created, arm, feedback_n, d, _finite(tau), int(fallback), int(idle), _finite(bound), n_refits))

    # -- reads ------------------------------------------------------------------------------------
    def count(self, table: str) -> int:
        if table not in ("requests", "decisions", "feedback", "states"):
            raise ValueError(f"unknown table {table!r}; valid: requests, decisions, feedback, states")
        return int(self._read(f"SELECT COUNT(*) FROM {table}")[0][0])

    def request(self, request_id: str) -> dict[str, Any] | None:
        """A request with its decision (``None`` fields while it runs), or None when unknown."""
        rows = self._read("SELECT r.seq, r.id, r.arm AS request_arm, r.prompt, d.* FROM requests r "
                          "LEFT JOIN decisions d ON d.request_id = r.id WHERE r.id = ?", (request_id,))
        return _decode(rows[0]) if rows else None

    def has_feedback(self, request_id: str) -> bool:
        """Has a client sent feedback on this request (the label-free agreement aside)?"""
        return bool(self._read("SELECT 1 FROM feedback WHERE request_id = ? AND by_client = 1", (request_id,)))

    _FEEDBACK = ("SELECT f.n, f.source, f.gold, f.correct, f.em, r.seq, r.prompt, d.* FROM feedback f "
                 "JOIN requests r ON r.id = f.request_id LEFT JOIN decisions d ON d.request_id = f.request_id ")

    def feedback_log(self) -> list[dict[str, Any]]:
        """Every feedback in commit order, with its request and decision (the replay on restart)."""
        return [_decode(r) for r in self._read(self._FEEDBACK + "ORDER BY f.n")]

    def feedback_row(self, n: int) -> dict[str, Any] | None:
        """Feedback number ``n`` with its request and decision."""
        rows = self._read(self._FEEDBACK + "WHERE f.n = ?", (n,))
        return _decode(rows[0]) if rows else None

    def totals(self) -> dict[str, Any]:
        """Counters for /metrics, per arm and plan."""
        out: dict[str, Any] = {"requests": self.count("requests"), "feedback": int(self._read(
            "SELECT COUNT(*) FROM feedback WHERE by_client = 1")[0][0])}
        out["by_plan"] = [dict(r) for r in self._read(
            "SELECT arm, plan, COUNT(*) AS n, SUM(total_tokens) AS tokens, SUM(stopped_at IS NOT NULL) AS stopped, "
            "SUM(latency_s) AS latency FROM decisions GROUP BY arm, plan ORDER BY arm, plan")]
        out["paired"] = [dict(r) for r in self._read(
            "SELECT arm, COUNT(*) AS n, SUM(full_cost) AS full_cost, SUM(stop_cost) AS stop_cost FROM decisions "
            "WHERE full_cost IS NOT NULL GROUP BY arm ORDER BY arm")]
        out["em"] = [dict(r) for r in self._read(
            "SELECT d.arm, COUNT(*) AS n, SUM(f.em) AS right FROM feedback f JOIN decisions d "
            "ON d.request_id = f.request_id WHERE f.em IS NOT NULL AND f.by_client = 1 GROUP BY d.arm ORDER BY d.arm")]
        return out

    def series(self, limit: int = 2000) -> dict[str, list[dict[str, Any]]]:
        """The dashboard's time series: the last ``limit`` decisions and states, oldest first."""
        dec = self._read("SELECT finished, arm, plan, total_tokens, stopped_at IS NOT NULL AS stopped, full_cost, "
                         "stop_cost FROM decisions ORDER BY finished DESC LIMIT ?", (limit,))
        st = self._read("SELECT created, arm, tau, fallback, idle, bound FROM states ORDER BY n DESC LIMIT ?", (limit,))
        return {"decisions": [dict(r) for r in reversed(dec)], "states": [dict(r) for r in reversed(st)]}


def _finite(x: float | None) -> float | None:
    return None if x is None or x != x or x in (float("inf"), float("-inf")) else float(x)


def _decode(row: sqlite3.Row) -> dict[str, Any]:
    out = dict(row)
    if out.get("trace") is not None:
        out["trace"] = json.loads(out["trace"])
    return out
