"""The meta-learning study of issue 11 (items 2 and 3): when does meta-training beat adapting from scratch?

Grouped leave-families-out folds (:mod:`maml_stop.evaluate.grouped_folds`: variants of one generator
held out together, every family tested once, validation families apart from both) and, per fold, the
number of meta-training families as an axis (nested subsets). For each fold and count:

* meta-train MAML, ANIL and Meta-SGD (``maml-stop fit`` in process; the fit configs of the YAML, e.g.
  ``quickstart.yaml`` then ``main.yaml``, plus each algorithm's overrides and the fold's split); the best
  checkpoint (lowest ``val/loss``) of each; a fit that never validated is an error, not a fallback;
* write each algorithm's zero-step checkpoint (:mod:`maml_stop.learn.zero_step`: the same random
  initialisation with the meta-training families' normalisation, no optimiser step);
* the methods that do not depend on the meta-training families (:data:`COUNT_FREE`: full, first_probe,
  confidence, scratch, the oracles, ...) are evaluated at a fold's first count and reused at the others
  (the same episodes; tests/test_meta_study.py checks them against a fresh evaluation);
* evaluate on the held-out families with the ``maml-stop evaluate`` machinery (``build_policies``,
  ``evaluate_family``: every method on the same fixed episodes, threshold chosen on support): the
  evaluate YAML's methods (full, pooled / fine-tuned / from-scratch probes trained on the same
  meta-training families, oracles, ...) plus one adapted probe per checkpoint, named after it (``maml``,
  ``anil``, ``metasgd``, ``zero_step_maml``, ...); and the adapted query loss (the adapter's own loss on
  every query set after adapting on the support set; the pooled probe's without adaptation).

Writes into ``--out``: ``n_<count>/results.json`` + ``results.md`` + plots (the ``maml-stop evaluate``
report of every held-out family at that count, each from its own fold), ``report.md``, ``results.json``,
``savings_vs_families.png`` and ``query_loss_vs_families.png`` (against the number of meta-training
families, one panel per K), and the paired bootstrap (:func:`maml_stop.evaluate.compare.compare`) of
each MAML variant against each baseline at each K: the 95% interval of the difference in savings and
in EM drop, stratified by family. Checkpoints and logs: ``--out/folds/fold<i>/n_<count>/<name>``.

    python experiments/meta_study.py --config experiments/meta_study.yaml                   # corpus v2
    python experiments/meta_study.py --config experiments/meta_study.yaml --corpus experiments/corpus/qwen05 --quick
    python experiments/meta_study.py --report_only runs/meta_study/results.json     # rebuild report.md + plots

``report.md`` ends with the criterion of issue 11: at some count and K <= 16, a variant within the EM-drop
target on every held-out family that saves at least 3 points more than both the zero-step baseline and the
pooled probe, each 95% interval excluding 0 (or a plain "no"); and the same verdict with the mean EM drop
over the held-out families within the target instead of every family's.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

log = logging.getLogger("meta_study")

ROOT = Path(__file__).resolve().parents[1]
CRITERION_POINTS = 3.0  # issue 11 "Done when": savings over zero-step and pooled, K <= 16, within the target
CRITERION_MAX_K = 16


@dataclass
class StudyConfig:
    """Settings of the study (tuned values: experiments/meta_study.yaml; ``quick`` overrides them)."""

    corpus: str = "experiments/corpus/qwen05_v2"
    out: str = "runs/meta_study"
    folds: int = 5  # grouped folds (fewer when the corpus has fewer groups of families)
    val_families: int = 1  # validation families per fold (whole groups)
    seed: int = 0  # fold assignment and nested order
    counts: list[int | str] = field(default_factory=lambda: [6, 12, "all"])  # meta-training families per fold
    corpus_counts: dict[str, list[int | str]] = field(default_factory=dict)  # corpus folder -> its own counts
    # corpus folder -> its study families: a list, or a JSON file with "kept" (the pilot's choice,
    # experiments/corpus_v2_families.json); a corpus not listed: every family it holds
    corpus_families: dict[str, list[str] | str] = field(default_factory=dict)
    min_traces: int = 150  # refuse a study family with fewer traces (an unfinished harvest)
    fit_workers: int = 1  # meta-training fits side by side in forked processes before the evaluation
    fit_configs: list[str] = field(default_factory=lambda: ["experiments/quickstart.yaml", "experiments/main.yaml"])
    fit: dict[str, Any] = field(default_factory=dict)  # a fit-config fragment read after fit_configs
    algorithms: dict[str, dict[str, Any]] = field(default_factory=lambda: {"maml": {}})  # name -> fit fragment
    evaluate_configs: list[str] = field(default_factory=lambda: ["experiments/evaluate.yaml"])
    evaluate: dict[str, Any] = field(default_factory=dict)  # EvaluateConfig overrides
    baselines: list[str] = field(default_factory=lambda: ["pooled", "finetuned", "scratch", "zero_step"])
    n_resamples: int = 9999  # paired bootstrap resamples

    @classmethod
    def load(cls, path: str | Path, quick: bool = False, corpus: str | None = None, out: str | None = None) -> "StudyConfig":
        raw = yaml.safe_load(Path(path).read_text()) or {}
        quick_over = raw.pop("quick", {}) or {}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - names) + sorted(set(quick_over) - names)
        if unknown:
            raise ValueError(f"{path}: unknown settings {unknown}; valid: {sorted(names)} (and quick:)")
        cfg = cls(**raw)
        if quick:
            for key, value in quick_over.items():
                old = getattr(cfg, key)
                setattr(cfg, key, _merge(old, value) if isinstance(old, dict) else value)
        if corpus is not None:
            cfg.corpus = corpus
        if out is not None:
            cfg.out = out
        bad = [b for b in cfg.baselines if b not in ("pooled", "finetuned", "scratch", "zero_step")]
        if bad or not cfg.algorithms:
            raise ValueError(f"baselines {bad} unknown (valid: pooled, finetuned, scratch, zero_step); algorithms: "
                             f"{list(cfg.algorithms)} (at least one)")
        return cfg

    def families_for(self, corpus: str, available: list[str]) -> list[str]:
        """The study families of ``corpus`` (``corpus_families`` by folder, else ``available``), checked
        against the families the corpus holds."""
        chosen: list[str] | str | None = None
        for key, value in self.corpus_families.items():
            if Path(key).resolve() == Path(corpus).resolve():
                chosen = value
        if chosen is None:
            return list(available)
        if isinstance(chosen, str):
            data = json.loads((ROOT / chosen).read_text())
            if not data.get("pilot_complete", True):
                log.warning("%s: the pilot is not complete; the study families may still change", chosen)
            chosen = list(data["kept"])
        missing = [f for f in chosen if f not in available]
        if missing:
            raise ValueError(f"study families {missing} are not in the corpus {corpus}; it holds {available}")
        return list(chosen)

    def counts_for(self, corpus: str) -> list[int | str]:
        """The counts of ``corpus`` (``corpus_counts`` by folder, else ``counts``)."""
        for key, counts in self.corpus_counts.items():
            if Path(key).resolve() == Path(corpus).resolve():
                return list(counts)
        return list(self.counts)


def _merge(a: dict, b: dict) -> dict:
    """``b`` over ``a``, nested dicts merged (lists replaced)."""
    out = dict(a)
    for key, value in b.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


# ---------------------------------------------------------------------------------------------------
# meta-training


def _fit_args(cfg: StudyConfig, configs: Path, algo: str, split, root: Path) -> list[str]:
    files = [str(ROOT / p) for p in cfg.fit_configs] + [str(configs / "fit.yaml"), str(configs / f"{algo}.yaml")]
    return [a for f in files for a in ("--config", f)] + [
        f"--data.corpus={cfg.corpus}", "--data.fold=null",
        f"--data.train_families=[{','.join(split.train)}]", f"--data.val_families=[{','.join(split.val)}]",
        f"--data.test_families=[{','.join(split.test)}]", f"--trainer.default_root_dir={root}",
    ]


_FITS: list | None = None  # the fits of the running study's pre-pass (a forked worker inherits them)


def _fit_job(i: int) -> str:
    """Fit ``i`` of :data:`_FITS` (in a forked worker of :func:`fork_map`)."""
    torch.set_num_threads(1)
    return meta_train(*_FITS[i])


def meta_train(args: list[str], root: Path, resume: bool) -> str:
    """``maml-stop fit`` in process; the best checkpoint (lowest ``val/loss``). Raises when none was written.
    A finished fit writes ``root/fit_done.json``; ``resume`` reuses only such a fit (an interrupted one has a
    best.ckpt of its first epochs and is fitted again)."""
    from maml_stop.learn.cli import cli_main

    done = root / FIT_DONE
    if resume and done.is_file():
        record = json.loads(done.read_text())
        if record.get("args") == list(args) and Path(record["best"]).is_file():
            return record["best"]
    shutil.rmtree(root, ignore_errors=True)
    cli = cli_main(args, run=False, follow_root=True)
    callback = cli.trainer.checkpoint_callback  # the first ModelCheckpoint: best.ckpt (monitor val/loss)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    path = callback.best_model_path if callback is not None else ""
    if not path or not Path(path).is_file():
        raise RuntimeError(f"the fit under {root} wrote no best checkpoint (did it validate? trainer.max_steps "
                           f"{cli.trainer.max_steps}, check_val_every_n_epoch {cli.trainer.check_val_every_n_epoch})")
    _write_json(done, {"args": list(args), "best": str(path)})
    return path


FIT_DONE = "fit_done.json"  # written after a fit finished: its arguments (what --resume checks)
ZERO_DONE = "zero_step_done.json"  # written after a zero-step checkpoint was saved: its arguments


def zero_step(args: list[str], path: Path, resume: bool) -> str:
    """The zero-step checkpoint (:func:`maml_stop.learn.zero_step.save_zero_step`) of the fit arguments
    ``args`` at ``path``. ``resume`` reuses a stored one only when ``ZERO_DONE`` beside it, written after
    the (atomic) save, records the same arguments; otherwise it is written again."""
    from maml_stop.learn.zero_step import save_zero_step

    path, done = Path(path), Path(path).parent / ZERO_DONE
    if resume and done.is_file() and path.is_file():
        if json.loads(done.read_text()).get("args") == list(args):
            return str(path)
    done.unlink(missing_ok=True)
    save_zero_step(args, path)
    _write_json(done, {"args": list(args)})
    return str(path)


def _write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` atomically (:func:`maml_stop.data.store.atomic_write_bytes`)."""
    from maml_stop.data.store import atomic_write_bytes

    atomic_write_bytes(Path(path), json.dumps(data, default=_jsonable).encode())


