"""``maml-stop harvest``: (task families, causal LM, prompt, probe schedule) -> a stored trace corpus.

    maml-stop harvest --config experiments/corpus_qwen05.yaml
    maml-stop harvest --out runs/mycorpus --model path/to/model --families '[basic_arithmetic, gcd]' \
        --n_per_family 50

The harvest walks the families round-robin, one shard (``shard_size`` traces of one family) at a time,
so an interrupted harvest has some traces of every family. Each shard is written atomically; on restart
the traces already stored are skipped (by trace id), so nothing is duplicated or lost. Re-running with
settings that differ from the stored ``meta.json`` (model weights and dtype, prompt, schedule, features,
generation, question order, a stored family's settings) is an error rather than a silently mixed corpus.
Shards are numbered past the highest index present, and the harvest checks on exit that every trace it
wrote reads back exactly once.
"""

from __future__ import annotations

import logging
import math
import random
from fractions import Fraction
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import maml_stop
from maml_stop.data import store
from maml_stop.data.lock import corpus_lock
from maml_stop.data.repair import main as repair_main
from maml_stop.data.outputs import remove_stale_temp
from maml_stop.harvest.interrupt import StopRequest
from maml_stop.harvest.resume import check_meta, check_stored_in_order, meta_lock, recorded_args
from maml_stop.probe.features import ProbeFeaturizer
from maml_stop.probe.engine import ProbingGenerator, TraceResult
from maml_stop.probe.labels import CAP_ANSWERS, final_answer
from maml_stop.harvest.model import load_model, model_identity, resolve_device
from maml_stop.probe.schedule import ProbeSchedule
from maml_stop.probe.think import check_think_trigger, count_think_tokens, think_schedule
from tasks import get_family
from tasks.base import check_reasoning_format, think_trigger

log = logging.getLogger(__name__)

SPLIT_FRACTIONS = {"train": 0.7, "validation": 0.1, "test": 0.2}


