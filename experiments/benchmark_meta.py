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
import dataclasses
import os
import time

import numpy as np
import torch

from maml_stop.data.corpus import Trace, TraceCorpus
from maml_stop.data.batches import TraceTensors
from maml_stop.data.datamodule import EpisodeBatch
from maml_stop.learn import adapter as adapter_module
from maml_stop.learn.adapter import AdapterConfig, InnerLoopAdapter
from maml_stop.learn.module import MetaStoppingModule
from maml_stop.learn.predictor import PredictorConfig
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


SETTINGS = (("maml", True), ("maml", False), ("anil", False), ("metasgd", False))  # (algorithm, first_order)
DEFAULT_BACKENDS = ("learn2learn", "torch_func")


def adapter_backends() -> tuple[str | None, ...]:
    """The adaptation backends :class:`AdapterConfig` offers, read at run time: ``(None,)`` (the one,
    learn2learn) when it has no ``backend`` field; else its module's ``BACKENDS`` (or learn2learn and
    torch_func)."""
    if "backend" not in {f.name for f in dataclasses.fields(AdapterConfig)}:
        return (None,)
    return tuple(getattr(adapter_module, "BACKENDS", DEFAULT_BACKENDS))


def with_backend(adapter: InnerLoopAdapter, backend: str | None) -> InnerLoopAdapter:
    """``adapter`` itself for ``backend=None``, else a new adapter on the same predictor (and state) with
    that backend; raises when the adapter does not take it (so no figure is labelled with a backend
    that did not run)."""
    if backend is None:
        return adapter
    new = InnerLoopAdapter.from_config(adapter.predictor, dataclasses.replace(adapter.config(), backend=backend))
    new.load_state_dict(adapter.state_dict())
    if getattr(new.config(), "backend", None) != backend:
        raise RuntimeError(f"InnerLoopAdapter.from_config ignored backend={backend!r}")
    return new.train(adapter.training)


def measure(by_family: dict, meta_batch: int = 8, k: int = 16, q: int = 64, inner_steps: int = 5, hidden: int = 64,
            depth: int = 2, kinds: tuple[str, ...] = ("mlp",), repeats: int = 10, rounds: int = 5,
            backends: tuple[str | None, ...] = (None,), settings=SETTINGS) -> dict:
    """Meta-steps/s per (kind, algorithm, order, backend) on the families of ``by_family`` with at least
    K + Q traces, CPU time of this process (see :func:`timed`). Returns ``{"families", "n_features",
    "probes_per_trace", "sampling_ms", "rows": [{kind, algorithm, order, backend, meta_steps_per_s,
    step_only_per_s, loop_per_s, adapt_ms}]}``."""
    families = [f for f, ts in by_family.items() if len(ts) >= k + q]
    if not families:
        raise ValueError(f"no family has K + Q = {k + q} traces; sizes: { {f: len(t) for f, t in by_family.items()} }")
    n_features = by_family[families[0]][0].features.shape[1]
    tensors = TraceTensors([t for f in families for t in by_family[f]])
    sampler = EpisodeSampler(by_family, k, q, families=families, seed=0)
    probes = float(np.mean([t.n_probes for f in families for t in by_family[f]]))

    def draw() -> list[EpisodeBatch]:
        return [EpisodeBatch(e.family, tensors.collate(e.support), tensors.collate(e.query))
                for e in sampler.sample_batch(meta_batch)]

    out = {"families": families, "n_features": n_features, "probes_per_trace": probes,
           "sampling_ms": timed(draw, repeats, rounds) * 1e3, "rows": []}
    for kind in kinds:
        for algorithm, first_order in settings:
            for backend in backends:
                module = MetaStoppingModule(
                    n_features, predictor=PredictorConfig(hidden=hidden, depth=depth, kind=kind),
                    adapter=AdapterConfig(algorithm, inner_lr=0.1, inner_steps=inner_steps, first_order=first_order),
                    compare_random_init=False,
                )
                module.adapter = with_backend(module.adapter, backend)
                opt = torch.optim.Adam(module.parameters(), lr=1e-3)
                fixed = draw()

                def step(batch=None) -> None:
                    opt.zero_grad()
                    module._shared_step(batch if batch is not None else draw(), "train").backward()
                    opt.step()

                module.log = lambda *a, **kw: None  # no Trainer attached

                def loop_step() -> None:
                    opt.zero_grad()
                    a = module.adapter
                    torch.stack([a.loss(a.adapt(ep.support), ep.query) for ep in fixed]).mean().backward()
                    opt.step()

                t_full = timed(step, repeats, rounds)
                t_step = timed(lambda: step(fixed), repeats, rounds)
                t_loop = timed(loop_step, repeats, rounds)
                support = fixed[0].support
                with torch.no_grad():
                    t_adapt = timed(lambda: module.adapter.adapt(support)(fixed[0].query), repeats, rounds)
                out["rows"].append({"kind": kind, "algorithm": algorithm, "order": "first" if first_order else "second",
                                    "backend": backend or "learn2learn", "meta_steps_per_s": 1 / t_full,
                                    "step_only_per_s": 1 / t_step, "loop_per_s": 1 / t_loop, "adapt_ms": t_adapt * 1e3})
    return out


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
    res = measure(by_family, args.meta_batch, args.k, args.q, args.inner_steps, args.hidden, args.depth,
                  tuple(args.kinds.split(",")), args.repeats, backends=adapter_backends())
    print(f"{source}: {len(res['families'])} families, {res['n_features']} features, {res['probes_per_trace']:.1f} "
          f"probes/trace; meta-batch {args.meta_batch}, K={args.k}, Q={args.q}, {args.inner_steps} inner steps, "
          f"MLP {args.depth}x{args.hidden}, torch threads {torch.get_num_threads()}; "
          f"figures are CPU time of this process (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    print(f"episode sampling + collation: {res['sampling_ms']:.2f} ms per meta-batch")
    print(f"{'kind':<6} {'algorithm':<9} {'order':<6} {'backend':<11} {'meta-steps/s':>12} {'step only':>10} "
          f"{'loop':>7} {'adapt K=16 ms':>14}")
    for r in res["rows"]:
        print(f"{r['kind']:<6} {r['algorithm']:<9} {r['order']:<6} {r['backend']:<11} {r['meta_steps_per_s']:>12.1f} "
              f"{r['step_only_per_s']:>10.1f} {r['loop_per_s']:>7.1f} {r['adapt_ms']:>14.2f}")


if __name__ == "__main__":
    main()