# ---------------------------------------------------------------------------------------------------
# evaluation (the maml-stop evaluate machinery, every checkpoint of a cell on the same episodes)


def adapted_query_loss(adapter, model_or_none, traces, family, ks, episodes, seed, query, steps) -> dict[str, list[float]]:
    """Per K, per episode: ``adapter.loss`` on the query set of the model adapted on the support set
    (``model_or_none`` given: that model, unadapted). The episodes are ``evaluate_family``'s."""
    from maml_stop.data.batches import collate_traces
    from maml_stop.data.episodes import EpisodeSampler

    sampler = EpisodeSampler({family: list(traces)}, k=min(ks), q=query, seed=seed)
    out: dict[str, list[float]] = {}
    for k in ks:
        losses = []
        for ep in sampler.fixed_episodes(family, n=episodes, seed=seed, k=k, q=query):
            model = model_or_none if model_or_none is not None else adapter.fit_support(ep.support, steps=steps)
            with torch.no_grad():
                losses.append(float(adapter.loss(model, collate_traces(ep.query, weighting=adapter.weighting))))
        out[str(k)] = losses
    return out


# methods whose figures do not depend on the meta-training families (nor on any checkpoint): evaluated once
# per fold, at its first count, and reused at the others (the episodes are the same at every count)
COUNT_FREE = ("full", "first_probe", "budget", "consistency", "confidence", "scratch", "oracle", "oracle_equal_em")


