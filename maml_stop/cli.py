"""The ``maml-stop`` console script: one entry point, one module per subcommand.

Subcommands are imported lazily so that ``maml-stop --help`` is fast and a subcommand's heavy imports
(transformers, lightning) load only when it runs.

One error style for every subcommand (issue 29): a refused input (a ValueError: the project's CorpusError,
AdaptError, CheckpointError, ... derive from it) or a file that cannot be read or written (an OSError) ends
the run with the reason in one line on stderr and exit status 2; ``--debug`` (anywhere in the arguments)
shows the traceback instead. Ctrl-C ends with one line and status 130.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

# name -> (module with a ``main(argv: list[str]) -> int | None``, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "tasks": ("maml_stop.commands.tasks_cmd", "list the task families with a sample question and gold answer"),
    "harvest": ("maml_stop.harvest.cli", "harvest traces (probes, features, token costs) from a causal LM"),
    "datasheet": ("maml_stop.evaluate.datasheet", "write the datasheet (per-family figures) of a trace corpus"),
    "fit": ("maml_stop.learn.cli", "meta-train a stopping predictor (LightningCLI)"),
    "validate": ("maml_stop.learn.cli", "validate a checkpoint (LightningCLI)"),
    "test": ("maml_stop.learn.cli", "test a checkpoint (LightningCLI)"),
    "evaluate": ("maml_stop.evaluate.command", "leave-one-family-out EM/token evaluation with every baseline"),
    "meta-select": ("maml_stop.evaluate.meta_select.study", "meta-learned threshold selectors on held-out families (nested simulation)"),
    "tune": ("maml_stop.learn.tune", "Optuna (TPE) over the model hyperparameters on the validation families; best trial as a fit YAML"),
    "compare": ("maml_stop.evaluate.compare", "A/B comparison of two methods on the same episodes (paired bootstrap)"),
    "adapt": ("maml_stop.live.adapt", "adapt a meta-trained predictor to a new family from K labelled traces"),
    "generate": ("maml_stop.live.generate", "answer questions with live stopping from an adapted artifact (JSONL out)"),
    "serve": ("maml_stop.serve.cli", "serve live stopping over HTTP: batching, feedback, monitor, A/B, dashboard"),
}


def _usage() -> str:
    lines = ["usage: maml-stop <command> [options]", "", "commands:"]
    for name, (module, text) in SUBCOMMANDS.items():
        if importlib.util.find_spec(module) is not None:
            lines.append(f"  {name:<10} {text}")
    lines.append("")
    lines.append("Run 'maml-stop <command> --help' for a command's options.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS or importlib.util.find_spec(SUBCOMMANDS[name][0]) is None:
        available = [n for n, (m, _) in SUBCOMMANDS.items() if importlib.util.find_spec(m) is not None]
        print(f"maml-stop: unknown command {name!r}; valid commands: {', '.join(available)}", file=sys.stderr)
        return 2
    debug = "--debug" in rest
    rest = [a for a in rest if a != "--debug"]
    module = importlib.import_module(SUBCOMMANDS[name][0])
    if SUBCOMMANDS[name][0] == "maml_stop.learn.cli":
        rest = [name, *rest]
    try:
        code = module.main(rest)
    except (ValueError, OSError) as err:
        if debug:
            raise
        reason = " ".join(str(err).split()) or type(err).__name__
        print(f"maml-stop {name}: {reason} (--debug shows the traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"maml-stop {name}: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
