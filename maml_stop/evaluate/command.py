"""``maml-stop evaluate``: the command line of the protocol (:mod:`maml_stop.evaluate.protocol`).

Tuned values live in ``experiments/evaluate.yaml``; experiment files add overrides on top of it
(several ``--config`` files are read in order, the last wins)::

    maml-stop evaluate --config experiments/evaluate.yaml --config experiments/main_evaluate.yaml
    maml-stop evaluate --report_only runs/evaluate/results.json      # rebuild the report from the JSON
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from jsonargparse import ActionConfigFile, ArgumentParser

from maml_stop.evaluate.cascade import run_cascade
from maml_stop.evaluate.cascade_report import write_cascade_report
from maml_stop.evaluate.config import EvaluateConfig
from maml_stop.evaluate.protocol import run
from maml_stop.evaluate.results_file import read_results, write_results

__all__ = ["main", "parse_config"]


def _parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="maml-stop evaluate",
        description="Leave-one-family-out EM/token evaluation of every stopping method on fixed episodes.",
    )
    parser.add_argument("--config", action=ActionConfigFile,
                        help="YAML settings, repeatable (experiments/evaluate.yaml, then overrides)")
    parser.add_argument("--report_only", type=str | None, default=None,
                        help="rebuild results.md and the plots from this results.json and exit")
    parser.add_class_arguments(EvaluateConfig)
    return parser


def parse_config(argv: list[str]) -> EvaluateConfig:
    """The :class:`EvaluateConfig` of a command line (``--config`` files and flags)."""
    ns = _parser().parse_args(argv)
    return EvaluateConfig(**{f: ns[f] for f in EvaluateConfig.__dataclass_fields__})


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--report_only", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.report_only:  # no evaluation: the corpus and the rest of the settings are not needed
        path = Path(known.report_only)
        saved = read_results(path)
        if "cost_model" in saved:  # a cascade evaluation's results (maml_stop.evaluate.cascade)
            print(f"report written: {write_cascade_report(saved, path.parent)}")
            return 0
        paths = write_results(saved, path.parent)
        print(f"report written: {paths['table']}")
        return 0
    cfg = parse_config(argv)
    if cfg.cascade is not None:  # the paired small -> large protocol (issue 28)
        results = run_cascade(cfg)
    else:
        results = run(cfg)
    print(f"results: {Path(cfg.out) / 'results.json'}; report: {Path(cfg.out) / 'results.md'} ({results['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
