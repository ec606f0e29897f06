"""The result tables of the README and docs/results.md are the tables of the committed reports
(maml_stop/commands/readme_tables.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from maml_stop.commands.readme_tables import DOCUMENTS, ReadmeTableError, blocks, sync, table_under

ROOT = Path(__file__).resolve().parents[1]

REPORT = """# Report

### Mean over families: saved

| method | K=4 |
|---|---|
| full | 0.0 |
| maml | 50.0 |

### K = 4: details

| family | method | saved |
|---|---|---|
| a | maml | 40.0 |
| mean | full | 0.0 |
| mean | maml | 50.0 |
"""


def test_table_under_heading_and_rows():
    assert table_under(REPORT, "Mean over").splitlines()[-1] == "| maml | 50.0 |"
    kept = table_under(REPORT, "K = 4", rows=["mean"]).splitlines()
    assert kept[0].startswith("| family") and len(kept) == 4 and all("| a |" not in r for r in kept)
    assert table_under(REPORT) == table_under(REPORT, "Mean over")  # no heading: the first table
    with pytest.raises(ReadmeTableError, match="no heading"):
        table_under(REPORT, "K = 8")


def test_sync_rewrites_stale_blocks(tmp_path):
    (tmp_path / "r.md").write_text(REPORT)
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- table: r.md # K = 4 # rows: mean -->\n| stale |\n<!-- /table -->\nend\n")
    assert sync(readme) == 1
    text = readme.read_text()
    assert "| stale |" not in text and "| mean | maml | 50.0 |" in text and text.endswith("<!-- /table -->\nend\n")
    assert sync(readme) == 0
    readme.write_text("<!-- table: missing.md # x -->\n<!-- /table -->\n")
    with pytest.raises(ReadmeTableError, match="does not exist"):
        sync(readme)


@pytest.mark.parametrize("document", DOCUMENTS)
def test_document_tables_match_the_committed_reports(document):
    path = ROOT / document
    found = blocks(path.read_text(), path.parent)
    assert found, f"{document} has no generated tables"
    for match, table in found:
        assert match["body"] == table, (
            f"{document} table from {match['source']} ({match['heading']}) is stale: run "
            f"`python -m maml_stop.commands.readme_tables {document}`"
        )
