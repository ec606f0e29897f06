"""``maml-stop harvest``: (task families, causal LM, prompt, probe schedule) -> a stored trace corpus.

    maml-stop harvest --config experiments/corpus_qwen05.yaml
    maml-stop harvest --out runs/mycorpus --model path/to/model --families '[basic_arithmetic, gcd]' \
        --n_per_family 50

The harvest walks the families round-robin, one shard (``shard_size`` traces of one family) at a time,
so an interrupted harvest has some traces of every family. Each shard is written atomically; on restart
the traces already stored are skipped (by trace id), so nothing is duplicated or lost. Re-running with
settings that differ from the stored ``meta.json`` (model weights, prompt, schedule, features) is an
error rather than a silently mixed corpus.
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import maml_stop
from maml_stop.harvest import store
from maml_stop.harvest.features import ProbeFeaturizer
from maml_stop.harvest.generate import ProbingGenerator, TraceResult
from maml_stop.harvest.model import load_model, model_identity
from maml_stop.harvest.schedule import ProbeSchedule

log = logging.getLogger(__name__)

SPLIT_FRACTIONS = {"train": 0.7, "validation": 0.1, "test": 0.2}
# metadata keys that must agree between a stored corpus and a resumed harvest
_MUST_MATCH = ("model_weights", "schedule", "features", "prompt", "generation")


def trace_row(family, question, result: TraceResult, tokenizer, model_name: str) -> dict[str, Any]:
    text = tokenizer.decode(result.generated_ids, skip_special_tokens=True)
    final = family.extract_answer(text)
    width = len(result.features[0]) if result.features else 0
    return {
        "trace_id": f"{question.id}#0",
        "question_id": question.id,
        "family": family.name,
        "split": question.split,
        "question": question.question,
        "gold": question.gold,
        "model": model_name,
        "prompt_tokens": result.prompt_tokens,
        "generated_text": text,
        "final_answer": final,
        "final_em": bool(family.score(final, question)),
        "reasoning_tokens": len(result.generated_ids),
        "hit_cap": result.hit_cap,
        "probe_positions": [p.position for p in result.probes],
        "probe_reasons": [p.reason for p in result.probes],
        "probe_answers": [p.answer or "" for p in result.probes],
        "probe_texts": [p.text for p in result.probes],
        "probe_em": [bool(family.score(p.answer, question)) for p in result.probes],
        "probe_tokens": [p.cost for p in result.probes],
        "probe_answer_tokens": [len(p.answer_ids) for p in result.probes],
        "probe_logprob_mean": [float(np.mean(p.logprobs)) if p.logprobs else 0.0 for p in result.probes],
        "probe_logprob_min": [float(np.min(p.logprobs)) if p.logprobs else 0.0 for p in result.probes],
        "features": [f.astype(np.float16).tolist() for f in result.features] if width else [],
    }


def _family_settings(family) -> dict[str, Any]:
    """What defines a family's questions and scoring, recorded so that a changed family is visible."""
    keys = ("generator", "config", "answer_kind", "answer_trigger", "instruction", "pool_size", "use_rg_scorer")
    out = {"class": type(family).__name__}
    for key in keys:
        value = getattr(family, key, None)
        if value is not None:
            out[key] = value if isinstance(value, (str, int, float, bool, list, dict)) else str(value)
    return out


def _check_meta(out: Path, meta: dict[str, Any]) -> None:
    if not (out / store.META_FILE).is_file():
        store.write_meta(out, meta)
        return
    old = store.read_meta(out)
    for key in _MUST_MATCH:
        if old.get(key) != meta.get(key):
            raise store.CorpusError(
                f"corpus {out} was harvested with a different {key!r}:\n  stored: {old.get(key)}\n  now:    "
                f"{meta.get(key)}\nUse a new --out folder, or the stored settings to resume."
            )
    stored = {p.parent.name for p in store.shard_paths(out)}  # families with traces, plus this run's
    merged = {**old, **{k: v for k, v in meta.items() if k not in _MUST_MATCH}}
    merged["families"] = sorted(stored | set(meta["families"]))
    merged["family_settings"] = {**old.get("family_settings", {}), **meta.get("family_settings", {})}
    store.write_meta(out, merged)


