"""The front door (issue 31): a short README whose commands run, an index of experiments/ that misses no
file, and no document or code that points outside the repository or at a path of one machine."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"
DATA_DIRS = ("corpus", "results")  # committed corpora and reports: data, not entry points
README_MAX_LINES = 250
OWN_SECTION = "## On your own model and data"
# ../shared, or an absolute path of the machine this was written on (DESIGN.md: the repository stands alone)
OUTSIDE = re.compile(r"\.\./shared|(?<![\w.~-])/(?:work|root)/")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    return text[start:end if end > 0 else None]


def _fenced(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


def _commands(block: str) -> list[str]:
    """The block's lines with their continuations joined, comments and blank lines left out."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [line for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_readme_is_short_and_ci_runs_its_test_command():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= README_MAX_LINES
    tests = _fenced(_section(readme, "## Tests"), "bash")[0].strip()
    assert tests.splitlines() == [".venv/bin/python -m pytest"]
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci[-1] == tests, "`.ci/run` must end with exactly the README's test command"
    setup = _fenced(_section(readme, "## Set-up"), "bash")[0].strip()
    assert setup == "bash scripts/install.sh && bash scripts/main.sh"


def _experiment_files() -> list[Path]:
    top = [p for p in EXPERIMENTS.iterdir() if p.is_file() and p.name != "README.md"]
    studies = [p for p in (EXPERIMENTS / "studies").iterdir() if p.is_file()]
    assert not {p.name for p in EXPERIMENTS.iterdir() if p.is_dir()} - {*DATA_DIRS, "studies", "__pycache__"}, (
        "a new folder in experiments/: index it in experiments/README.md and here")
    return sorted(top + studies)


def test_every_experiment_file_is_indexed_or_used_by_a_script():
    index = (EXPERIMENTS / "README.md").read_text()
    scripts = "\n".join(p.read_text() for p in (ROOT / "scripts").iterdir() if p.is_file())
    missing = []
    for path in _experiment_files():
        name = str(path.relative_to(EXPERIMENTS))
        if f"`{name}`" not in index and f"experiments/{name}" not in scripts:
            missing.append(name)
    assert not missing, f"experiments/ files in neither experiments/README.md nor scripts/: {missing}"


def _checked_files() -> list[Path]:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    for folder in ("maml_stop", "tasks", "scripts", "notebooks"):
        files += sorted(p for p in (ROOT / folder).rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    files += sorted(p for p in EXPERIMENTS.rglob("*") if p.is_file()
                    and p.relative_to(EXPERIMENTS).parts[0] not in DATA_DIRS and "__pycache__" not in p.parts)
    # the reports and datasheets of the data folders too (their JSON keeps the paths it ran with: provenance)
    files += sorted(p for d in DATA_DIRS for p in (EXPERIMENTS / d).rglob("*.md"))
    return files


def test_nothing_points_outside_the_repository():
    found = []
    for path in _checked_files():
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if OUTSIDE.search(line):
                found.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()[:100]}")
    assert not found, "paths outside the repository or of one machine:\n" + "\n".join(found)


def test_the_outside_pattern_catches_what_it_should():
    for bad in ("see ../shared/DESIGN.md", "--model /work/models/qwen05", "cd /root/x"):
        assert OUTSIDE.search(bad), bad
    for good in ("experiments/corpus/qwen05", "https://example.org/work/x", "runs/work/x", "~/work/x"):
        assert not OUTSIDE.search(good), good


@pytest.mark.parametrize("doc", ["README.md", "docs/design.md", "docs/results.md", "docs/architecture.md",
                                 "experiments/README.md"])
