#!/usr/bin/env bash
# One install script for maml_stop (see README "Set-up").
#  - a virtual environment in .venv (override with VENV=...)
#  - torch==2.13.0: the CPU wheel on these machines. GPU users: install the torch build for their CUDA
#    first (e.g. `pip install torch --index-url https://download.pytorch.org/whl/cu124`) and set
#    TORCH_SPEC to that exact version (or to "skip").
#  - the pinned dependencies from setup.cfg, then learn2learn 0.2.0 the only way it builds on
#    Python 3.11 (Cython regenerates its C files; --no-deps keeps pip from swapping torch for a CUDA
#    build and pulling torchvision/gym/qpth/gsutil). torchvision is never installed.
#  - the project itself (editable) with the extras given in EXTRAS (default: harvest,notebooks,test).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
EXTRAS=${EXTRAS:-harvest,notebooks,test}
[[ -x $VENV/bin/python ]] || "$PY" -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip setuptools wheel
[[ $TORCH_SPEC == skip ]] || python -m pip install -q "$TORCH_SPEC"
# learn2learn first needs Cython and numpy in the build; it must not pull its own dependencies.
python -m pip install -q "cython>=3" numpy
if ! python -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('learn2learn') else 1)" 2>/dev/null; then
  python -m pip install -q --no-deps --no-build-isolation \
    --config-settings="--build-option=build_ext" learn2learn==0.2.0
fi
python -m pip install -q -e ".[${EXTRAS}]"
if python -c "import torchvision" 2>/dev/null; then
  echo "torchvision got installed; it breaks transformers/lightning beside this torch. Remove it." >&2
  exit 1
fi
python -c "import maml_stop, tasks; print('maml_stop', maml_stop.__version__, 'installed in', '$VENV')"
