"""``maml-stop generate`` (issue 12 item 1): live stopping from an adapted artifact alone, on the tiny
local model and a corpus harvested with it (the fixtures of test_feature_subsets)."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from test_feature_subsets import FAMILY, MAX_NEW, _artifact, harvested  # noqa: F401  (harvested: a fixture)

FIELDS = {"id", "question", "answer", "total_tokens", "reasoning_tokens", "stopped_at", "stopped_early", "end",
          "probes", "forced"}


def _model_dir(harvested) -> str:  # noqa: F811
    return str(Path(harvested[0]).parent / "tiny_lm")


def _questions(tmp_path, n: int = 4, gold: bool = True, field: str = "question") -> str:
    from tasks import get_family

    path = tmp_path / f"q{n}{gold}{field}.jsonl"
    lines = [{field: q.question, **({"gold": q.gold} if gold else {})}
             for q in get_family(FAMILY).questions("test", n, seed=1)]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return str(path)


def _run(args, capsys):
    from maml_stop.cli import main

    code = main(["generate", *args])
    return code, capsys.readouterr()


@pytest.fixture(scope="module")
def artifact(harvested, tmp_path_factory):  # noqa: F811
    from maml_stop.data import store

    from maml_stop.live.artifact import save_adapted
    from maml_stop.live.generate import InputQuestion, generate_answers
    from maml_stop.live.stopping import LiveStopping
    from tasks import get_family

    _, model, tok = harvested
    root = tmp_path_factory.mktemp("gen")
    names = store.read_meta(harvested[0])["feature_names"]
    path, adapted = _artifact(harvested, root, names)
    # a threshold between the two highest per-row maxima of a never-stopping run on the test questions:
    # one row stops, the others run to their end
    adapted.tau = None
    never = LiveStopping.from_adapted(save_adapted(adapted, root / "never.pt"), model, tok)
    qs = [InputQuestion(q.question) for q in get_family(FAMILY).questions("test", 4, seed=1)]
    try:
        generate_answers(never, model, tok, get_family(FAMILY), qs, batch_size=4)
    finally:
        never.remove_hooks()
    best = sorted({max(p for p in row if p is not None) for row in never.probabilities}, reverse=True)
    adapted.tau = (best[0] + best[1]) / 2
    return str(save_adapted(adapted, path))


def _lines(path) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text().splitlines()]


def test_batch_gives_the_answers_of_one_question_at_a_time(harvested, artifact, tmp_path, capsys):  # noqa: F811
    qfile = _questions(tmp_path)
    common = ["--adapted", artifact, "--model", _model_dir(harvested), "--questions", qfile]
    code, out = _run([*common, "--batch_size", "4", "--out", str(tmp_path / "b.jsonl")], capsys)
    assert code == 0, out.err
    code, out = _run([*common, "--batch_size", "1", "--out", str(tmp_path / "one.jsonl")], capsys)
    assert code == 0, out.err
    batch, single = _lines(tmp_path / "b.jsonl"), _lines(tmp_path / "one.jsonl")
    assert len(batch) == 4 and batch == single
    ends = [row["end"] for row in batch]
    assert ends.count("stop") == 1 and len(set(ends)) > 1, ends
    for row in batch:
        assert FIELDS | {"gold", "em"} == set(row)
        assert row["reasoning_tokens"] <= MAX_NEW <= row["reasoning_tokens"] + MAX_NEW
        # total = reasoning + every forced answer the rule ran (trigger + answer tokens each)
        assert row["total_tokens"] >= row["reasoning_tokens"] + row["forced"]
        assert (row["end"] == "stop") == (row["stopped_at"] is not None)
        if row["stopped_at"] is not None:
            assert row["reasoning_tokens"] == row["stopped_at"]
            assert row["stopped_early"] == (row["stopped_at"] < MAX_NEW)
        else:
            assert not row["stopped_early"]


def test_token_accounting_matches_the_criterion(harvested, artifact, tmp_path):  # noqa: F811
    """The command's figures are the criterion's own: the stop, the forced probes, the cap answer."""
    from maml_stop.live.generate import InputQuestion, generate_answers
    from maml_stop.live.stopping import LiveStopping
    from tasks import get_family

    _, model, tok = harvested
    qs = [InputQuestion(x["question"], x["gold"]) for x in _lines(_questions(tmp_path, 3))]
    criteria = LiveStopping.from_adapted(artifact, model, tok)
    try:
        rows = generate_answers(criteria, model, tok, get_family(FAMILY), qs, batch_size=3)
    finally:
        criteria.remove_hooks()
    trigger = len(criteria.trigger_ids)
    k = criteria.featurizer.feature_names.index("answer_tokens")
    for r, row in enumerate(rows):
        paid = sum(int(v[k]) + trigger for v, f in zip(criteria.features[r], criteria.forced[r]) if f)
        assert row["total_tokens"] == row["reasoning_tokens"] + paid
        assert row["forced"] == sum(criteria.forced[r]) and row["probes"] == len(criteria.reasons[r])
        assert row["stopped_at"] == criteria.stopped_at[r]
        if row["end"] == "stop" or (row["end"] == "cap" and criteria.reasons[r][-1] == "cap"):
            assert row["answer"] == criteria.answers[r]


def test_em_written_with_gold_and_absent_otherwise(harvested, artifact, tmp_path, capsys):  # noqa: F811
    from tasks import get_family

    common = ["--adapted", artifact, "--model", _model_dir(harvested)]
    code, out = _run([*common, "--questions", _questions(tmp_path, 2, gold=False)], capsys)
    assert code == 0, out.err
    rows = [json.loads(x) for x in out.out.splitlines()]
    assert len(rows) == 2 and all(set(r) == FIELDS for r in rows)
    q = get_family(FAMILY).questions("test", 1, seed=1)[0]
    code, out = _run([*common, "--question", q.question], capsys)
    assert code == 0, out.err
    (row,) = [json.loads(x) for x in out.out.splitlines()]
    assert "em" not in row and row["question"] == q.question
    # gold under another field name; EM is the family's score of the answer
    path = tmp_path / "g.jsonl"
    path.write_text(json.dumps({"q": q.question, "want": q.gold}) + "\n")
    code, out = _run([*common, "--questions", str(path), "--field", "q", "--gold_field", "want"], capsys)
    assert code == 0, out.err
    (row,) = [json.loads(x) for x in out.out.splitlines()]
    assert row["gold"] == q.gold and row["em"] == get_family(FAMILY).score(row["answer"], q)


def test_bad_inputs_give_clear_errors(harvested, artifact, tmp_path, capsys):  # noqa: F811
    from maml_stop.live.artifact import load_adapted, save_adapted

    model = _model_dir(harvested)
    common = ["--adapted", artifact, "--model", model]
    qfile = _questions(tmp_path, 1)

    def err(args):
        code, out = _run(args, capsys)
        assert code == 2, out
        return out.err

    assert "exactly one of --question" in err(common)
    assert "exactly one of --question" in err([*common, "--question", "x", "--questions", qfile])
    assert "cannot read the question file" in err([*common, "--questions", str(tmp_path / "missing.jsonl")])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(Path(qfile).read_text() + "{not json\n")
    assert f"{bad}, line 2: not JSON" in err([*common, "--questions", str(bad)])
    msg = err([*common, "--questions", qfile, "--field", "prompt"])
    assert "no field 'prompt'" in msg and "keys present: ['gold', 'question']" in msg
    assert "does not exist" in err(["--adapted", str(tmp_path / "none.pt"), "--model", model, "--question", "x"])
    assert "is not a torch file" in err(["--adapted", qfile, "--model", model, "--question", "x"])
    # an artifact whose features do not fit the model: from_adapted's AdaptError, with its message
    adapted = load_adapted(artifact)
    adapted.recipe["featurizer"]["hidden_size"] = 16
    other = save_adapted(adapted, tmp_path / "h16.pt")
    assert "the model has hidden size 32" in err(["--adapted", str(other), "--model", model, "--question", "x"])


def test_out_checked_first_and_answers_written_as_they_are_made(harvested, artifact, tmp_path, capsys,  # noqa: F811
                                                                monkeypatch):
    """Issue 29: an unwritable --out is refused before the model loads; each answer is written (and
    flushed) as its batch ends, so a run that fails later keeps the answers it made."""
    from maml_stop.live import generate as G

    qfile = _questions(tmp_path, 4)
    code, out = _run(["--adapted", artifact, "--model", "/nonexistent/model", "--questions", qfile,
                      "--out", str(tmp_path)], capsys)
    assert code == 2 and f"--out {tmp_path} is a folder" in out.err  # not a model error: checked first
    real, calls = G.result_row, []

    def fails_in_the_second_batch(*a, **kw):
        calls.append(1)
        if len(calls) > 2:
            raise OSError(errno.EIO, "the device went away")
        return real(*a, **kw)

    monkeypatch.setattr(G, "result_row", fails_in_the_second_batch)
    path = tmp_path / "part.jsonl"
    code, out = _run(["--adapted", artifact, "--model", _model_dir(harvested), "--questions", qfile,
                      "--batch_size", "2", "--out", str(path)], capsys)
    assert code == 2 and "the device went away" in out.err
    assert len(_lines(path)) == 2  # the first batch's answers survived