def test_relative_links_resolve(doc):
    path = ROOT / doc
    broken = []
    for target in LINK.findall(path.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        file = target.split("#", 1)[0]
        if not (path.parent / file).exists():
            broken.append(target)
    assert not broken, f"{doc}: links to files that do not exist: {broken}"


def _help(command: str) -> str:
    from maml_stop.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main([command, "--help"])
    return out.getvalue()


def test_own_model_commands_name_real_options():
    """Cheap and in the default run: every `maml-stop` command of the section exists and every flag it
    gives is one of that command's options (the slow test below runs them)."""
    block = _fenced(_section((ROOT / "README.md").read_text(), OWN_SECTION), "bash")[0]
    commands = [shlex.split(c) for c in _commands(block) if c.startswith(".venv/bin/maml-stop ")]
    assert {c[1] for c in commands} >= {"harvest", "fit", "adapt", "generate"}
    for argv in commands:
        options = set(re.findall(r"--[\w.]+", _help(argv[1])))
        unknown = [a for a in argv[2:] if a.startswith("--") and a not in options]
        assert not unknown, f"maml-stop {argv[1]}: options it lacks: {unknown}"


def test_generate_rebuilds_a_dataset_family_from_the_harvests_family_args(tmp_path, monkeypatch):
    """`maml-stop generate --family_args` (the own-model path): an artifact adapted on a dataset family
    names it by its own name, which is not in the registry; the harvest's family_args rebuild it."""
    from types import SimpleNamespace

    from maml_stop.live import generate
    from maml_stop.live.generate import GenerateError, _family_of

    rows = [{"question": f"What is {i} + 1?", "answer": f"#### {i + 1}"} for i in range(30)]
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(generate, "load_adapted", lambda _: SimpleNamespace(recipe={"extraction": {"family": "mine"}}))
    monkeypatch.setattr(generate, "missing_recipe_fields", lambda _: [])
    mine = {"path": str(path), "answer_format": "gsm8k", "name": "mine"}
    assert _family_of("a.pt", {"dataset": mine}).name == "mine"
    with pytest.raises(GenerateError, match="no family named 'mine'"):
        _family_of("a.pt", {"dataset": {**mine, "name": "other"}})
    with pytest.raises(GenerateError, match="--family_args"):
        _family_of("a.pt")


# what the tiny model needs to finish in seconds, appended to each command of the section (the last value
# wins); the tiny random model ends most traces of some families before their first probe, so its harvest
# keeps the families where it reaches the probes
SHRINK = {
    "harvest": "--families '[basic_arithmetic, simple_equations, gcd, lcm, dataset]' --n_per_family 24 "
               "--max_new_tokens 24 --every_n 4 --align 4 --min_gap 4 --dtype float32 --batch_size 8 "
               "--shard_size 24 --hash_weights false",
    "fit": "--trainer.max_steps=4 --data.steps_per_epoch=2 --trainer.check_val_every_n_epoch=1 --data.k=4 "
           "--data.q=8 --data.val_episodes=2 --data.test_episodes=2 --trainer.enable_progress_bar=false "
           "--trainer.enable_model_summary=false",
    "adapt": "--k 4",
    "generate": "--max_new_tokens 24",
}
HUB_ID = "Qwen/Qwen2.5-Coder-0.5B-Instruct"


@pytest.mark.slow
def test_own_model_section_runs_on_the_tiny_model(tmp_path):
    """The README's "own model and data" section, as written, from a folder laid out like a clone: its
    shell block on a local JSONL and the tiny local model (sizes shrunk by SHRINK), then its Python block."""
    import tiny_lm

    section = _section((ROOT / "README.md").read_text(), OWN_SECTION)
    for name in ("experiments", "scripts"):
        (tmp_path / name).symlink_to(ROOT / name)
    (tmp_path / ".venv").symlink_to(Path(sys.executable).parent.parent)
    model = tiny_lm.save_tiny(tmp_path / "tiny_lm")
    rows = [{"question": f"Ann has {i} pens and buys {i + 7} more. How many pens now?", "answer": f"#### {2 * i + 7}"}
            for i in range(80)]
    (tmp_path / "my_questions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "new_questions.jsonl").write_text("".join(
        json.dumps({"question": f"Bob has {i} cups and buys {i + 3} more. How many cups now?"}) + "\n" for i in range(3)))

    lines = []
    for command in _commands(_fenced(section, "bash")[0]):
        words = command.split()
        extra = SHRINK.get(words[1], "") if words[0] == ".venv/bin/maml-stop" else ""
        lines.append(f"{command} {extra}".rstrip())
    env = {**os.environ, "MODEL": model, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    run = subprocess.run(["bash", "-euo", "pipefail", "-c", "\n".join(lines)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    answers = [json.loads(x) for x in (tmp_path / "runs" / "own" / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 3 and all({"answer", "total_tokens", "stopped_early"} <= set(a) for a in answers)
    assert (tmp_path / "runs" / "own" / "corpus" / "shards" / "mine").is_dir()

    code = _fenced(section, "python")[0].replace(HUB_ID, model)
    assert code != _fenced(section, "python")[0], "the Python block no longer loads the hub id"
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip(), "the Python block printed nothing"
