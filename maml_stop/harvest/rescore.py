"""Re-score a stored corpus with the current answer extraction and EM code.

The harvester stores the raw texts (the full generation and every forced probe continuation), so labels
can be recomputed whenever a family's extraction or scoring improves, without touching the model:
final answer and EM, probe answers and EM, and the four answer-stability features (which depend only on
the sequence of probe answers). Shards are rewritten atomically; ``meta.json`` records the rescoring.

    python -m maml_stop.harvest.rescore experiments/corpus/qwen05 [forced]   # forced: switch the cap rule
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from maml_stop.data import store
from maml_stop.probe.features import answer_key, answer_stability
from maml_stop.probe.labels import CAP_ANSWERS, final_answer
from tasks import get_family
from tasks.base import Question

_STABILITY = ("answer_empty", "same_as_prev", "run_length", "n_distinct")


def stability_features(answers: list[str | None]) -> list[dict[str, float]]:
    """The answer-stability features of each probe, as the featurizer computes them."""
    out, previous = [], []
    for answer in answers:
        key = answer_key(answer)
        out.append(answer_stability(previous, key))
        previous.append(key)
    return out


def rescore(root: str | Path, cap_answer: str | None = None) -> dict[str, int]:
    """Rescore every shard of ``root``; ``cap_answer`` (``"text"`` | ``"forced"``) switches the corpus's
    rule for the answer of a capped run (recorded in ``meta.json`` ``generation.cap_answer``); None keeps
    the stored rule."""
    meta = store.read_meta(root)
    if cap_answer is not None:
        if cap_answer not in CAP_ANSWERS:
            raise ValueError(f"unknown cap_answer {cap_answer!r}; valid: {', '.join(CAP_ANSWERS)}")
        meta["generation"]["cap_answer"] = cap_answer
    cap_answer = meta["generation"].get("cap_answer", "text")
    names = meta["feature_names"]
    cols = {k: names.index(k) for k in _STABILITY if k in names}
    changed = {"final_em": 0, "probe_em": 0, "traces": 0}
    families: dict[str, object] = {}
    for path in store.shard_paths(root):
        rows = pq.read_table(path).to_pylist()
        for r in rows:
            fam = families.setdefault(r["family"], get_family(r["family"]))
            q = Question(r["question_id"], r["family"], r["split"], r["question"], r["gold"])
            answers = [fam.extract_probe_answer(t) for t in r["probe_texts"]]
            final = final_answer(fam, r["generated_text"], r["hit_cap"], r["probe_reasons"], answers, cap_answer,
                                 r["probe_positions"], r["reasoning_tokens"])
            em = bool(fam.score(final, q))
            changed["final_em"] += em != r["final_em"]
            r["final_answer"], r["final_em"] = final, em
            probe_em = [bool(fam.score(a, q)) for a in answers]
            changed["probe_em"] += sum(a != b for a, b in zip(probe_em, r["probe_em"]))
            r["probe_answers"], r["probe_em"] = [a or "" for a in answers], probe_em
            if cols and r["features"]:
                feats = np.asarray(r["features"], dtype=np.float32)
                for i, stab in enumerate(stability_features(answers)):
                    for k, j in cols.items():
                        feats[i, j] = stab[k]
                r["features"] = feats.astype(np.float16).tolist()
            changed["traces"] += 1
        store.rewrite_shard(path, rows)  # in place, atomically
    meta["rescored"] = {"at": time.strftime("%Y-%m-%d %H:%M:%S"), **changed}
    store.write_meta(root, {k: v for k, v in meta.items() if k != "schema_version"})
    return changed


if __name__ == "__main__":
    # python -m maml_stop.harvest.rescore ROOT [text|forced]
    print(rescore(sys.argv[1] if len(sys.argv) > 1 else "experiments/corpus/qwen05",
                  sys.argv[2] if len(sys.argv) > 2 else None))