def evaluate_cell(ecfg, corpus, fold, split, checkpoints: dict[str, str],
                  reuse: dict[str, dict] | None = None) -> tuple[dict, dict, dict]:
    """Every method of ``ecfg`` plus one adapted probe per checkpoint on the held-out families of ``fold``.
    ``reuse``: per family, evaluate_family's cells of an earlier count of the same fold, whose
    :data:`COUNT_FREE` methods are copied instead of evaluated again.
    Returns (per family: evaluate_family's cells, per family: query losses, per family: pooled sources)."""
    from maml_stop.data.datamodule import select_features
    from maml_stop.evaluate.config import BASELINE_DTYPES
    from maml_stop.evaluate.folds import load_checkpoint
    from maml_stop.evaluate.methods import build_policies
    from maml_stop.learn.pooled import train_predictor
    from maml_stop.evaluate.protocol import fork_map, selectors_for

    loaded = {name: load_checkpoint(path, corpus)[:2] for name, path in checkpoints.items()}
    first, _ = next(iter(loaded.values()))
    names = loaded[next(iter(loaded))][1].get("feature_names")
    view = corpus if names is None or list(names) == corpus.feature_names else select_features(corpus, names)
    config, loss = first.predictor.config(), first.loss_kind
    pooled = None
    if any(m in ecfg.methods for m in ("pooled", "finetuned")):
        source = [t for f in split.train for t in view.traces(f)]
        pooled = train_predictor(source, config, ecfg.pooled_steps, ecfg.pooled_lr, loss, seed=ecfg.seed,
                                 backend=ecfg.backend, dtype=BASELINE_DTYPES[ecfg.baseline_dtype])  # as maml-stop evaluate
    methods = [m for m in ecfg.methods if m != "maml"]
    reused = [m for m in methods if reuse and m in COUNT_FREE]
    policies = build_policies(ecfg, [m for m in methods if m not in reused], first, pooled, config, loss)
    for name, (adapter, meta) in loaded.items():
        steps = (meta.get("hyper_parameters") or {}).get("eval_inner_steps")
        policies[name] = build_policies(ecfg, ["maml"], adapter, pooled, config, loss, maml_steps=steps)["maml"]
    global _CELL
    _CELL = (ecfg, view, policies, selectors_for(ecfg), loaded, first, pooled, fold, split)
    try:  # ecfg.workers: held-out families side by side in forked processes (as maml-stop evaluate)
        done = fork_map(_evaluate_family, fold.test, ecfg.workers)
    finally:
        _CELL = None
    cells = {family: c for family, (c, _) in zip(fold.test, done)}
    for family, by_k in cells.items():  # the reused methods, in the evaluation's method order
        for k, figures in by_k.items():
            got = {**figures, **{m: reuse[family][k][m] for m in reused}}
            by_k[k] = {m: got[m] for m in [*methods, *loaded] if m in got}
    losses = {family: q for family, (_, q) in zip(fold.test, done)}
    return cells, losses, {f: list(split.train) for f in fold.test}


