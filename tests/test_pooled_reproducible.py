"""Issue 29 item 12: the pooled probe trains to the same weights on other BLAS code paths (another CPU) when
trained in float64, and the protocol's pooled, fine-tuned and from-scratch figures (``baseline_dtype:
float64``, experiments/evaluate.yaml) come out the same, so that the main job's table regenerates to the
printed digit anywhere. Each path runs in its own process: MKL fixes its code path at start
(``MKL_CBWR``), and torch its thread pool."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import write_tiny_corpus
from trace_helpers import results_differences

TRAIN = """
import sys, numpy as np, torch
torch.set_num_threads(int(sys.argv[2]))
from maml_stop.data.corpus import TraceCorpus
from maml_stop.learn.pooled import train_predictor
from maml_stop.learn.predictor import PredictorConfig
corpus = TraceCorpus.load(sys.argv[1], families=["fam_a", "fam_b"])
traces = [t for f in ("fam_a", "fam_b") for t in corpus.traces(f)]
probe = train_predictor(traces, PredictorConfig(n_features=8, hidden=32, depth=1, kind="mlp"), 300, 0.5, "balanced",
                        dtype=getattr(torch, sys.argv[4]))
assert all(v.dtype == getattr(torch, sys.argv[4]) for v in probe.state_dict().values())
np.save(sys.argv[3], torch.cat([v.detach().double().flatten() for v in probe.state_dict().values()]).numpy())
"""

# (threads, extra environment): the default path and MKL's conditional-reproducibility modes, which pick
# other kernels as another CPU would (float32 training differed by 3.6e-7 under COMPATIBLE)
PATHS = {"1 thread": (1, {}), "MKL_CBWR=COMPATIBLE": (1, {"MKL_CBWR": "COMPATIBLE"}),
         "MKL_CBWR=AVX2": (1, {"MKL_CBWR": "AVX2"})}
needs_mkl = pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="the BLAS paths emulated here are MKL's")


def _on_each_path(args: list[str], tmp_path: Path) -> dict[str, Path]:
    """``python args...`` once per path of :data:`PATHS`, each in its own process; path -> its output
    folder (``args`` may name ``{out}`` and ``{threads}``)."""
    repo = str(Path(__file__).resolve().parents[1])
    outs = {}
    for i, (name, (threads, env)) in enumerate(PATHS.items()):
        out = tmp_path / f"path{i}"
        run_env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": repo, **env}
        argv = [sys.executable, *[a.format(out=out, threads=threads) for a in args]]
        done = subprocess.run(argv, env=run_env, timeout=300, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True)
        assert done.returncode == 0, f"{name}: {done.stderr[-2000:]}"
        outs[name] = out
    return outs


def _weights(probe) -> np.ndarray:
    return torch.cat([v.detach().double().flatten() for v in probe.state_dict().values()]).numpy()


def test_pooled_probe_weights_agree_between_1_and_2_threads(tiny_corpus):
    from maml_stop.data.corpus import TraceCorpus
    from maml_stop.learn.pooled import train_predictor
    from maml_stop.learn.predictor import PredictorConfig

    corpus = TraceCorpus.load(tiny_corpus, families=["fam_a", "fam_b"])
    traces = [t for f in ("fam_a", "fam_b") for t in corpus.traces(f)]
    config = PredictorConfig(n_features=8, hidden=32, depth=1, kind="mlp")
    before = torch.get_num_threads()
    weights = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            weights.append(_weights(train_predictor(traces, config, 100, 0.5, "balanced")))
    finally:
        torch.set_num_threads(before)
    assert np.abs(weights[0] - weights[1]).max() <= 1e-9


@pytest.mark.slow
@needs_mkl
@pytest.mark.parametrize("dtype", [
    pytest.param("float32", marks=pytest.mark.xfail(strict=True, reason="float32 training: 3.6e-7 apart under "
                                                    "MKL_CBWR=COMPATIBLE, why the protocol trains in float64")),
    "float64",
])
def test_pooled_probe_weights_agree_across_blas_paths(tmp_path, dtype):
    root = write_tiny_corpus(tmp_path / "c", families=("fam_a", "fam_b"), n=40)
    outs = _on_each_path(["-c", TRAIN, root, "{threads}", "{out}.npy", dtype], tmp_path)
    weights = {name: np.load(f"{out}.npy") for name, out in outs.items()}
    first = weights["1 thread"]
    for name, w in weights.items():
        assert np.abs(w - first).max() <= 1e-9, name


EVALUATE = "import sys; from maml_stop.evaluate.command import main; sys.exit(main(sys.argv[1:]))"


def _figures(out: Path) -> dict:
    """results.json of a run, less what differs between any two runs (its wall time, its folder)."""
    results = json.loads((out / "results.json").read_text())
    results.pop("seconds")
    results["config"].pop("out")
    return results


# what a float64 forward pass may still change on another BLAS path: the last bits of the probabilities (seen:
# 2e-16 in a Brier score), hence of their summaries; every decision figure must be equal
PROBABILITY_FIGURES = {"brier", "ece", "confidence", "frequency"}


@pytest.mark.slow
@needs_mkl
@pytest.mark.parametrize("dtype, batched", [
    ("float64", "true"), ("float64", "false"),
    pytest.param("float32", "true", marks=pytest.mark.xfail(strict=True, reason="float32 probes trained on support "
                                                            "carry the BLAS path into their probabilities")),
])
def test_baseline_figures_agree_across_blas_paths(tmp_path, dtype, batched):
    """The main job's pooled, fine-tuned and from-scratch probes (experiments/evaluate.yaml's protocol: 300
    pooled steps, 20 fine-tuning and 100 scratch steps, cross-fitting) give the same results.json on each
    BLAS path in ``baseline_dtype: float64``, batched and per episode: every decision figure equal, the
    probability summaries to 1e-12 (float32 misses that by orders of magnitude)."""
    root = write_tiny_corpus(tmp_path / "c", families=("fam_a", "fam_b", "fam_c"), n=40)
    repo = Path(__file__).resolve().parents[1]
    methods = ["full", "pooled", "finetuned", "scratch"]
    args = ["-c", EVALUATE, "--config", str(repo / "experiments" / "evaluate.yaml"), "--corpus", root,
            "--families", "[fam_a]", "--out", "{out}", "--methods", json.dumps(methods), "--k", "[4, 8]",
            "--episodes", "5", "--cache_dir", "null", "--progress", "false", "--batched", batched,
            "--baseline_dtype", dtype]
    results = {name: _figures(out) for name, out in _on_each_path(args, tmp_path).items()}
    first = results["1 thread"]
    assert first["config"]["baseline_dtype"] == dtype and first["methods"] == methods
    assert first["calibration"]["finetuned"]["ece"] > 0 and first["calibration"]["scratch"]["ece"] > 0
    for name, r in results.items():
        differences = results_differences(r, first)
        decisions = [d for d in differences if not PROBABILITY_FIGURES & {str(x) for x in d[0]}]
        assert not decisions, (name, decisions[:5])
        for path, a, b in differences:
            assert a == pytest.approx(b, rel=1e-12, abs=1e-15), (name, path)


def test_the_pooled_probe_cache_keys_on_the_precision(tiny_corpus, tmp_path):
    """A float32 pooled probe in cache_dir is never read for float64 (issue 29 item 12): each precision
    has its own entry, and each is read back in its own precision with the weights trained."""
    from maml_stop.data.corpus import TraceCorpus
    from maml_stop.evaluate.cache import pooled_probe
    from maml_stop.learn.pooled import train_predictor
    from maml_stop.learn.predictor import PredictorConfig

    traces = TraceCorpus.load(tiny_corpus).traces("fam_a")[:20]
    config = PredictorConfig(n_features=8, hidden=8, depth=1)
    single = pooled_probe(str(tmp_path), traces, config, 5, 0.5, dtype=torch.float32)
    double = pooled_probe(str(tmp_path), traces, config, 5, 0.5, dtype=torch.float64)
    assert len(list((tmp_path / "pooled").glob("*.pt"))) == 2
    again = pooled_probe(str(tmp_path), traces, config, 5, 0.5, dtype=torch.float64)  # read back
    trained = train_predictor(traces, config, 5, 0.5, dtype=torch.float64)
    assert single.dtype == torch.float32 and double.dtype == again.dtype == torch.float64
    for a, b, c in zip(trained.state_dict().values(), double.state_dict().values(), again.state_dict().values()):
        assert a.dtype == torch.float64 and torch.equal(a, b) and torch.equal(a, c)
    pairs = zip(single.state_dict().values(), double.state_dict().values())
    assert not all(torch.equal(a.double(), b) for a, b in pairs)  # two trainings, not one cast
