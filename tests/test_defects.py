"""Issue 14: one home per rule outside evaluation (the EM tolerance, trace-id parsing), and the defects a
reading found: reasoning-gym scorer exceptions swallowed at debug level, reasoning-gym crediting "-12"
for 12, two dataset families sharing ``shards/dataset/``, family names that cannot name a folder."""

from __future__ import annotations

import inspect
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest

import tiny_lm
from conftest import make_trace_rows
from maml_stop.data import store
from maml_stop.data.corpus import TraceCorpus
from maml_stop.data.episodes import QuestionGroups, split_support_query
from maml_stop.harvest.cli import harvest
from tasks import answers, get_family
from tasks.base import Question, TaskError
from tasks.reasoning_gym_families import ODD_TEXT_ERRORS, ReasoningGymFamily

ROOT = Path(__file__).resolve().parents[1]


# -- item 1: the EM tolerance has one home (tasks/answers.py) ---------------------------------------
def test_em_tolerance_defaults_are_the_named_constants():
    assert inspect.signature(answers.exact_match).parameters["rel_tol"].default is answers.NUMBER_REL_TOL
    assert inspect.signature(answers.numbers_equal).parameters["rel_tol"].default is answers.NUMBER_REL_TOL
    assert inspect.signature(ReasoningGymFamily).parameters["rel_tol"].default is answers.NUMBER_REL_TOL
    assert get_family("gcd").rel_tol == answers.NUMBER_REL_TOL
    assert get_family("coin_flip").rel_tol == 5e-3  # a family's documented widening, not a second rule


def test_no_tolerance_literal_outside_answers():
    """No numeric comparison rule written a second time in tasks/ (isclose, or the tolerances' values)."""
    for path in sorted((ROOT / "tasks").glob("*.py")):
        text = path.read_text()
        if path.name == "answers.py":
            body = text.split("def numbers_equal", 1)[1]
            assert body.count("isclose(") == 1, "answers.py: isclose outside numbers_equal"
            continue
        for literal in ("isclose(", "1e-6", "1e-9", "5e-4", "abs_tol"):
            assert literal not in text, f"{path.name} writes {literal!r}: use tasks.answers' constants"


@pytest.mark.parametrize("a, b, equal", [(1234.5, 1234.5 * (1 + 5e-7), True), (1234.5, 1234.5 * (1 + 2e-6), False),
                                          (0.0, 5e-10, True), (0.0, 1e-8, False), (12.0, -12.0, False)])
def test_numbers_equal_is_the_old_rule(a, b, equal):
    assert answers.numbers_equal(a, b) is equal
    assert answers.exact_match(repr(a), repr(b), kind="number") is equal


# -- item 2: one parser of trace ids -----------------------------------------------------------------
def test_trace_id_round_trip():
    for qid in ("gcd/0123456789ab", "gsm_tiny/ffffffffffff"):
        for sample in (0, 1, 12):
            tid = store.make_trace_id(qid, sample)
            assert tid == f"{qid}#{sample}" and store.question_id_of(tid) == qid
    assert store.question_id_of("t7") == "t7"  # no "#<sample>" tail: its own question


def test_samples_of_a_question_stay_on_one_side():
    class T:
        def __init__(self, tid):
            self.trace_id, self.family = tid, "f"

    traces = [T(store.make_trace_id(f"f/{q:012d}", s)) for q in range(6) for s in range(3)]
    assert len(QuestionGroups(traces)) == 6
    support, query = split_support_query(traces, 2, None, np.random.default_rng(0))
    assert {store.question_id_of(t.trace_id) for t in support}.isdisjoint(
        {store.question_id_of(t.trace_id) for t in query})
    assert len(support) == 6 and len(query) == 12


# -- family names name folders and open question ids -------------------------------------------------
@pytest.mark.parametrize("name", ["a/b", "a#b", ".hidden", " padded", "", "a\\b"])
def test_family_name_that_cannot_name_a_shard_folder_is_refused(tmp_path, name):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"question": "1+1?", "answer": "#### 2"}) + "\n")
    with pytest.raises(TaskError, match="family name"):
        get_family("dataset", path=str(path), answer_format="gsm8k", name=name)


# -- item 3: reasoning-gym scorer exceptions ---------------------------------------------------------
def _raising_family(monkeypatch, errors):
    fam = get_family("gsm_symbolic")
    q = fam.questions("train", 1, seed=0)[0]
    calls = iter(errors)

    def score_answer(answer, entry):
        raise next(calls)

    monkeypatch.setattr(fam._dataset(0), "score_answer", score_answer)
    return fam, q


def test_odd_text_scorer_error_is_wrong_and_warned_once_per_type(monkeypatch, caplog):
    errors = [ValueError("bad"), ValueError("bad again"), OverflowError("big"), IndexError("short")]
    fam, q = _raising_family(monkeypatch, errors)
    with caplog.at_level(logging.WARNING, logger="tasks.reasoning_gym_families"):
        assert [fam.score(a, q) for a in ("banana", "cherry", "plum", "fig")] == [False] * 4
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.getMessage().split(" raised ")[1].split(" ")[0] for r in warned] == ["ValueError", "OverflowError", "IndexError"]
    assert "'banana'" in warned[0].getMessage() and "gsm_symbolic" in warned[0].getMessage()
    assert all(issubclass(type(e), ODD_TEXT_ERRORS) for e in errors)


