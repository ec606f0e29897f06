#!/usr/bin/env bash
# Commit the shards of a running harvest every few minutes (only the corpus folder), so that an
# interrupted session loses at most one interval. usage: experiments/studies/commit_corpus.sh DIR [SECONDS]
# A corpus with a datasheet (DIR/datasheet.json) gets it regenerated before each commit
# (tests/test_datasheet.py recomputes it from the shards, so shards and datasheet must move together):
# the datasheet is rebuilt until the list of shards is the same before and after it, and only those
# shards are committed with it (a shard that a harvest finishes meanwhile waits for the next commit).
set -u
DIR=${1:-experiments/corpus/qwen05}; EVERY=${2:-600}
cd "$(dirname "$0")/../.."
shards() { ls "$DIR"/shards/*/*.parquet 2>/dev/null; }
while true; do
  sleep "$EVERY"
  [ -d "$DIR" ] || continue
  listed=$(shards)
  if [ -f "$DIR/datasheet.json" ]; then
    for try in 1 2 3 4 5; do
      .venv/bin/maml-stop datasheet "$DIR" >/dev/null 2>&1 || echo "datasheet of $DIR failed" >&2
      now=$(shards)
      [ "$now" == "$listed" ] && break
      listed=$now
    done
  fi
  n=$(printf '%s\n' "$listed" | grep -c parquet)
  others=$(ls "$DIR"/*.json "$DIR"/*.md "$DIR"/*.png 2>/dev/null)
  for i in 1 2 3 4 5; do
    # shellcheck disable=SC2086
    git add -- $listed $others 2>/dev/null && git commit -q -m "corpus: $DIR now $n shards (harvest in progress)" -- $listed $others && break
    sleep 5
  done
done
