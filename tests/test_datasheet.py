"""The datasheet's figures are recomputed from stored traces, for the tiny corpus and the bundled one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from maml_stop.data.corpus import TraceCorpus
from maml_stop.evaluate.datasheet import corpus_stats, write_datasheet

BUNDLED = Path(__file__).resolve().parents[1] / "experiments" / "corpus" / "qwen05"


def test_datasheet_figures_by_hand(tiny_corpus, tmp_path):
    root = shutil.copytree(tiny_corpus, tmp_path / "c")
    stats = write_datasheet(root)
    corpus = TraceCorpus.load(root, min_probes=0)
    for fam in corpus.families:
        traces = corpus.traces(fam)
        s = stats["families"][fam]
        assert s["traces"] == len(traces)
        assert s["final_em"] == pytest.approx(np.mean([t.final_em for t in traces]))
        first = [t.labels[0] > 0.5 if t.n_probes else bool(t.final_em) for t in traces]
        assert s["first_probe_em"] == pytest.approx(np.mean(first))
        labels = np.concatenate([t.labels for t in traces])
        assert s["probe_correct_fraction"] == pytest.approx(labels.mean())
        # oracle by hand: earliest correct probe; else full run if final correct; else first probe
        cost = full = 0
        em = []
        for t in traces:
            full += t.reasoning_tokens
            hits = np.flatnonzero(t.labels > 0.5)
            if hits.size:
                i = hits[0]
                cost += t.positions[i] + t.probe_tokens[: i + 1].sum()
                em.append(1)
            elif t.final_em:
                cost += t.reasoning_tokens
                em.append(1)
            else:
                cost += t.positions[0] + t.probe_tokens[0]
                em.append(0)
        assert s["oracle_savings"] == pytest.approx(1 - cost / full)
        assert s["oracle_em"] == pytest.approx(np.mean(em))
        # the oracle at equal EM may give up the fixes the EM-first oracle buys, never save less
        assert s["oracle_equal_em_savings"] >= s["oracle_savings"] - 1e-12
    assert "| fam_a |" in (Path(root) / "README.md").read_text()
    assert (Path(root) / "probe_accuracy.png").stat().st_size > 0


@pytest.mark.parametrize("name", ["qwen05", "qwen15", "qwen05_v2"])
def test_bundled_datasheet_is_reproduced(name):
    root = BUNDLED.parent / name
    if not (root / "datasheet.json").is_file():
        pytest.skip(f"corpus {name} not present")
    stored = json.loads((root / "datasheet.json").read_text())
    fresh = corpus_stats(root)
    assert set(stored["families"]) == set(fresh["families"])
    for fam, s in fresh["families"].items():
        for key, value in s.items():
            assert stored["families"][fam][key] == pytest.approx(value, rel=1e-6), (fam, key)


REPO = Path(__file__).resolve().parents[1]


def _named_files(line: str, base: Path) -> list[Path]:
    """The .yaml files a datasheet's regeneration line names, resolved against ``base``."""
    import re

    return [base / m if not Path(m).is_absolute() else Path(m) for m in re.findall(r"[\w./-]+\.yaml", line)]


def _regenerate_line(root: Path) -> str:
    return next(x for x in (root / "README.md").read_text().splitlines() if x.startswith("- regenerate"))


@pytest.mark.parametrize("name", ["qwen05", "qwen15", "qwen05_v2"])
def test_committed_datasheets_name_recipes_that_exist(name):
    """Issue 29 item 12: the regeneration hint of each committed corpus names a recipe of the repository."""
    root = BUNDLED.parent / name
    if not (root / "README.md").is_file():
        pytest.skip(f"corpus {name} not present")
    files = _named_files(_regenerate_line(root), REPO)
    assert files and all(f.is_file() for f in files), files


def test_a_corpus_without_a_recipe_is_told_how_to_write_one(tiny_corpus, tmp_path):
    """A corpus that no corpus*.yaml writes and whose meta.json records no harvest_args (the tiny one):
    the hint says how to write a recipe and names only files that exist, never corpus_<name>.yaml."""
    root = tmp_path / "corpus" / "mine"
    shutil.copytree(tiny_corpus, root)
    write_datasheet(root)
    line = _regenerate_line(root)
    assert "write a harvest recipe" in line and "corpus_mine.yaml" not in line
    assert all(f.is_file() for f in _named_files(line, REPO)), line


def test_a_recipe_beside_the_corpus_is_named_where_it_is(tiny_corpus, tmp_path):
    """A corpus*.yaml whose ``out`` is the corpus folder is the hint, under ``experiments/`` or elsewhere."""
    for parent in ("experiments", "elsewhere"):
        root = tmp_path / parent / "corpus" / "mine"
        shutil.copytree(tiny_corpus, root)
        (tmp_path / parent / "corpus_mine_recipe.yaml").write_text("out: experiments/corpus/mine\nfamilies: [gcd]\n")
        write_datasheet(root)
        line = _regenerate_line(root)
        assert "--config" in line and "corpus_mine_recipe.yaml" in line
        assert all(f.is_file() for f in _named_files(line, tmp_path / parent / "..")), line
