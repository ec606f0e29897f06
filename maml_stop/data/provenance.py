"""Where a corpus's features came from, recorded in every checkpoint and adapted artifact and checked
where they are used (issue 29: a checkpoint recorded only feature names, so a corpus harvested with
another projection seed was accepted silently, and an artifact ran with another model of the same width).

The provenance of a corpus is the part of its ``meta.json`` that fixes what a feature vector means:

* ``model``: the sha256 of each weight file (None when the harvest ran with ``hash_weights: false``);
* ``features``: the featurizer (hidden size, projection seed and width, summary, mid layer);
* ``schedule`` and ``prompt``: the probe recipe (where probes fire, the answer trigger).

``hash`` is the sha256 of those parts as canonical JSON. A mismatch is refused naming the parts that
differ; ``allow=True`` (the commands' ``--allow_other_recipe`` / ``--allow_other_model``) turns the
refusal into a warning, for deliberate cross-recipe or cross-model studies.

>>> p = corpus_provenance({"features": {"proj_seed": 0}, "schedule": {"every_n": 32}})
>>> q = corpus_provenance({"features": {"proj_seed": 1}, "schedule": {"every_n": 32}})
>>> differences(p, q)
['features.proj_seed: 0 vs 1']
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

log = logging.getLogger(__name__)

PARTS = ("model", "features", "schedule", "prompt")


class ProvenanceError(ValueError):
    """A checkpoint, artifact or model used with features of another recipe."""


def corpus_provenance(meta: dict[str, Any]) -> dict[str, Any] | None:
    """``{"hash", "parts"}`` of a corpus ``meta.json``; None when it records none of the parts (a
    synthetic corpus), so that there is nothing to check."""
    weights = (meta.get("model_weights") or {}).get("weights")
    parts = {"model": weights or None, "features": meta.get("features"), "schedule": meta.get("schedule"),
             "prompt": meta.get("prompt")}
    if all(v is None for v in parts.values()):
        return None
    parts = json.loads(json.dumps(parts, sort_keys=True))
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return {"hash": digest, "parts": parts}


def _leaves(x: Any, prefix: str) -> dict[str, Any]:
    if isinstance(x, dict) and x:
        out: dict[str, Any] = {}
        for k, v in x.items():
            out.update(_leaves(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: x}


def differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """``"part.key: a vs b"`` for every leaf that differs (parts that either side does not know, None,
    are not compared: a corpus harvested without weight hashes cannot be checked for its model)."""
    out = []
    for part in PARTS:
        x, y = a["parts"].get(part), b["parts"].get(part)
        if x is None or y is None:
            continue
        lx, ly = _leaves(x, part), _leaves(y, part)
        out += [f"{k}: {lx.get(k)} vs {ly.get(k)}" for k in sorted(set(lx) | set(ly)) if lx.get(k) != ly.get(k)]
    return out


def check_provenance(expected: dict[str, Any] | None, got: dict[str, Any] | None, what: str, other: str,
                     allow: bool = False, flag: str = "--allow_other_recipe") -> None:
    """Refuse ``other`` (e.g. "the corpus runs/c") for ``what`` (e.g. "the checkpoint x.ckpt") when
    their provenances differ; nothing to check when either is unknown (written before provenance)."""
    if expected is None and got is not None:  # an older checkpoint or artifact: loads, unchecked
        log.warning("%s records no corpus recipe (written before provenance, issue 29): %s is not checked against "
                    "it", what, other)
        return
    if expected is None or got is None or expected["hash"] == got["hash"]:
        return
    diff = differences(expected, got)
    if not diff:  # differ only in parts one side does not know
        return
    shown = "; ".join(diff[:6]) + (f"; and {len(diff) - 6} more" if len(diff) > 6 else "")
    message = f"{what} and {other} come from different recipes ({shown}; 'x vs y': the first's, then the second's)"
    if allow:
        log.warning("%s (allowed by %s)", message, flag)
        return
    raise ProvenanceError(f"{message}. Its features mean something else; use the matching corpus/model, or pass "
                          f"{flag} for a deliberate cross-recipe use")
