"""Answer extraction and exact match (tasks/answers.py) on the formats models actually produce."""

from __future__ import annotations

import pytest

from tasks import answers
from tasks.answers import AnswerFormatError, canonical, exact_match, extract_final, extract_probe


@pytest.mark.parametrize(
    "answer, gold",
    [
        ("$1,234.50", "1234.5"),
        ("1,234.50", "1234.50"),
        ("\\boxed{12}", "12"),
        ("The answer is: 7.", "7"),
        ("12 apples", "12"),
        ("7 legs", "7"),
        ("-5", "-5"),
        ("−5", "-5"),  # unicode minus
        ("**42**", "42"),
        ("3 + 4 = 7", "7"),
        ("x = 46", "46"),
        ("3/8", "0.375"),
        ("\\frac{3}{8}", "0.375"),
        ("$24$", "24"),
        ("24.0", "24"),
    ],
)
def test_number_matches(answer: str, gold: str) -> None:
    assert exact_match(answer, gold, kind="number")
    assert exact_match(answer, gold, numeric=True)  # the shorthand


@pytest.mark.parametrize(
    "answer, gold",
    [("5", "-5"), ("1234", "1234.5"), ("12 apples", "13"), ("no idea", "7"), ("", "7"), ("7", "17")],
)
def test_number_mismatches(answer: str, gold: str) -> None:
    assert not exact_match(answer, gold, kind="number")


def test_text_kind_is_not_numeric() -> None:
    assert not exact_match("12 apples", "12", kind="text")
    assert exact_match("Husband.", "husband", kind="text")
    assert exact_match("  eaditO ", "eaditO", kind="text")
    assert not exact_match("eadito x", "eaditO", kind="text")


@pytest.mark.parametrize(
    "answer, gold, ok",
    [
        ("YES", "Yes", True),
        ("yes, it follows.", "Yes", True),
        ("**No**", "No", True),
        ("No", "Yes", False),
        ("Not necessarily", "No", False),
        ("Maybe", "No", False),
    ],
)
def test_yesno(answer: str, gold: str, ok: bool) -> None:
    assert exact_match(answer, gold, kind="yesno") is ok


@pytest.mark.parametrize(
    "answer, ok",
    [
        ("['52.2', '30.0']", True),
        ("52.2, 30.0", True),
        ("[52.2, 30]", True),
        ('["52.2", "30.0"]', True),
        ("52.2 30.0", True),
        ("30.0, 52.2", False),  # order matters
        ("52.2", False),
        ("52.2, 30.0, 1", False),
    ],
)
def test_number_list(answer: str, ok: bool) -> None:
    assert exact_match(answer, "['52.2', '30.0']", kind="number_list") is ok


@pytest.mark.parametrize(
    "answer, ok",
    [
        ("state, originator, located", True),
        ("State, Originator, Located", True),
        ("['state', 'originator', 'located']", True),
        ("state,originator,located", True),
        ("originator, state, located", False),
        ("state, originator", False),
    ],
)
def test_word_list(answer: str, ok: bool) -> None:
    assert exact_match(answer, "state, originator, located", kind="word_list") is ok


@pytest.mark.parametrize(
    "answer, ok",
    [("2 × 2 × 3", True), ("2*2*3", True), ("3 x 2 x 2", True), ("2^2 × 3", True), ("2 \\times 2 \\times 3", True),
     ("2 × 3", False), ("12", False), ("2 × 2 × 3 × 1 × z", False)],
)
def test_factors(answer: str, ok: bool) -> None:
    assert exact_match(answer, "2 × 2 × 3", kind="factors") is ok


@pytest.mark.parametrize(
    "answer, gold, ok",
    [
        ("3:22:03", "03:22:03", True),
        ("03:22:04", "03:22:03", False),
        ("67 days, 1:04:00", "67 days, 01:04:00", True),
        ("67 days, 01:04", "67 days, 01:04:00", True),
        ("66 days, 01:04:00", "67 days, 01:04:00", False),
        ("34 days", "34 days", True),
        ("34", "34 days", True),
        ("02:04:01.658", "02:04:01.658", True),
        ("02:04:01.659", "02:04:01.658", False),
        ("two hours", "02:00", False),
    ],
)
def test_duration(answer: str, gold: str, ok: bool) -> None:
    assert exact_match(answer, gold, kind="duration") is ok


@pytest.mark.parametrize("answer", ["B", "(B)", "B)", "B.", "The answer is B", "The answer is (B).", "Option B", "b"])
def test_choice_letters(answer: str) -> None:
    assert exact_match(answer, "B", kind="choice")
    assert not exact_match(answer, "C", kind="choice")


def test_choice_article_is_not_a_letter() -> None:
    assert canonical("A cat", "choice") is None
    assert canonical("A) a cat", "choice") == "A"


