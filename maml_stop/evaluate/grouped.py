"""Grouped folds x meta-training family counts x algorithms: ``maml-stop evaluate`` with ``folds.kind: grouped``.

The meta-learning study of issue 11 as a protocol feature (issue 31 item 6). The folds are
:func:`maml_stop.evaluate.grouped_folds.grouped_folds` (variants of one generator held out together,
every family tested once, validation families apart from both); per fold and count (``folds.counts``,
nested subsets of the fold's meta-training families):

* one checkpoint per entry of ``algorithms`` (``maml-stop fit`` with ``train_config``, then
  ``train_overrides``, then the algorithm's fragment, and the fold's split), fitted by
  :func:`maml_stop.evaluate.folds.fit_checkpoint` (the code of ``train_config``'s one-out folds),
  ``fit_workers`` side by side; with ``zero_step``, each algorithm's zero-step checkpoint
  (:mod:`maml_stop.learn.zero_step`). A fit lives under ``<cache_dir or out>/fits/<name>-<hash>``, keyed by
  the content hash of what it reads (the config files' text, the overrides, the corpus traces), so a rerun
  with the same inputs reads it back instead of fitting again;
* every held-out family of the fold evaluated by the protocol's own
  :func:`maml_stop.evaluate.protocol.evaluate_folds`: ``methods`` (without ``maml``) plus one adapted probe
  per checkpoint, named after it (``maml``, ``anil``, ``zero_step_maml``, ...), and each one's adapted
  query loss (:mod:`maml_stop.evaluate.query_loss`). The methods of :data:`COUNT_FREE` do not depend on
  the meta-training families: evaluated at a fold's first count, copied to the others (same episodes).

Writes ``out/n_<count>/results.json`` and its report per count (``count``, ``n_train`` and ``folds`` in
the file: the count is an axis of the results); the study's summary across counts is
``experiments/meta_study.py``'s.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml

from maml_stop.data.corpus import TraceCorpus
from maml_stop.data.store import atomic_write_bytes
from maml_stop.evaluate.cache import traces_digest
from maml_stop.evaluate.config import EvaluateConfig, check_config
from maml_stop.evaluate.folds import Fold, fit_checkpoint, load_checkpoint
from maml_stop.evaluate.fork import fork_map
from maml_stop.evaluate.grouped_folds import ALL, GroupedFold, family_groups, grouped_folds, resolve_counts
from maml_stop.evaluate.methods import check_methods
from maml_stop.evaluate.protocol import evaluate_folds, load_corpora
from maml_stop.evaluate.results_file import write_results
from maml_stop.learn.zero_step import save_zero_step

__all__ = ["COUNT_FREE", "FIT_DONE", "FitJob", "run_grouped", "study_families", "fit_jobs", "run_fit"]

log = logging.getLogger(__name__)

# methods whose figures do not depend on the meta-training families (nor on any checkpoint): evaluated once
# per fold, at its first count, and reused at the others (the episodes are the same at every count)
COUNT_FREE = ("full", "first_probe", "budget", "consistency", "confidence", "scratch", "oracle", "oracle_equal_em")
FIT_DONE = "fit_done.json"  # written beside a finished fit: its content key and checkpoint (what a rerun checks)
_KEY_VERSION = 1  # part of every fit key: bump it when a fit's computation changes (old fits are not reused)


@dataclasses.dataclass(frozen=True)
class FitJob:
    """One checkpoint of the grouped folds: ``maml-stop fit`` arguments (no output root), its content key."""

    name: str  # the method it becomes: the algorithm, or zero_step_<algorithm>
    fold: int
    count: int | str
    args: tuple[str, ...]
    key: str  # sha256 of what the fit reads (:func:`_fit_key`)
    zero_step: bool = False

    def folder(self, root: Path) -> Path:
        return root / "fits" / f"{self.name}-{self.key[:16]}"


def study_families(cfg: EvaluateConfig, corpus: TraceCorpus) -> list[str]:
    """The families of the grouped folds: ``folds.families_file``'s ``kept`` list, else ``families``, else
    every family of the corpus; checked against the corpus, and against ``folds.min_traces``."""
    chosen: list[str] | None = list(cfg.families) if cfg.families else None
    if cfg.folds.families_file:
        data = json.loads(Path(cfg.folds.families_file).read_text())
        if not data.get("pilot_complete", True):
            log.warning("%s: the pilot is not complete; the study families may still change", cfg.folds.families_file)
        chosen = list(data["kept"])
    if chosen is None:
        chosen = list(corpus.families)
    missing = [f for f in chosen if f not in corpus.families]
    if missing:
        raise ValueError(f"study families {missing} are not in the corpus {cfg.corpus}; it holds {corpus.families}")
    short = {f: len(corpus.traces(f)) for f in chosen if len(corpus.traces(f)) < cfg.folds.min_traces}
    if short:
        raise ValueError(f"families with fewer than min_traces={cfg.folds.min_traces} traces in {cfg.corpus} (is the "
                         f"harvest finished?): {short}")
    return chosen


def _fit_key(args: Sequence[str], digest: str, zero: bool) -> str:
    """sha256 of a fit's inputs: its arguments with every ``--config`` file replaced by its text, the
    corpus traces' digest, whether it is a zero-step checkpoint, the torch version."""
    resolved, it = [], iter(args)
    for a in it:
        resolved += [a, Path(next(it)).read_text()] if a == "--config" else [a]
    blob = json.dumps({"version": _KEY_VERSION, "args": resolved, "corpus": digest, "zero_step": zero,
                       "torch": torch.__version__})
    return hashlib.sha256(blob.encode()).hexdigest()


