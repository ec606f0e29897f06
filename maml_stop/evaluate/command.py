"""``maml-stop evaluate``: the command line of the protocol (:mod:`maml_stop.evaluate.protocol`).

Tuned values live in ``experiments/evaluate.yaml``; experiment files add overrides on top of it
(several ``--config`` files are read in order, the last wins)::

    maml-stop evaluate --config experiments/evaluate.yaml --config experiments/main_evaluate.yaml
    maml-stop evaluate --config experiments/evaluate.yaml --config experiments/meta_study.yaml   # grouped folds x counts
    maml-stop evaluate --report_only runs/evaluate/results.json      # rebuild the report from the JSON
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from maml_stop.evaluate.cascade import run_cascade
from maml_stop.evaluate.cascade_report import write_cascade_report
from maml_stop.evaluate.config import EvaluateConfig, FoldsConfig
from maml_stop.evaluate.grouped import run_grouped
from maml_stop.evaluate.protocol import run
from maml_stop.evaluate.results_file import read_results, write_results

__all__ = ["main", "parse_config"]


def _parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="maml-stop evaluate",
        description="Leave-families-out EM/token evaluation of every stopping method on fixed episodes (one family "
                    "held out at a time, or grouped folds x meta-training family counts: folds.kind grouped).",
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
    values = {f: _plain(ns[f]) for f in EvaluateConfig.__dataclass_fields__}
    values["folds"] = FoldsConfig(**values["folds"])  # a nested group of the parser
    return EvaluateConfig(**values)


def _plain(value):
    """``value`` with jsonargparse's Namespaces (a nested group, a ``class_path`` mapping inside a fit
    fragment) as plain dicts, so that the config is JSON and YAML as written."""
    if isinstance(value, Namespace):
        value = value.as_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


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
    elif cfg.folds.kind == "grouped":  # grouped folds x meta-training family counts (issue 11, issue 31)
        results = run_grouped(cfg)
        reports = ", ".join(str(Path(cfg.out) / f"n_{c}" / "results.md") for c in results["counts"])
        print(f"results per count of meta-training families: {reports} ({results['seconds']} s)")
        return 0
    else:
        results = run(cfg)
    print(f"results: {Path(cfg.out) / 'results.json'}; report: {Path(cfg.out) / 'results.md'} ({results['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