_CELL: tuple | None = None  # what evaluate_cell's families share (a forked worker inherits it)

CELL_FILE = "evaluation.json"  # a fold and count's evaluation, beside its checkpoints (reused by --resume)


def evaluated_cell(ecfg, corpus, fold, split, checkpoints: dict[str, str], reuse: dict[str, dict] | None,
                   cell: Path, resume: bool) -> tuple[dict, dict, dict]:
    """:func:`evaluate_cell`, written to ``cell/evaluation.json`` with what it was computed from (the
    evaluation settings, checkpoints and their SHA-256, held-out and meta-training families, whether count-free methods were
    reused). With ``resume``, a stored evaluation computed from exactly the same is read back instead (an
    interrupted study loses at most the fold and count it was evaluating); any difference re-evaluates."""
    digests = {name: hashlib.sha256(Path(path).read_bytes()).hexdigest() for name, path in checkpoints.items()}
    key = json.loads(json.dumps({"evaluate": dataclasses.asdict(ecfg), "checkpoints": checkpoints, "sha256": digests,
                                 "test": list(fold.test), "train": list(split.train), "reuse": reuse is not None},
                                default=_jsonable))
    path = cell / CELL_FILE
    if resume and path.is_file():
        stored = json.loads(path.read_text())
        if stored.get("key") == key:
            log.info("fold %d, %d meta-training families: evaluation read from %s", fold.index, len(split.train), path)
            return stored["cells"], stored["losses"], stored["sources"]
        log.info("%s was computed from other settings: evaluating again", path)
    cells, losses, sources = evaluate_cell(ecfg, corpus, fold, split, checkpoints, reuse=reuse)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_json(path, {"key": key, "cells": cells, "losses": losses, "sources": sources})  # whole or absent
    return cells, losses, sources


def _evaluate_family(family: str) -> tuple[dict, dict]:
    """One held-out family of the running :func:`evaluate_cell`: its evaluate_family cells and query losses."""
    from maml_stop.evaluate.protocol import evaluate_family

    ecfg, view, policies, selectors, loaded, first, pooled, fold, split = _CELL
    torch.set_num_threads(1)
    traces = [t for t in view.traces(family) if ecfg.splits is None or t.split in ecfg.splits]
    log.info("fold %d, %d meta-training families: evaluating %s", fold.index, len(split.train), family)
    cells = evaluate_family(family, traces, policies, selectors, ecfg.k, ecfg.episodes, ecfg.seed,
                            ecfg.query, ecfg.delta, ecfg.calibration_bins, ecfg.progress, None)
    args = (traces, family, ecfg.k, ecfg.episodes, ecfg.seed, ecfg.query)
    losses = {name: adapted_query_loss(adapter, None, *args, (meta.get("hyper_parameters") or {}).get("eval_inner_steps"))
              for name, (adapter, meta) in loaded.items()}
    if pooled is not None:
        losses["pooled"] = adapted_query_loss(first, pooled, *args, None)
    return cells, losses


# ---------------------------------------------------------------------------------------------------
# the study


