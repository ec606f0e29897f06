"""The research notebooks: committed stripped, numbered, defining nothing of their own, and running top to
bottom under ``MAML_STOP_SMOKE=1`` on the bundled corpus (nbclient, the ``python3`` kernel of the current
interpreter). Their outputs (PNG files, checkpoints) go to a temporary folder via ``MAML_STOP_NOTEBOOK_OUT``.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
NAMES = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
# measured under SMOKE on the shared 2-core machine (kernel start and imports included); over ~20 s -> slow
SLOW: set[str] = set()


def execute(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, smoke: bool = True, **env: str):
    """Run a notebook in a fresh kernel (working directory notebooks/, as Jupyter would) and return it."""
    monkeypatch.setenv("MAML_STOP_SMOKE", "1" if smoke else "0")
    monkeypatch.setenv("MAML_STOP_NOTEBOOK_OUT", str(tmp_path / "out"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    # the kernel spec's argv[0] "python" is replaced by this interpreter (jupyter_client), so the venv runs it
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()  # raises CellExecutionError naming the cell on the first error
    return nb


def outputs_text(nb) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", ""))
            parts += [v for k, v in out.get("data", {}).items() if k.startswith("text/") and isinstance(v, str)]
    return "\n".join(parts)


def test_the_four_notebooks_exist():
    assert NAMES == ["01_corpus.ipynb", "02_meta_train.ipynb", "03_evaluate.ipynb", "04_live_stopping.ipynb"]


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_stripped_and_defines_nothing(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    assert re.fullmatch(r"\d\d_[a-z_]+\.ipynb", name)
    assert nb.metadata.kernelspec.name == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, "a notebook without code"
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, f"{name}: outputs not stripped"
        tree = ast.parse(cell.source)
        defined = [n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
        assert not defined and not any(isinstance(n, ast.Lambda) for n in ast.walk(tree)), (
            f"{name} defines {defined or 'a lambda'}: put it in the package"
        )
    assert 'os.environ.get("MAML_STOP_SMOKE", "0") == "1"' in code[0].source


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in NAMES])
def test_notebook_runs_in_smoke_mode(name, tmp_path, monkeypatch):
    nb = execute(name, tmp_path, monkeypatch)
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    out = tmp_path / "out" / name.removesuffix(".ipynb")
    expected = {
        "01_corpus.ipynb": ["probe_accuracy.png"],
        "02_meta_train.ipynb": ["loss_curves.png"],
        "03_evaluate.ipynb": ["evaluate/results.json", "evaluate/results.md", "evaluate/curves_k16.png"],
        "04_live_stopping.ipynb": [],
    }[name]
    for rel in expected:
        assert (out / rel).is_file(), f"{name} did not write {rel}"
    if name == "04_live_stopping.ipynb":
        assert "skipped (SMOKE or no model)" in outputs_text(nb)


@pytest.mark.slow
def test_live_notebook_generates_with_a_tiny_local_model(tmp_path, monkeypatch):
    """SMOKE off with a tiny random Llama standing in for the harvest's model: the live branch runs."""
    import tiny_lm

    model = tiny_lm.save_tiny(tmp_path / "tiny")
    nb = execute("04_live_stopping.ipynb", tmp_path, monkeypatch, smoke=False, MAML_STOP_MODEL=model,
                 MAML_STOP_ADAPTED=str(tmp_path / "no-adapted-file.pt"))
    text = outputs_text(nb)
    assert "live run: True" in text
    assert text.count("gold `") == 2 and text.count("P(correct) at each probe") == 2
