"""Bad input names where it is: the file and line of a malformed JSONL row, the shard and trace of a
stored trace whose per-probe lists disagree or whose features are not finite (issue 16, item 5)."""

from __future__ import annotations

import math
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import make_trace_rows
from maml_stop.data.corpus import TraceCorpus
from maml_stop.evaluate.datasheet import write_datasheet
from maml_stop.data import store
from tasks.base import TaskError
from tasks.dataset_family import DatasetFamily


def test_malformed_jsonl_line_names_the_file_and_line(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text(
        '{"question": "1+1?", "answer": "#### 2"}\n'
        "\n"
        '{"question": "2+2?", "answer": "#### 4"}\n'
        '{"question": "3+3?", "answer": \n'
        '{"question": "4+4?", "answer": "#### 8"}\n'
    )
    with pytest.raises(TaskError, match=rf"{re.escape(str(path))}.*line 4 is not valid JSON"):
        DatasetFamily(path=str(path), answer_format="gsm8k")


def _corpus_with(tmp_path, edit) -> tuple[str, str, str]:
    """A two-shard corpus (family fam_a) whose second shard's row 3 is changed by ``edit(row)``;
    returns (root, that shard's path, that trace's id)."""
    root = tmp_path / "c"
    store.write_meta(root, {"feature_names": [f"f{i}" for i in range(4)], "model": {"name": "synthetic"}})
    rows = make_trace_rows("fam_a", 12, seed=0, n_features=4)
    store.write_shard(root, "fam_a", "all", rows[:6])
    bad = rows[6:]
    edit(bad[3])
    # written with pyarrow directly: the harvester's writer would not produce such a row
    shard = store.write_shard(root, "fam_a", "all", rows[6:7])
    pq.write_table(pa.Table.from_pylist(bad, schema=store.TRACE_SCHEMA), shard)
    return str(root), str(shard), bad[3]["trace_id"]


def test_per_probe_lists_of_different_lengths_name_shard_trace_and_lengths(tmp_path):
    def drop_a_label(row):
        row["probe_em"] = row["probe_em"][:-1]

    root, shard, trace_id = _corpus_with(tmp_path, drop_a_label)
    with pytest.raises(store.CorpusError) as err:
        write_datasheet(root)
    msg = str(err.value)
    assert shard in msg and trace_id in msg
    n = len(make_trace_rows("fam_a", 12, seed=0, n_features=4)[9]["probe_positions"])
    assert f"probe_em {n - 1}" in msg and f"probe_positions {n}" in msg and f"features {n}" in msg


def test_non_finite_features_name_the_shard(tmp_path):
    def poison(row):
        row["features"][1][2] = math.nan

    root, shard, trace_id = _corpus_with(tmp_path, poison)
    with pytest.raises(store.CorpusError, match=rf"shard {re.escape(shard)}, trace {re.escape(trace_id)}: non-finite"):
        TraceCorpus.load(root)


def test_feature_vectors_of_the_wrong_width_name_the_shard(tmp_path):
    def widen(row):
        row["features"][0] = [*row["features"][0], 0.0]

    root, shard, trace_id = _corpus_with(tmp_path, widen)
    with pytest.raises(store.CorpusError, match=rf"{re.escape(shard)}, trace {re.escape(trace_id)}: feature vectors of width \[5\]"):
        TraceCorpus.load(root)