def fit_jobs(cfg: EvaluateConfig, folds: Sequence[GroupedFold], labels: Sequence[int | str], configs: Path,
             digest: str) -> list[FitJob]:
    """Every checkpoint of the grouped folds, count by count, fold by fold, algorithm by algorithm."""
    algorithms = cfg.algorithms or {"maml": {}}
    jobs = []
    for label in labels:
        for fold in folds:
            split = fold.split(label)
            for algo in algorithms:
                files = [*cfg.train_configs, str(configs / "train_overrides.yaml"), str(configs / f"{algo}.yaml")]
                args = tuple([a for f in files for a in ("--config", f)] + [
                    f"--data.corpus={cfg.source_corpus or cfg.corpus}", "--data.fold=null",
                    f"--data.train_families=[{','.join(split.train)}]", f"--data.val_families=[{','.join(split.val)}]",
                    f"--data.test_families=[{','.join(split.test)}]"])
                jobs.append(FitJob(algo, fold.index, label, args, _fit_key(args, digest, False)))
                if cfg.zero_step:
                    jobs.append(FitJob(f"zero_step_{algo}", fold.index, label, args, _fit_key(args, digest, True), True))
    return jobs


def run_fit(root: Path, job: FitJob) -> str:
    """The checkpoint of ``job`` under ``root``: read back when a finished fit of the same key is there
    (``fit_done.json``, written after the checkpoint), else fitted (or, for a zero-step job, written)."""
    folder = job.folder(root)
    done = folder / FIT_DONE
    if done.is_file():
        record = json.loads(done.read_text())
        if record.get("key") == job.key and Path(record["checkpoint"]).is_file():
            return record["checkpoint"]
    args = [*job.args, f"--trainer.default_root_dir={folder}"]
    log.info("fold %d, %s meta-training families: fitting %s", job.fold, job.count, job.name)
    if job.zero_step:
        path = save_zero_step(list(job.args), folder / "zero_step.ckpt")
    else:
        path = fit_checkpoint(args, folder)
    atomic_write_bytes(done, json.dumps({"key": job.key, "checkpoint": str(path), "args": args}).encode())
    return str(path)


def _count_labels(counts: Sequence[int | str], folds: Sequence[GroupedFold]) -> list[int | str]:
    """The counts every fold has (``all`` always; an int only where no fold has fewer families)."""
    labels = resolve_counts(counts, max(len(f.train) for f in folds))
    return [c for c in labels if c == ALL or all(c <= len(f.train) for f in folds)]


