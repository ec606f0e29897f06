"""Tables in the README and docs/results.md copied from the generated reports, so that the documents show
what the code produced.

A block names its source report (a path relative to the document, as a Markdown link would), the heading
the table follows (a prefix of the heading's text) and optionally the first-column values of the rows to
keep::

    <!-- table: experiments/results/main/results.md # K = 16: threshold # rows: mean -->
    | family | method | ... |
    ...
    <!-- /table -->

``python -m maml_stop.commands.readme_tables README.md docs/results.md`` (the default) rewrites every block
from its source; ``tests/test_readme_tables.py`` fails when a block differs from its source.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

BLOCK = re.compile(
    r"<!-- table: (?P<source>\S+)(?: # (?P<heading>[^#]*?))?(?: # rows: (?P<rows>[^>]*?))? -->\n"
    r"(?P<body>.*?)<!-- /table -->",
    re.S,
)


DOCUMENTS = ("README.md", "docs/results.md")  # the documents with table blocks, relative to the repository


class ReadmeTableError(ValueError):
    """A README block whose source report, heading or rows cannot be found."""


def table_under(markdown: str, heading: str | None = None, rows: list[str] | None = None) -> str:
    """The first Markdown table after the first heading that starts with ``heading`` (after its ``#``
    marks; no heading: the first table of the text), keeping the header and, when ``rows`` is given,
    only the rows whose first cell is one of them."""
    lines = markdown.splitlines()
    start = 0
    if heading:
        found = [i for i, line in enumerate(lines) if line.startswith("#") and line.lstrip("#").strip().startswith(heading)]
        if not found:
            raise ReadmeTableError(f"no heading starting with {heading!r}")
        start = found[0] + 1
    first = next((i for i in range(start, len(lines)) if lines[i].startswith("|")), None)
    if first is None:
        raise ReadmeTableError(f"no table after heading {heading!r}")
    table = []
    for line in lines[first:]:
        if not line.startswith("|"):
            break
        table.append(line)
    if rows:
        keep = {r.strip() for r in rows}
        table = table[:2] + [line for line in table[2:] if line.strip("|").split("|")[0].strip() in keep]
    return "\n".join(table) + "\n"


def blocks(readme: str, root: Path) -> list[tuple[re.Match, str]]:
    """Every table block of ``readme`` with the table its source gives now."""
    out = []
    for match in BLOCK.finditer(readme):
        source = root / match["source"]
        if not source.is_file():
            raise ReadmeTableError(f"README table source {match['source']} does not exist")
        rows = [r for r in (match["rows"] or "").split(",") if r.strip()] or None
        out.append((match, table_under(source.read_text(), (match["heading"] or "").strip() or None, rows)))
    return out


def sync(readme_path: str | Path) -> int:
    """Rewrite every block of the README from its source; returns how many changed."""
    path = Path(readme_path)
    text = path.read_text()
    changed = 0
    for match, table in reversed(blocks(text, path.parent)):  # from the end: earlier offsets stay valid
        if match["body"] != table:
            changed += 1
            text = text[: match.start("body")] + table + text[match.end("body"):]
    path.write_text(text)
    return changed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m maml_stop.commands.readme_tables", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("documents", nargs="*", default=list(DOCUMENTS))
    args = p.parse_args(argv)
    for doc in args.documents:
        print(f"{sync(doc)} table(s) updated in {doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
