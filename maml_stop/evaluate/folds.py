"""Folds of ``maml-stop evaluate``: which families are held out, and the meta-trained adapter of each.

Three ways to get them (:func:`resolve_folds`): one checkpoint (its test families are held out), one
checkpoint per held-out family (``checkpoints``), or one fold meta-trained here per held-out family
(``train_config``: ``maml-stop fit`` in process, through :func:`maml_stop.learn.cli.cli_main`, with the
fold's split from :meth:`maml_stop.data.episodes.FamilySplit.holding_out`).

Feature subsets (issue 10): a fold reads the columns its checkpoint was trained on (the checkpoint's
``feature_names``), else the config's ``features``; :attr:`Fold.feature_names` holds them (None: every
column of the corpus).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import yaml

from maml_stop.data.corpus import TraceCorpus
from maml_stop.data.provenance import check_provenance, corpus_provenance
from maml_stop.data.datamodule import resolve_features
from maml_stop.data.episodes import FamilySplit
from maml_stop.evaluate.config import EvaluateConfig
from maml_stop.learn.cli import cli_main
from maml_stop.learn.module import CheckpointError, load_predictor

__all__ = ["Fold", "load_checkpoint", "data_settings", "train_fold", "fit_checkpoint", "resolve_folds"]

log = logging.getLogger(__name__)


@dataclass
class Fold:
    """One held-out family with what its methods need."""

    family: str
    adapter: Any | None  # meta-trained InnerLoopAdapter (None without a checkpoint)
    sources: list[str]  # families the pooled probe trains on
    checkpoint: str | None = None
    eval_steps: int | None = None  # inner steps at evaluation (the checkpoint's eval_inner_steps)
    feature_names: list[str] | None = None  # the columns its methods read (None: all of the corpus's)
    rl_checkpoint: str | None = None  # the RL checkpoint of methods rl / rl_unadapted (None: not asked for)
    # grouped folds: method name -> (adapter, eval_steps, checkpoint) of each algorithm's checkpoint (and
    # zero-step one), evaluated as an adapted probe of that name beside ``adapter`` (the first)
    adapters: dict[str, tuple[Any, int | None, str]] | None = None


def load_checkpoint(path: str, corpus: TraceCorpus,
                    allow_other_recipe: bool = False) -> tuple[Any, dict[str, Any], dict[str, list[str]]]:
    """The meta-trained adapter of a checkpoint, its metadata, and the family split it was trained with
    (``train``/``val``/``test`` resolved against the corpus families; empty when not recorded).
    Raises when the corpus lacks a feature the checkpoint was trained on (its ``feature_names``: every
    column of its corpus, or the ``data.features`` subset it was trained on), or when the corpus was
    harvested with another recipe than the checkpoint's corpus (:mod:`maml_stop.data.provenance`; a
    warning with ``allow_other_recipe``)."""
    _, adapter, meta = load_predictor(path)
    check_provenance(meta.get("provenance"), corpus_provenance(getattr(corpus, "meta", None) or {}),
                     f"the checkpoint {path}", f"the corpus {getattr(corpus, 'root', None) or '(in memory)'}",
                     allow_other_recipe)
    names = meta.get("feature_names")
    missing = [n for n in names or () if n not in corpus.feature_names]
    if missing:
        raise CheckpointError(
            f"the checkpoint {path} was trained on other features than the corpus provides: the corpus lacks "
            f"{missing}\n  checkpoint ({len(names)}): {list(names)}\n"
            f"  corpus     ({len(corpus.feature_names)}): {corpus.feature_names}"
        )
    hp = meta["data"]
    split: dict[str, list[str]] = {}
    if any(hp.get(key) is not None for key in ("train_families", "val_families", "test_families", "fold")):
        resolved = FamilySplit.resolve(
            corpus.families, hp.get("train_families"), hp.get("val_families"), hp.get("test_families"),
            hp.get("fold"), hp.get("n_val_families", 1),
        )
        split = {"train": resolved.train, "val": resolved.val, "test": resolved.test}
    return adapter, meta, split


def data_settings(configs: Sequence[str]) -> dict[str, Any]:
    """The ``data`` section of LightningCLI config files read in order (a later file's key wins, as
    with repeated ``--config``)."""
    data: dict[str, Any] = {}
    for path in configs:
        data.update((yaml.safe_load(Path(path).read_text()) or {}).get("data", {}) or {})
    return data


def train_fold(cfg: EvaluateConfig, family: str, corpus: TraceCorpus, out: Path,
               configs: Sequence[str] | None = None, folds: str = "folds") -> str:
    """Meta-train one checkpoint with ``family`` held out, in process (``maml-stop fit`` with the
    ``configs`` files, by default ``train_config``'s): the split is :meth:`FamilySplit.holding_out` of the
    configs' validation families; checkpoints and CSV/TensorBoard logs go under ``out/<folds>/<family>``
    (its output root, whatever paths the config names; a rerun replaces the folder). Returns the best
    (else last) checkpoint."""
    configs = list(cfg.train_configs if configs is None else configs)
    data = data_settings(configs)
    split = FamilySplit.holding_out(corpus.families, family, data.get("val_families"), data.get("n_val_families", 1))
    folder = out / folds / family
    shutil.rmtree(folder, ignore_errors=True)  # no file of an earlier evaluation survives in the fold
    args = [a for path in configs for a in ("--config", str(path))] + [  # run=False: we call fit
        f"--data.corpus={cfg.source_corpus or cfg.corpus}", "--data.fold=null", "--data.train_families=null",
        f"--data.val_families=[{','.join(split.val)}]", f"--data.test_families=[{','.join(split.test)}]",
        f"--trainer.default_root_dir={folder}",
    ] + ([] if cfg.features is None else [  # a shorthand as it is (json would quote it: '"free"'), a list as JSON
        f"--data.features={cfg.features if isinstance(cfg.features, str) else json.dumps(cfg.features)}"])
    log.info("meta-training the fold of %s: maml-stop fit %s", family, " ".join(args))
    return fit_checkpoint(args, folder)


def fit_checkpoint(args: Sequence[str], folder: Path) -> str:
    """``maml-stop fit`` with ``args`` in process, its output root ``folder`` (``args`` name it with
    ``--trainer.default_root_dir``); the best (else last) checkpoint, else ``folder/final.ckpt`` written
    at the end. Every meta-trained fold of ``maml-stop evaluate`` (one out or grouped) is fitted here."""
    # follow_root: the config's logger save_dir / checkpoint dirpath move under the fold's folder too
    # (they would mix every fold's files with the main job's)
    cli = cli_main(list(args), run=False, follow_root=True)
    callback = cli.trainer.checkpoint_callback  # the first ModelCheckpoint: best.ckpt in our YAMLs
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    path = (callback.best_model_path or callback.last_model_path) if callback is not None else ""
    if not path:
        path = str(Path(folder) / "final.ckpt")
        cli.trainer.save_checkpoint(path)
    return path


def resolve_folds(cfg: EvaluateConfig, corpus: TraceCorpus, out: Path, source: TraceCorpus | None = None) -> list[Fold]:
    """Every held-out family (from ``corpus``) with its meta-trained adapter and pooled-probe source
    families (from ``source``, by default the same corpus), and its RL checkpoint where the methods
    ask for one (:func:`rl_checkpoints`)."""
    source = corpus if source is None else source
    folds = _resolve_folds(cfg, corpus, out, source)
    for fold, path in zip(folds, rl_checkpoints(cfg, [f.family for f in folds], source, out)):
        fold.rl_checkpoint = path
    return folds


def rl_checkpoints(cfg: EvaluateConfig, families: Sequence[str], source: TraceCorpus, out: Path) -> list[str | None]:
    """The RL checkpoint of each held-out family: ``rl_checkpoint`` (one path for all, or family -> path),
    or one RL fold meta-trained here per family (``rl_train_config``, under ``out/rl_folds/<family>``);
    None for all when no RL method is listed."""
    if not any(m in ("rl", "rl_unadapted") for m in cfg.methods):
        return [None] * len(families)
    if cfg.rl_train_configs:
        return [train_fold(cfg, f, source, out, cfg.rl_train_configs, folds="rl_folds") for f in families]
    if isinstance(cfg.rl_checkpoint, dict):
        missing = [f for f in families if f not in cfg.rl_checkpoint]
        if missing:
            raise ValueError(f"no RL checkpoint for held-out families {missing}; rl_checkpoint given for "
                             f"{sorted(cfg.rl_checkpoint)}")
        return [cfg.rl_checkpoint[f] for f in families]
    return [cfg.rl_checkpoint] * len(families)


def _resolve_folds(cfg: EvaluateConfig, corpus: TraceCorpus, out: Path, source: TraceCorpus) -> list[Fold]:
    available = corpus.families

    # the config's subset (None: all), resolved against the corpus the pooled probe trains on
    wanted = (None if cfg.features is None
              else resolve_features(cfg.features, source.feature_names, source.meta.get("feature_costs"), "features"))

    def check_families(names: Sequence[str], what: str, where: TraceCorpus = corpus) -> None:
        bad = [f for f in names if f not in where.families]
        if bad:
            raise ValueError(f"{what} {bad} are not in the corpus; families in the corpus: {where.families}")

    def fold(family: str, path: str | None, held_out: Sequence[str]) -> Fold:
        adapter, meta, split = load_checkpoint(path, source, cfg.allow_other_recipe) if path else (None, {}, {})
        seen = set(split.get("train", [])) | set(split.get("val", []))
        if family in seen:
            raise ValueError(f"family {family!r} was seen in meta-training by {path}; it cannot be held out")
        sources = list(cfg.source_families or split.get("train") or [g for g in source.families if g not in held_out])
        if family in sources:
            raise ValueError(f"held-out family {family!r} is among the pooled-probe source families {sources}")
        check_families(sources, "source families", source)
        steps = (meta.get("hyper_parameters") or {}).get("eval_inner_steps")
        names = meta.get("feature_names") if path else None
        if wanted is not None and names is not None and list(names) != wanted:
            raise ValueError(
                f"features: {cfg.features!r} selects other features than the checkpoint {path} was trained on:\n"
                f"  features   ({len(wanted)}): {wanted}\n  checkpoint ({len(names)}): {list(names)}\n"
                "Leave features unset to evaluate the checkpoint on its own subset."
            )
        names = list(names) if names is not None else wanted
        return Fold(family, adapter, sources, path, steps, names if names != source.feature_names else None)


    if cfg.checkpoints:
        families = list(cfg.families or cfg.checkpoints)
        missing = [f for f in families if f not in cfg.checkpoints]
        if missing:
            raise ValueError(f"no checkpoint for held-out families {missing}; checkpoints given for {sorted(cfg.checkpoints)}")
        check_families(families, "held-out families")
        return [fold(f, cfg.checkpoints[f], [f]) for f in families]
    if cfg.train_config or (cfg.rl_train_config and not cfg.checkpoint):  # every family held out once
        families = list(cfg.families or available)
        check_families(families, "held-out families")
        return [fold(f, train_fold(cfg, f, source, out) if cfg.train_config else None, [f]) for f in families]
    split = load_checkpoint(cfg.checkpoint, source, cfg.allow_other_recipe)[2] if cfg.checkpoint else {}
    families = list(cfg.families or split.get("test") or [])
    if not families:
        raise ValueError(
            f"no held-out families: pass --families (families in the corpus: {available}); "
            + ("the checkpoint records no test families" if cfg.checkpoint else "no checkpoint was given")
        )
    check_families(families, "held-out families")
    return [fold(f, cfg.checkpoint, families) for f in families]
