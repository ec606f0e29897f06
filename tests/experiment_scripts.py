"""Import a script of experiments/ as a module (they are scripts, not a package), for the tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def load_script(name: str) -> ModuleType:
    """``experiments/<name>.py`` (or ``experiments/studies/<name>.py``) as the module ``name`` (registered in
    ``sys.modules``: dataclasses look their module up there)."""
    path = EXPERIMENTS / f"{name}.py"
    if not path.is_file():
        path = EXPERIMENTS / "studies" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
