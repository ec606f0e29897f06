"""The writer's lock on a corpus folder, held for a whole harvest (or repair), so that a second process
writing into the same folder refuses at once instead of storing every trace a second time (issue 29).

    with corpus_lock("runs/mycorpus"):                      # one writer
        ...
    with corpus_lock("runs/mycorpus", worker=0, num_workers=2):   # worker 0 of 2 (issue 15)
        ...

Locks are POSIX ``flock`` locks, so the kernel frees them when their process ends, however it ends
(a crash or a SIGKILL included): a lock file left by a dead process is simply taken over. Files:

* ``.harvest.lock``: a single writer holds it exclusively (and writes its pid there); each of several
  workers holds it shared, so a single writer and the workers exclude each other;
* ``.harvest-w<i>.lock``: worker ``i`` holds it exclusively and writes ``<pid> <num_workers>`` there,
  so two processes never run as the same worker, and workers started with different ``num_workers``
  (whose question sets would overlap) refuse each other.

Acquisition is serialised by a brief exclusive lock on ``.harvest.guard``.
"""

from __future__ import annotations

import fcntl
import logging
import os
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import IO, Iterator

from maml_stop.data.outputs import check_output_dir
from maml_stop.data.store import CorpusError

log = logging.getLogger(__name__)

LOCK_FILE = ".harvest.lock"
GUARD_FILE = ".harvest.guard"


class CorpusLockedError(CorpusError):
    """Another live process holds the writer's lock of a corpus folder."""


def _worker_file(worker: int) -> str:
    return f".harvest-w{worker}.lock"


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _try_lock(path: Path, mode: int) -> IO[str] | None:
    """``path`` opened and flock-ed with ``mode`` (without waiting), or None when another holds it."""
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


def _claim(handle: IO[str], content: str, path: Path) -> None:
    """Record this process in a lock file just acquired (warning when it takes over a dead one's)."""
    old = _read(path).split()
    if old and old[0].isdigit() and int(old[0]) != os.getpid() and not _alive(int(old[0])):
        log.warning("taking over the stale lock %s of process %s, which is no longer running", path, old[0])
    handle.seek(0)
    handle.truncate()
    handle.write(content)
    handle.flush()


def _held(path: Path, mode: int) -> bool:
    """Whether another open file holds a lock on ``path`` that conflicts with ``mode``."""
    if not path.exists():
        return False
    probe = _try_lock(path, mode)
    if probe is None:
        return True
    probe.close()
    return False


def _holders(root: Path, mine: str = "") -> str:
    """The live holders recorded in the lock files of ``root`` (``mine``, this process's, left out)."""
    found = []
    if _held(root / LOCK_FILE, fcntl.LOCK_SH):  # held exclusively: by a single writer, who wrote its pid
        found.append(f"pid {_read(root / LOCK_FILE) or '?'}")
    for path in sorted(root.glob(".harvest-w*.lock")):
        words = _read(path).split()
        if path.name != mine and words and _held(path, fcntl.LOCK_SH):
            found.append(f"pid {words[0]}" + (f" (a worker of {words[1]})" if len(words) > 1 else ""))
    return ", ".join(found) or "an unknown process"


@contextmanager
def corpus_lock(root: str | Path, worker: int | None = None, num_workers: int = 1) -> Iterator[None]:
    """Hold the writer's lock of corpus folder ``root`` (created) for the body; raises
    :class:`CorpusLockedError`, naming the holder's pid, when another live process holds it.

    ``worker``: None for a single writer, else this process's index among ``num_workers`` workers."""
    root = check_output_dir(root, "corpus folder")  # created; not writable: refused here, before any work
    with ExitStack() as stack:
        guard = open(root / GUARD_FILE, "a+")
        stack.callback(guard.close)
        fcntl.flock(guard, fcntl.LOCK_EX)  # acquisitions one at a time; released below, before the body
        mine = _worker_file(worker) if worker is not None else ""
        refuse = lambda what, skip="": CorpusLockedError(  # noqa: E731
            f"corpus {root} is being written by another process ({_holders(root, skip)}): {what}. Wait for it to end, "
            "or harvest into another --out folder (the lock of a process that has ended is taken over automatically).")
        if worker is None:
            main = _try_lock(root / LOCK_FILE, fcntl.LOCK_EX)
            if main is None:
                raise refuse("refusing to write into it at the same time")
            stack.callback(main.close)
            _claim(main, f"{os.getpid()}\n", root / LOCK_FILE)
        else:
            main = _try_lock(root / LOCK_FILE, fcntl.LOCK_SH)
            if main is None:
                raise refuse("a single (not worker) harvest holds it")
            stack.callback(main.close)
            own = _try_lock(root / mine, fcntl.LOCK_EX)
            if own is None:
                raise refuse(f"worker {worker} is already running")
            stack.callback(own.close)
            for other in sorted(root.glob(".harvest-w*.lock")):
                words = _read(other).split()
                if other.name != mine and len(words) > 1 and words[1] != str(num_workers) \
                        and _held(other, fcntl.LOCK_SH):
                    raise refuse(f"its workers run with num_workers={words[1]}, this one with {num_workers}, "
                                 "and their question sets would overlap", skip=mine)
            _claim(own, f"{os.getpid()} {num_workers}\n", root / mine)
        fcntl.flock(guard, fcntl.LOCK_UN)
        yield
