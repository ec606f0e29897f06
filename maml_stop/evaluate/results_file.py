"""The results file of ``maml-stop evaluate`` (``results.json``): written with its report, read back with
the migrations of older files.

Names (issue 31): K is ``k`` and the fixed threshold ``tau``. Files written before that say ``shots``
(top level and ``config``) and ``fixed_tau`` (``config``); :func:`migrate_results` renames them on read,
so that every older report renders as it did.

>>> migrate_results({"shots": [4, 16], "config": {"shots": [4, 16], "fixed_tau": 0.5}})
{'config': {'k': [4, 16], 'tau': 0.5}, 'k': [4, 16]}
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from maml_stop.evaluate.report import write_report

__all__ = ["read_results", "migrate_results", "migrate_config", "write_results", "json_safe"]

RENAMED = {"shots": "k"}  # top level
RENAMED_CONFIG = {"shots": "k", "fixed_tau": "tau"}


def migrate_config(config: dict[str, Any]) -> dict[str, Any]:
    """An :class:`~maml_stop.evaluate.config.EvaluateConfig` dict with older names renamed (in place)."""
    for old, new in RENAMED_CONFIG.items():
        if old in config:
            config.setdefault(new, config.pop(old))
    return config


def migrate_results(results: dict[str, Any]) -> dict[str, Any]:
    """``results`` with the names of older files renamed (in place, and returned)."""
    for old, new in RENAMED.items():
        if old in results:
            results.setdefault(new, results.pop(old))
    if isinstance(results.get("config"), dict):
        migrate_config(results["config"])
    return results


RESULTS_KEYS = ("methods", "families", "results")  # what every results.json of maml-stop evaluate has


def read_results(path: str | Path) -> dict[str, Any]:
    """A ``results.json`` (of ``maml-stop evaluate``), migrated (:func:`migrate_results`). A missing file,
    invalid JSON or another JSON file raises a ValueError naming the file (one line, not a KeyError deep in
    the report; issue 29)."""
    path = Path(path)
    try:
        results = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"no results file at {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not a results file of maml-stop evaluate: not valid JSON ({err})") from None
    if isinstance(results, dict) and "cost_model" in results and "families" in results:
        return results  # a cascade evaluation's (maml_stop.evaluate.cascade): its own report reads it
    missing = [k for k in RESULTS_KEYS if not isinstance(results, dict) or k not in results]
    if isinstance(results, dict) and "k" not in results and "shots" not in results:
        missing.append("k")
    if missing:
        found = sorted(results)[:8] if isinstance(results, dict) else type(results).__name__
        raise ValueError(f"{path} is not a results file of maml-stop evaluate: it lacks {missing} (found {found})")
    return migrate_results(results)


def json_safe(x: Any, inf_as_text: bool = False) -> Any:
    """``x`` with NaN as None, inf as None (``inf_as_text``: ``"inf"`` / ``"-inf"``, for figures where an
    infinite value means something, such as a margin that admits nothing) and NumPy scalars as Python
    numbers (strict JSON)."""
    if isinstance(x, float) and not math.isfinite(x):
        return "inf" if inf_as_text and x > 0 else "-inf" if inf_as_text and x < 0 else None
    if isinstance(x, dict):
        return {k: json_safe(v, inf_as_text) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v, inf_as_text) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return json_safe(x.item(), inf_as_text)
    return x


def write_results(results: dict[str, Any], out: str | Path) -> dict[str, Path]:
    """results.json plus the report (tables, analysis, plots) in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    migrate_results(results)
    path.write_text(json.dumps(json_safe(results), indent=1))
    paths = write_report(results, out)
    paths["json"] = path
    return paths
