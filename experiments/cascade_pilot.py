"""The pilot rule of the paired 1.5B corpus (issue 28 item 1; recipe: experiments/corpus_qwen15_pairs.yaml).

    python experiments/cascade_pilot.py [--small experiments/corpus/qwen05] [--large experiments/corpus/qwen15]

For every candidate family of the recipe that the large corpus holds, on the questions both corpora hold
(:func:`maml_stop.data.pairs.load_pairs`): the share the large model answers right and the small one wrong (what
a perfect router gains: **the rule's key**), the EM of each model and their gap (the tie-break: larger |gap|
first). Families with fewer than ``--min_pairs`` shared questions are not ranked. Prints the table and the
harvest command that completes the top ``--take`` families to the recipe's ``n_per_family``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RECIPE = ROOT / "experiments" / "corpus_qwen15_pairs.yaml"
ALREADY_PAIRED = ("gcd", "gsm_symbolic", "letter_counting")  # experiments/corpus_qwen15.yaml


def rank(pairs: dict, min_pairs: int) -> list[dict]:
    """One row per family with >= ``min_pairs`` pairs, best first by the rule."""
    rows = []
    for family, ps in pairs.items():
        small = np.array([p.small.final_em for p in ps], dtype=float)
        large = np.array([p.large.final_em for p in ps], dtype=float)
        if len(ps) < min_pairs:
            continue
        rows.append({"family": family, "pairs": len(ps), "small_em": small.mean(), "large_em": large.mean(),
                     "gap": large.mean() - small.mean(), "router_gain": float(np.mean(large * (1 - small)))})
    return sorted(rows, key=lambda r: (-r["router_gain"], -abs(r["gap"]), r["family"]))


def main(argv: list[str] | None = None) -> int:
    from maml_stop.data import store
    from maml_stop.data.pairs import load_pairs

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", default="experiments/corpus/qwen05")
    p.add_argument("--large", default="experiments/corpus/qwen15")
    p.add_argument("--take", type=int, default=3)
    p.add_argument("--min_pairs", type=int, default=16)
    args = p.parse_args(argv)
    recipe = yaml.safe_load(RECIPE.read_text())
    candidates = [f for f in recipe["families"] if f not in ALREADY_PAIRED]
    present = sorted({q.parent.name for q in store.shard_paths(args.large)})
    harvested = [f for f in candidates if f in present]
    if not harvested:
        print(f"no pilot family in {args.large} yet (candidates: {candidates}); run step 1 of {RECIPE.name}")
        return 1
    rows = rank(load_pairs(args.small, args.large, harvested), args.min_pairs)
    print("| family | pairs | 0.5B EM | 1.5B EM | gap | router gain |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['family']} | {r['pairs']} | {r['small_em']:.3f} | {r['large_em']:.3f} | {r['gap']:+.3f} "
              f"| {r['router_gain']:.3f} |")
    missing = [f for f in candidates if f not in harvested]
    if missing:
        print(f"\nnot harvested yet: {missing} (the ranking covers the others only)")
    chosen = [r["family"] for r in rows[: args.take]]
    if len(chosen) < args.take:
        print(f"\nonly {len(chosen)} families have >= {args.min_pairs} pairs: finish the pilot first")
        return 1
    fams = ", ".join([*ALREADY_PAIRED, *chosen])
    print(f"\nchosen: {chosen}\nmaml-stop harvest --config experiments/{RECIPE.name} --model \"$(bash scripts/fetch_models.sh "
          f"qwen15)\" --families \"[{fams}]\" --max_per_family null")
    return 0


if __name__ == "__main__":
    sys.exit(main())
