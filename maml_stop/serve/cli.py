"""``maml-stop serve``: live stopping as an HTTP service that keeps itself tuned (see :mod:`maml_stop.serve`).

    maml-stop serve --model Qwen/Qwen2.5-Coder-0.5B-Instruct --artifact runs/adapted/gcd.pt --db runs/serve.sqlite \\
        --corpus experiments/corpus/qwen05 --port 8000 [--config experiments/serve.yaml]

Every field of :class:`~maml_stop.serve.config.ServeConfig` is an option (nested ones dotted:
``--online.sample_rate 0.2``, ``--batch.window_ms 10``, ``--online.monitor.bound lower``) or a key of the
``--config`` YAML. A model that does not fit the artifact refuses to start, naming both. A renamed key
(the ``online`` section's ``threshold``, now ``rule``: how tau moves) is refused naming the new one.
"""

from __future__ import annotations

import logging
import sys

from maml_stop.given_keys import given_keys
from maml_stop.online import refuse_moved_keys
from maml_stop.serve.config import ServeConfig
from maml_stop.serve.app import create_app
from maml_stop.serve.service import Service, ServeError

__all__ = ["main", "parse_config"]

log = logging.getLogger(__name__)


def _parser():
    from jsonargparse import ActionConfigFile, ArgumentParser


    p = ArgumentParser(prog="maml-stop serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", action=ActionConfigFile)
    p.add_class_arguments(ServeConfig, None)
    return p


def parse_config(argv: list[str]):
    """The :class:`ServeConfig` of a command line (and its ``--config`` YAML)."""

    refuse_moved_keys(dict.fromkeys(given_keys(argv, "online")))
    p = _parser()
    ns = p.instantiate_classes(p.parse_args(argv))
    fields = {k: v for k, v in vars(ns).items() if k != "config"}
    return ServeConfig(**fields)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = parse_config(list(sys.argv[1:] if argv is None else argv))
    except ValueError as err:
        print(f"maml-stop serve: {err}", file=sys.stderr)
        return 2
    try:
        import uvicorn

    except ImportError as err:
        print(f"maml-stop serve: {err}; install the serve extra: pip install -e '.[serve]'", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(1)
    try:
        service = Service(config)
    except (ServeError, FileNotFoundError, OSError) as err:
        print(f"maml-stop serve: {err}", file=sys.stderr)
        return 2
    log.info("serving %s with %s on http://%s:%d (state in %s; %d learning steps replayed)", config.model,
             config.artifact, config.host, config.port, config.db, service.replayed)
    uvicorn.run(create_app(service), host=config.host, port=config.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
