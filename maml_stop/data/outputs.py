"""Output paths checked before the work that fills them starts (issue 29: an adapt or generate that ran
to the end and then could not write lost everything), and stale temporary files of the atomic writer
(:func:`maml_stop.data.store.atomic_write_bytes`) cleaned at the next start.

>>> check_output_file("runs/adapted/gcd.pt", "--out")        # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)


class OutputError(OSError):
    """An output path that cannot be written: the message names it and why."""


def check_output_dir(folder: str | Path, what: str) -> Path:
    """Create ``folder`` if needed and prove it writable by creating and removing a file in it."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{what} {folder} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-check.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise OutputError(f"{what} {folder} is not writable: {err.strerror or err}") from None
    return folder


def check_output_file(path: str | Path, what: str) -> Path:
    """Refuse an output file path that cannot be written (a folder, a read-only file or folder, a parent
    that is a file), before the work that produces it; creates the parent folder."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{what} {path} is a folder; give a file path")
    parent = path.parent
    blocked = next((p for p in [parent, *parent.parents] if p.exists() and not p.is_dir()), None)
    if blocked is not None:
        raise OutputError(f"{what} {path}: {blocked} is a file, not a folder")
    check_output_dir(parent, what)
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputError(f"{what} {path} is read-only")
    return path


def remove_stale_temp(folder: str | Path) -> list[Path]:
    """Remove the atomic writer's temporary files (``.<name>.*.tmp``) under ``folder``, left by a process
    killed mid-write. Only for a writer that holds the folder alone (a single harvest's lock): another
    writer's file in progress has the same form."""
    stale = [p for p in Path(folder).rglob(".*.tmp") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    if stale:
        log.info("removed %d stale temporary file(s) under %s, e.g. %s", len(stale), folder, stale[0])
    return stale
