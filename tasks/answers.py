"""Answer extraction and exact-match scoring shared by all families.

An **answer kind** says how an answer is read and compared:

=============  ==========================================  ===========================================
kind           examples (gold / accepted model answers)    EM compares
=============  ==========================================  ===========================================
``text``       ``husband`` / ``Husband.``                  normalised strings (case, spaces, markup)
``number``     ``1234.5`` / ``$1,234.50``, ``12 apples``   numerically (the number the answer states)
``number_list````['52.2', '30.0']`` / ``52.2, 30.0``        the numbers in order
``word_list``  ``a, b, c`` / ``['a', 'b', 'c']``, ``a b c`` the words in order (case-insensitive)
``factors``    ``2 × 2 × 3`` / ``2*2*3``, ``2^2 × 3``        the multiset of factors
``yesno``      ``Yes`` / ``YES``, ``yes, it follows``       the leading yes/no word
``duration``   ``67 days, 01:04:00`` / ``67 days, 1:04:00`` the total number of seconds (to 1 ms)
``choice``     ``B`` / ``(B)``, ``B)``, ``The answer is B``  the option letter (choice text: see
                                                            :mod:`tasks.dataset_family`)
=============  ==========================================  ===========================================

>>> extract_final("5 + 7 = 12.\\nFinal answer: \\\\boxed{12}", kind="number")
'12'
>>> exact_match("$1,234.50", "1234.5", kind="number")
True
>>> extract_probe(" 42\\nStep 3: add 5", kind="number")
'42'
"""

from __future__ import annotations

import math
import re

ANSWER_KINDS = ("text", "number", "number_list", "word_list", "factors", "yesno", "duration", "choice")

# The EM tolerances: the one home of "equal" for numbers and durations (issue 14). A family may widen the
# relative tolerance of its numbers (coin_flip: 5e-3, answers to 3 significant digits) but not redefine it.
NUMBER_REL_TOL = 1e-6  # relative tolerance of numbers (number and number_list kinds)
NUMBER_ABS_TOL = 1e-9  # absolute tolerance beside it, so that a gold of 0 can be matched at all
DURATION_TOL_S = 5e-4  # durations agree to the millisecond


class AnswerFormatError(ValueError):
    """A gold answer, answer field or answer kind that cannot be read."""


def check_kind(kind: str) -> str:
    if kind not in ANSWER_KINDS:
        raise AnswerFormatError(f"unknown answer kind {kind!r}; valid kinds: {', '.join(ANSWER_KINDS)}")
    return kind


def _kind(kind: str | None, numeric: bool) -> str:
    return check_kind(kind) if kind is not None else ("number" if numeric else "text")


# -- cleaning --------------------------------------------------------------------------------------
_NUM = r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+"
_NUMBER_RE = re.compile(_NUM)
# two operands around a binary operator: "24 + 12", "-16 - (-46", "(3) * 4"
_EXPRESSION_RE = re.compile(r"\d\s*\)*\s*[-+*/×÷^]\s*\(*\s*[-+]?\s*\d")
_PHRASE_RE = re.compile(
    r"^\s*(?:(?:so|thus|therefore|hence)\s*,?\s*)?(?:the\s+)?(?:final\s+)?answer\s*(?:is\b\s*[:：]?|[:：=])\s*",
    re.IGNORECASE,
)


