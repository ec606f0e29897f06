"""Shared fixtures: everything tiny and built locally (no hub access, ever)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pytest
import torch

torch.set_num_threads(1)

from maml_stop.data import store  # noqa: E402

TINY_FEATURES = ["f0", "f1", "f2", "f3", "logprob_mean", "same_as_prev", "tokens_so_far", "probe_index"]


def make_trace_rows(family: str, n: int, seed: int, shift: float = 0.0, n_features: int = 8) -> list[dict]:
    """Synthetic trace rows in the stored schema. A probe's answer is correct once the trace's hidden
    'solved' step has passed; feature f0 (plus a family-specific shift) carries that signal."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        p = int(rng.integers(3, 9))
        solve_at = int(rng.integers(0, p + 2))  # may be never (>= p)
        final_em = bool(solve_at <= p or rng.random() < 0.3)
        pos = (np.arange(p) + 1) * 16
        em = [bool(j >= solve_at) for j in range(p)]
        feats = rng.normal(size=(p, n_features)).astype(np.float32)
        feats[:, 0] += np.array([2.0 if e else -1.0 for e in em]) + shift
        feats[:, n_features - 1] = np.arange(p)
        answers = [("42" if e else str(int(rng.integers(0, 40)))) for e in em]
        rows.append(
            {
                "trace_id": f"{family}/{i:05d}#0",
                "question_id": f"{family}/{i:05d}",
                "family": family,
                "split": ["train", "validation", "test"][i % 3],
                "question": f"question {i}",
                "gold": "42",
                "model": "synthetic",
                "prompt_tokens": 20,
                "generated_text": "...",
                "final_answer": "42" if final_em else "7",
                "final_em": final_em,
                "reasoning_tokens": int(pos[-1] + rng.integers(1, 16)),
                "hit_cap": False,
                "probe_positions": pos.astype(int).tolist(),
                "probe_reasons": ["every_n"] * p,
                "probe_answers": answers,
                "probe_texts": [" " + a for a in answers],
                "probe_em": em,
                "probe_tokens": [6] * p,
                "probe_answer_tokens": [2] * p,
                "probe_logprob_mean": (-rng.random(p)).astype(np.float32).tolist(),
                "probe_logprob_min": (-rng.random(p) - 1).astype(np.float32).tolist(),
                "features": feats.astype(np.float16).tolist(),
            }
        )
    return rows


def write_tiny_corpus(root, families=("fam_a", "fam_b", "fam_c"), n: int = 60, n_features: int = 8) -> str:
    names = TINY_FEATURES if n_features == len(TINY_FEATURES) else [f"f{i}" for i in range(n_features)]
    store.write_meta(root, {"feature_names": names, "model": {"name": "synthetic"}})
    for k, fam in enumerate(families):
        rows = make_trace_rows(fam, n, seed=k, shift=0.3 * k, n_features=n_features)
        store.write_shard(root, fam, "all", rows)
    return str(root)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> str:
    """A three-family synthetic trace corpus (60 traces each, 8 features) in the stored schema."""
    return write_tiny_corpus(tmp_path_factory.mktemp("tiny_corpus"))
