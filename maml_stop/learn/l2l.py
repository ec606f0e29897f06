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

learn2learn is imported on first use of a name of this module (PEP 562 ``__getattr__``), not when
``maml_stop`` is imported: without learn2learn the package still works with the torch.func backend
(``model.adapter.backend: torch_func``, :mod:`maml_stop.learn.func_backend`), and only a learn2learn-backend
adapter raises the ImportError below.
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


NOT_INSTALLED = (
    "learn2learn is not installed. Run scripts/install.sh (it installs learn2learn==0.2.0 with "
    "--no-deps and the Cython build option that Python 3.11 needs), or adapt with the torch.func "
    "backend, which needs only torch: `model.adapter.backend: torch_func` in the YAML "
    "(InnerLoopAdapter(..., backend=\"torch_func\") in code)."
)


def _load() -> dict[str, object]:
    spec = importlib.util.find_spec("learn2learn")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(NOT_INSTALLED)
    root = list(spec.submodule_search_locations)
    _stand_in("learn2learn", root)
    _stand_in("learn2learn.algorithms", [p + "/algorithms" for p in root])
    maml = importlib.import_module("learn2learn.algorithms.maml")
    meta_sgd = importlib.import_module("learn2learn.algorithms.meta_sgd")
    utils = importlib.import_module("learn2learn.utils")
    return {"MAML": maml.MAML, "maml_update": maml.maml_update, "MetaSGD": meta_sgd.MetaSGD,
            "clone_module": utils.clone_module, "update_module": utils.update_module}


def __getattr__(name: str) -> object:
    """``MAML``, ``MetaSGD``, ...: learn2learn's, imported on first access (ImportError without it)."""
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals().update(_load())  # later accesses find the names directly
    return globals()[name]
