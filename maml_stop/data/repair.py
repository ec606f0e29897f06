"""``maml-stop harvest --repair --out DIR``: keep one copy of every trace a corpus stores more than once.

A corpus holds a trace twice only when two processes harvested into one folder at once (before the
writer's lock of :mod:`maml_stop.data.lock`, issue 29) or when shards were copied in by hand. Every
loader refuses such a corpus, naming the ids and their shards; this repair keeps the first copy of each
id in shard order (the shards sorted by path, rows in their stored order), rewrites each shard that held
a later copy without it (atomically), and deletes a shard left empty. It holds the writer's lock, so it
never runs beside a harvest.

>>> report = remove_duplicate_traces("runs/mycorpus")            # doctest: +SKIP
>>> report["removed"], report["rewritten"], report["deleted"]
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from maml_stop.data import store
from maml_stop.data.lock import corpus_lock

log = logging.getLogger(__name__)


def remove_duplicate_traces(root: str | Path, dry_run: bool = False) -> dict[str, Any]:
    """Keep the first copy of every trace id of corpus ``root``; returns ``{"removed": n, "rewritten":
    [shards], "deleted": [shards], "ids": [trace ids that had copies]}``. ``dry_run``: report, change nothing."""
    store.read_meta(root)  # a corpus folder, readable by this code
    with corpus_lock(root):
        seen: set[str] = set()
        twice: set[str] = set()
        drop: dict[Path, set[int]] = {}  # shard -> rows holding a later copy
        for path in store.shard_paths(root):
            for row, tid in enumerate(store.shard_trace_ids(path)):
                if tid in seen:
                    drop.setdefault(path, set()).add(row)
                    twice.add(tid)
                seen.add(tid)
        ids = sorted(twice)
        report: dict[str, Any] = {"removed": sum(len(r) for r in drop.values()), "rewritten": [], "deleted": [],
                                  "ids": ids}
        for path, rows in drop.items():
            keep = [r for i, r in enumerate(store.read_shard(path).to_pylist()) if i not in rows]
            key = "rewritten" if keep else "deleted"
            report[key].append(str(path))
            if dry_run:
                continue
            if keep:
                store.rewrite_shard(path, keep)
            else:
                path.unlink()
        log.info("corpus %s: %s %d duplicate trace(s) of %d id(s); shards rewritten %d, deleted %d", root,
                 "would remove" if dry_run else "removed", report["removed"], len(ids), len(report["rewritten"]),
                 len(report["deleted"]))
        return report


def main(argv: list[str]) -> int:
    """``maml-stop harvest --repair --out DIR [--dry_run]`` (dispatched from :mod:`maml_stop.harvest.cli`)."""
    import argparse

    parser = argparse.ArgumentParser(prog="maml-stop harvest --repair",
                                     description="keep one copy of every trace a corpus stores more than once")
    parser.add_argument("--repair", action="store_true", required=True)
    parser.add_argument("--out", required=True, help="the corpus folder")
    parser.add_argument("--dry_run", action="store_true", help="report what would be removed, change nothing")
    args = parser.parse_args(argv)
    report = remove_duplicate_traces(args.out, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    print(f"{args.out}: {verb} {report['removed']} duplicate trace(s) of {len(report['ids'])} id(s); "
          f"shards rewritten {len(report['rewritten'])}, deleted {len(report['deleted'])}")
    return 0
