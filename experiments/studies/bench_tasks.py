"""Speed of the task families: build, draw 400 train / 400 test questions, extract and score answers.

    python experiments/studies/bench_tasks.py [--n 400] [--families gcd aiw ...]

Prints one line per family (seconds). The harvester draws a few hundred questions per family, so a
draw should take well under a second; the first family also pays the reasoning-gym import (~1 s).
"""

from __future__ import annotations

import argparse
import time

import torch

from tasks import get_family, list_families


def main() -> None:
    torch.set_num_threads(1)
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=400)
    parser.add_argument("--families", nargs="*", default=None)
    args = parser.parse_args()
    names = args.families or [n for n in list_families() if n != "dataset"]
    t0 = time.perf_counter()
    get_family(names[0])
    print(f"first build (imports reasoning-gym): {time.perf_counter() - t0:.2f}s")
    # train: a fresh family's first draw; val+test: the next draws, which reuse the generated stream
    print(f"{'family':<24} {'build':>7} {'train':>7} {'val+test':>9} {'score/q ms':>11}")
    worst = 0.0
    for name in names:
        t = time.perf_counter()
        fam = get_family(name)
        build = time.perf_counter() - t
        t = time.perf_counter()
        train = fam.questions("train", args.n, seed=0)
        t_train = time.perf_counter() - t
        t = time.perf_counter()
        fam.questions("validation", args.n // 4, seed=0)
        fam.questions("test", args.n, seed=0)
        t_test = time.perf_counter() - t
        t = time.perf_counter()
        for q in train:
            fam.score(fam.extract_answer(f"Step 1: think.\nFinal answer: {q.gold}"), q)
            fam.score(fam.extract_probe_answer(" 0\nStep 2: ..."), q)  # a wrong answer also runs rg's scorer
        per_q = (time.perf_counter() - t) / len(train) * 1000
        worst = max(worst, t_train, t_test)
        print(f"{name:<24} {build:7.3f} {t_train:7.3f} {t_test:9.3f} {per_q:11.3f}")
    print(f"slowest draw: {worst:.2f}s")
    t = time.perf_counter()
    get_family("simple_equations").questions("test", args.n, seed=0)
    print(f"simple_equations, a fresh family's first draw of {args.n} test questions: {time.perf_counter() - t:.2f}s")


if __name__ == "__main__":
    main()
