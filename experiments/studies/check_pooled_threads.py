"""Does the pooled probe train to the same weights on 1 and 2 CPU threads? (issue 29, item 12)

Trains the main job's pooled probe (the meta-training families of experiments/main.yaml on the bundled
corpus, 300 full-batch steps, the checkpoint's 1x32 MLP of experiments/quickstart.yaml, balanced loss)
once per thread count and prints the largest weight difference. Measured on the session's machine (MKL, AVX512): 0.0, bitwise equal, so the issue's
last-digit differences on another CPU come from another BLAS code path, not from the thread count (to
emulate one: ``MKL_CBWR=COMPATIBLE``, measured on a tiny corpus by tests/test_pooled_reproducible.py: 3.6e-7 in
float32, 0 with ``train_predictor(..., dtype=torch.float64)``).

    python experiments/studies/check_pooled_threads.py     # under a minute on 2 busy cores
"""

from __future__ import annotations

import argparse
import time

import torch

from maml_stop.data.corpus import TraceCorpus
from maml_stop.learn.pooled import train_predictor
from maml_stop.learn.predictor import PredictorConfig

SOURCE = ["base_conversion", "basic_arithmetic", "count_bits", "lcm", "products", "simple_equations"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", default="experiments/corpus/qwen05")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = p.parse_args()
    corpus = TraceCorpus.load(args.corpus, families=SOURCE)
    traces = [t for f in SOURCE for t in corpus.traces(f)]
    print(f"{len(traces)} traces, {sum(t.n_probes for t in traces)} probes")
    config = PredictorConfig(n_features=len(corpus.feature_names), hidden=32, depth=1, kind="mlp")
    weights = {}
    for n in args.threads:
        torch.set_num_threads(n)
        t0 = time.time()
        trained = train_predictor(traces, config, 300, 0.5, "balanced", seed=0)
        weights[n] = {k: v.detach().double() for k, v in trained.state_dict().items()}
        print(f"{n} thread(s): {time.time() - t0:.0f} s")
    first = weights[args.threads[0]]
    for n in args.threads[1:]:
        diff = max((first[k] - weights[n][k]).abs().max().item() for k in first)
        print(f"max |w({args.threads[0]} thread) - w({n} threads)| = {diff:.3g}")


if __name__ == "__main__":
    main()
