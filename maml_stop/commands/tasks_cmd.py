"""``maml-stop tasks``: list the task families with a sample question and its gold answer.

``--dataset PATH`` (with ``--question-field``, ``--answer-field``, ``--answer-format``, ``--choices-field``)
adds a dataset-backed family read from a local file, to check that it loads and its golds parse.
"""

from __future__ import annotations

import argparse
import sys

from tasks import get_family, list_families
from tasks.base import SPLITS
from tasks.dataset_family import ANSWER_FORMATS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="maml-stop tasks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", default="train", choices=list(SPLITS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--families", nargs="*", default=None, help="default: every registered family")
    parser.add_argument("--dataset", default=None, help="also show a 'dataset' family read from this path")
    parser.add_argument("--name", default="dataset", help="name of the --dataset family")
    parser.add_argument("--question-field", default="question")
    parser.add_argument("--answer-field", default="answer")
    parser.add_argument("--answer-format", default="text", choices=list(ANSWER_FORMATS))
    parser.add_argument("--choices-field", default=None)
    args = parser.parse_args(argv)
    if args.families:
        names = args.families
    elif args.dataset:
        names = []
    else:
        names = [n for n in list_families() if n != "dataset"]
    families = []
    try:
        families = [get_family(name) for name in names]
        if args.dataset:
            families.append(get_family(
                "dataset", path=args.dataset, name=args.name, question_field=args.question_field,
                answer_field=args.answer_field, answer_format=args.answer_format, choices_field=args.choices_field,
            ))
        for family in families:
            q = family.questions(args.split, n=1, seed=args.seed)[0]
            text = " ".join(q.question.split())
            print(f"{family.name:<24} {text[:90]!s:<92} gold: {q.gold}")
    except ValueError as err:
        print(f"maml-stop tasks: {err}", file=sys.stderr)
        return 2
    return 0
