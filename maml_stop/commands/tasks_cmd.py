"""``maml-stop tasks``: list the task families with a sample question and its gold answer."""

from __future__ import annotations

import argparse

from tasks import get_family, list_families


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="maml-stop tasks", description=__doc__)
    parser.add_argument("--split", default="train", choices=["train", "validation", "test"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--families", nargs="*", default=None, help="default: every registered family")
    args = parser.parse_args(argv)
    names = args.families or [n for n in list_families() if n != "dataset"]
    for name in names:
        family = get_family(name)
        q = family.questions(args.split, n=1, seed=args.seed)[0]
        text = " ".join(q.question.split())
        print(f"{name:<24} {text[:90]!s:<92} gold: {q.gold}")
    return 0