def strip_boxed(text: str) -> str:
    """Content of the last ``\\boxed{...}`` (balanced braces), else the text unchanged."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return text
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return text[i:]


def clean(text: str) -> str:
    """Strip markup around an answer: an answer phrase, boxed, bold, LaTeX delimiters, quotes, spaces,
    a trailing period ("The answer is: **7**." -> "7")."""
    text = _PHRASE_RE.sub("", text.strip(), count=1)
    text = strip_boxed(text).strip()
    text = text.replace("**", "").replace("`", "")
    text = re.sub(r"\\[()\[\]]", "", text)  # \( \) \[ \]
    text = re.sub(r"\\text\{([^{}]*)\}", r"\1", text)
    text = text.strip()
    if re.fullmatch(r"\$[^$]+\$", text):  # $x$ (LaTeX), not "$5" (money)
        text = text[1:-1]
    text = _PHRASE_RE.sub("", text, count=1).strip()  # "**Final answer:** 7" leaves "Final answer: 7"
    text = re.sub(r"[.。!]+$", "", text).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text


def normalise(text: str) -> str:
    """Lower-case, single-spaced, markup-free form of an answer."""
    return re.sub(r"\s+", " ", clean(text).lower()).strip()


# -- numbers ---------------------------------------------------------------------------------------
def _to_float(token: str) -> float | None:
    try:
        return float(token.replace(",", ""))
    except ValueError:
        return None


def _prepare_numeric(text: str) -> str:
    text = clean(text).replace("−", "-").replace("–", "-")
    text = re.sub(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}", r"\1/\2", text)
    return text.replace("$", "").replace("\\%", "%")


def pick_number(text: str) -> str | None:
    """The number a short answer states, as written without "$" or thousands commas.

    The number the text opens with ("12. Then 12 + 3 = 15" -> "12", "7 (3 + 4)" -> "7"), unless an
    operator follows it; else the one after the last "=" ("3 + 4 = 7" -> "7", "x = 46" -> "46"); else
    the first number. A whole fraction "3/8" stays a fraction. None when the text holds no number,
    or only an expression not yet worked out ("24 + 12 + 6", "-16 - (-46) =", "\\frac{2105}{").
    """
    text = _prepare_numeric(text)
    # not a coefficient ("-10p = -220") nor the start of an expression ("16 - 93")
    lead = re.match(rf"\s*({_NUM})(?!\d|[.,]\d|[A-Za-z(])(?!\s*[-+*/×÷^=])", text)
    if lead and not re.fullmatch(r"\s*[-+]?\d+\s*/\s*\d+\s*", text):
        return lead.group(1).replace(",", "")
    if "=" in text:
        text = text.rsplit("=", 1)[1]
    frac = re.fullmatch(r"\s*([-+]?\d+)\s*/\s*(\d+)\s*", text)
    if frac:
        return f"{frac.group(1)}/{frac.group(2)}"
    if "\\frac" in text or _EXPRESSION_RE.search(text):
        return None
    m = _NUMBER_RE.search(text)
    return m.group(0).replace(",", "") if m else None


def numbers_equal(a: float, b: float, rel_tol: float = NUMBER_REL_TOL) -> bool:
    """Whether two numbers count as the same answer (within ``rel_tol``, or :data:`NUMBER_ABS_TOL`).

    >>> numbers_equal(1234.5, 1234.5000001), numbers_equal(12, -12)
    (True, False)
    """
    return math.isclose(a, b, rel_tol=rel_tol, abs_tol=NUMBER_ABS_TOL)


def parse_number(text: str) -> float | None:
    """The number a short answer states ("$1,234.50" -> 1234.5, "7 apples" -> 7, "3/8" -> 0.375)."""
    token = pick_number(text)
    if token is None:
        return None
    if "/" in token:
        num, den = token.split("/")
        return int(num) / int(den) if int(den) != 0 else None
    return _to_float(token)



# -- canonical forms -------------------------------------------------------------------------------
_LIST_STRIP = re.compile(r"^[\[(]+|[\])]+$")


def _list_items(text: str) -> list[str]:
    text = _LIST_STRIP.sub("", clean(text).strip())
    parts = text.split(",") if "," in text else text.split()
    items = [p.strip().strip("\"'").strip() for p in parts]
    return [i for i in items if i]


def _yesno(text: str) -> str | None:
    m = re.match(r"\W*(yes|no|true|false)\b", clean(text), re.IGNORECASE)
    if m is None:
        return None
    return {"true": "yes", "false": "no"}.get(m.group(1).lower(), m.group(1).lower())


_DURATION_RE = re.compile(
    r"(?:(?P<days>\d+)\s*days?)?\s*,?\s*(?:(?P<h>\d+):(?P<m>\d{1,2})(?::(?P<s>\d{1,2})(?:\.(?P<ms>\d+))?)?)?",
    re.IGNORECASE,
)


def _duration(text: str) -> float | None:
    if re.fullmatch(r"\d+", clean(text)):  # a bare count is a count of days ("34" for "34 days")
        return int(clean(text)) * 86400.0
    m = next((m for m in _DURATION_RE.finditer(clean(text)) if m.group(0).strip(" ,")), None)
    if m is None:
        return None
    total = int(m.group("days") or 0) * 86400.0
    if m.group("h") is not None:
        total += int(m.group("h")) * 3600 + int(m.group("m")) * 60 + int(m.group("s") or 0)
        if m.group("ms"):
            total += float("0." + m.group("ms"))
    return total


def _factors(text: str) -> list[int] | None:
    body = clean(text).replace("\\times", "×").replace("\\cdot", "×")
    parts = re.split(r"\s*(?:×|\*|·|⋅|\bx\b)\s*", body.strip())
    out: list[int] = []
    for part in parts:
        m = re.fullmatch(r"(\d+)\s*(?:\^\s*\{?(\d+)\}?|\*\*\s*(\d+))?", part.strip())
        if m is None:
            return None
        out += [int(m.group(1))] * int(m.group(2) or m.group(3) or 1)
    return sorted(out)


def _choice_letter(text: str) -> str | None:
    t = clean(text)
    m = re.fullmatch(r"(?:option|choice)?\s*\(?([A-Za-z])\)?", t, re.IGNORECASE)
    if m is None:  # "(B) text", "B) text", "B. text", "B: text"
        m = re.match(r"(?:(?:option|choice)\s*)?(?:\(([A-Za-z])\)|([A-Za-z])[.):])(?:\s|$)", t, re.IGNORECASE)
        if m is None:
            return None
        return (m.group(1) or m.group(2)).upper()
    return m.group(1).upper()


def canonical(text: str, kind: str = "text") -> object | None:
    """The comparable form of an answer of ``kind`` (None when it states none).

    Use it to compare two answers of the same question (e.g. answer stability across probes).
    """
    check_kind(kind)
    if kind == "text":
        return normalise(text) or None
    if kind == "number":
        return parse_number(text)
    if kind == "number_list":
        items = _list_items(text)
        vals = [_to_float(_prepare_numeric(i)) for i in items]
        return tuple(vals) if vals and all(v is not None for v in vals) else None
    if kind == "word_list":
        items = [normalise(i) for i in _list_items(text)]
        return tuple(items) if items else None
    if kind == "factors":
        f = _factors(text)
        return tuple(f) if f else None
    if kind == "yesno":
        return _yesno(text)
    if kind == "duration":
        return _duration(text)
    return _choice_letter(text)  # choice


def exact_match(
    answer: str | None, gold: str, numeric: bool = False, kind: str | None = None,
    rel_tol: float = NUMBER_REL_TOL,
) -> bool:
    """Whether ``answer`` matches ``gold``: normalised string match, or equal canonical forms of ``kind``
    (numbers by :func:`numbers_equal` within ``rel_tol``, durations within :data:`DURATION_TOL_S`;
    ``numeric=True`` is shorthand for ``kind="number"``)."""
    if answer is None:
        return False
    kind = _kind(kind, numeric)
    if normalise(answer) == normalise(gold) and normalise(gold):
        return True
    a, g = canonical(answer, kind), canonical(gold, kind)
    if a is None or g is None:
        return False
    if kind == "number":
        return numbers_equal(a, g, rel_tol)  # type: ignore[arg-type]
    if kind == "number_list":
        return len(a) == len(g) and all(numbers_equal(x, y, rel_tol) for x, y in zip(a, g))  # type: ignore[arg-type]
    if kind == "duration":
        return abs(a - g) < DURATION_TOL_S  # type: ignore[operator]
    return a == g


def _signed_values(text: str, kind: str) -> tuple[float, ...] | None:
    """The numbers an answer of a number kind states, with their signs (None when it states none)."""
    if kind == "number_list":
        return canonical(text, kind)  # type: ignore[return-value]
    value = parse_number(text)
    if value is None:  # an expression not worked out ("-16 - (-46) ="): its first number, as another scorer reads it
        first = _NUMBER_RE.search(_prepare_numeric(text))
        value = _to_float(first.group(0)) if first else None
    return None if value is None else (value,)


def signs_differ(answer: str | None, gold: str, kind: str) -> bool:
    """Whether an answer of a number kind (``number``, ``number_list``) states a number whose sign differs
    from the gold's (False for other kinds and for answers that cannot be read as many numbers as the gold).

    Such an answer is never right, whatever another scorer says: reasoning-gym's ``gsm_symbolic`` scorer
    reads numbers with ``\\b-?\\d+``, which skips the minus sign of "-12" and credits it for 12 (issue 14).

    >>> signs_differ("-12", "12", "number"), signs_differ("12 apples", "12", "number")
    (True, False)
    """
    if answer is None or check_kind(kind) not in ("number", "number_list"):
        return False
    a, g = _signed_values(answer, kind), _signed_values(gold, kind)
    if a is None or g is None or len(a) != len(g):
        return False
    return any((x < 0) != (y < 0) for x, y in zip(a, g))


# -- reasoning models that think inside <think> ... </think> --------------------------------------
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


def answer_part(text: str) -> str:
    """The part of a generation that states its answer: after the last ``</think>`` when the text closes
    a think block (what a reasoning model thinks before it is not its answer), else the whole text.

    >>> answer_part("<think>Final answer: 3? Wait.</think>\\n\\nFinal answer: \\\\boxed{4}")
    '\\n\\nFinal answer: \\\\boxed{4}'
    """
    cut = text.rfind(THINK_CLOSE)
    return text if cut < 0 else text[cut + len(THINK_CLOSE):]


# -- extraction ------------------------------------------------------------------------------------
_FINAL_MARK = re.compile(r"final\s+answer\s*(?:is)?\s*[:：]?", re.IGNORECASE)
_ANSWER_MARK = re.compile(r"(?:the\s+answer\s+is|answer\s*[:：])\s*[:：]?", re.IGNORECASE)


def _after_last(mark: re.Pattern[str], text: str) -> str | None:
    """The text after the last ``mark``: the rest of its line, else the next non-empty line."""
    matches = list(mark.finditer(text))
    if not matches:
        return None
    rest = text[matches[-1].end():]
    lines = rest.split("\n")
    if lines[0].strip(" *:\t"):
        return lines[0]
    nxt = [ln for ln in lines[1:] if ln.strip()]
    return nxt[0] if nxt else None


def _shape(segment: str, kind: str) -> str | None:
    """An extracted answer segment in the form of its kind (a number for numbers, ...)."""
    if kind == "number":
        return pick_number(segment)
    if kind == "yesno":
        m = re.match(r"\W*(yes|no|true|false)\b", clean(segment), re.IGNORECASE)
        if m:
            return m.group(1)
        # "It does not follow, so No": one yes/no word in the segment, whatever else it says
        words = re.findall(r"\b(yes|no)\b", segment, re.IGNORECASE)
        return words[-1] if words and len({w.lower() for w in words}) == 1 else None
    if kind == "choice":
        letter = _choice_letter(segment)
        return letter if letter is not None else (clean(segment) or None)
    return clean(segment) or None


def extract_final(text: str, numeric: bool = False, kind: str | None = None) -> str | None:
    """The answer stated in a full generation, None when it states none.

    In order: the last "Final answer:" (rest of the line, else the next line); the last ``\\boxed{}``;
    the last "The answer is" / "Answer:"; for numbers, the last number in the text. A text that closes
    a think block is read after its ``</think>`` only (:func:`answer_part`).
    """
    kind = _kind(kind, numeric)
    text = answer_part(text)
    for segment in (
        _after_last(_FINAL_MARK, text),
        strip_boxed(text[text.rfind("\\boxed{"):]) if "\\boxed{" in text else None,
        _after_last(_ANSWER_MARK, text),
    ):
        if segment is not None and segment.strip():
            shaped = _shape(segment, kind)
            if shaped is not None:
                return shaped
    if kind == "number":
        nums = _NUMBER_RE.findall(_prepare_numeric(text.replace("\n", " ")))
        return nums[-1].replace(",", "") if nums else None
    return None


def extract_probe(text: str, numeric: bool = False, kind: str | None = None) -> str | None:
    """The answer in a forced continuation (the text after the answer trigger): its first non-empty
    line, read as an answer of ``kind``. Sees nothing but ``text`` (no look-ahead)."""
    kind = _kind(kind, numeric)
    lines = [ln for ln in text.split("\n") if ln.strip()]
    if not lines:
        return None
    return _shape(lines[0], kind)


__all__ = ["ANSWER_KINDS", "THINK_CLOSE", "THINK_OPEN", "answer_part", "DURATION_TOL_S", "NUMBER_ABS_TOL", "NUMBER_REL_TOL",
           "AnswerFormatError", "canonical", "check_kind", "clean", "exact_match", "extract_final", "extract_probe",
           "normalise", "numbers_equal", "parse_number", "pick_number", "signs_differ", "strip_boxed"]
