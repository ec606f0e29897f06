"""The dataset-backed family on tiny local files (JSONL, CSV, parquet, a save_to_disk folder)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from maml_stop import cli
from tasks import get_family
from tasks.answers import AnswerFormatError
from tasks.base import SPLITS, Question, TaskError
from tasks.dataset_family import DatasetFamily, DatasetFormatError, choice_gold, gsm8k_gold

N_ROWS = 120


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def gsm_file(tmp_path_factory) -> Path:
    rows = [
        {"question": f"Tom has {i} apples and buys {i + 1000} more. How many now?",
         "answer": f"He has {i} + {i + 1000} = {2 * i + 1000} apples.\n#### {2 * i + 1000:,}"}
        for i in range(N_ROWS)
    ]
    return write_jsonl(tmp_path_factory.mktemp("gsm") / "gsm.jsonl", rows)


@pytest.fixture(scope="module")
def gsm(gsm_file) -> DatasetFamily:
    return get_family("dataset", path=str(gsm_file), answer_format="gsm8k", name="gsm_tiny")


@pytest.fixture(scope="module")
def mc_file(tmp_path_factory) -> Path:
    colours = ["red", "green", "blue", "yellow"]
    rows = []
    for i in range(N_ROWS):
        right = i % 4
        gold: object = ["ABCD"[right], right, str(right), colours[right]][i % 4]  # letter, int, digit, text
        rows.append({"q": f"Item {i}: which colour is number {right}?", "options": colours, "label": gold})
    return write_jsonl(tmp_path_factory.mktemp("mc") / "mc.jsonl", rows)


@pytest.fixture(scope="module")
def mc(mc_file) -> DatasetFamily:
    return get_family("dataset", path=str(mc_file), question_field="q", answer_field="label",
                      answer_format="choice", choices_field="options", name="colours")


def test_gsm8k_gold_extractor() -> None:
    assert gsm8k_gold("so 40 + 2 = 42\n#### 42") == "42"
    assert gsm8k_gold("#### 1,234") == "1234"
    assert gsm8k_gold("a #### 1 then\n#### -7 ") == "-7"
    with pytest.raises(AnswerFormatError, match="no '#### <answer>'"):
        gsm8k_gold("the answer is 42")
    with pytest.raises(DatasetFormatError, match="nothing after"):
        gsm8k_gold("#### ")


def test_choice_gold_forms() -> None:
    texts = ["red", "green", "blue"]
    assert choice_gold("B", texts, None) == "B"
    assert choice_gold("b", texts, None) == "B"
    assert choice_gold(1, texts, None) == "B"
    assert choice_gold("1", texts, None, index_base=1) == "A"
    assert choice_gold("Green", texts, None) == "B"
    assert choice_gold("3", texts, ["1", "2", "3"]) == "C"  # ARC labels win over indices
    with pytest.raises(DatasetFormatError, match="out of range"):
        choice_gold(5, texts, None)
    with pytest.raises(DatasetFormatError, match="none of the letters ABC"):
        choice_gold("purple", texts, None)


def test_gsm8k_family_draws_and_scores(gsm) -> None:
    assert gsm.numeric and len(gsm) == N_ROWS
    q = gsm.questions("train", 10, seed=0)[0]
    assert q.family == "gsm_tiny" and q.id.startswith("gsm_tiny/")
    assert "," not in q.gold and gsm.score(q.gold, q)
    value = int(q.gold)
    for text in [f"${value:,}.00", f"\\boxed{{{value}}}", f"The answer is: {value}.", f"{value} apples"]:
        assert gsm.score(gsm.extract_answer(f"Step 1: add.\nFinal answer: {text}"), q), text
        assert gsm.score(gsm.extract_probe_answer(f" {text}\nStep 2: check"), q), text
    assert not gsm.score(gsm.extract_answer(f"Final answer: {value + 1}"), q)


def test_splits_deterministic_and_disjoint(gsm) -> None:
    sizes, pools = {}, {}
    for s in SPLITS:
        # all the questions of a split: ask for too many, read the count from the error, then ask again
        with pytest.raises(TaskError, match=rf"has only (\d+) distinct {s} questions") as err:
            gsm.questions(s, N_ROWS + 1)
        sizes[s] = int(str(err.value).split("has only ")[1].split()[0])
        pools[s] = {q.question for q in gsm.questions(s, sizes[s], seed=0)}
    assert sum(sizes.values()) == N_ROWS
    assert not pools["train"] & pools["validation"] and not pools["train"] & pools["test"]
    assert not pools["validation"] & pools["test"]
    assert [q.id for q in gsm.questions("train", 5, seed=3)] == [q.id for q in gsm.questions("train", 5, seed=3)]
    assert [q.id for q in gsm.questions("train", 5, seed=3)] != [q.id for q in gsm.questions("train", 5, seed=4)]
    assert {q.question for q in gsm.questions("train", 5, seed=4)} <= pools["train"]


def test_multiple_choice_family(mc) -> None:
    assert mc.answer_kind == "choice"
    qs = mc.questions("train", 20, seed=0)
    for q in qs:
        assert q.gold in "ABCD" and "(A) red" in q.question and "(D) yellow" in q.question
        colour = ["red", "green", "blue", "yellow"]["ABCD".index(q.gold)]
        wrong = "A" if q.gold != "A" else "C"
        for said in [q.gold, f"({q.gold})", f"{q.gold})", f"The answer is {q.gold}", f"({q.gold}) {colour}",
                     colour, colour.upper() + "."]:
            assert mc.score(mc.extract_answer(f"Step 1: think.\nFinal answer: {said}"), q), said
            assert mc.score(mc.extract_probe_answer(f" {said}\nStep 2: ..."), q), said
        assert not mc.score(mc.extract_answer(f"Final answer: ({wrong})"), q)
        assert not mc.score("purple", q)
        # a question read back from a corpus (no metadata) still maps choice texts
        bare = Question(q.id, q.family, q.split, q.question, q.gold)
        assert mc.score(colour, bare) and not mc.score("purple", bare)


def test_arc_style_choices(tmp_path) -> None:
    rows = [{"question": f"Q{i}: which is a planet?", "choices": {"text": ["Sun", "Mars", "Moon"], "label": ["1", "2", "3"]},
             "answerKey": "2"} for i in range(30)]
    fam = get_family("dataset", path=str(write_jsonl(tmp_path / "arc.jsonl", rows)), answer_field="answerKey",
                     answer_format="choice", choices_field="choices", name="arc")
    q = fam.questions("train", 3)[0]
    assert q.gold == "B" and fam.score("Mars", q) and fam.score("(B)", q) and not fam.score("Sun", q)


@pytest.mark.parametrize("fmt", ["csv", "parquet", "disk"])
def test_other_sources(tmp_path, fmt: str) -> None:
    import datasets

    ds = datasets.Dataset.from_dict({"problem": [f"What is {i} + 1?" for i in range(40)],
                                     "solution": [str(i + 1) for i in range(40)]})
    path = tmp_path / f"data.{fmt}"
    {"csv": ds.to_csv, "parquet": ds.to_parquet, "disk": ds.save_to_disk}[fmt](str(path))
    fam = get_family("dataset", path=str(path), question_field="problem", answer_field="solution", numeric=True)
    q = fam.questions("test", 2)[0]
    assert fam.numeric and fam.score(f"{q.gold}.0", q) and not fam.score("-1", q)


def test_text_and_other_kinds(tmp_path) -> None:
    rows = [{"question": f"Is {i} even?", "answer": "Yes" if i % 2 == 0 else "No"} for i in range(30)]
    path = str(write_jsonl(tmp_path / "yn.jsonl", rows))
    fam = get_family("dataset", path=path, answer_format="yesno")
    q = fam.questions("train", 1)[0]
    assert fam.score(q.gold.upper(), q) and not fam.score("Maybe", q)
    text = get_family("dataset", path=path)  # plain text: "yes" == "Yes" still (normalised)
    assert text.score(q.gold.lower() + ".", q)


def test_source_split_selection(tmp_path) -> None:
    import datasets

    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"question": [f"t{i}" for i in range(30)], "answer": ["1"] * 30}),
        "test": datasets.Dataset.from_dict({"question": [f"s{i}" for i in range(30)], "answer": ["2"] * 30}),
    })
    dd.save_to_disk(str(tmp_path / "dd"))
    both = get_family("dataset", path=str(tmp_path / "dd"))
    only_test = get_family("dataset", path=str(tmp_path / "dd"), source_split="test")
    assert len(both) == 60 and len(only_test) == 30
    assert all(q.question.startswith("s") for q in only_test.questions("train", 5))
    with pytest.raises(TaskError, match="no split 'dev'; valid: train, test"):
        get_family("dataset", path=str(tmp_path / "dd"), source_split="dev")


# -- bad input -------------------------------------------------------------------------------------
def test_missing_path_argument() -> None:
    with pytest.raises(TaskError, match="required: path"):
        get_family("dataset")


def test_missing_field_names_columns(gsm_file) -> None:
    with pytest.raises(TaskError, match="question_field='problem' is not a column .* columns: question, answer"):
        get_family("dataset", path=str(gsm_file), question_field="problem")


def test_missing_file_and_bad_extension(tmp_path) -> None:
    with pytest.raises(TaskError, match="does not exist"):
        get_family("dataset", path=str(tmp_path / "nope.jsonl"))
    bad = tmp_path / "data.xlsx"
    bad.write_text("x")
    with pytest.raises(TaskError, match="unknown extension '.xlsx'; valid: .jsonl"):
        get_family("dataset", path=str(bad))


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_empty_dataset(tmp_path, fmt: str) -> None:
    import datasets

    path = tmp_path / f"empty.{fmt}"
    if fmt == "parquet":  # columns but no rows
        datasets.Dataset.from_dict({"question": [], "answer": []}).to_parquet(str(path))
    else:
        path.write_text("question,answer\n" if fmt == "csv" else "")
    with pytest.raises(TaskError, match="has no rows"):
        get_family("dataset", path=str(path))


def test_malformed_gsm8k_gold(tmp_path) -> None:
    rows = [{"question": "a?", "answer": "x\n#### 1"}, {"question": "b?", "answer": "the answer is 2"}]
    path = str(write_jsonl(tmp_path / "bad.jsonl", rows))
    with pytest.raises(DatasetFormatError, match="row 1 .*no '#### <answer>'.*skip_malformed=True"):
        get_family("dataset", path=path, answer_format="gsm8k")
    fam = get_family("dataset", path=path, answer_format="gsm8k", skip_malformed=True)
    assert len(fam) == 1
    only_bad = str(write_jsonl(tmp_path / "allbad.jsonl", rows[1:]))
    with pytest.raises(TaskError, match="every one of its 1 rows was malformed"):
        get_family("dataset", path=only_bad, answer_format="gsm8k", skip_malformed=True)


def test_non_numeric_gold_for_number_format(tmp_path) -> None:
    path = str(write_jsonl(tmp_path / "t.jsonl", [{"question": "a?", "answer": "forty"}]))
    with pytest.raises(DatasetFormatError, match="cannot be read as 'number'"):
        get_family("dataset", path=path, answer_format="number")


def test_bad_format_and_choice_arguments(gsm_file) -> None:
    with pytest.raises(TaskError, match="unknown answer_format 'mcq'; valid: text, number, gsm8k, choice"):
        get_family("dataset", path=str(gsm_file), answer_format="mcq")
    with pytest.raises(TaskError, match="needs choices_field"):
        get_family("dataset", path=str(gsm_file), answer_format="choice")


def test_unknown_split_and_too_many(gsm) -> None:
    with pytest.raises(ValueError, match="valid splits: train, validation, test"):
        gsm.questions("dev", 1)
    with pytest.raises(TaskError, match=f"{N_ROWS + 1} were asked for"):
        gsm.questions("train", N_ROWS + 1)


def test_hub_id_offline_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TaskError, match="cannot load dataset 'no-such-user/no-such-dataset'"):
        get_family("dataset", path="no-such-user/no-such-dataset")


def test_tasks_command_with_a_dataset(gsm_file, capsys) -> None:
    assert cli.main(["tasks", "--dataset", str(gsm_file), "--answer-format", "gsm8k", "--name", "gsm_tiny"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("gsm_tiny") and "gold:" in out
    assert cli.main(["tasks", "--dataset", str(gsm_file), "--question-field", "nope"]) == 2
    assert "is not a column" in capsys.readouterr().err
