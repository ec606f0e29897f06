"""The keys a command line sets in one section of its settings: ``--<section>.X`` flags and the section of
each ``--config`` file. The commands use it to refuse a key that moved, naming where it went, before their
parser reports it as unknown (learn/cli.py for ``model``, serve/cli.py for ``online``).

>>> given_keys(["--online.window", "32", "--port", "1"], "online")
['window']
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

__all__ = ["given_keys"]


def given_keys(argv: Sequence[str], section: str, nested: str | None = None) -> list[str]:
    """Top-level keys of ``section`` in ``argv``'s flags and ``--config`` files, in order; with ``nested``
    (e.g. ``init_args``), that sub-mapping's keys count as the section's own, and the key itself does not.
    An unreadable config file is skipped: the command's parser says what is wrong with it."""
    import yaml

    given: list[str] = []
    flag = f"--{section}."
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv) or arg.startswith("--config="):
            path = Path(argv[i + 1] if arg == "--config" else arg.split("=", 1)[1])
            try:
                found = (yaml.safe_load(path.read_text()) or {}).get(section)
            except (OSError, yaml.YAMLError, AttributeError):
                continue
            if isinstance(found, dict):
                given += [k for k in found if nested is None or k not in ("class_path", nested)]
                given += list(found.get(nested) or {}) if nested else []
        elif arg.startswith(flag):
            key = arg[len(flag):].split("=", 1)[0]
            if nested and key.startswith(f"{nested}."):
                key = key[len(nested) + 1:]
            given.append(key.split(".", 1)[0])
    return given
