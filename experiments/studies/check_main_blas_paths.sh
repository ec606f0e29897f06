#!/usr/bin/env bash
# Does the main job's table regenerate to the printed digit on another CPU? (issue 29 item 12)
# Runs the evaluate step of scripts/main.sh on its checkpoint once per MKL code path (MKL_CBWR, fixed when the
# process starts: another CPU's kernels, emulated), each with its own pooled-probe cache, and diffs each
# results.md against the plain run's. Measured (baseline_dtype: float64): identical under COMPATIBLE and AVX2;
# about 3 minutes a run on 2 busy cores.
#   bash experiments/studies/check_main_blas_paths.sh [CHECKPOINT] [OUT]   (extra flags: EVALUATE_FLAGS)
set -euo pipefail
cd "$(dirname "$0")/../.."
ckpt=${1:-runs/main/checkpoints/best.ckpt}
out=${2:-runs/check_blas_paths}
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
mkdir -p "$out"
status=0
for path in plain COMPATIBLE AVX2; do
  env $([ $path = plain ] || echo MKL_CBWR=$path) .venv/bin/maml-stop evaluate --config experiments/evaluate.yaml \
    --config experiments/main_evaluate.yaml --checkpoint "$ckpt" --out "$out/$path" --cache_dir "$out/$path/cache" \
    --progress false ${EVALUATE_FLAGS:-} > "$out/$path.log" 2>&1
  if [ $path != plain ]; then
    if diff -q "$out/plain/results.md" "$out/$path/results.md" > /dev/null; then echo "$path: results.md identical"
    else echo "$path: results.md differs:"; diff "$out/plain/results.md" "$out/$path/results.md" || true; status=1; fi
  fi
done
exit $status