def run(cfg: StudyConfig, resume: bool = False) -> dict[str, Any]:
    from maml_stop.data.corpus import TraceCorpus
    from maml_stop.evaluate.compare import compare
    from maml_stop.evaluate.command import parse_config
    from maml_stop.evaluate.grouped_folds import ALL, family_groups, grouped_folds, resolve_counts
    from maml_stop.evaluate.protocol import fork_map
    from maml_stop.evaluate.results_file import write_results
    from maml_stop.evaluate.report import summarise
    torch.set_num_threads(1)
    started = time.time()
    out = Path(cfg.out)
    configs = out / "configs"  # the fit fragments, kept beside the results
    configs.mkdir(parents=True, exist_ok=True)
    (configs / "fit.yaml").write_text(yaml.safe_dump(cfg.fit or {}, sort_keys=False))
    for algo, fragment in cfg.algorithms.items():
        (configs / f"{algo}.yaml").write_text(yaml.safe_dump(fragment or {}, sort_keys=False))
    ecfg = parse_config([a for p in cfg.evaluate_configs for a in ("--config", str(ROOT / p))] + [f"--corpus={cfg.corpus}"])
    ecfg = dataclasses.replace(ecfg, **cfg.evaluate, out=str(out))
    corpus = TraceCorpus.load(cfg.corpus, min_probes=ecfg.min_probes)
    families = cfg.families_for(cfg.corpus, corpus.families)
    short = {f: len(corpus.traces(f)) for f in families if len(corpus.traces(f)) < cfg.min_traces}
    if short:
        raise ValueError(f"families with fewer than min_traces={cfg.min_traces} traces in {cfg.corpus} (is the "
                         f"harvest finished?): {short}")
    groups = family_groups(families)
    n_folds = min(cfg.folds, len(groups))
    if n_folds < cfg.folds:
        log.warning("%d groups of families: %d folds instead of %d", len(groups), n_folds, cfg.folds)
    folds = grouped_folds(families, n_folds, cfg.val_families, cfg.seed)
    counts = cfg.counts_for(cfg.corpus)
    labels = resolve_counts(counts, max(len(f.train) for f in folds))  # the labels every fold shares
    labels = [c for c in labels if c == ALL or all(c <= len(f.train) for f in folds)]
    zero = "zero_step" in cfg.baselines
    names = list(cfg.algorithms) + ([f"zero_step_{a}" for a in cfg.algorithms] if zero else [])
    per_count: dict[str, dict[str, Any]] = {}
    n_train: dict[str, list[int]] = {}
    per_fold_cells: dict[int, dict | None] = {}  # fold -> its first count's cells (COUNT_FREE reused after)
    if cfg.fit_workers > 1:  # every fit of the study first, side by side; the loop below then finds them
        jobs = [(_fit_args(cfg, configs, algo, fold.split(label), cell / algo), cell / algo, resume)
                for label in labels for fold in folds for algo in cfg.algorithms
                for cell in [out / "folds" / f"fold{fold.index}" / f"n_{label}"]]
        log.info("meta-training %d fits, %d side by side", len(jobs), cfg.fit_workers)
        global _FITS
        _FITS = jobs
        try:
            fork_map(_fit_job, range(len(jobs)), cfg.fit_workers)
        finally:
            _FITS = None
    fitted = cfg.fit_workers > 1  # the fits' checkpoints exist: the loop reads them
    from tqdm.auto import tqdm

    bar = tqdm(total=len(labels) * len(folds), desc="meta study: folds x counts evaluated", unit="cell")
    for label in labels:
        key = str(label)
        merged = {"results": {}, "sources": {}, "checkpoints": {}, "losses": {}}
        n_train[key] = []
        for fold in folds:
            bar.set_postfix_str(f"fold {fold.index}, {label} meta-training families")
            split = fold.split(label)
            n_train[key].append(len(split.train))
            cell = out / "folds" / f"fold{fold.index}" / f"n_{key}"
            ckpts: dict[str, str] = {}
            for algo in cfg.algorithms:
                ckpts[algo] = meta_train(_fit_args(cfg, configs, algo, split, cell / algo), cell / algo, resume or fitted)
            if zero:
                for algo in cfg.algorithms:
                    path = cell / f"zero_step_{algo}" / "zero_step.ckpt"
                    ckpts[f"zero_step_{algo}"] = zero_step(_fit_args(cfg, configs, algo, split, path.parent), path, resume)
            first_cells = per_fold_cells.setdefault(fold.index, None)
            cells, losses, sources = evaluated_cell(ecfg, corpus, fold, split, ckpts, first_cells, cell, resume)
            if first_cells is None:
                per_fold_cells[fold.index] = cells  # the count-free methods' figures of this fold
            merged["results"].update(cells)
            merged["losses"].update(losses)
            merged["sources"].update(sources)
            merged["checkpoints"].update({f: ckpts for f in fold.test})
            bar.update()
        families = [f for fold in folds for f in fold.test]
        base = [m for m in ecfg.methods if m != "maml"]
        oracles = [m for m in base if m.startswith("oracle")]
        methods = [m for m in base if m not in oracles] + names + oracles  # the oracles last, as in maml-stop evaluate
        results = {
            "corpus": cfg.corpus, "source_corpus": None, "families": families, "k": list(ecfg.k),
            "methods": methods, "threshold_methods": list(ecfg.threshold_methods), "episodes": ecfg.episodes,
            "delta": ecfg.delta, "ltt_delta": ecfg.delta if ecfg.ltt_delta is None else ecfg.ltt_delta,
            "ltt_alpha": ecfg.ltt_alpha, "config": dataclasses.asdict(ecfg), "feature_names": corpus.feature_names,
            "sources": merged["sources"], "checkpoints": {f: c[cfg_first(cfg)] for f, c in merged["checkpoints"].items()},
            "all_checkpoints": merged["checkpoints"], "query_loss": merged["losses"], "results": merged["results"],
            "calibration": {}, "seconds": round(time.time() - started, 1),
        }
        write_results(results, out / f"n_{key}")  # the maml-stop evaluate report of this count
        per_count[key] = results
    bar.close()
    study = summarise_study(cfg, ecfg, folds, labels, n_train, per_count, summarise, compare)
    study["seconds"] = round(time.time() - started, 1)
    (out / "results.json").write_text(json.dumps(study, indent=1, default=_jsonable))
    plot_study(study, out)
    (out / "report.md").write_text(report_markdown(study))
    return study


