"""What a resumed harvest must agree with: the stored ``meta.json`` (the recipe) and the stored question
order; and the lock around the read-check-write of ``meta.json`` by workers starting together."""

from __future__ import annotations

import inspect
import json
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from maml_stop.data import store

log = logging.getLogger(__name__)

# metadata keys that must agree between a stored corpus and a resumed harvest (model_weights: by its hashes,
# check_weights)
MUST_MATCH = ("model_weights", "schedule", "features", "prompt", "generation", "order")


def check_weights(out: Path, was: dict[str, Any] | None, now: dict[str, Any]) -> None:
    """The model of a resumed harvest is the stored one when the sha256 of its weight files agree, whatever
    path or hub id it was loaded from (committed corpora record the absolute path of the machine that
    harvested them). Without hashes on either side (``hash_weights: false``) only the spec can be compared."""
    was = was or {}
    old_w, new_w = was.get("weights") or None, now.get("weights") or None
    if old_w and new_w:
        if old_w != new_w:
            raise store.CorpusError(
                f"corpus {out} was harvested with other model weights:\n  stored: {old_w} ({was.get('spec')})\n"
                f"  now:    {new_w} ({now.get('spec')})\nUse the stored model to resume, or a new --out folder.")
        if was.get("spec") != now.get("spec"):
            log.info("corpus %s: the model is now loaded from %s (stored: %s); its weights' sha256 agree, resuming",
                     out, now.get("spec"), was.get("spec"))
        return
    if old_w or new_w:
        raise store.CorpusError(
            f"corpus {out}: the weights' sha256 cannot be compared (stored: {old_w or 'not hashed'}; now: "
            f"{new_w or 'not hashed'}): resume with hash_weights true and the stored model")
    if was.get("spec") != now.get("spec"):
        raise store.CorpusError(
            f"corpus {out} was harvested from model {was.get('spec')!r}, now {now.get('spec')!r}, and neither "
            "run hashed the weights (hash_weights false): resume with the stored model, or hash its weights")


def check_meta(out: Path, meta: dict[str, Any]) -> None:
    if not (out / store.META_FILE).is_file():
        store.write_meta(out, meta)
        return
    old = store.read_meta(out)
    stored = {p.parent.name for p in store.shard_paths(out)}  # families with traces, plus this run's

    def refuse(key: str, was: Any, now: Any) -> None:
        raise store.CorpusError(
            f"corpus {out} was harvested with a different {key!r}:\n  stored: {was}\n  now:    {now}\n"
            "Use a new --out folder, or the stored settings to resume (a resumed harvest must not mix recipes)."
        )

    for key in MUST_MATCH:
        if key not in old and key == "order":  # written before the key was recorded: record it now
            log.warning("corpus %s does not record its question order; recording %s", out, meta[key])
            continue
        if key == "model_weights":
            check_weights(out, old.get(key), meta[key])
            continue
        if old.get(key) != meta.get(key):
            refuse(key, old.get(key), meta.get(key))
    if old.get("model", {}).get("dtype") != meta["model"]["dtype"]:
        refuse("model.dtype", old.get("model", {}).get("dtype"), meta["model"]["dtype"])
    was_device = old.get("model", {}).get("device", "cpu")  # an execution setting, not part of the recipe
    if was_device != meta["model"].get("device", "cpu"):
        log.warning("corpus %s was harvested on device %s, this run uses %s: greedy traces may differ in rare "
                    "near-ties (kernels differ); meta.json records the latest device", out, was_device,
                    meta["model"].get("device"))
    for name, settings in meta.get("family_settings", {}).items():
        was = old.get("family_settings", {}).get(name)
        if name in stored and was is not None and was != settings:
            refuse(f"family_settings.{name}", was, settings)
    merged = {**old, **{k: v for k, v in meta.items() if k not in MUST_MATCH or k not in old}}
    merged["families"] = sorted(stored | set(meta["families"]))
    merged["family_settings"] = {**old.get("family_settings", {}), **meta.get("family_settings", {})}
    store.write_meta(out, merged)


def recorded_args(fn, call: dict[str, Any]) -> dict[str, Any]:
    """The arguments of ``call`` that differ from ``fn``'s defaults, as JSON: ``meta.json``'s
    ``harvest_args``, from which the datasheet writes the command that regenerates the corpus."""
    call = json.loads(json.dumps(call, default=str))
    params = inspect.signature(fn).parameters
    return {k: v for k, v in call.items() if k not in params or params[k].default is inspect.Parameter.empty
            or json.dumps(params[k].default, default=str) != json.dumps(v)}


@contextmanager
def meta_lock(out: Path):
    """An exclusive lock on ``out/.meta.lock`` (POSIX ``flock``) around the read-check-write of
    ``meta.json``, so that workers starting together neither lose nor mix each other's metadata."""
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".meta.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def check_stored_in_order(done: set[str], orders: dict[str, set[str]]) -> None:
    """Refuse to extend a family whose stored traces are not all in its question order: its questions
    changed since they were stored (a generator whose output depends on the process, e.g. on
    PYTHONHASHSEED, or another reasoning-gym version), and a resume would mix two question sets."""
    for name, order in orders.items():
        stray = sorted(t for t in done if store.question_id_of(t).split("/", 1)[0] == name and t not in order)
        if stray:
            raise ValueError(
                f"family {name!r}: {len(stray)} stored traces are not in its question order now (e.g. {stray[0]}): "
                "its questions changed since they were stored (a question generator that depends on the process "
                "or the reasoning-gym version). Refusing to mix two question sets: delete the family's shards "
                "or harvest it into another folder.")
