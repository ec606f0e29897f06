"""The one place that imports learn2learn.

``import learn2learn`` runs ``learn2learn/__init__.py``, which imports its vision, gym and Lightning
sub-packages; those import torchvision, which cannot load beside the CPU torch wheel. We only need the
MAML core (``learn2learn.algorithms.maml``, ``meta_sgd``, ``base_learner`` and ``learn2learn.utils``),
none of which imports anything beyond torch. So we register *namespace stand-ins* for the two
packages (``learn2learn`` and ``learn2learn.algorithms``) whose ``__path__`` points at the installed
files, without executing their ``__init__``; Python then imports the submodules from the real files.

>>> from maml_stop.learn.l2l import MAML
>>> import torch
>>> learner = MAML(torch.nn.Linear(2, 1), lr=0.1).clone()
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

__all__ = ["MAML", "MetaSGD", "clone_module", "update_module", "maml_update"]


def _stand_in(name: str, path: list[str]) -> None:
    module = sys.modules.get(name)
    if module is not None:  # already imported (the real package or our stand-in): leave it be
        return
    module = types.ModuleType(name)
    module.__path__ = list(path)  # type: ignore[attr-defined]
    module.__package__ = name
    sys.modules[name] = module


def _load() -> types.ModuleType:
    spec = importlib.util.find_spec("learn2learn")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "learn2learn is not installed. Run scripts/install.sh (it installs learn2learn==0.2.0 with "
            "--no-deps and the Cython build option that Python 3.11 needs)."
        )
    root = list(spec.submodule_search_locations)
    _stand_in("learn2learn", root)
    _stand_in("learn2learn.algorithms", [p + "/algorithms" for p in root])
    return importlib.import_module("learn2learn.algorithms.maml")


_maml = _load()
_meta_sgd = importlib.import_module("learn2learn.algorithms.meta_sgd")
_utils = importlib.import_module("learn2learn.utils")

MAML = _maml.MAML
maml_update = _maml.maml_update
MetaSGD = _meta_sgd.MetaSGD
clone_module = _utils.clone_module
update_module = _utils.update_module
