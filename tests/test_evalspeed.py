"""The fast evaluation path (issue 26) against the reference path: the same results.json to the last
digit on a small run of every default method, cross-fitting included."""

from __future__ import annotations

import json

import numpy as np
import pytest

from maml_stop.decide import outcomes as V
from maml_stop.decide.policies import AnswerConsistency, evaluate_policy, sweep_policy
from maml_stop.evaluate.command import main
from trace_helpers import results_differences, write_tiny_checkpoint

ALL = ["full", "first_probe", "budget", "consistency", "confidence", "pooled", "finetuned", "scratch", "maml",
       "oracle", "oracle_equal_em"]


def _run(tiny_corpus, ckpt, out, batched: bool, dtype: str = "float32") -> dict:
    code = main([
        "--corpus", tiny_corpus, "--checkpoint", ckpt, "--out", str(out), "--k", "[4, 8]",
        "--episodes", "3", "--pooled_steps", "20", "--scratch_steps", "10", "--finetune_steps", "3",
        "--progress", "false", "--threshold_methods", "[em_target, ltt, fixed, cost]", "--ltt_delta", "0.1",
        "--crossfit", "true", "--methods", json.dumps(ALL), "--batched", str(batched).lower(),
        "--baseline_dtype", dtype,
    ])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    results.pop("seconds")
    results["config"].pop("batched")
    results["config"].pop("out")
    return results


# The batched inner loop (maml_stop/evaluate/batched.py) sums in batched matrix products, in another order
# than the per-episode loop: adapted weights, and so the float32 probabilities, can differ by an ulp (6e-8
# relative; seen: 1.3e-9 relative in an ECE, 5e-11 absolute in a Brier score). Every decision (the chosen
# thresholds, EM, tokens, savings, curves) must be equal; the probability summaries (Brier, ECE, the
# reliability diagram) equal to 1e-6 relative, far below their printed digits (three decimals).
PROBABILITY_FIGURES = {"brier", "ece", "confidence", "frequency"}


@pytest.mark.parametrize("dtype", ["float32", pytest.param("float64", marks=pytest.mark.slow)])
def test_fast_path_gives_the_reference_results(tiny_corpus, tmp_path, dtype):
    """Also with the probes trained here in float64 (baseline_dtype, experiments/evaluate.yaml)."""
    ckpt = write_tiny_checkpoint(tmp_path / "tiny.ckpt")
    reference = _run(tiny_corpus, ckpt, tmp_path / "reference", batched=False, dtype=dtype)
    fast = _run(tiny_corpus, ckpt, tmp_path / "fast", batched=True, dtype=dtype)
    assert reference["results"] and set(reference["methods"]) == set(ALL)
    differences = results_differences(fast, reference)
    exact = [d for d in differences if not PROBABILITY_FIGURES & {str(x) for x in d[0]}]
    assert not exact, exact[:5]
    for path, a, b in differences:
        assert a == pytest.approx(b, rel=1e-6, abs=1e-9), path


def test_candidate_outcomes_equal_the_per_trace_loop(tiny_corpus):
    from maml_stop.data.corpus import TraceCorpus

    traces = TraceCorpus.load(tiny_corpus).traces("fam_a")[:25]
    policy = AnswerConsistency(windows=[4, 3, 2, 1]).fit(traces[:8])
    fast = sweep_policy(policy, traces)
    with V.vectorised(False):
        slow = sweep_policy(policy, traces)
        slow_out = evaluate_policy(policy, traces, param=2)
    fast_out = evaluate_policy(policy, traces, param=2)
    for a, b in ((fast.em, slow.em), (fast.tokens, slow.tokens), (fast.full_tokens, slow.full_tokens)):
        np.testing.assert_array_equal(a, b)
    for field in ("em", "total_tokens", "reasoning_tokens", "full_em", "full_tokens", "stopped_early"):
        np.testing.assert_array_equal(getattr(fast_out, field), getattr(slow_out, field), err_msg=field)
    assert fast.em.shape == (25, 4) and V.is_enabled()


def test_token_budget_outcomes_equal_the_per_trace_loop(tiny_corpus):
    from maml_stop.data.corpus import TraceCorpus
    from maml_stop.decide.policies import TokenBudget

    traces = TraceCorpus.load(tiny_corpus).traces("fam_b")[:30]
    policy = TokenBudget(quantiles=[1.0, 0.7, 0.4, 0.1, 0.0]).fit(traces[:10])
    fast = sweep_policy(policy, traces)
    with V.vectorised(False):
        slow = sweep_policy(policy, traces)
        slow_out = evaluate_policy(policy, traces, param=policy.candidates[2])
    fast_out = evaluate_policy(policy, traces, param=policy.candidates[2])
    np.testing.assert_array_equal(fast.em, slow.em)
    np.testing.assert_array_equal(fast.tokens, slow.tokens)
    for field in ("em", "total_tokens", "reasoning_tokens", "stopped_early"):
        np.testing.assert_array_equal(getattr(fast_out, field), getattr(slow_out, field), err_msg=field)
    assert 0 < fast_out.stopped_early.sum() < len(traces)  # both branches taken


def test_pooled_probe_cache_returns_the_trained_weights(tiny_corpus, tmp_path):
    import torch

    from maml_stop.data.corpus import TraceCorpus
    from maml_stop.evaluate.cache import pooled_probe, traces_digest
    from maml_stop.learn.pooled import train_predictor
    from maml_stop.learn.predictor import PredictorConfig

    traces = TraceCorpus.load(tiny_corpus).traces("fam_a")[:20]
    config = PredictorConfig(n_features=traces[0].features.shape[1], hidden=8, depth=1)
    trained = train_predictor(traces, config, 5, 0.5)
    first = pooled_probe(str(tmp_path), traces, config, 5, 0.5)  # trained and stored
    again = pooled_probe(str(tmp_path), traces, config, 5, 0.5)  # read back
    assert len(list((tmp_path / "pooled").glob("*.pt"))) == 1
    for a, b, c in zip(trained.state_dict().values(), first.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b) and torch.equal(a, c)
    pooled_probe(str(tmp_path), traces, config, 6, 0.5)  # other settings: another entry
    pooled_probe(str(tmp_path), traces[:19], config, 5, 0.5)  # other traces: another entry
    assert len(list((tmp_path / "pooled").glob("*.pt"))) == 3
    assert traces_digest(traces) != traces_digest(traces[::-1])