def trace_row(family, question, result: TraceResult, tokenizer, model_name: str,
              cap_answer: str = "text", reasoning_format: str = "plain") -> dict[str, Any]:
    """A stored trace row; in think mode with the optional columns ``think_tokens`` and
    ``after_think_tokens`` (:func:`maml_stop.probe.think.count_think_tokens`; they add up to
    ``reasoning_tokens``)."""
    text = tokenizer.decode(result.generated_ids, skip_special_tokens=True)
    final = final_answer(family, text, result.hit_cap, [p.reason for p in result.probes],
                         [p.answer for p in result.probes], cap_answer,
                         [p.position for p in result.probes], len(result.generated_ids))
    width = len(result.features[0]) if result.features else 0
    think = {}
    if reasoning_format == "think":
        count = count_think_tokens(tokenizer, result.generated_ids)
        think = {"think_tokens": count.think_tokens, "after_think_tokens": count.after_think_tokens}
    return {
        "trace_id": store.make_trace_id(question.id),
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
        **think,
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


def split_counts(n: int) -> dict[str, int]:
    """``n`` questions over the splits of :data:`SPLIT_FRACTIONS`, summing to exactly ``n`` (largest
    remainder, ties to the earlier split). Where rounding each split alone sums to ``n`` (300, 160, 96,
    every recipe in experiments/) the counts are the rounded ones; elsewhere rounding lost or added one
    (issue 29: 12 -> 11, 8 -> 9).

    >>> split_counts(12), split_counts(300)
    ({'train': 9, 'validation': 1, 'test': 2}, {'train': 210, 'validation': 30, 'test': 60})
    """
    exact = {s: n * Fraction(str(f)) for s, f in SPLIT_FRACTIONS.items()}  # 0.7 * 12 is 8.39999... in floats
    counts = {s: int(v) for s, v in exact.items()}
    by_remainder = sorted(exact, key=lambda s: -(exact[s] - counts[s]))  # stable: ties keep split order
    for s in by_remainder[:n - sum(counts.values())]:
        counts[s] += 1
    return counts


def harvest_order(family, name: str, n_per_family: int, seed: int) -> list:
    """A family's questions in the order the harvest takes them: ``n_per_family`` split 70/10/20 over
    its train/validation/test pools, interleaved by a seeded shuffle (so that a harvest stopped early
    has some of each split)."""
    qs = []
    for split, count in split_counts(n_per_family).items():
        qs += family.questions(split, count, seed=seed)
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
    mid_layer: int | None = None,
    probe_at_start: bool = False,
    probe_at_cap: bool = False,
    cap_answer: str | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    family_args: dict[str, dict[str, Any]] | None = None,
    max_shards: int | None = None,
    worker: int = 0,
    num_workers: int = 1,
    max_per_family: int | None = None,
    hash_weights: bool = True,
    num_threads: int = 1,
    reasoning_format: str = "plain",
    device: str = "cpu",
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
        mid_layer: also store a projected summary of the hidden state after this decoder layer (an
            index into ``output_hidden_states``, 0 = embeddings) as features ``m0..``.
        probe_at_start: also force an answer at position 0, before any reasoning.
        probe_at_cap: also force an answer at the token cap of a trace that reaches it; that answer is
            then the trace's ``final_answer`` (``meta.json``: ``generation.cap_answer = "forced"``).
        cap_answer: the answer of a capped trace, ``text`` (read from the truncated text) or ``forced`` (the
            probe at the cap: the last probe with reason ``cap`` or at the cap position); None follows
            ``probe_at_cap``. ``forced`` without ``probe_at_cap`` is what a corpus rescored with
            ``maml-stop rescore --cap_answer forced`` records, so that its harvest resumes with this option.
        worker, num_workers: harvest only part ``worker`` of ``num_workers`` disjoint parts of every
            family's question order (every ``num_workers``-th question, from the ``worker``-th), so that
            several processes or machines harvest one corpus into one folder: each worker tags its
            shards (``-w<i>of<n>``) and skips traces already stored by any of them; together they store
            exactly the traces of a single run.
        hash_weights: record the sha256 of the weight files (about 1 s a GB). With ``false`` only the
            paths are recorded, so weights replaced in place under the same path are NOT detected on
            resume and a corpus could mix two models: keep it on for any corpus that matters.
        reasoning_format: ``plain``, or ``think`` for models that reason inside ``<think> ... </think>``
            (:mod:`maml_stop.probe.think`): the prompt opens the think block, ``answer_trigger`` must close
            it (e.g. ``"\\n</think>\\n\\nFinal answer:"``), probes stop once the model closed it, and
            traces store ``think_tokens`` / ``after_think_tokens``. Part of the recipe (``prompt``).
        device: torch device of the model (``cpu``, ``cuda``, ``cuda:1``), checked before the model loads.
            An execution setting: not part of the recipe, so a harvest may resume on another device.

    A resumed harvest (same ``out``) must use the stored recipe: model weights and dtype, prompt,
    schedule, features, generation settings, question order (``n_per_family``, ``seed``) and the
    settings of every family already stored (``family_args``); any difference is refused, naming it.
    """
    call = {k: v for k, v in locals().items()}  # the arguments, recorded in meta.json as the recipe (datasheet)
    torch.set_num_threads(num_threads)
    if not families:
        raise ValueError("no task families given")
    if max_per_family is not None and max_per_family < 1:
        raise ValueError(f"max_per_family must be >= 1 (or None for all n_per_family questions); got {max_per_family}")
    for arg, value in (("n_per_family", n_per_family), ("batch_size", batch_size), ("shard_size", shard_size),
                       ("max_new_tokens", max_new_tokens), ("answer_max_tokens", answer_max_tokens),
                       ("num_threads", num_threads)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{arg} must be an integer >= 1, got {value!r}")
    if not (isinstance(num_workers, int) and num_workers >= 1 and isinstance(worker, int) and 0 <= worker < num_workers):
        raise ValueError(f"worker must be in 0..num_workers-1 and num_workers >= 1; got worker={worker!r}, "
                         f"num_workers={num_workers!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a number > 0 (1.0 samples from the model's distribution); "
                         f"got {temperature!r}")
    resolve_device(device)  # a bad device string, or CUDA on a machine without it, fails before anything loads
    check_reasoning_format(reasoning_format)
    if reasoning_format == "think":
        check_think_trigger(answer_trigger)
    if max_shards is not None and max_shards < 1:
        raise ValueError(f"max_shards must be >= 1 (or None: no limit), got {max_shards}")
    if len(set(families)) != len(families):
        raise ValueError(f"families lists a family twice: {families}")
    out_path = Path(out)
    if out_path.exists() and not out_path.is_dir():
        raise ValueError(f"--out {out} is a file, not a corpus folder")
    family_args = family_args or {}
    unknown = sorted(set(family_args) - set(families))
    if unknown:
        raise ValueError(f"family_args names {unknown}, which this harvest does not harvest; "
                         f"its families: {', '.join(families)}")
    fams = {name: get_family(name, **family_args.get(name, {})) for name in families}
    # traces, shards and meta.json go under the family's own name (a ``dataset`` family's ``name``), not its
    # registry name: two dataset families in one corpus would otherwise share shards/dataset/ (issue 14)
    by_name: dict[str, list[str]] = {}
    for name, fam in fams.items():
        by_name.setdefault(fam.name, []).append(name)
    clash = {n: regs for n, regs in by_name.items() if len(regs) > 1}
    if clash:
        raise ValueError(f"families {clash} would store their traces under one family name; give each its own "
                         "name (family_args: {<family>: {name: ...}})")
    for name, fam in fams.items():
        expected = getattr(fam, "answer_trigger", answer_trigger)
        if reasoning_format == "think" and answer_trigger == think_trigger(expected):
            continue  # the family's trigger after closing the think block
        if expected != answer_trigger:
            raise ValueError(f"family {name!r} expects the answer trigger {fam.answer_trigger!r}, the harvest uses "
                             f"{answer_trigger!r}: harvest it separately with --answer_trigger")
    schedule = ProbeSchedule(every_n=every_n, boundary=boundary, cues=tuple(cues or ()), min_gap=min_gap,
                             max_probes=max_probes, align=align, at_start=probe_at_start, at_cap=probe_at_cap)
    schedule = think_schedule(schedule, reasoning_format)  # think: no probes after the model's own </think>
    schedule.check_fires_within(max_new_tokens)
    cap_answer = cap_answer if cap_answer is not None else ("forced" if probe_at_cap else "text")
    if cap_answer not in CAP_ANSWERS:
        raise ValueError(f"unknown cap_answer {cap_answer!r}; valid: {', '.join(CAP_ANSWERS)}")

    # questions first: a bad family or too few questions fails before the model loads
    todo: dict[str, list] = {}
    orders: dict[str, set[str]] = {}
    for name, fam in fams.items():
        qs = harvest_order(fam, name, n_per_family, seed)
        if not qs:
            raise ValueError(f"family {name!r} yields no questions (n_per_family={n_per_family})")
        orders[name] = {store.make_trace_id(q.id) for q in qs}
        qs = qs if max_per_family is None else qs[:max_per_family]
        todo[name] = qs[worker::num_workers]  # worker i of n: every n-th question of the order, from i

    # the writer's lock for the whole harvest: a second process writing into --out refuses here, at once,
    # before the model loads
    with corpus_lock(out_path, worker if num_workers > 1 else None, num_workers):
        if num_workers == 1:  # alone in the folder: temporary files of a killed writer are stale
            remove_stale_temp(out_path)
        lm, tok = load_model(model, dtype=dtype, device=device)
        featurizer = ProbeFeaturizer(lm.config.hidden_size, proj_dim=proj_dim, proj_seed=proj_seed,
                                     summary=hidden_summary, mid_layer=mid_layer)
        gen = ProbingGenerator(lm, tok, schedule, answer_trigger=answer_trigger, featurizer=featurizer,
                               max_new_tokens=max_new_tokens, answer_max_tokens=answer_max_tokens,
                               do_sample=do_sample, temperature=temperature, seed=seed)
        has_template = bool(getattr(tok, "chat_template", None))
        if not has_template:
            log.warning("the tokenizer has no chat template: prompts use the plain 'Question: ... Answer:' format")
        first = next(iter(fams.values()))
        meta = {
            "model": {"spec": model, "dtype": dtype, "chat_template": has_template, "device": device},
            "model_weights": model_identity(model, hash_weights=hash_weights),
            "schedule": schedule.to_dict(),
            "features": featurizer.config(),
            "feature_names": featurizer.feature_names,
            "feature_costs": featurizer.feature_costs,
            "prompt": {"instruction": first.instruction, "system": first.system_prompt,
                       "answer_trigger": answer_trigger,
                       "trigger_ids": gen.trigger_ids, "trigger_roundtrip": gen.trigger_roundtrip,
                       **({"reasoning_format": reasoning_format} if reasoning_format != "plain" else {})},
            "generation": {"max_new_tokens": max_new_tokens, "answer_max_tokens": answer_max_tokens,
                           "do_sample": do_sample, "temperature": temperature, "seed": seed,
                           **({"cap_answer": "forced"} if cap_answer == "forced" else {})},
            "order": {"n_per_family": n_per_family, "seed": seed, "split_fractions": SPLIT_FRACTIONS},
            "families": sorted(f.name for f in fams.values()),
            "family_settings": {f.name: _family_settings(f) for f in fams.values()},
            "code_version": maml_stop.__version__,
            "split_fractions": SPLIT_FRACTIONS,
            # this run's arguments (the latest run's on a resume): the datasheet's "regenerate" command
            "harvest_args": recorded_args(harvest, call),
        }
        with meta_lock(out_path):  # several workers may start at once on one folder
            check_meta(out_path, meta)

        done = store.stored_trace_ids(out_path)
        check_stored_in_order(done, orders)
        pending = {n: [q for q in qs if store.make_trace_id(q.id) not in done] for n, qs in todo.items()}
        # resume with the families that have the fewest traces, so restarts do not starve the last ones
        fams = dict(sorted(fams.items(), key=lambda kv: len(todo[kv[0]]) - len(pending[kv[0]])))
        total = sum(len(v) for v in pending.values())
        log.info("harvest: %d traces to do, %d already stored", total, len(done))

        from tqdm.auto import tqdm

        stats = {n: [0, 0, 0] for n in fams}  # registry name -> traces, final EM, hit cap
        shard_tag = f"w{worker}of{num_workers}" if num_workers > 1 else ""
        written: list[str] = []  # trace ids this run stored, verified readable at the end
        tokens, shards, t0 = 0, 0, time.time()
        bar = tqdm(total=total, desc="harvest", unit="trace", dynamic_ncols=True)
        stop = StopRequest.on_sigint()  # Ctrl-C: the shard in progress is written, then the run ends
        try:
            while any(pending.values()) and (max_shards is None or shards < max_shards) and not stop.requested:
                for name in list(fams):
                    if not pending[name] or (max_shards is not None and shards >= max_shards) or stop.requested:
                        continue
                    fam, chunk = fams[name], pending[name][:shard_size]
                    prompts = {q.id: fam.render_prompt(q, tok, reasoning_format) for q in chunk}
                    # similar prompt lengths in a batch waste less compute on padding
                    order = sorted(chunk, key=lambda q: len(tok(prompts[q.id], add_special_tokens=False)["input_ids"]))
                    rows = []
                    for b in range(0, len(order), batch_size):
                        batch = order[b : b + batch_size]
                        results = gen.run([prompts[q.id] for q in batch], fam.extract_probe_answer)
                        for q, r in zip(batch, results):
                            row = trace_row(fam, q, r, tok, model, cap_answer, reasoning_format)
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
                        store.write_shard(out_path, fam.name, split, srows, worker=shard_tag)
                        written += [r["trace_id"] for r in srows]
                    shards += 1
                    pending[name] = pending[name][len(chunk):]
                    s = stats[name]
                    log.info("%s: %d traces this run, final EM %.2f, hit cap %d", name, s[0], s[1] / max(s[0], 1), s[2])
        finally:
            stop.restore()
            bar.close()
        store.verify_stored(out_path, written)
        dt = time.time() - t0
        return {
            "traces": int(bar.n),
            "seconds": dt,
            "traces_per_s": bar.n / dt if dt else 0.0,
            "tokens_per_s": tokens / dt if dt else 0.0,
            "per_family": {fams[n].name: {"traces": s[0], "final_em": s[1] / max(s[0], 1), "hit_cap": s[2]}
                           for n, s in stats.items()},  # by the family's own name (a dataset's, not "dataset")
            "remaining": sum(len(v) for v in pending.values()),
            "interrupted": stop.requested,
        }


def main(argv: list[str] | None = None) -> int:
    from jsonargparse import CLI

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--repair" in argv:
        return repair_main(argv)
    summary = CLI(harvest, args=argv, as_positional=False)
    log.info("harvest summary: %s", summary)
    if summary.get("interrupted"):
        log.warning("harvest interrupted after a whole shard: %d traces remain; the same command resumes it",
                    summary["remaining"])
        return 130
    return 0
