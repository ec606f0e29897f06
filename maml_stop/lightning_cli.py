"""``maml-stop fit|validate|test --config experiments/<name>.yaml``: LightningCLI over
:class:`MetaStoppingModule` and :class:`TraceDataModule`.

>>> main(["fit", "--config", "experiments/quickstart.yaml"])                  # doctest: +SKIP
>>> main(["test", "--config", "experiments/quickstart.yaml", "--ckpt_path", "runs/quickstart/checkpoints/last.ckpt"])  # doctest: +SKIP

Links (data -> model, after the datamodule is instantiated): ``data.n_features -> model.n_features``
and ``data.feature_names -> model.feature_names`` (both read from the corpus ``meta.json``); do not set
them in YAML. The normalisation statistics follow by hook (``MetaStoppingModule.setup``, see
:mod:`maml_stop.datamodule`).

``trainer.inference_mode`` defaults to false and setting it to true is refused: validation and test
adapt the predictor with gradient steps, which inference mode forbids.
"""

from __future__ import annotations

import logging
import sys

import torch
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from maml_stop.checkpoint_io import secure_ckpt_path
from maml_stop.datamodule import TraceDataModule
from maml_stop.module import MetaStoppingModule

__all__ = ["MetaStoppingCLI", "main", "cli_main"]

log = logging.getLogger(__name__)


class MetaStoppingCLI(LightningCLI):
    """LightningCLI with the data -> model links and the inference-mode guard."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.n_features", "model.n_features", apply_on="instantiate")
        parser.link_arguments("data.feature_names", "model.feature_names", apply_on="instantiate")

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        """Parse, then make ``--ckpt_path`` loading safe before Lightning reads the file (it would
        show torch's advice to pass ``weights_only=False``, and honour TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD)."""
        super().parse_arguments(parser, args)
        if self.config.get("subcommand"):
            secure_ckpt_path(self.config[self.config.subcommand])

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.trainer.get("inference_mode", False):
            raise ValueError(
                "trainer.inference_mode must be false: validation and test adapt the predictor on each "
                "episode's support set with gradient steps, which torch.inference_mode() forbids"
            )


def cli_main(args: list[str] | None = None, run: bool = True) -> MetaStoppingCLI:
    """Build (and by default run) the CLI; ``args`` as on the command line, subcommand first."""
    torch.set_num_threads(1)  # see DESIGN.md: a second thread was slower whenever anything else ran
    return MetaStoppingCLI(
        MetaStoppingModule,
        TraceDataModule,
        trainer_defaults={"inference_mode": False},
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
        auto_configure_optimizers=False,
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point used by ``maml_stop.cli`` (argv starts with fit/validate/test)."""
    args = list(sys.argv[1:] if argv is None else argv)
    # the console script passes sys.argv on: let LightningCLI read it itself (no "args and argv" warning)
    cli_main(None if args == sys.argv[1:] else args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
