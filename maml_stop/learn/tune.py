"""``maml-stop tune``: Optuna (TPE) over the adapter's and predictor's hyperparameters, scored on the
validation families alone; the best trial is written as a YAML that ``maml-stop fit`` takes (issue 13).

>>> main(["--config", "experiments/quickstart.yaml", "--space", "experiments/tune.yaml",
...       "--n_trials", "20", "--out", "runs/tune/best.yaml"])                      # doctest: +SKIP

Each trial is a short ``maml-stop fit`` in process (:func:`maml_stop.learn.cli.cli_main`, as the folds of
``maml-stop evaluate`` are trained) with the sampled ``model.*`` values, in its own output root
``<out_dir>/trial_NNNN``; its score is the lowest ``val/loss`` (the validation families' adapted query
loss) over its validations; the study minimises it.

**The held-out families are never read.** The base config's split is resolved against the corpus's shard
folders (names only, no trace is read); every trial then reads a view of the corpus (``<out_dir>/corpus``:
``meta.json`` and links to the shard folders of the train and validation families only), with
``data.train_families``/``data.val_families`` explicit and ``data.test_families=[]``, and each trial checks
that none of the held-out families reached its datamodule. Arguments other than the tune's own are passed
to every trial (``--data.k=4``); they are not written to the best YAML (its comment lists them).

The search space (``--space``, e.g. ``experiments/tune.yaml``) maps a ``model.*`` key to a range:
``{low, high}`` (ints: an integer; floats: a float; ``log: true``: log-uniform) or ``{choices: [...]}``.
Without one, :data:`DEFAULT_SPACE` (small). ``model.adapter.loss: cost`` trials also set ``data.weighting: cost``
(the loss reads the cost weights, see :mod:`maml_stop.learn.adapter`).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path
from typing import Any, Sequence

import yaml

from maml_stop.data import store
from maml_stop.data.episodes import FamilySplit
from maml_stop.learn.adapter import LOSSES, parse_loss
from maml_stop.learn.cli import cli_main

__all__ = ["DEFAULT_SPACE", "HeldOutReadError", "TuneResult", "load_space", "corpus_view", "tune", "main"]

log = logging.getLogger(__name__)

# small and safe (STYLE 4): the tuned ranges live in experiments/tune.yaml
DEFAULT_SPACE: dict[str, dict[str, Any]] = {
    "model.adapter.inner_lr": {"low": 0.01, "high": 1.0, "log": True},  # log-uniform
    "model.adapter.inner_steps": {"low": 1, "high": 5},
    "model.predictor.hidden": {"choices": [16, 32, 64]},
    "model.adapter.loss": {"choices": list(LOSSES)},
}
TUNABLE = ("adapter.inner_lr", "adapter.inner_steps", "predictor.hidden", "predictor.depth", "predictor.dropout",
           "adapter.loss", "predictor.kind", "adapter.algorithm", "adapter.first_order")


class HeldOutReadError(RuntimeError):
    """A held-out (test) family reached a tuning trial."""


class TuneResult(dict):
    """``best_params``, ``best_value``, ``n_trials``, ``out`` (the best YAML), ``held_out`` (never read)."""


def load_space(path: str | Path | None) -> dict[str, dict[str, Any]]:
    """The search space of a tune YAML (its ``space`` section), checked; :data:`DEFAULT_SPACE` without one."""
    if path is None:
        return {k: dict(v) for k, v in DEFAULT_SPACE.items()}
    cfg = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(cfg.get("space"), dict) or not cfg["space"]:
        raise ValueError(f"{path}: a tune YAML needs a non-empty 'space' section; keys present: {sorted(cfg)}")
    space = cfg["space"]
    for key, spec in space.items():
        name = key.removeprefix("model.")
        if not key.startswith("model.") or name not in TUNABLE:
            raise ValueError(f"{path}: cannot tune {key!r}; tunable keys: {', '.join('model.' + t for t in TUNABLE)}")
        if not isinstance(spec, dict) or not ({"choices"} <= set(spec) or {"low", "high"} <= set(spec)):
            raise ValueError(f"{path}: {key}: give {{low, high[, log]}} or {{choices: [...]}}; got {spec!r}")
        if name == "adapter.loss":
            if "choices" not in spec:
                raise ValueError(f"{path}: model.adapter.loss needs choices; valid: {', '.join(LOSSES)} or INNER/QUERY")
            for choice in spec["choices"]:
                try:
                    parse_loss(choice)  # a kind, or INNER/QUERY such as balanced/expected_cost
                except ValueError as err:
                    raise ValueError(f"{path}: model.adapter.loss choice {choice!r}: {err}") from None
    return space


def _suggest(trial: Any, key: str, spec: dict[str, Any]) -> Any:
    if "choices" in spec:
        return trial.suggest_categorical(key, list(spec["choices"]))
    low, high = spec["low"], spec["high"]
    if isinstance(low, int) and isinstance(high, int):
        return trial.suggest_int(key, low, high, log=bool(spec.get("log", False)))
    return trial.suggest_float(key, float(low), float(high), log=bool(spec.get("log", False)))


def corpus_view(root: str | Path, families: Sequence[str], view: Path) -> Path:
    """A corpus folder at ``view`` holding ``root``'s ``meta.json`` and links to the shard folders of
    ``families`` alone: what reads it cannot reach another family's traces."""
    shutil.rmtree(view, ignore_errors=True)
    (view / store.SHARD_DIR).mkdir(parents=True)
    shutil.copy2(Path(root) / store.META_FILE, view / store.META_FILE)
    for fam in families:
        (view / store.SHARD_DIR / fam).symlink_to((Path(root) / store.SHARD_DIR / fam).resolve(), target_is_directory=True)
    return view


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``update`` over ``base``, mappings merged key by key at every depth."""
    out = dict(base)
    for key, value in update.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _merged_configs(configs: Sequence[str]) -> dict[str, Any]:
    """The config files read in order, a later file's key winning (nested sections merged key by key, as
    repeated ``--config`` does for these YAMLs)."""
    merged: dict[str, Any] = {}
    for path in configs:
        merged = _merge(merged, yaml.safe_load(Path(path).read_text()) or {})
    return merged


def _fit_values(params: dict[str, Any]) -> list[tuple[str, Any]]:
    """(dotted key, value) a trial sets: the sampled values, plus ``data.weighting: cost`` for the cost loss."""
    values = list(params.items())
    if params.get("model.adapter.loss") == "cost":
        values.append(("data.weighting", "cost"))
    return values


def tune(
    configs: Sequence[str],
    n_trials: int = 20,
    out: str | Path = "best.yaml",
    space: str | Path | None = None,
    seed: int = 0,
    study_name: str | None = None,
    out_dir: str | Path | None = None,
    fit_args: Sequence[str] = (),
) -> TuneResult:
    """Run the study (module docstring) and write the best trial's fit-ready YAML to ``out``."""
    import optuna
    from lightning.pytorch.callbacks import Callback

    if n_trials < 1:
        raise ValueError(f"n_trials must be >= 1; got {n_trials}")
    search = load_space(space)
    out = Path(out)
    out_dir = Path(out_dir) if out_dir is not None else out.with_suffix("").parent / f"{out.stem}_trials"
    base = [a for path in configs for a in ("--config", str(path))] + list(fit_args)

    # the split, resolved as the datamodule would (run=False reads meta.json, no trace)
    probe = cli_main(base, run=False)
    hp = probe.datamodule.hparams
    corpus = hp["corpus"]
    present = sorted({p.parent.name for p in store.shard_paths(corpus)})
    split = FamilySplit.resolve(present, hp["train_families"], hp["val_families"], hp["test_families"],
                                hp["fold"], hp["n_val_families"])
    if not split.val:
        raise ValueError("maml-stop tune scores trials on the validation families: set data.val_families "
                         f"(or data.fold); families in the corpus: {present}")
    held_out = sorted(set(present) - set(split.train) - set(split.val))  # the test families and any unused
    log.info("tuning: train %s, val %s; never read: %s", split.train, split.val, held_out)
    view = corpus_view(corpus, split.train + split.val, out_dir / "corpus")
    del probe

    class _BestValLoss(Callback):
        def __init__(self) -> None:
            self.best: float | None = None

        def on_validation_end(self, trainer, pl_module) -> None:
            value = trainer.callback_metrics.get("val/loss")
            if value is not None and not trainer.sanity_checking:
                self.best = float(value) if self.best is None else min(self.best, float(value))

    def objective(trial: "optuna.Trial") -> float:
        params = {key: _suggest(trial, key, spec) for key, spec in search.items()}
        root = out_dir / f"trial_{trial.number:04d}"
        shutil.rmtree(root, ignore_errors=True)
        args = base + [
            f"--data.corpus={view}", "--data.fold=null", f"--data.train_families=[{','.join(split.train)}]",
            f"--data.val_families=[{','.join(split.val)}]", "--data.test_families=[]",
            f"--trainer.default_root_dir={root}",
        ] + [f"--{key}={value}" for key, value in _fit_values(params)]
        cli = cli_main(args, run=False, follow_root=True)
        score = _BestValLoss()
        cli.trainer.callbacks.append(score)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        dm = cli.datamodule
        reached = sorted(set(held_out) & (set(dm.corpus.families) | set(dm.split.test)))
        if reached or dm.split.test:
            raise HeldOutReadError(f"trial {trial.number}: held-out families {reached or dm.split.test} reached the trial")
        if score.best is None:
            raise ValueError(f"trial {trial.number} logged no val/loss: make trainer.max_steps reach a validation "
                             "(trainer.check_val_every_n_epoch x data.steps_per_epoch)")
        return score.best

    study = optuna.create_study(direction="minimize", study_name=study_name,
                                sampler=optuna.samplers.TPESampler(seed=seed))
    study.optimize(objective, n_trials=n_trials)

    best = _merged_configs(configs)
    for key, value in _fit_values(study.best_trial.params):
        *sections, name = key.split(".")
        node = best
        for section in sections:
            node = node.setdefault(section, {})
        node[name] = value
    header = [
        f"# maml-stop tune: best of {len(study.trials)} trials (study {study.study_name!r}, TPE seed {seed}): "
        f"val/loss {study.best_value:.6g} (trial {study.best_trial.number})",
        f"# base configs: {' '.join(map(str, configs))}; tuned: {', '.join(study.best_trial.params)}",
        f"# trials were run with: {' '.join(fit_args) or '(no extra arguments)'}; never read: {', '.join(held_out)}",
        f"#   maml-stop fit --config {out}",
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(header) + "\n" + yaml.safe_dump(best, sort_keys=False))
    log.info("best trial %d: val/loss %.6g, %s -> %s", study.best_trial.number, study.best_value,
             study.best_trial.params, out)
    return TuneResult(best_params=dict(study.best_trial.params), best_value=float(study.best_value),
                      n_trials=len(study.trials), out=str(out), held_out=held_out)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="maml-stop tune",
        description="Optuna (TPE) over model.* hyperparameters, scored on the validation families' val/loss "
                    "(held-out families never read); writes the best trial as a YAML for `maml-stop fit`. "
                    "Other arguments (e.g. --data.k=4, --trainer.max_steps=200) go to every trial.",
    )
    p.add_argument("--config", action="append", required=True, help="fit config(s), read in order (as for fit)")
    p.add_argument("--space", default=None, help="tune YAML with a 'space' section (default: a small built-in one)")
    p.add_argument("--n_trials", type=int, default=20)
    p.add_argument("--out", default="best.yaml", help="the best trial's fit-ready YAML")
    p.add_argument("--out_dir", default=None, help="trial output roots (default: <out without .yaml>_trials/)")
    p.add_argument("--seed", type=int, default=0, help="TPE sampler seed")
    p.add_argument("--study_name", default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args, rest = _parser().parse_known_args(sys.argv[1:] if argv is None else argv)
    result = tune(args.config, args.n_trials, args.out, args.space, args.seed, args.study_name, args.out_dir, rest)
    print(f"best val/loss {result['best_value']:.6g} of {result['n_trials']} trials: {result['best_params']} -> {result['out']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
