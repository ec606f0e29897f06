#!/usr/bin/env bash
# Commit the shards of a running harvest every few minutes (only the corpus folder), so that an
# interrupted session loses at most one interval. usage: experiments/commit_corpus.sh DIR [SECONDS]
# A corpus with a datasheet (DIR/datasheet.json) gets it regenerated before each commit
# (tests/test_datasheet.py recomputes it from the shards, so shards and datasheet must move together).
set -u
DIR=${1:-experiments/corpus/qwen05}; EVERY=${2:-600}
cd "$(dirname "$0")/.."
while true; do
  sleep "$EVERY"
  [ -d "$DIR" ] || continue
  n=$(ls "$DIR"/shards/*/*.parquet 2>/dev/null | wc -l)
  if [ -f "$DIR/datasheet.json" ]; then
    .venv/bin/maml-stop datasheet "$DIR" >/dev/null 2>&1 || echo "datasheet of $DIR failed; committing the shards alone" >&2
  fi
  for i in 1 2 3 4 5; do
    git add "$DIR" 2>/dev/null && git commit -q -m "corpus: $DIR now $n shards (harvest in progress)" -- "$DIR" && break
    sleep 5
  done
done
