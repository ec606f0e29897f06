"""Speed of the meta-learning hot path; prints figures (not a test).

    python experiments/benchmark_meta.py                       # synthetic traces shaped like qwen05
    python experiments/benchmark_meta.py --corpus experiments/corpus/qwen05

Measures, on one thread:

* meta-steps/s of ``MetaStoppingModule`` training steps (meta-batch 8, K=16, Q=64 traces, 5 inner
  steps): episode sampling + collation, inner loops, outer backward, Adam step, for first-order and
  second-order MAML, ANIL and Meta-SGD; "step only" leaves out sampling/collation, "loop" is the
  same step computed episode by episode with ``adapt`` (what ``episode_losses`` vectorises);
* latency of adapting one predictor on K=16 traces as evaluation does (under ``torch.no_grad()``).

Targets (issue 5): >= 50 first-order and >= 25 second-order meta-steps/s; adaptation <= 50 ms.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from maml_stop.data.corpus import Trace, TraceCorpus
from maml_stop.data.batches import TraceTensors
from maml_stop.data.datamodule import EpisodeBatch
from maml_stop.learn.module import MetaStoppingModule
from maml_stop.data.episodes import EpisodeSampler


def synthetic_traces(n_families: int = 6, per_family: int = 400, n_features: int = 45, seed: int = 0) -> dict:
    """Traces shaped like the qwen05 corpus: 45 features, 2-16 probes (most runs near the cap)."""
    rng = np.random.default_rng(seed)
    out = {}
    for f in range(n_families):
        fam = f"fam{f}"
        traces = []
        for i in range(per_family):
            p = int(rng.integers(2, 17))
            solve = int(rng.integers(0, p + 3))
            labels = (np.arange(p) >= solve).astype(np.float32)
            feats = rng.normal(size=(p, n_features)).astype(np.float32)
            feats[:, 0] += 2 * labels + 0.3 * f
            traces.append(Trace(
                trace_id=f"{fam}/{i:05d}#0", family=fam, split="train", features=feats, labels=labels,
                positions=(np.arange(p) + 1) * 32, probe_tokens=np.full(p, 6), probe_answers=[""] * p,
                logprob_mean=np.zeros(p, np.float32), final_em=bool(labels[-1]), reasoning_tokens=32 * p + 20,
                hit_cap=False,
            ))
        out[fam] = traces
    return out


def timed(fn, repeats: int, rounds: int = 5, warmup: int = 3) -> float:
    """CPU seconds of this process per call: the best of ``rounds`` rounds of ``repeats`` calls.

    CPU time, not wall time, and the best round (as ``timeit`` advises): the machine is shared (a
    harvest and other jobs run beside), which only ever adds time; the targets are per core."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(rounds):
        t = time.process_time()
        for _ in range(repeats):
            fn()
        best = min(best, (time.process_time() - t) / repeats)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=None, help="a stored corpus (default: synthetic traces)")
    ap.add_argument("--meta-batch", type=int, default=8)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--q", type=int, default=64)
    ap.add_argument("--inner-steps", type=int, default=5)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--kinds", default="mlp,delta,gru")
    ap.add_argument("--repeats", type=int, default=10, help="calls per round (5 rounds)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)

    if args.corpus:
        corpus = TraceCorpus.load(args.corpus)
        by_family = {f: corpus.traces(f) for f in corpus.families}
        source = f"corpus {args.corpus}"
    else:
        by_family = synthetic_traces()
        source = "synthetic traces (45 features, 2-16 probes)"
    families = [f for f, ts in by_family.items() if len(ts) >= args.k + args.q]
    n_features = next(iter(by_family.values()))[0].features.shape[1]
    tensors = TraceTensors([t for f in families for t in by_family[f]])
    sampler = EpisodeSampler(by_family, args.k, args.q, families=families, seed=0)
    probes = np.mean([t.n_probes for f in families for t in by_family[f]])
    print(f"{source}: {len(families)} families, {n_features} features, {probes:.1f} probes/trace; "
          f"meta-batch {args.meta_batch}, K={args.k}, Q={args.q}, {args.inner_steps} inner steps, "
          f"MLP {args.depth}x{args.hidden}, torch threads {torch.get_num_threads()}; "
          f"figures are CPU time of this process (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")

    def draw() -> list[EpisodeBatch]:
        return [EpisodeBatch(e.family, tensors.collate(e.support), tensors.collate(e.query))
                for e in sampler.sample_batch(args.meta_batch)]

    t_data = timed(draw, args.repeats)
    print(f"episode sampling + collation: {t_data * 1e3:.2f} ms per meta-batch")

    settings = [("maml", True), ("maml", False), ("anil", False), ("metasgd", False)]
    print(f"{'kind':<6} {'algorithm':<9} {'order':<6} {'meta-steps/s':>12} {'step only':>10} {'loop':>7} "
          f"{'adapt K=16 ms':>14}")
    for kind in args.kinds.split(","):
        for algorithm, first_order in settings:
            module = MetaStoppingModule(
                n_features, hidden=args.hidden, depth=args.depth, kind=kind, algorithm=algorithm,
                inner_lr=0.1, inner_steps=args.inner_steps, first_order=first_order, compare_random_init=False,
            )
            opt = torch.optim.Adam(module.parameters(), lr=1e-3)
            fixed = draw()

            def step(batch=None) -> None:
                opt.zero_grad()
                module._shared_step(batch if batch is not None else draw(), "train").backward()
                opt.step()

            module.log = lambda *a, **k: None  # no Trainer attached
            def loop_step() -> None:
                opt.zero_grad()
                a = module.adapter
                torch.stack([a.loss(a.adapt(ep.support), ep.query) for ep in fixed]).mean().backward()
                opt.step()

            t_full = timed(step, args.repeats)
            t_step = timed(lambda: step(fixed), args.repeats)
            t_loop = timed(loop_step, args.repeats)
            support = fixed[0].support
            with torch.no_grad():
                t_adapt = timed(lambda: module.adapter.adapt(support)(fixed[0].query), args.repeats)
            order = "first" if first_order else "second"
            print(f"{kind:<6} {algorithm:<9} {order:<6} {1 / t_full:>12.1f} {1 / t_step:>10.1f} {1 / t_loop:>7.1f} "
                  f"{t_adapt * 1e3:>14.2f}")


if __name__ == "__main__":
    main()
