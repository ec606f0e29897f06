#!/usr/bin/env bash
# One install script for maml_stop (see README "Set-up").
#  - a virtual environment in .venv (override with VENV=...)
#  - torch==2.13.0: the CPU wheel on these machines. GPU users: install the torch build for their CUDA
#    first (e.g. `pip install torch --index-url https://download.pytorch.org/whl/cu124`) and set
#    TORCH_SPEC to that exact version (or to "skip").
#  - the pinned dependencies from setup.cfg, then learn2learn 0.2.0 the only way it builds on
#    Python 3.11 (Cython regenerates its C files; --no-deps keeps pip from swapping torch for a CUDA
#    build and pulling torchvision/gym/qpth/gsutil). torchvision is never installed.
#  - the project itself (editable) with the extras given in EXTRAS (default: harvest,notebooks,test,serve).
# Without learn2learn: `bash scripts/install.sh --no-learn2learn` (or MAML_STOP_NO_L2L=1) skips its
#    special build (and the Cython it needs); then adapt with the torch.func backend, which needs only
#    torch and gives the same results: `model.adapter.backend: torch_func` in the YAML (a learn2learn-backend
#    adapter raises an ImportError that says so).
set -euo pipefail
cd "$(dirname "$0")/.."
NO_L2L=${MAML_STOP_NO_L2L:-0}
for arg in "$@"; do
  case $arg in
    --no-learn2learn) NO_L2L=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "unknown option $arg; valid: --no-learn2learn, --help" >&2; exit 2 ;;
  esac
done
[[ $NO_L2L == 0 || $NO_L2L == 1 ]] || { echo "MAML_STOP_NO_L2L=$NO_L2L; valid: 0, 1" >&2; exit 2; }
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
EXTRAS=${EXTRAS:-harvest,notebooks,test,serve}
[[ -x $VENV/bin/python ]] || "$PY" -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip setuptools wheel
[[ $TORCH_SPEC == skip ]] || python -m pip install -q "$TORCH_SPEC"
if [[ $NO_L2L == 1 ]]; then
  echo "skipping learn2learn (--no-learn2learn / MAML_STOP_NO_L2L=1): set model.adapter.backend: torch_func"
else
  # learn2learn first needs Cython and numpy in the build; it must not pull its own dependencies.
  python -m pip install -q "cython>=3" numpy
  if ! python -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('learn2learn') else 1)" 2>/dev/null; then
    python -m pip install -q --no-deps --no-build-isolation \
      --config-settings="--build-option=build_ext" learn2learn==0.2.0
  fi
fi
python -m pip install -q -e ".[${EXTRAS}]"
if python -c "import torchvision" 2>/dev/null; then
  echo "torchvision got installed; it breaks transformers/lightning beside this torch. Remove it." >&2
  exit 1
fi
python -c "import maml_stop, tasks; print('maml_stop', maml_stop.__version__, 'installed in', '$VENV')"
