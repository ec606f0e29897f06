#!/usr/bin/env bash
# The main job on the bundled corpus: meta-train (LightningCLI), then the leave-families-out EM/token
# evaluation with every baseline. Writes runs/main/evaluate/results.md (the README's results table).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
rm -rf runs/main  # a fresh output root (fit refuses to write over an earlier run's files)
.venv/bin/maml-stop fit --config experiments/quickstart.yaml --config experiments/main.yaml
.venv/bin/maml-stop evaluate --config experiments/evaluate.yaml --config experiments/main_evaluate.yaml
echo "results: runs/main/evaluate/results.md"
