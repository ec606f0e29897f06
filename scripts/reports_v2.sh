#!/usr/bin/env bash
# Regenerate the committed reports of corpus v2 (experiments/corpus/qwen05_v2, issue 11) once its harvest is
# complete: the meta-learning study (maml-stop evaluate with grouped folds, summarised by experiments/meta_study.py;
# about 25 minutes of fits and an hour or more of evaluation on this 2-core machine; a rerun reads back the fits
# it finished, keyed by content hash under runs/cache/fits) and cost-aware probing on v2's features (issue 10's follow-up); then copy each
# report and its plots into experiments/results/<name>/ and rewrite the README and docs/results.md tables from them.
#   usage: bash scripts/reports_v2.sh [meta_study v2_cost_aware]
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
steps=${*:-meta_study v2_cost_aware}
for step in $steps; do
  echo "== $step ($(date +%H:%M:%S))"
  case $step in
    meta_study)  # report.md, the study's results.json (every figure of the report; --report_only renders from it), plots, per-count reports
      .venv/bin/python experiments/meta_study.py --config experiments/evaluate.yaml --config experiments/meta_study.yaml
      dest=experiments/results/meta_study
      rm -rf "$dest" && mkdir -p "$dest"
      cp runs/meta_study/report.md runs/meta_study/results.json runs/meta_study/*.png "$dest/"
      # per count: the maml-stop evaluate report and its savings-vs-K plot; not its results.json (about 50 MB
      # per count: every episode of every method) nor the per-family curve plots (over 1 MB each)
      for d in runs/meta_study/n_*/; do
        mkdir -p "$dest/$(basename "$d")" && cp "$d"results.md "$d"savings_vs_k.png "$dest/$(basename "$d")/"
      done ;;
    v2_cost_aware)
      rm -rf runs/v2_free_maml
      .venv/bin/maml-stop fit --config experiments/quickstart.yaml --config experiments/main.yaml --config experiments/v2_free_maml.yaml
      .venv/bin/maml-stop evaluate --config experiments/evaluate.yaml --config experiments/cost_aware_evaluate.yaml \
        --config experiments/v2_cost_aware_evaluate.yaml
      rm -f experiments/results/v2_cost_aware/*.png
      cp runs/v2_cost_aware/results.md runs/v2_cost_aware/*.png experiments/results/v2_cost_aware/ ;;
    *) echo "unknown step $step; valid: meta_study v2_cost_aware" >&2; exit 2 ;;
  esac
done
.venv/bin/python -m maml_stop.commands.readme_tables README.md docs/results.md
echo "== done ($(date +%H:%M:%S))"