def run_grouped(cfg: EvaluateConfig) -> dict[str, Any]:
    """Fit and evaluate the grouped folds x counts x algorithms of ``cfg``; write each count's results.
    Returns ``counts`` (labels as strings), ``folds``, ``n_train`` (count -> per fold), ``per_count``
    (count -> its results dictionary) and ``seconds``."""
    check_config(cfg)
    check_methods(cfg)
    torch.set_num_threads(1)
    started = time.time()
    out = Path(cfg.out)
    configs = out / "configs"  # the fit fragments, kept beside the results (their text is in the fit keys)
    configs.mkdir(parents=True, exist_ok=True)
    algorithms = cfg.algorithms or {"maml": {}}
    for name, fragment in {"train_overrides": cfg.train_overrides, **algorithms}.items():
        (configs / f"{name}.yaml").write_text(yaml.safe_dump(fragment or {}, sort_keys=False))
    corpus, source = load_corpora(cfg)
    families = study_families(cfg, corpus)
    n_groups = len(family_groups(families))
    n_folds = min(cfg.folds.n, n_groups)
    if n_folds < cfg.folds.n:
        log.warning("%d groups of families: %d folds instead of %d", n_groups, n_folds, cfg.folds.n)
    folds = grouped_folds(families, n_folds, cfg.folds.val_families, cfg.folds.seed)
    labels = _count_labels(cfg.folds.counts, folds)
    digest = traces_digest([t for f in sorted(families) for t in source.traces(f)])
    jobs = fit_jobs(cfg, folds, labels, configs, digest)
    log.info("grouped folds: %d checkpoints (%d folds x %d counts), %d side by side", len(jobs), len(folds),
             len(labels), cfg.fit_workers)
    paths = fork_map(run_fit, jobs, cfg.fit_workers, Path(cfg.cache_dir or out))
    checkpoints = {(j.fold, j.count, j.name): p for j, p in zip(jobs, paths)}
    first_jobs = [j for j in jobs if j.fold == folds[0].index and j.count == labels[0]]
    names = [j.name for j in first_jobs if not j.zero_step] + [j.name for j in first_jobs if j.zero_step]
    per_count: dict[str, dict[str, Any]] = {}
    for label in labels:
        eval_folds = [f for fold in folds
                      for f in _fold(cfg, source, fold, label, {n: checkpoints[fold.index, label, n] for n in names})]
        first = per_count[str(labels[0])] if per_count else None
        results = _evaluate_count(cfg, eval_folds, corpus, source, names, first)
        results.update(count=str(label), n_train=[len(f.train_subset(label)) for f in folds],
                       folds=[dataclasses.asdict(f) for f in folds])
        write_results(results, out / f"n_{label}")
        per_count[str(label)] = results
    return {"counts": [str(c) for c in labels], "folds": [dataclasses.asdict(f) for f in folds],
            "n_train": {str(c): per_count[str(c)]["n_train"] for c in labels}, "per_count": per_count,
            "seconds": round(time.time() - started, 1)}


def _evaluate_count(cfg: EvaluateConfig, folds: Sequence[Fold], corpus: TraceCorpus, source: TraceCorpus,
                    names: Sequence[str], first: dict[str, Any] | None) -> dict[str, Any]:
    """The results of one count: :func:`~maml_stop.evaluate.protocol.evaluate_folds` of ``methods`` (without
    ``maml``) and the named checkpoints; the :data:`COUNT_FREE` methods copied from ``first`` (the first
    count's results, the same episodes) instead of evaluated again."""
    started = time.time()
    methods = [m for m in cfg.methods if m != "maml"]
    reused = [m for m in methods if first is not None and m in COUNT_FREE]
    results = evaluate_folds(dataclasses.replace(cfg, methods=[m for m in methods if m not in reused]), folds, corpus, source)
    for family, by_k in results["results"].items():  # the reused methods, in the evaluation's method order
        for k, figures in by_k.items():
            got = {**figures, **{m: first["results"][family][k][m] for m in reused}}
            by_k[k] = {m: got[m] for m in [*methods, *names] if m in got}
    if reused:  # the reused methods' reliability data too (the same episodes), in the methods' order
        merged = {**results["calibration"], **{m: first["calibration"][m] for m in reused if m in first["calibration"]}}
        results["calibration"] = {m: merged[m] for m in methods if m in merged}
    oracles = [m for m in methods if m.startswith("oracle")]
    results.update(methods=[m for m in methods if m not in oracles] + [*names] + oracles,  # the oracles last, as one out
                   config=dataclasses.asdict(cfg), seconds=round(time.time() - started, 1))
    return results


def _fold(cfg: EvaluateConfig, source: TraceCorpus, fold: GroupedFold, label: int | str,
          checkpoints: dict[str, str]) -> list[Fold]:
    """The protocol's :class:`Fold` of every held-out family of ``fold`` at ``label`` meta-training
    families: the first checkpoint as its adapter, every checkpoint as a named adapter."""
    loaded = {name: load_checkpoint(path, source, cfg.allow_other_recipe)[:2] for name, path in checkpoints.items()}
    adapters = {name: (adapter, (meta.get("hyper_parameters") or {}).get("eval_inner_steps"), checkpoints[name])
                for name, (adapter, meta) in loaded.items()}
    first, steps, path = next(iter(adapters.values()))
    names = next(iter(loaded.values()))[1].get("feature_names")
    subset = None if names is None or list(names) == source.feature_names else list(names)
    train = fold.train_subset(label)
    return [Fold(family, first, list(train), path, steps, subset, adapters=adapters) for family in fold.test]