def rebuild(path: Path) -> dict[str, Any]:
    """Recompute the study's figures, paired bootstrap, report.md and plots from a study ``results.json``
    and the per-count ``n_<count>/results.json`` beside it (no fit, no evaluation). Without the per-count
    files (a committed report keeps only the study's ``results.json``: the per-count ones hold every
    episode, tens of MB) report.md and the plots are rendered from the stored figures as they are."""
    from maml_stop.evaluate.compare import compare
    from maml_stop.evaluate.config import EvaluateConfig
    from maml_stop.evaluate.grouped_folds import GroupedFold
    from maml_stop.evaluate.report import summarise
    from maml_stop.evaluate.results_file import read_results

    old = _migrate_study(json.loads(path.read_text()))
    if not all((path.parent / f"n_{c}" / "results.json").is_file() for c in old["counts"]):
        log.info("no per-count results.json beside %s: report.md and plots from its stored figures", path)
        plot_study(old, path.parent)
        (path.parent / "report.md").write_text(report_markdown(old))
        return old
    cfg, ecfg = StudyConfig(**old["config"]), EvaluateConfig(**old["evaluate"])
    folds = [GroupedFold(**f) for f in old["folds"]]
    labels = [int(c) if c.isdigit() else c for c in old["counts"]]
    per_count = {c: read_results(path.parent / f"n_{c}" / "results.json") for c in old["counts"]}
    study = summarise_study(cfg, ecfg, folds, labels, old["n_train"], per_count, summarise, compare)
    study["seconds"] = old["seconds"]
    path.write_text(json.dumps(study, indent=1, default=_jsonable))
    plot_study(study, path.parent)
    (path.parent / "report.md").write_text(report_markdown(study))
    return study


def _migrate_study(study: dict[str, Any]) -> dict[str, Any]:
    """A study results.json written before issue 31's names (``shots`` for ``k``, ``fixed_tau`` for ``tau``)."""
    from maml_stop.evaluate.results_file import migrate_config

    if "shots" in study:
        study["k"] = study.pop("shots")
    migrate_config(study.get("evaluate") or {})
    return study


def cfg_first(cfg: StudyConfig) -> str:
    return next(iter(cfg.algorithms))


