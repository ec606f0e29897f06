"""The zero-step checkpoint: a ``maml-stop fit`` config's predictor at its random initialisation, with the
meta-training families' normalisation, and no optimiser step (issue 11 item 3).

It is the honest "no meta-training" baseline: the same architecture, ``init_seed``, adapter (algorithm,
inner rate and steps; Meta-SGD's rates at their initial value) and normalisation statistics as the run
that config meta-trains, so adapting it on K support traces (``maml-stop evaluate --checkpoint``, the
``maml`` method) measures what the outer loop adds. It is written by ``Trainer.fit`` with
``max_steps=0``: Lightning runs the set-up hooks (the datamodule's split, :meth:`MetaStoppingModule.setup`
copies ``dm.normalisation_stats()`` into the predictor) and stops before the first training step; the
file is Lightning's checkpoint (``global_step`` 0, the ``maml_stop`` section), so
:func:`maml_stop.learn.module.load_predictor` reads it like any other. :func:`save_zero_step` checks
both promises before writing: every parameter equals the initialisation, and the normalisation buffers
equal the meta-training families' statistics.

    python -m maml_stop.learn.zero_step --out runs/zero_step/zero_step.ckpt \\
        --config experiments/quickstart.yaml --config experiments/main.yaml      # any `maml-stop fit` arguments
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

import torch
from maml_stop.learn.cli import cli_main

__all__ = ["save_zero_step", "main"]

log = logging.getLogger(__name__)

NORMALISATION = ("predictor.feature_mean", "predictor.feature_std")  # adapter.state_dict() buffer keys


def save_zero_step(fit_args: Sequence[str], path: str | Path) -> str:
    """Write the zero-step checkpoint of the ``maml-stop fit`` arguments ``fit_args`` (``--config`` files
    and overrides, no subcommand) to ``path`` and return it. Nothing is trained and no log is written; the
    config's ``trainer.default_root_dir`` is replaced by ``path``'s folder. The file is written atomically
    (a temporary name, then ``os.replace``): a checkpoint at ``path`` is a complete one. Raises ``RuntimeError`` if a
    parameter moved or the normalisation is not the meta-training families'."""
    from lightning.pytorch import Trainer

    path = Path(path)
    root = path.parent
    root.mkdir(parents=True, exist_ok=True)
    cli = cli_main([*fit_args, f"--trainer.default_root_dir={root}"], run=False, follow_root=True)
    model, dm = cli.model, cli.datamodule
    init = {k: v.detach().clone() for k, v in model.adapter.state_dict().items()}  # a fresh module: its init
    trainer = Trainer(max_steps=0, logger=False, enable_checkpointing=False, inference_mode=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      accelerator="cpu", devices=1, default_root_dir=root)
    trainer.fit(model, datamodule=dm)  # set-up hooks only: max_steps=0 stops before the first step
    state = model.adapter.state_dict()
    moved = [k for k in init if k not in NORMALISATION and not torch.equal(state[k], init[k])]
    if trainer.global_step != 0 or moved:
        raise RuntimeError(f"the zero-step checkpoint moved from its initialisation (global_step "
                           f"{trainer.global_step}, parameters changed: {moved})")
    mean, std = dm.normalisation_stats()  # the meta-training families' (dm.split.train)
    if not (torch.equal(state[NORMALISATION[0]], mean) and torch.equal(state[NORMALISATION[1]], std)):
        raise RuntimeError("the zero-step predictor's normalisation is not the meta-training families' statistics")
    partial = path.with_name(path.name + ".partial")  # atomic: an interrupted save leaves no checkpoint at path
    trainer.save_checkpoint(partial)
    os.replace(partial, path)
    log.info("zero-step checkpoint %s: init_seed %s, meta-training families %s", path,
             model.hparams.get("init_seed"), dm.split.train)
    return str(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m maml_stop.learn.zero_step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="checkpoint file to write")
    args, fit_args = p.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(save_zero_step(fit_args, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
