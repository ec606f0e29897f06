"""Does every committed corpus still resume with its recipe? (issue 29 item 2)

Copies each corpus's meta.json and shards into a scratch folder and runs its recipe's harvest there,
loading the model from another folder than the one meta.json records (a folder of links to the weight
files: the same sha256, another path), up to its first generation: the resume checks (recipe, weights'
sha256, question order) run, nothing is generated, the committed folders are only read.

    python experiments/studies/check_resume_committed.py --models "$MAML_STOP_MODELS"   # scripts/fetch_models.sh; minutes

Measured on the session's machine (2026-12-07): the committed qwen05, qwen05_v2 and qwen15 resume ("its
weights' sha256 agree"), and so does the 1.5B harvest running then (``--corpus`` its folder: 456 traces).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
from pathlib import Path

from maml_stop.harvest import cli

# corpus folder name -> (recipe, model key under --models)
CORPORA = {
    "qwen05": ("experiments/corpus_qwen05.yaml", "qwen05"),
    "qwen05_v2": ("experiments/corpus_v2.yaml", "qwen05"),
    "qwen15": ("experiments/corpus_qwen15_pairs.yaml", "qwen15"),
}


class _Checked(Exception):
    """Raised at the first generation: the resume checks have passed."""


def _stop(*args, **kwargs):
    raise _Checked


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", required=True, help="folder with the converted models (scripts/fetch_models.sh)")
    p.add_argument("--corpus", nargs="*", default=[f"experiments/corpus/{n}" for n in CORPORA],
                   help="corpus folders to check (a folder elsewhere, e.g. a running harvest's, by its name)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cli.ProbingGenerator.run = _stop  # the checks run, no trace is generated
    failed = []
    with tempfile.TemporaryDirectory() as scratch:
        for corpus in args.corpus:
            recipe, key = CORPORA[Path(corpus).name]
            links = Path(scratch) / "models" / key  # the same files under another path
            if not links.is_dir():
                links.mkdir(parents=True)
                for f in (Path(args.models) / key).iterdir():
                    (links / f.name).symlink_to(f.resolve())
            copy = Path(scratch) / Path(corpus).name
            copy.mkdir()
            shutil.copy(Path(corpus) / "meta.json", copy)
            shutil.copytree(Path(corpus) / "shards", copy / "shards", ignore=shutil.ignore_patterns(".*"))
            try:
                cli.main(["--config", recipe, "--out", str(copy), "--model", str(links)])
                print(f"{corpus}: resumes (nothing left to do)")
            except _Checked:
                print(f"{corpus}: resumes (stopped before its first generation)")
            except Exception as err:  # noqa: BLE001 - reported per corpus
                print(f"{corpus}: REFUSED: {err}")
                failed.append(corpus)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
