"""Safe reading of the torch files this code loads back: Lightning checkpoints and adapted predictors.

A ``torch.save`` file is a pickle, and unpickling can run arbitrary code. :func:`safe_load` reads one
with ``torch.load(weights_only=True)`` (tensors, containers and primitive types only, plus
:data:`SAFE_GLOBALS`), after checking statically, without unpickling, that it is a complete
``torch.save`` archive whose pickle names no other class or function. Every refusal is a
:class:`CheckpointLoadError` that names the file and what is wrong; none suggests
``weights_only=False``.

>>> ckpt = safe_load("runs/quickstart/checkpoints/last.ckpt")                    # doctest: +SKIP
>>> blob = safe_load("runs/adapted/gcd.pt", what="adapted predictor")           # doctest: +SKIP
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["CheckpointLoadError", "CheckpointNotFoundError", "SAFE_GLOBALS", "safe_load", "check_loadable",
           "secure_ckpt_path"]

# Classes and functions a checkpoint may name beyond torch's own weights-only allow-list (tensors,
# storages, dtypes, OrderedDict, primitive types). What maml_stop and Lightning 2.6 write needs none:
# tests/test_checkpoint_io.py checks a fitted checkpoint and an adapted predictor against this list.
SAFE_GLOBALS: tuple[Any, ...] = ()


class CheckpointLoadError(ValueError):
    """A torch file that :func:`safe_load` will not read (missing, not a torch file, truncated, or
    naming objects outside the allow-list). The message names the file."""


class CheckpointNotFoundError(CheckpointLoadError, FileNotFoundError):
    """No file at the given path."""


def _allowed_names() -> set[str]:
    return {f"{g.__module__}.{g.__qualname__}" for g in SAFE_GLOBALS}


def check_loadable(path: str | Path, what: str = "checkpoint") -> Path:
    """Raise :class:`CheckpointLoadError` unless ``path`` is a complete ``torch.save`` archive that a
    weights-only load accepts; the check disassembles the pickle and runs none of it. Returns the path."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"no {what} file at {path}")
    with open(path, "rb") as f:
        head = f.read(4)
    if not zipfile.is_zipfile(path):
        if head == b"PK\x03\x04":
            raise CheckpointLoadError(f"{what} {path} is truncated or corrupt (an incomplete zip archive)")
        raise CheckpointLoadError(
            f"{what} {path} is not a torch file (expected a zip archive written by torch.save; "
            f"{path.stat().st_size} bytes starting {head!r})"
        )
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as err:  # a zip without a readable data.pkl, a bad pickle stream
        raise CheckpointLoadError(f"{what} {path} is not a readable torch file: {type(err).__name__}: {err}") from None
    unsafe = sorted(set(unsafe) - _allowed_names())
    if unsafe:
        raise CheckpointLoadError(
            f"refusing to load {what} {path}: it names objects outside the allow-list of tensors, containers "
            f"and primitive types, and unpickling them could run code: {unsafe}. Load only files written by "
            "maml_stop (maml-stop fit / maml-stop adapt)."
        )
    return path


def safe_load(path: str | Path, what: str = "checkpoint", map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` after :func:`check_loadable`; any failure is a
    :class:`CheckpointLoadError` naming the file and ``what`` it should have been."""
    path = check_loadable(path, what)
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, KeyError) as err:
        # torch's own message on a weights-only refusal recommends weights_only=False: keep its last line
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        if "weights_only" in reason:
            reason = type(err).__name__
        raise CheckpointLoadError(f"cannot read {what} {path}: {reason}") from None


_LIGHTNING_CKPT_NAMES = ("best", "last", "hpc", "registry")  # Lightning resolves these to files it wrote


def secure_ckpt_path(config: Any) -> None:
    """Make a ``fit``/``validate``/``test`` subcommand's checkpoint loading safe, before Lightning reads
    the file. Lightning 2.6 loads ``--ckpt_path`` with ``weights_only=None``: weights-only under
    torch >= 2.6, but full unpickling where TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is set and for http(s)
    paths, and a bad file gets torch's advice to pass ``weights_only=False``. So: ``weights_only`` is set
    to True (``--weights_only false`` is refused), and a local ``ckpt_path`` is read once with
    :func:`safe_load`, raising :class:`CheckpointLoadError` naming the file."""
    if "weights_only" in config:
        if config.get("weights_only") is False:
            raise ValueError("--weights_only false is refused: maml_stop checkpoints load weights-only "
                             "(a checkpoint is a pickle, and a full unpickle can run code)")
        config["weights_only"] = True
    ckpt_path = config.get("ckpt_path")
    if ckpt_path and str(ckpt_path) not in _LIGHTNING_CKPT_NAMES and "://" not in str(ckpt_path):
        safe_load(ckpt_path, what="--ckpt_path checkpoint")