def _jsonable(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    raise TypeError(f"not JSON: {type(x)}")


def _nan_mean(values) -> float:
    a = np.asarray([np.nan if v is None else v for v in values], dtype=np.float64)
    return float(np.nanmean(a)) if np.isfinite(a).any() else float("nan")


def summarise_study(cfg, ecfg, folds, labels, n_train, per_count, summarise, compare) -> dict[str, Any]:
    """The figures of report.md: per count, K and method the mean over held-out families of savings, EM
    drop and share of episodes within the target (support-chosen threshold, the headline rule), the
    adapted query loss, and the paired bootstrap rows (variant - baseline, ``mean`` over families)."""
    from maml_stop.evaluate.report.tables import within_target

    headline = ecfg.threshold_methods[0]
    variants = list(cfg.algorithms)
    curve: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    paired: list[dict[str, Any]] = []
    for label in labels:
        key = str(label)
        results = per_count[key]
        s = summarise(results, headline)
        curve[key] = {}
        for k in results["k"]:
            curve[key][str(k)] = {}
            for m in results["methods"]:
                row = s[str(k)][m]["mean"]
                loss = [_nan_mean(results["query_loss"][f][m][str(k)]) for f in results["families"]
                        if m in results["query_loss"][f]]
                curve[key][str(k)][m] = {
                    "savings": 100 * row["savings"][0], "savings_ci": 100 * row["savings"][1],
                    "em_drop": 100 * row["em_drop"][0], "within_delta": 100 * row["within_delta"][0],
                    "query_loss": float(np.mean(loss)) if loss else None,
                    # the report's one rule: within the EM-drop target on every held-out family
                    "within_target": within_target(s[str(k)], m, "mean", results["families"], results["delta"]),
                }
        for v in variants:
            for b in cfg.baselines:
                other = f"zero_step_{v}" if b == "zero_step" else b
                if other not in results["methods"]:
                    continue
                table = compare(results, results, v, other, headline, results["k"], None, cfg.n_resamples, cfg.seed)
                rows = table["rows"]
                mean = [r for r in rows if r["family"] == "mean"] or rows  # one family: its own row
                for r in mean:
                    paired.append({"count": key, "variant": v, "baseline": b, "method_b": other, **r})
    return {
        "config": dataclasses.asdict(cfg), "evaluate": dataclasses.asdict(ecfg), "threshold": headline,
        "folds": [dataclasses.asdict(f) for f in folds], "counts": [str(c) for c in labels],
        "n_train": n_train, "k": list(ecfg.k), "methods": per_count[str(labels[0])]["methods"],
        "variants": variants, "curve": curve, "paired": paired,
    }


def _x(study, key) -> float:
    return float(np.mean(study["n_train"][key]))


def plot_study(study: dict[str, Any], out: Path) -> None:
    """savings_vs_families.png (a row of savings and, below it, a row of mean EM drop with the target, so
    that savings bought with accuracy show) and query_loss_vs_families.png: one panel per K, a line per
    method, against the number of meta-training families."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks, counts = study["k"], study["counts"]
    xs = [_x(study, c) for c in counts]
    shown = [m for m in study["methods"] if m not in ("full", "oracle", "oracle_equal_em")]
    target = 100 * study["evaluate"]["delta"]
    for rows, name in (([("savings", "% tokens saved\n(support-chosen threshold)"), ("em_drop", "EM drop (points)")],
                        "savings_vs_families.png"),
                       ([("query_loss", "adapted query loss")], "query_loss_vs_families.png")):
        fig, axes = plt.subplots(len(rows), len(ks), figsize=(4.2 * len(ks), 3.4 * len(rows)),
                                 squeeze=False, sharex=True)
        for r, (figure, ylabel) in enumerate(rows):
            for ax, k in zip(axes[r], ks):
                for m in shown:
                    ys = [study["curve"][c][str(k)][m][figure] for c in counts]
                    if all(y is None for y in ys):
                        continue
                    style = "-o" if m in study["variants"] else ("--x" if m.startswith("zero_step") else ":s")
                    ax.plot(xs, [np.nan if y is None else y for y in ys], style, label=m, markersize=4)
                if figure == "em_drop":
                    ax.axhline(target, color="k", lw=0.8, ls="--")
                ax.set_title(f"K = {k}" if r == 0 else "")
                ax.grid(alpha=0.3)
            axes[r][0].set_ylabel(ylabel)
        for ax in axes[-1]:
            ax.set_xlabel("meta-training families")
        axes[0][-1].legend(fontsize=7, loc="best")
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)


def criterion(study: dict[str, Any]) -> list[dict[str, Any]]:
    """The criterion of issue 11, one row per count, K <= ``CRITERION_MAX_K`` and variant: ``met`` when the
    variant is within the EM-drop target on every held-out family and its savings exceed both the zero-step
    baseline's and the pooled probe's by at least ``CRITERION_POINTS``, each 95% interval excluding 0
    (``low > 0``); ``met_on_mean``: the same with the mean EM drop over held-out families within the target
    instead of every family's (with dozens of held-out families the strict rule alone would say little about
    meta-learning). Rows lacking either comparison are left out."""
    rows = {(r["count"], r["k"], r["variant"], r["baseline"]): r for r in study["paired"] if r["figure"] == "savings"}
    out = []
    for c in study["counts"]:
        for k in (k for k in study["k"] if k <= CRITERION_MAX_K):
            for v in study["variants"]:
                z, p = rows.get((c, k, v, "zero_step")), rows.get((c, k, v, "pooled"))
                if z is None or p is None:
                    continue
                row = study["curve"][c][str(k)][v]
                inside = bool(row["within_target"])
                on_mean = bool(row["em_drop"] <= 100 * study["evaluate"]["delta"])
                beats = all(r["difference"] >= CRITERION_POINTS and r["low"] > 0 for r in (z, p))
                out.append({"count": c, "k": k, "variant": v, "within_target": inside, "mean_within": on_mean,
                            "zero_step": z, "pooled": p, "met": inside and beats, "met_on_mean": on_mean and beats})
    return out


def _yes(flag: bool, bold: bool = False) -> str:
    return ("**yes**" if bold else "yes") if flag else "no"


def report_markdown(study: dict[str, Any]) -> str:
    cfg, ks, counts = study["config"], study["k"], study["counts"]
    lines = [
        "# Meta-learning study: savings against the number of meta-training families", "",
        f"Corpus `{cfg['corpus']}`; {len(study['folds'])} grouped folds (seed {cfg['seed']}; variants of one "
        f"generator held out together), {cfg['val_families']} validation family per fold (whole groups); "
        f"meta-training families per fold: {', '.join(counts)} (nested subsets); fit configs "
        f"{' + '.join(cfg['fit_configs'])} + the study's fragments; K in {ks}; {study['evaluate']['episodes']} fixed "
        f"episodes per held-out family and K, every method on the same episodes; threshold `{study['threshold']}` "
        f"chosen on support (EM drop <= {100 * study['evaluate']['delta']:g} point); {study['seconds']} s.", "",
        "Zero-step baselines (`zero_step_<algorithm>`): the algorithm's random initialisation with the meta-training "
        "families' normalisation, no optimiser step, adapted by the same adapter. Pooled, fine-tuned and "
        "from-scratch probes train on the same meta-training families (the K shots for the last two).", "",
        "## Folds", "", "| fold | held out | validation | meta-training order (nested prefixes) |", "|---|---|---|---|",
    ]
    for f in study["folds"]:
        lines.append(f"| {f['index']} | {', '.join(f['test'])} | {', '.join(f['val'])} | {', '.join(f['train'])} |")
    lines += ["", "Meta-training families per count, per fold: " + "; ".join(
        f"{c}: {study['n_train'][c]}" for c in counts), ""]
    for figure, title, fmt in (("savings", "% of tokens saved (EM drop in points), mean over held-out families", None),
                               ("query_loss", "Adapted query loss (pooled: unadapted), mean over held-out families", None)):
        lines += [f"## {title}", "", "| method | families | " + " | ".join(f"K={k}" for k in ks) + " |",
                  "|---|---|" + "---|" * len(ks)]
        for m in study["methods"]:
            for c in counts:
                cells = []
                for k in ks:
                    v = study["curve"][c][str(k)][m]
                    if figure == "savings":
                        cells.append(f"{v['savings']:.1f} ± {v['savings_ci']:.1f} ({v['em_drop']:.1f})")
                    else:
                        cells.append("" if v["query_loss"] is None else f"{v['query_loss']:.3f}")
                if figure == "query_loss" and not any(cells):
                    continue
                lines.append(f"| {m} | {c} ({_x(study, c):g}) | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["![savings](savings_vs_families.png)", "", "![query loss](query_loss_vs_families.png)", "",
              "## Paired bootstrap: variant - baseline, the same episodes",
              "", f"A = the variant, B = the baseline (`zero_step`: the variant's own zero-step checkpoint). Mean over "
              f"held-out families of the per-episode difference A - B, in points; 95% percentile interval, {cfg['n_resamples']} resamples of the episodes within each family (`maml_stop.evaluate.compare`).", "",
              "| families | K | variant | baseline | savings diff [95% CI] | EM-drop diff [95% CI] | savings verdict | EM-drop verdict |",
              "|---|---|---|---|---|---|---|---|"]
    rows = {(r["count"], r["k"], r["variant"], r["baseline"], r["figure"]): r for r in study["paired"]}
    for c in counts:
        for k in ks:
            for v in study["variants"]:
                for b in cfg["baselines"]:
                    s, e = rows.get((c, k, v, b, "savings")), rows.get((c, k, v, b, "em_drop"))
                    if s is None or e is None:
                        continue
                    lines.append(f"| {c} | {k} | {v} | {b} | {s['difference']:+.1f} [{s['low']:+.1f}, {s['high']:+.1f}] | "
                                 f"{e['difference']:+.1f} [{e['low']:+.1f}, {e['high']:+.1f}] | {s['verdict']} | {e['verdict']} |")
    for c in counts:  # the compact comparison the README shows: every baseline side by side, per variant and K
        lines += ["", f"## Paired comparison, {c} meta-training families: savings difference A - B [95% CI] (EM-drop difference)",
                  "", "| variant | K | " + " | ".join(f"- {b}" for b in cfg["baselines"]) + " |",
                  "|---|---|" + "---|" * len(cfg["baselines"])]
        for v in study["variants"]:
            for k in ks:
                cells = []
                for b in cfg["baselines"]:
                    s, e = rows.get((c, k, v, b, "savings")), rows.get((c, k, v, b, "em_drop"))
                    cells.append("" if s is None or e is None else
                                 f"{s['difference']:+.1f} [{s['low']:+.1f}, {s['high']:+.1f}] ({e['difference']:+.1f})")
                lines.append(f"| {v} | {k} | " + " | ".join(cells) + " |")
    lines += ["", "## The criterion of issue 11", "",
              f"A variant meets it at a count and K <= {CRITERION_MAX_K} when it is within the EM-drop target on every held-out family "
              f"and saves at least {CRITERION_POINTS:g} points more than both the zero-step baseline and the pooled probe, "
              "each 95% interval excluding 0 (`met`); `met on mean`: the same with the mean EM drop over the held-out "
              "families within the target instead.", "",
              "| families | K | variant | within target (every family) | mean EM drop within target | - zero_step [95% CI] | "
              "- pooled [95% CI] | met | met on mean |", "|---|---|---|---|---|---|---|---|---|"]
    verdicts = criterion(study)
    for r in verdicts:
        z, p = r["zero_step"], r["pooled"]
        lines.append(f"| {r['count']} | {r['k']} | {r['variant']} | {_yes(r['within_target'])} | {_yes(r['mean_within'])} | "
                     f"{z['difference']:+.1f} [{z['low']:+.1f}, {z['high']:+.1f}] | {p['difference']:+.1f} [{p['low']:+.1f}, "
                     f"{p['high']:+.1f}] | {_yes(r['met'], True)} | {_yes(r['met_on_mean'], True)} |")
    lines += ["", "Met by some variant: " + ("**yes**" if any(r["met"] for r in verdicts) else "**no**") + "; on the mean "
              "EM drop: " + ("**yes**" if any(r["met_on_mean"] for r in verdicts) else "**no**") + "."]
    lines += ["", "Per-count reports of every method and family: " + ", ".join(f"[`n_{c}/results.md`](n_{c}/results.md)" for c in counts)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "experiments" / "meta_study.yaml"))
    p.add_argument("--corpus", default=None, help="trace corpus (default: the YAML's, experiments/corpus/qwen05_v2)")
    p.add_argument("--out", default=None, help="output folder (default: the YAML's)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (the YAML's quick: section): a smoke run")
    p.add_argument("--resume", action="store_true",
                   help="reuse the checkpoints and the fold evaluations already under --out (same settings only)")
    p.add_argument("--report_only", default=None, help="rebuild report.md and the plots from this study results.json")
    args = p.parse_args(argv)
    if args.report_only:
        study = rebuild(Path(args.report_only))
        print(f"report: {Path(args.report_only).parent / 'report.md'}")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = StudyConfig.load(args.config, quick=args.quick, corpus=args.corpus, out=args.out)
    study = run(cfg, resume=args.resume)
    out = Path(cfg.out)
    print(report_markdown(study))
    print(f"report: {out / 'report.md'}; results: {out / 'results.json'} ({study['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