def harvest_order(family, name: str, n_per_family: int, seed: int) -> list:
    """A family's questions in the order the harvest takes them: ``n_per_family`` split 70/10/20 over
    its train/validation/test pools, interleaved by a seeded shuffle (so that a harvest stopped early
    has some of each split)."""
    qs = []
    for split, frac in SPLIT_FRACTIONS.items():
        qs += family.questions(split, int(round(n_per_family * frac)), seed=seed)
    random.Random(f"{seed}/{name}").shuffle(qs)
    return qs


def harvest(
    out: str,
    model: str,
    families: list[str],
    n_per_family: int = 300,
    seed: int = 0,
    dtype: str = "bfloat16",
    batch_size: int = 16,
    shard_size: int = 64,
    max_new_tokens: int = 256,
    answer_max_tokens: int = 12,
    every_n: int | None = 32,
    boundary: bool = False,
    cues: list[str] | None = None,
    min_gap: int = 1,
    max_probes: int = 16,
    align: int = 1,
    answer_trigger: str = "\nFinal answer:",
    hidden_summary: str = "mean",
    proj_dim: int = 32,
    proj_seed: int = 0,
    do_sample: bool = False,
    temperature: float = 1.0,
    family_args: dict[str, dict[str, Any]] | None = None,
    max_shards: int | None = None,
    max_per_family: int | None = None,
    hash_weights: bool = True,
    num_threads: int = 1,
) -> dict[str, Any]:
    """Harvest ``n_per_family`` traces of each family into ``out`` (resumable). Returns a summary.

    Args:
        out: corpus folder (created; resumed when it exists).
        model: model folder, ``.gguf`` file or hub id.
        families: registry names of the task families.
        n_per_family: traces per family, split 70/10/20 over the families' train/validation/test pools.
        max_shards: stop after writing this many shards (for tests and time-boxed runs).
        max_per_family: harvest only the first this many of each family's ``n_per_family`` questions, in
            the harvest's seeded order: a prefix of the ``n_per_family`` recipe, so that raising it later
            extends the corpus without changing what is already stored.
    """
    from tasks import get_family

    torch.set_num_threads(num_threads)
    if not families:
        raise ValueError("no task families given")
    if max_per_family is not None and max_per_family < 1:
        raise ValueError(f"max_per_family must be >= 1 (or None for all n_per_family questions); got {max_per_family}")
    family_args = family_args or {}
    fams = {name: get_family(name, **family_args.get(name, {})) for name in families}
    for name, fam in fams.items():
        if getattr(fam, "answer_trigger", answer_trigger) != answer_trigger:
            raise ValueError(f"family {name!r} expects the answer trigger {fam.answer_trigger!r}, the harvest uses "
                             f"{answer_trigger!r}: harvest it separately with --answer_trigger")
    schedule = ProbeSchedule(every_n=every_n, boundary=boundary, cues=tuple(cues or ()), min_gap=min_gap,
                             max_probes=max_probes, align=align)
    schedule.check_fires_within(max_new_tokens)
    out_path = Path(out)

    # questions first: a bad family or too few questions fails before the model loads
    todo: dict[str, list] = {}
    for name, fam in fams.items():
        qs = harvest_order(fam, name, n_per_family, seed)
        if not qs:
            raise ValueError(f"family {name!r} yields no questions (n_per_family={n_per_family})")
        todo[name] = qs if max_per_family is None else qs[:max_per_family]

    lm, tok = load_model(model, dtype=dtype)
    featurizer = ProbeFeaturizer(lm.config.hidden_size, proj_dim=proj_dim, proj_seed=proj_seed, summary=hidden_summary)
    gen = ProbingGenerator(lm, tok, schedule, answer_trigger=answer_trigger, featurizer=featurizer,
                           max_new_tokens=max_new_tokens, answer_max_tokens=answer_max_tokens,
                           do_sample=do_sample, temperature=temperature, seed=seed)
    has_template = bool(getattr(tok, "chat_template", None))
    if not has_template:
        log.warning("the tokenizer has no chat template: prompts use the plain 'Question: ... Answer:' format")
    first = next(iter(fams.values()))
    meta = {
        "model": {"spec": model, "dtype": dtype, "chat_template": has_template},
        "model_weights": model_identity(model, hash_weights=hash_weights),
        "schedule": schedule.to_dict(),
        "features": featurizer.config(),
        "feature_names": featurizer.feature_names,
        "prompt": {"instruction": first.instruction, "system": first.system_prompt, "answer_trigger": answer_trigger,
                   "trigger_ids": gen.trigger_ids, "trigger_roundtrip": gen.trigger_roundtrip},
        "generation": {"max_new_tokens": max_new_tokens, "answer_max_tokens": answer_max_tokens,
                       "do_sample": do_sample, "temperature": temperature, "seed": seed},
        "families": sorted(fams),
        "family_settings": {n: _family_settings(f) for n, f in fams.items()},
        "code_version": maml_stop.__version__,
        "split_fractions": SPLIT_FRACTIONS,
    }
    _check_meta(out_path, meta)

    done = store.stored_trace_ids(out_path)
    pending = {n: [q for q in qs if f"{q.id}#0" not in done] for n, qs in todo.items()}
    # resume with the families that have the fewest traces, so restarts do not starve the last ones
    fams = dict(sorted(fams.items(), key=lambda kv: len(todo[kv[0]]) - len(pending[kv[0]])))
    total = sum(len(v) for v in pending.values())
    log.info("harvest: %d traces to do, %d already stored", total, len(done))

    from tqdm.auto import tqdm

    stats = {n: [0, 0, 0] for n in fams}  # traces, final EM, hit cap
    tokens, shards, t0 = 0, 0, time.time()
    bar = tqdm(total=total, desc="harvest", unit="trace", dynamic_ncols=True)
    try:
        while any(pending.values()) and (max_shards is None or shards < max_shards):
            for name in list(fams):
                if not pending[name] or (max_shards is not None and shards >= max_shards):
                    continue
                fam, chunk = fams[name], pending[name][:shard_size]
                prompts = {q.id: fam.render_prompt(q, tok) for q in chunk}
                # similar prompt lengths in a batch waste less compute on padding
                order = sorted(chunk, key=lambda q: len(tok(prompts[q.id], add_special_tokens=False)["input_ids"]))
                rows = []
                for b in range(0, len(order), batch_size):
                    batch = order[b : b + batch_size]
                    results = gen.run([prompts[q.id] for q in batch], fam.extract_probe_answer)
                    for q, r in zip(batch, results):
                        row = trace_row(fam, q, r, tok, model)
                        rows.append(row)
                        tokens += row["reasoning_tokens"] + sum(row["probe_tokens"])
                        s = stats[name]
                        s[0] += 1
                        s[1] += row["final_em"]
                        s[2] += row["hit_cap"]
                    bar.update(len(batch))
                    dt = time.time() - t0
                    bar.set_postfix(fam=name, traces_s=f"{bar.n / dt:.2f}", tok_s=f"{tokens / dt:.0f}")
                split_rows: dict[str, list] = {}
                for row in rows:
                    split_rows.setdefault(row["split"], []).append(row)
                for split, srows in split_rows.items():
                    store.write_shard(out_path, name, split, srows)
                shards += 1
                pending[name] = pending[name][len(chunk):]
                s = stats[name]
                log.info("%s: %d traces this run, final EM %.2f, hit cap %d", name, s[0], s[1] / max(s[0], 1), s[2])
    finally:
        bar.close()
    dt = time.time() - t0
    return {
        "traces": int(bar.n),
        "seconds": dt,
        "traces_per_s": bar.n / dt if dt else 0.0,
        "tokens_per_s": tokens / dt if dt else 0.0,
        "per_family": {n: {"traces": s[0], "final_em": s[1] / max(s[0], 1), "hit_cap": s[2]} for n, s in stats.items()},
        "remaining": sum(len(v) for v in pending.values()),
    }


def main(argv: list[str] | None = None) -> int:
    from jsonargparse import CLI

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    summary = CLI(harvest, args=argv, as_positional=False)
    log.info("harvest summary: %s", summary)
    return 0