def test_unknown_kind_names_valid_kinds() -> None:
    with pytest.raises(AnswerFormatError, match="valid kinds: text, number"):
        exact_match("1", "1", kind="integer")


# -- extraction from a full generation -------------------------------------------------------------
@pytest.mark.parametrize(
    "text, kind, expected",
    [
        ("Step 1: 3+4=7\nStep 2: 7*2=14\nFinal answer: 14 apples", "number", "14"),
        ("Step 1: 3+4=7\nFinal answer: $1,234.50", "number", "1234.50"),
        ("We get 5.\nFinal answer:\n42", "number", "42"),
        ("So the total is \\boxed{12}.", "number", "12"),
        ("The answer is: 7.", "number", "7"),
        ("... so it is 5 then 6", "number", "6"),  # last number as the last resort
        ("I cannot tell.", "number", None),
        ("Step 1\nFinal answer: YES", "yesno", "YES"),
        ("Step 1\nFinal answer: **No**, it does not follow.", "yesno", "No"),
        ("Step 1\nFinal answer: it does not follow, so No.", "yesno", "No"),
        ("Final answer: hard to say, yes or no", "yesno", None),  # two different words: no answer
        ("Sorted.\nFinal answer: ['1', '2']", "number_list", "['1', '2']"),
        ("Final answer: state, originator", "word_list", "state, originator"),
        ("Final answer: 2 × 2 × 449", "factors", "2 × 2 × 449"),
        ("Thinking.\nFinal answer: (C) Paris", "choice", "C"),
        ("Final answer: husband.", "text", "husband"),
        ("no final line here", "text", None),
        ("Answer: 9 legs\nFinal answer: 8 legs", "number", "8"),  # the last Final answer wins
    ],
)
def test_extract_final(text: str, kind: str, expected: str | None) -> None:
    assert extract_final(text, kind=kind) == expected


# -- probe continuations (what follows "\nFinal answer:") ------------------------------------------
@pytest.mark.parametrize(
    "continuation, kind, expected",
    [
        (" 42\nStep 3: add 5 to get 47", "number", "42"),
        ("\n42\nStep 3", "number", "42"),
        (" $1,234.50 in total.\nStep", "number", "1234.50"),
        (" \\boxed{-3}", "number", "-3"),
        (" The answer is: 7.\n", "number", "7"),
        (" Let me think again", "number", None),
        ("", "number", None),
        (" Yes.\nStep 2: but", "yesno", "Yes"),
        (" 52.2, 30.0\nStep 4", "number_list", "52.2, 30.0"),
        (" (B) because\nmore", "choice", "B"),
        (" husband\nStep 3: Jennifer is the wife", "text", "husband"),
    ],
)
def test_extract_probe(continuation: str, kind: str, expected: str | None) -> None:
    assert extract_probe(continuation, kind=kind) == expected


def test_probe_reads_only_the_first_line() -> None:
    # the later line holds the right answer, but a probe must not look past its first line
    assert extract_probe(" 41\nFinal answer: 42", kind="number") == "41"


def test_clean_and_boxed() -> None:
    assert answers.strip_boxed("x \\boxed{\\frac{1}{2}} y") == "\\frac{1}{2}"
    assert answers.clean("**Final answer:** 7.") == "7"
    assert answers.clean('"eaditO"') == "eaditO"
    assert answers.parse_number("no number") is None


@pytest.mark.parametrize(
    "text, expected",
    [
        ("12. Then 12 + 3 = 15", "12"),  # the stated answer opens the line; later arithmetic is not it
        ("7 (since 3 + 4 = 7)", "7"),
        ("3 + 4 = 7", "7"),
        ("12 - 5 = 7 apples", "7"),
        ("1,234 + 5 = 1,239", "1239"),
        ("x = 46", "46"),
        ("The total is 3 * 4 = 12", "12"),
        ("-7", "-7"),
        ("3/8", "3/8"),
        ("no number", None),
        # expressions not yet worked out state no answer (seen in real probe continuations)
        (" 24 + 12 + 6", None),
        (" -16 - (-46) = -", None),
        (" \\(-(-126) + 1", None),
        (" \\(-\\frac{2105}{", None),
        (" \\(\\boxed{53 - 35", None),
        (" \\(-192\\)", "-192"),
        (" -2 + 6 = 4\n", "4"),
    ],
)
def test_pick_number(text: str, expected: str | None) -> None:
    assert answers.pick_number(text) == expected


def test_answer_phrase_needs_a_delimiter() -> None:
    # a caesar-cipher answer may begin with the word "answer"; only "answer is"/"answer:" is a phrase
    assert answers.clean("ANSWER THE CALL") == "ANSWER THE CALL"
    assert not exact_match("THE CALL", "ANSWER THE CALL")
    assert answers.clean("answer = 5") == "5"