@pytest.mark.parametrize("error", [KeyError("direction"), TypeError("unsupported operand"), AttributeError("x")])
def test_programming_error_in_the_scorer_propagates(monkeypatch, error):
    fam, q = _raising_family(monkeypatch, [error])
    with pytest.raises(type(error)) as info:
        fam.score("banana", q)
    assert any("gsm_symbolic" in n and "'banana'" in n for n in getattr(info.value, "__notes__", []))


# -- item 4: reasoning-gym drops a leading minus sign ------------------------------------------------
def _gsm_question(gold: str) -> Question:
    q = get_family("gsm_symbolic").questions("train", 1, seed=0)[0]
    return Question(q.id, q.family, q.split, q.question, gold)


@pytest.mark.parametrize("answer, gold, right", [
    ("-12", "12", False),             # reasoning-gym's r"\b-?\d+" reads 12 and credited it
    ("-16 - (-46) =", "16", False),   # an expression not worked out: reasoning-gym read its "16"
    ("12", "12", True), ("-12", "-12", True), ("12 apples", "12", True), ("-0", "0", True),
    ("12", "-12", False),
])
def test_minus_sign_is_not_dropped(answer, gold, right):
    fam = get_family("gsm_symbolic")
    assert fam.score(answer, _gsm_question(gold)) is right


def test_signs_differ_rule():
    assert answers.signs_differ("-12", "12", "number") and not answers.signs_differ("12", "12", "number")
    assert answers.signs_differ("-1, 2", "1, 2", "number_list")
    assert not answers.signs_differ("1, 2, 3", "-1, 2", "number_list")  # not as many numbers: no say
    assert not answers.signs_differ("-12", "12", "text") and not answers.signs_differ("no number", "12", "number")


# -- item 5: dataset families are stored under their own names ---------------------------------------
def _qa_file(path: Path, offset: int) -> Path:
    rows = [{"question": f"Ann has {i + offset} pens and gets {i} more. How many?", "answer": f"#### {2 * i + offset}"}
            for i in range(60)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _harvest(out, model_dir, families, family_args):
    return harvest(out=str(out), model=model_dir, families=families, family_args=family_args, n_per_family=6,
                   dtype="float32", batch_size=3, shard_size=3, max_new_tokens=8, every_n=4, hash_weights=False)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_lm.save_tiny(tmp_path_factory.mktemp("tiny_lm"))


def test_two_dataset_families_in_one_corpus_load_by_name(tmp_path, model_dir):
    out = tmp_path / "c"
    a, b = _qa_file(tmp_path / "a.jsonl", 0), _qa_file(tmp_path / "b.jsonl", 1000)
    _harvest(out, model_dir, ["dataset"], {"dataset": {"path": str(a), "answer_format": "gsm8k", "name": "pens_a"}})
    _harvest(out, model_dir, ["dataset"], {"dataset": {"path": str(b), "answer_format": "gsm8k", "name": "pens_b"}})
    assert sorted(p.name for p in (out / store.SHARD_DIR).iterdir()) == ["pens_a", "pens_b"]
    meta = store.read_meta(out)
    assert meta["families"] == ["pens_a", "pens_b"] and sorted(meta["family_settings"]) == ["pens_a", "pens_b"]
    for name in ("pens_a", "pens_b"):
        corpus = TraceCorpus.load(out, families=[name])
        assert corpus.families == [name] and len(corpus) == 6
        assert all(t.trace_id.startswith(f"{name}/") for t in corpus.traces(name))
    assert TraceCorpus.load(out).families == ["pens_a", "pens_b"]


def test_two_families_with_one_name_are_refused(tmp_path, model_dir):
    a = _qa_file(tmp_path / "a.jsonl", 0)
    with pytest.raises(ValueError, match=re.escape("{'gcd': ['gcd', 'dataset']}")):
        _harvest(tmp_path / "c", model_dir, ["gcd", "dataset"],
                 {"dataset": {"path": str(a), "answer_format": "gsm8k", "name": "gcd"}})


# -- item 6: a wrong feature width is found by an explicit check, not by reshape ---------------------
def test_wrong_width_that_reshape_would_accept_is_refused(tmp_path):
    """meta.json names 8 features, the shard stores rows of 4: a trace with an even number of probes
    would reshape to (P/2, 8) without an error."""
    root = tmp_path / "c"
    store.write_meta(root, {"feature_names": [f"f{i}" for i in range(8)], "model": {"name": "synthetic"}})
    rows = [r for r in make_trace_rows("fam_a", 12, seed=0, n_features=4) if len(r["features"]) % 2 == 0]
    assert rows and np.asarray(rows[0]["features"]).reshape(-1, 8).shape[0] == len(rows[0]["features"]) // 2
    store.write_shard(root, "fam_a", "all", rows)
    with pytest.raises(store.CorpusError, match=r"feature vectors of width \[4\]; meta.json names 8 features"):
        TraceCorpus.load(root)
