#!/usr/bin/env bash
# Regenerate every committed report of the bundled corpus (experiments/results/) from scratch, in order:
# the main job (scripts/main.sh), the full leave-one-family-out protocol, every stopping strategy on its
# folds at K = 16 (the strategies, the cost-aware methods), the RL and cost-sensitive folds, the cross-model check and the ablations; then copy each
# run's results.md and plots into experiments/results/<name>/ and rewrite the README and docs/results.md tables from them. About
# two hours on this 2-core machine with harvests beside it.
#   usage: bash scripts/reports.sh [main lofo strategies cost_aware free_maml backoff rl cost_sensitive cross_model cascade ablations]
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
E=".venv/bin/maml-stop evaluate --config experiments/evaluate.yaml"
steps=${*:-main lofo strategies cost_aware free_maml backoff rl cost_sensitive cross_model cascade ablations}
copy() {  # copy() RUN_DIR NAME: the report and its plots (results.json stays in runs/: 5 MB)
  mkdir -p "experiments/results/$2"
  rm -f "experiments/results/$2"/*.png
  cp "$1"/results.md "$1"/*.png "experiments/results/$2/"
}
for step in $steps; do
  echo "== $step ($(date +%H:%M:%S))"
  case $step in
    main) bash scripts/main.sh && copy runs/main/evaluate main ;;
    lofo) $E --config experiments/lofo_evaluate.yaml && copy runs/lofo_evaluate lofo ;;
    strategies) $E --config experiments/cost_aware_evaluate.yaml --config experiments/hybrid_evaluate.yaml \
        --config experiments/ensemble_evaluate.yaml --config experiments/complexity_evaluate.yaml \
        --config experiments/lofo_strategies_evaluate.yaml \
        && copy runs/lofo_strategies lofo_strategies ;;
    cost_aware) $E --config experiments/cost_aware_evaluate.yaml --config experiments/lofo_strategies_evaluate.yaml \
        --methods '[full, free_probe, gated_probe, sparse, free_give_up, probe_give_up]' --out runs/lofo_cost_aware \
        && copy runs/lofo_cost_aware lofo_cost_aware ;;
    free_maml) $E --config experiments/cost_aware_evaluate.yaml --config experiments/lofo_free_maml_evaluate.yaml \
        && copy runs/lofo_free_maml lofo_free_maml ;;  # free-feature MAML folds trained here
    backoff) $E --config experiments/cost_aware_evaluate.yaml --config experiments/lofo_free_maml_evaluate.yaml \
        --config experiments/lofo_backoff_evaluate.yaml && copy runs/lofo_backoff lofo_backoff ;;  # free-feature folds trained here
    rl) $E --config experiments/lofo_rl_evaluate.yaml && copy runs/lofo_rl lofo_rl ;;  # RL folds trained here
    cost_sensitive) $E --config experiments/lofo_cost_sensitive_evaluate.yaml \
        && copy runs/lofo_cost_sensitive lofo_cost_sensitive \
        && .venv/bin/maml-stop compare runs/lofo_cost_sensitive/results.json runs/lofo_evaluate/results.json --k 16 \
           --out experiments/results/lofo_cost_sensitive/compare_vs_plain.json \
           > experiments/results/lofo_cost_sensitive/compare_vs_plain.md ;;  # after lofo: paired against the plain folds
    cross_model) $E --config experiments/main_evaluate.yaml --config experiments/cross_model_evaluate.yaml \
        && copy runs/cross_model/evaluate cross_model ;;
    cascade) $E --config experiments/cascade_evaluate.yaml && copy runs/cascade cascade ;;  # issue 28 (results.json: runs/, 1.4 MB)
    ablations) .venv/bin/python experiments/ablations.py --k 16 --episodes 50 \
        && cp runs/ablations/ablations.md experiments/results/ablations.md ;;
    *) echo "unknown step $step; valid: main lofo strategies cost_aware free_maml backoff rl cost_sensitive cross_model cascade ablations" >&2; exit 2 ;;
  esac
done
.venv/bin/python -m maml_stop.commands.readme_tables README.md docs/results.md
echo "== done ($(date +%H:%M:%S))"
