"""Speed of ``maml-stop evaluate`` at the bundled corpus's scale, on a synthetic corpus.

    python experiments/bench_evaluate.py [--traces 400] [--probes 16] [--episodes 10]

Writes a synthetic corpus (3 families, ``--traces`` traces each, up to ``--probes`` probes, 45
features like experiments/corpus/qwen05), a tiny untrained checkpoint, runs the protocol on one
held-out family at K in {4, 8, 16, 32} and prints seconds per episode and the projected time of the
full protocol (50 episodes, every family of the corpus recipe).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from maml_stop.data import store

N_FEATURES = 45
N_FAMILIES_IN_RECIPE = 14


def synthetic_rows(family: str, n: int, max_probes: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        p = int(rng.integers(2, max_probes + 1))
        solve = int(rng.integers(0, p + 3))
        em = [j >= solve for j in range(p)]
        feats = rng.normal(size=(p, N_FEATURES)).astype(np.float32)
        feats[:, 0] += np.where(em, 1.5, -0.5)
        pos = (np.arange(p) + 1) * 24
        answers = ["42" if e else str(int(rng.integers(0, 9))) for e in em]
        final = bool(solve < p or rng.random() < 0.3)
        rows.append({
            "trace_id": f"{family}/{i:05d}#0", "question_id": f"{family}/{i:05d}", "family": family,
            "split": "test", "question": "q", "gold": "42", "model": "synthetic", "prompt_tokens": 30,
            "generated_text": "", "final_answer": "42" if final else "7", "final_em": final,
            "reasoning_tokens": int(pos[-1] + rng.integers(1, 40)), "hit_cap": False,
            "probe_positions": pos.tolist(), "probe_reasons": ["every_n"] * p, "probe_answers": answers,
            "probe_texts": answers, "probe_em": em, "probe_tokens": [8] * p, "probe_answer_tokens": [3] * p,
            "probe_logprob_mean": (-rng.random(p)).tolist(), "probe_logprob_min": (-rng.random(p) - 1).tolist(),
            "features": feats.astype(np.float16).tolist(),
        })
    return rows


def measure(traces: int = 400, probes: int = 16, episodes: int = 10, k: list[int] | None = None,
            methods: list[str] | None = None) -> dict:
    """Run the protocol (cross-fitting, as in evaluate.yaml) on one held-out synthetic family and time it.
    ``k`` (the K values)/``methods``: default the :class:`EvaluateConfig` ones. Returns ``seconds`` (report
    included), ``evaluation_seconds`` (the protocol's own), ``episodes``, ``seconds_per_episode``, ``k``, ``methods``."""
    from maml_stop.evaluate.protocol import EvaluateConfig, run
    from maml_stop.learn.adapter import AdapterConfig
    from maml_stop.learn.module import MetaStoppingModule

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "corpus"
        names = [f"f{i}" for i in range(N_FEATURES)]
        store.write_meta(root, {"feature_names": names, "model": {"name": "synthetic"}})
        for i, fam in enumerate(("fam_a", "fam_b", "fam_c")):  # not `k`: that is the K values
            store.write_shard(root, fam, "test", synthetic_rows(fam, traces, probes, i))
        module = MetaStoppingModule(n_features=N_FEATURES, feature_names=names,
                                    adapter=AdapterConfig(inner_steps=3, first_order=True))
        ckpt = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "datamodule_hyper_parameters": {"val_families": ["fam_b"], "test_families": ["fam_c"]}}
        module.on_save_checkpoint(ckpt)
        torch.save(ckpt, Path(tmp) / "tiny.ckpt")
        extra = {name: value for name, value in (("k", k), ("methods", methods)) if value is not None}
        cfg = EvaluateConfig(corpus=str(root), checkpoint=str(Path(tmp) / "tiny.ckpt"), out=str(Path(tmp) / "out"),
                             episodes=episodes, progress=False, crossfit=True, **extra)  # as in evaluate.yaml
        start = time.perf_counter()
        results = run(cfg)
        seconds = time.perf_counter() - start
    n = episodes * len(cfg.k)
    return {"seconds": seconds, "evaluation_seconds": results["seconds"], "episodes": n,
            "seconds_per_episode": seconds / n, "k": list(cfg.k), "methods": list(cfg.methods)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--traces", type=int, default=400)
    parser.add_argument("--probes", type=int, default=16)
    parser.add_argument("--episodes", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    res = measure(args.traces, args.probes, args.episodes)
    print(f"{args.traces} traces/family, <= {args.probes} probes, {len(res['methods'])} methods, "
          f"K in {res['k']}: {res['seconds']:.1f} s for {res['episodes']} episodes of one family "
          f"({res['seconds_per_episode']:.2f} s/episode, report included; evaluation alone "
          f"{res['evaluation_seconds']:.1f} s)")
    projected = res["seconds_per_episode"] * 50 * len(res["k"]) * N_FAMILIES_IN_RECIPE
    print(f"projected full protocol (50 episodes x {len(res['k'])} K x {N_FAMILIES_IN_RECIPE} held-out families): "
          f"{projected / 60:.0f} min")


if __name__ == "__main__":
    main()
