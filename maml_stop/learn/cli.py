"""``maml-stop fit|validate|test --config experiments/<name>.yaml``: LightningCLI over
:class:`MetaStoppingModule` and :class:`TraceDataModule`.

>>> main(["fit", "--config", "experiments/quickstart.yaml"])                  # doctest: +SKIP
>>> main(["test", "--config", "experiments/quickstart.yaml", "--ckpt_path", "runs/quickstart/checkpoints/best.ckpt"])  # doctest: +SKIP

Links (data -> model, after the datamodule is instantiated): ``data.n_features -> model.n_features``
and ``data.feature_names -> model.feature_names`` (both read from the corpus ``meta.json``); do not set
them in YAML. The normalisation statistics follow by hook (``MetaStoppingModule.setup``, see
:mod:`maml_stop.data.datamodule`).

**The model class.** ``MetaStoppingModule`` unless the config names a subclass of it: ``--model
maml_stop.learn.rl.RLStoppingModule`` or ``model: {class_path: maml_stop.learn.rl.RLStoppingModule,
init_args: {...}}`` (``experiments/rl.yaml``). The nested ``model.predictor.*`` and ``model.adapter.*`` keys
(``PredictorConfig``, ``AdapterConfig``) of every YAML keep working (they are the default class's init arguments, and carry over to the subclass;
jsonargparse drops those the subclass does not take, e.g. ``compare_random_init`` for the RL module, and
the CLI logs a warning naming them: :func:`dropped_model_keys`).

``trainer.inference_mode`` defaults to false and setting it to true is refused: validation and test
adapt the predictor with gradient steps, which inference mode forbids.

**One output root.** ``trainer.default_root_dir`` (``--trainer.default_root_dir X``) is where every
file of a run goes; the YAMLs name no other path:

* ``<root>/checkpoints/best.ckpt``: the lowest ``val/loss`` (the ``ModelCheckpoint`` with ``monitor``);
  what ``maml-stop evaluate``, ``test`` and ``adapt`` should read;
* ``<root>/checkpoints/last.ckpt``: the final training step (a ``ModelCheckpoint`` with ``save_top_k: 0,
  save_last: true`` writes it once, when training ends). Under Lightning 2.6 ``save_last`` on a monitored
  callback is *not* the final step: it is written only when the monitor improves, i.e. a copy of best;
* ``<root>/logs/version_0/``: ``metrics.csv``, ``hparams.yaml``, ``config.yaml``, ``em_tokens/*.png`` of
  ``fit`` (``logs/validate/``, ``logs/test/`` for those subcommands, replaced at each run).

The CLI fills what the config leaves open: the default logger (``trainer.logger`` absent, ``true`` or
``null``) is a ``CSVLogger`` at ``<root>/logs``; a file logger's ``version`` is fixed as above; a
``ModelCheckpoint`` without ``dirpath`` writes to ``<root>/checkpoints``; checkpoints never get a
``-v1`` suffix (``enable_version_counter`` is forced off). A ``save_dir`` or ``dirpath`` set explicitly is
followed, with a warning when it lies outside the root (``cli_main(..., follow_root=True)``, used for
the folds of ``maml-stop evaluate --train_config``, moves those under the root too).

**Reruns.** ``fit`` into a root that already holds a run's checkpoints or logs is refused
(:class:`OutputExistsError`, naming the folder) unless ``--overwrite true``, which deletes them first, so
every file under the root is the new run's; ``fit --ckpt_path <root>/checkpoints/last.ckpt`` resumes in
place (checkpoints overwritten, the resumed part logged to the next ``logs/version_N``).
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import sys
from pathlib import Path

import torch
from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from maml_stop.given_keys import given_keys
from maml_stop.learn.checkpoint_io import secure_ckpt_path
from maml_stop.data.datamodule import TraceDataModule
from maml_stop.learn.module import MOVED_KEYS, MetaStoppingModule

__all__ = ["MetaStoppingCLI", "OutputExistsError", "ROOT", "main", "cli_main", "place_outputs", "previous_outputs"]

log = logging.getLogger(__name__)

ROOT = "<default_root_dir>"  # the default logger's save_dir: replaced by trainer.default_root_dir
DEFAULT_LOGGER = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": ROOT, "name": "logs"}}
# what a logger of ours leaves in its log folder (deleted by `fit --overwrite true`); checkpoints: *.ckpt
LOG_FILES = ("metrics.csv", "hparams.yaml", "config.yaml", "events.out.tfevents.*", "em_tokens")


class OutputExistsError(FileExistsError):
    """``fit`` into an output root that holds a previous run (pass ``--overwrite true`` to replace it)."""


class MetaStoppingCLI(LightningCLI):
    """LightningCLI with the data -> model links, the inference-mode guard and the one output root
    (module docstring). ``follow_root=True`` puts explicit logger/checkpoint paths under the root too."""

    def __init__(self, *args, follow_root: bool = False, **kwargs) -> None:
        self.follow_root = follow_root
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--overwrite", type=bool, default=False,
                            help="fit: replace the checkpoints and logs of a previous run under trainer.default_root_dir")
        parser.link_arguments("data.n_features", "model.init_args.n_features", apply_on="instantiate")
        parser.link_arguments("data.feature_names", "model.init_args.feature_names", apply_on="instantiate")
        # subclass mode (cli_main): MetaStoppingModule unless the config names a subclass (module docstring)
        parser.set_defaults({"model": {"class_path": f"{MetaStoppingModule.__module__}.{MetaStoppingModule.__name__}"}})

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        """Parse, then make ``--ckpt_path`` loading safe before Lightning reads the file (it would
        show torch's advice to pass ``weights_only=False``, and honour TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD)."""
        super().parse_arguments(parser, args)
        if self.config.get("subcommand"):
            secure_ckpt_path(self.config[self.config.subcommand])
        config = self.config[self.config.subcommand] if self.config.get("subcommand") else self.config
        model = config.get("model")
        if isinstance(model, Namespace) and model.get("class_path"):
            dropped = dropped_model_keys(sys.argv[1:] if args is None else list(args), model)
            if dropped:
                log.warning("model settings %s are not arguments of %s and are ignored (the model class is %s)",
                            dropped, model.class_path.rpartition(".")[2], model.class_path)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.trainer.get("inference_mode", False):
            raise ValueError(
                "trainer.inference_mode must be false: validation and test adapt the predictor on each "
                "episode's support set with gradient steps, which torch.inference_mode() forbids"
            )
        resuming = self.subcommand == "fit" and bool(config.get("ckpt_path"))
        ckpt_dirs, log_dirs = place_outputs(config.trainer, self.subcommand, resuming, self.follow_root)
        if self.subcommand == "fit" and not resuming:
            _replace_or_refuse(config.trainer, ckpt_dirs, log_dirs, bool(config.get("overwrite")))


def dropped_model_keys(argv: list[str], model: Namespace) -> list[str]:
    """The ``model`` settings of the command line and its ``--config`` files (flat keys, ``init_args``
    keys, ``--model.X`` flags) that the chosen model class does not take: jsonargparse drops them
    silently when ``class_path`` names a subclass with other arguments (module docstring)."""
    given = set(given_keys(argv, "model", nested="init_args"))
    taken = {k.split(".", 1)[0] for k in (model.get("init_args") or Namespace()).keys()}  # keys() are dotted
    taken |= {"n_features", "feature_names"}  # linked from the data
    return sorted(k for k in given if k not in taken and k not in ("class_path", "init_args", "dict_kwargs"))


def refuse_moved_model_keys(argv: list[str]) -> None:
    """A ``ValueError`` naming the new key for every flat ``model.hidden``, ``model.inner_lr``, ... of the
    command line or its ``--config`` files (they moved under ``model.predictor`` / ``model.adapter``)."""
    given = [key for key in given_keys(argv, "model", nested="init_args") if key in MOVED_KEYS]
    if given:
        moved = ", ".join(f"model.{k} -> model.{MOVED_KEYS[k]}.{k}" for k in given)
        raise ValueError(f"these model keys moved into the nested configs (PredictorConfig, AdapterConfig): {moved}")


def _class(spec: object) -> type | None:
    """The class a ``class_path`` config names (None for anything else: true/false/None, unknown)."""
    path = spec.get("class_path") if isinstance(spec, (Namespace, dict)) else None
    if not isinstance(path, str) or "." not in path:
        return None
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def _inside(path: str | os.PathLike, root: str | os.PathLike) -> bool:
    p, r = Path(path).resolve(), Path(root).resolve()
    return p == r or r in p.parents


def place_outputs(
    trainer: Namespace, subcommand: str | None, resuming: bool = False, follow_root: bool = False
) -> tuple[list[str], list[str]]:
    """Point the config's file loggers and ``ModelCheckpoint`` callbacks at ``trainer.default_root_dir``
    (in place, before instantiation; rules in the module docstring). Returns the checkpoint folders and
    the fixed log folders this run will write."""
    root = trainer.get("default_root_dir") or os.getcwd()
    version = subcommand if subcommand in ("validate", "test", "predict") else (None if resuming else 0)
    if trainer.get("logger") is None or trainer.get("logger") is True:
        trainer.logger = Namespace(class_path=DEFAULT_LOGGER["class_path"],
                                   init_args=Namespace(**DEFAULT_LOGGER["init_args"]))
    loggers = trainer.logger if isinstance(trainer.logger, list) else [trainer.logger]
    log_dirs: list[str] = []
    for spec in loggers:
        cls = _class(spec)
        if cls is None or not issubclass(cls, (CSVLogger, TensorBoardLogger)):
            continue
        args = spec.init_args
        if args.save_dir == ROOT or (follow_root and not _inside(args.save_dir, root)):
            if args.save_dir != ROOT:
                log.info("%s: save_dir %s moved under the output root %s", spec.class_path, args.save_dir, root)
            args.save_dir = str(root)
        elif not _inside(args.save_dir, root):
            log.warning("%s writes its logs to %s, outside trainer.default_root_dir %s (as configured)",
                        spec.class_path, args.save_dir, root)
        if args.get("version") is None:
            args.version = version
        if args.version is not None:
            folder = args.version if isinstance(args.version, str) else f"version_{args.version}"
            log_dirs.append(os.path.join(args.save_dir, args.get("name") or "", folder))
    callbacks = trainer.get("callbacks") or []
    callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
    ckpt_dirs: list[str] = []
    for spec in callbacks:
        cls = _class(spec)
        if cls is None or not issubclass(cls, ModelCheckpoint):
            continue
        args = spec.init_args
        default = os.path.join(root, "checkpoints")
        if args.get("dirpath") is None or (follow_root and not _inside(args.dirpath, root)):
            if args.get("dirpath") is not None:
                log.info("ModelCheckpoint: dirpath %s moved under the output root %s", args.dirpath, root)
            args.dirpath = default
        elif not _inside(args.dirpath, root):
            log.warning("ModelCheckpoint writes to %s, outside trainer.default_root_dir %s (as configured)",
                        args.dirpath, root)
        args.enable_version_counter = False  # a rerun replaces best.ckpt/last.ckpt, never best-v1.ckpt
        if args.get("monitor") and args.get("save_last"):
            log.warning("ModelCheckpoint(monitor=%r, save_last=%r): under Lightning 2.6 its last.ckpt is written "
                        "only when %s improves, not at the final step", args.monitor, args.save_last, args.monitor)
        ckpt_dirs.append(args.dirpath)
    if not ckpt_dirs and trainer.get("enable_checkpointing") is not False:  # Lightning's default callback, here
        default = Namespace(dirpath=os.path.join(root, "checkpoints"), enable_version_counter=False)
        spec = Namespace(class_path="lightning.pytorch.callbacks.ModelCheckpoint", init_args=default)
        trainer.callbacks = [*callbacks, spec]
        ckpt_dirs.append(default.dirpath)
    return ckpt_dirs, log_dirs


def previous_outputs(ckpt_dirs: list[str], log_dirs: list[str]) -> list[Path]:
    """Files of an earlier run in these folders: ``*.ckpt`` files, and what our loggers write."""
    found = [p for d in ckpt_dirs for p in sorted(Path(d).glob("*.ckpt"))]
    found += [p for d in log_dirs for pattern in LOG_FILES for p in sorted(Path(d).glob(pattern))]
    return list(dict.fromkeys(found))


def _launched_rank() -> int:
    """The global rank of a process started by a DDP launcher (Lightning's ``ddp`` re-runs the command with
    ``LOCAL_RANK`` / ``NODE_RANK`` set; torchrun sets ``RANK``; SLURM ``SLURM_PROCID``), 0 otherwise."""
    for key in ("RANK", "SLURM_PROCID"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return int(os.environ.get("NODE_RANK", "0") or 0) + int(os.environ.get("LOCAL_RANK", "0") or 0)


def _replace_or_refuse(trainer: Namespace, ckpt_dirs: list[str], log_dirs: list[str], overwrite: bool) -> None:
    if _launched_rank() != 0:  # only the first process checks and deletes (several nodes may share the folder)
        return
    old = previous_outputs(ckpt_dirs, log_dirs)
    if not old:
        return
    root = trainer.get("default_root_dir") or os.getcwd()
    if not overwrite:
        raise OutputExistsError(
            f"{root} already holds a run ({len(old)} files: {', '.join(str(p) for p in old[:4])}"
            f"{', ...' if len(old) > 4 else ''}). Pass --overwrite true to replace its checkpoints and logs, "
            "--trainer.default_root_dir DIR to write elsewhere, or --ckpt_path <checkpoint> to resume it."
        )
    for p in old:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    log.info("--overwrite: deleted %d files of the previous run under %s", len(old), root)


def cli_main(args: list[str] | None = None, run: bool = True, follow_root: bool = False) -> MetaStoppingCLI:
    """Build (and by default run) the CLI; ``args`` as on the command line, subcommand first.
    ``follow_root``: every logger and checkpoint path goes under ``trainer.default_root_dir``, whatever
    the config says (the folds of ``maml-stop evaluate --train_config``)."""
    torch.set_num_threads(1)  # see DESIGN.md: a second thread was slower whenever anything else ran
    refuse_moved_model_keys(list(sys.argv[1:] if args is None else args))
    return MetaStoppingCLI(
        MetaStoppingModule,
        TraceDataModule,
        follow_root=follow_root,
        trainer_defaults={"inference_mode": False, "logger": {**DEFAULT_LOGGER, "init_args": {**DEFAULT_LOGGER["init_args"]}}},
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
        auto_configure_optimizers=False,
        subclass_mode_model=True,  # --model maml_stop.learn.rl.RLStoppingModule (module docstring)
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point used by ``maml_stop.cli`` (argv starts with fit/validate/test)."""
    args = list(sys.argv[1:] if argv is None else argv)
    # the console script passes sys.argv on: let LightningCLI read it itself (no "args and argv" warning)
    cli_main(None if args == sys.argv[1:] else args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
