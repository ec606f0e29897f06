"""Answer extraction and exact-match scoring shared by all families.

>>> extract_final("5 + 7 = 12.\\nFinal answer: \\\\boxed{12}")
'12'
>>> exact_match("$1,234.50", "1234.5", numeric=True)
True
"""

from __future__ import annotations

import math
import re

_FINAL_RE = re.compile(r"(?:final answer|the answer is|answer)\s*(?:is)?\s*[:：]?\s*(.+)", re.IGNORECASE)
_NUMBER_RE = re.compile(r"[-+]?\$?\d[\d,]*(?:\.\d+)?|[-+]?\.\d+")


class AnswerFormatError(ValueError):
    """A gold answer or answer field that cannot be read."""


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
    """Strip markup around an answer: boxed, bold, quotes, surrounding spaces, a trailing period."""
    text = strip_boxed(text).strip()
    text = text.replace("**", "").replace("`", "").strip()
    text = re.sub(r"^\$+|\$+$", lambda m: "" if not re.match(r"^\$\d", text) else m.group(0), text)
    text = text.strip().strip("\"'").strip()
    text = re.sub(r"[.。]+$", "", text).strip()
    return text


def parse_number(text: str) -> float | None:
    """The number a short answer states ("$1,234.50" -> 1234.5, "7 apples" -> 7), else None."""
    text = clean(text)
    frac = re.fullmatch(r"\s*([-+]?\d+)\s*/\s*(\d+)\s*", text)
    if frac and int(frac.group(2)) != 0:
        return int(frac.group(1)) / int(frac.group(2))
    m = _NUMBER_RE.search(text)
    if m is None:
        return None
    try:
        return float(m.group(0).replace("$", "").replace(",", ""))
    except ValueError:
        return None


def normalise(text: str) -> str:
    text = clean(text).lower()
    text = re.sub(r"\s+", " ", text)
    return text.strip()


def exact_match(answer: str, gold: str, numeric: bool = False) -> bool:
    """Normalised string match; with ``numeric``, numerically equal answers match too."""
    if normalise(answer) == normalise(gold):
        return True
    if numeric:
        a, g = parse_number(answer), parse_number(gold)
        if a is not None and g is not None:
            return math.isclose(a, g, rel_tol=1e-6, abs_tol=1e-9)
    return False


def extract_final(text: str, numeric: bool = False) -> str | None:
    """The answer stated in a full generation: the last 'Final answer:' line, else the last \\boxed{},
    else (numeric families) the last number; None when nothing is found."""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    for line in reversed(lines):
        m = _FINAL_RE.search(line)
        if m and m.group(1).strip():
            return clean(m.group(1))
    if "\\boxed{" in text:
        return clean(strip_boxed(text))
    if numeric:
        nums = _NUMBER_RE.findall(text)
        if nums:
            return nums[-1].replace("$", "").replace(",", "")
    return None


def extract_probe(text: str, numeric: bool = False) -> str | None:
    """The answer in a forced continuation (what follows the answer trigger): its first line."""
    first = text.strip().split("\n", 1)[0] if text.strip() else ""
    first = clean(first)
    if not first:
        return None
    if numeric:
        n = _NUMBER_RE.search(first)
        return n.group(0).replace("$", "").replace(",", "") if n else first
    return first
