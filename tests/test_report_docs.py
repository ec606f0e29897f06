"""The report package's documentation against the code it documents (issue 14): every ``--flag`` that
a docstring of :mod:`maml_stop.evaluate.report` names is a real option of ``maml-stop evaluate``."""

from __future__ import annotations

import ast
import contextlib
import importlib
import io
import pkgutil
import re
from pathlib import Path

import pytest

import maml_stop.evaluate.report as report_pkg
from maml_stop.cli import main as cli_main

FLAG = re.compile(r"(?<![\w-])--[A-Za-z][\w-]*")


def _docstrings(path: Path) -> list[str]:
    """The module's docstring and every function's and class's in it."""
    tree = ast.parse(path.read_text())
    nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)))]
    return [doc for n in nodes if (doc := ast.get_docstring(n))]


def _report_modules() -> list[str]:
    return [report_pkg.__name__] + [
        f"{report_pkg.__name__}.{m.name}" for m in pkgutil.iter_modules(report_pkg.__path__)
    ]


@pytest.fixture(scope="module")
def evaluate_options() -> set[str]:
    """The option strings in ``maml-stop evaluate --help`` (wherever the subcommand lives)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit):
        cli_main(["evaluate", "--help"])
    return set(FLAG.findall(buf.getvalue()))


def test_every_flag_in_the_report_docstrings_is_an_evaluate_option(evaluate_options):
    assert "--report_only" in evaluate_options and "--out" in evaluate_options  # the help was read
    named = {
        (module, flag)
        for module in _report_modules()
        for doc in _docstrings(Path(importlib.import_module(module).__file__))
        for flag in FLAG.findall(doc)
    }
    assert named, "the report docstrings name no flag: this test checks nothing"
    unknown = sorted((m, f) for m, f in named if f not in evaluate_options)
    assert not unknown, f"flags named in docstrings that `maml-stop evaluate` lacks: {unknown}"


def test_the_report_docstring_shows_how_to_rebuild_a_report():
    assert "maml-stop evaluate --report_only " in report_pkg.__doc__


def test_the_examples_in_the_report_docstrings_run():
    import doctest

    for module in _report_modules():
        assert doctest.testmod(importlib.import_module(module)).failed == 0, module
