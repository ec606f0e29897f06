#!/usr/bin/env bash
# GPU check in one command (issue 15): on a machine with a CUDA GPU and a local model folder, prints
# harvest throughput and probing overhead (harvest and every live mode against plain generate(), from
# experiments/benchmark.py --sections generation) and the cached-probe / naive-probe equivalence
# (experiments/check_probe_invariance.py --cached-vs-naive), all on cuda.
#
#   experiments/gpu_check.sh MODEL_DIR [OUT_DIR]        # OUT_DIR default: experiments/results/gpu_check
#
# Environment: PYTHON (default .venv/bin/python, else python3), DTYPE (default bfloat16),
# FAMILY (default gsm_symbolic). Exits 2, before loading anything, when torch sees no CUDA device.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=${1:-}
OUT=${2:-experiments/results/gpu_check}
DTYPE=${DTYPE:-bfloat16}
FAMILY=${FAMILY:-gsm_symbolic}
if [[ -z "$MODEL" ]]; then
    echo "usage: experiments/gpu_check.sh MODEL_DIR [OUT_DIR]" >&2
    exit 64
fi
if [[ ! -d "$MODEL" ]]; then
    echo "gpu_check: model folder $MODEL does not exist (give a local model folder, e.g. the folder that bash scripts/fetch_models.sh qwen05 prints)" >&2
    exit 66
fi
if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON; elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: FAILED: no CUDA GPU is visible to torch $("$PY" -c 'import torch; print(torch.__version__)') " \
         "(torch.cuda.is_available() is False; a CPU build of torch, no driver, or CUDA_VISIBLE_DEVICES empty)." >&2
    echo "gpu_check: run it on a machine with a GPU; on CPU use: $PY experiments/benchmark.py --model $MODEL" >&2
    exit 2
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

echo "== harvest throughput and probing overhead (cuda, $DTYPE) =="
"$PY" experiments/benchmark.py --model "$MODEL" --device cuda --dtype "$DTYPE" --sections generation \
    --out "$OUT" --note "experiments/gpu_check.sh $MODEL"

echo "== cached probes against naive probes (cuda, $DTYPE) =="
"$PY" experiments/check_probe_invariance.py --cached-vs-naive --model "$MODEL" --device cuda --dtype "$DTYPE" \
    --families "$FAMILY" --n 8 --max_new_tokens 128 --every_n 32

echo "gpu_check: done (figures in $OUT/benchmark.md)"
