"""Question-complexity features: what is known of a question before any reasoning token (issue 13 item 2).

Two sources, both free (no forced answer, nothing generated yet):

* the question **text** (:func:`text_features`, names :data:`TEXT_FEATURES`): its length in characters,
  words and lines, how many digits and numbers it holds, the magnitude of its largest number, how many
  arithmetic operators, brackets, comparison signs and sentences. Counts enter as ``log1p`` (a question
  twice as long is not twice as hard), the largest number as ``log10(1 + |x|)``;
* where the trace has a probe at position 0 (corpus v2's ``start`` probe), that probe's **free**
  features (:class:`QuestionFeaturizer` ``start_features``: the hidden-state summary of the prompt, its
  next-token entropy), with a ``has_start`` indicator; a trace without one gets zeros there.

The same functions serve a live deployment (the text and the prompt's forward pass are all they read):
they see nothing of the generation, the final answer or the gold answer.

>>> round(float(text_features("What is 12 + 345 * 2?")[TEXT_FEATURES.index("n_numbers")]), 3)   # log1p(3)
1.386
>>> QuestionFeaturizer([]).names[:3]
['n_chars', 'n_words', 'n_lines']
"""

from __future__ import annotations

import math
import re
from typing import Sequence

import numpy as np

__all__ = ["TEXT_FEATURES", "text_features", "QuestionFeaturizer"]

TEXT_FEATURES: tuple[str, ...] = (
    "n_chars",  # log1p(characters)
    "n_words",  # log1p(whitespace-separated words)
    "n_lines",  # log1p(lines)
    "n_sentences",  # log1p(sentence ends . ? !)
    "n_digits",  # log1p(digit characters)
    "n_numbers",  # log1p(numbers: integers and decimals)
    "max_number",  # log10(1 + |largest number|)
    "mean_number_digits",  # mean digits per number (0 without numbers)
    "n_operators",  # log1p(+ - * / ^ % × ÷)
    "n_brackets",  # log1p(( ) [ ] { })
    "n_comparisons",  # log1p(= < >)
    "n_commas",  # log1p(commas)
    "n_upper",  # log1p(upper-case letters)
    "distinct_word_share",  # distinct words / words (0 without words)
)

_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_OPERATORS = re.compile(r"[+\-*/^%×÷]")
_BRACKETS = re.compile(r"[()\[\]{}]")
_COMPARISONS = re.compile(r"[=<>]")
_SENTENCE_END = re.compile(r"[.?!](?:\s|$)")


def text_features(text: str) -> np.ndarray:
    """The :data:`TEXT_FEATURES` of one question text. (len(TEXT_FEATURES),) float32"""
    words = text.split()
    numbers = _NUMBER.findall(text)
    values = []
    for n in numbers:
        try:
            values.append(abs(float(n)))
        except (OverflowError, ValueError):  # pragma: no cover - the pattern only matches plain numbers
            continue
    largest = max(values) if values else 0.0
    out = [
        math.log1p(len(text)),
        math.log1p(len(words)),
        math.log1p(text.count("\n") + 1 if text else 0),
        math.log1p(len(_SENTENCE_END.findall(text))),
        math.log1p(sum(c.isdigit() for c in text)),
        math.log1p(len(numbers)),
        math.log10(1.0 + largest) if math.isfinite(largest) else 308.0,
        float(np.mean([sum(c.isdigit() for c in n) for n in numbers])) if numbers else 0.0,
        math.log1p(len(_OPERATORS.findall(text))),
        math.log1p(len(_BRACKETS.findall(text))),
        math.log1p(len(_COMPARISONS.findall(text))),
        math.log1p(text.count(",")),
        math.log1p(sum(c.isupper() for c in text)),
        len({w.lower() for w in words}) / len(words) if words else 0.0,
    ]
    return np.asarray(out, dtype=np.float32)


class QuestionFeaturizer:
    """A question's complexity vector: :func:`text_features` of its text, then ``has_start`` and the
    ``start_features`` (names among ``feature_names``, the trace's feature columns; free ones only: the
    caller picks them, e.g. :func:`maml_stop.decide.policies.cost_aware.free_features`) of its probe at
    position 0, zeros when it has none.

    >>> import numpy as np
    >>> from types import SimpleNamespace as T
    >>> f = QuestionFeaturizer(["h0", "logprob_mean"], start_features=["h0"])
    >>> trace = T(positions=np.array([0, 16]), features=np.array([[0.5, -1.0], [0.7, -0.2]]))
    >>> f(trace, "2 + 2")[-2:].tolist()                       # has_start, h0 at position 0
    [1.0, 0.5]
    """

    def __init__(self, feature_names: Sequence[str], start_features: Sequence[str] = ()) -> None:
        index = {n: i for i, n in enumerate(feature_names)}
        unknown = [n for n in start_features if n not in index]
        if unknown:
            raise ValueError(f"start features {unknown} are not among the traces' features {list(feature_names)[:6]}...")
        self.feature_names = list(feature_names)
        self.start_features = list(start_features)
        self._columns = np.asarray([index[n] for n in self.start_features], dtype=np.int64)

    @property
    def names(self) -> list[str]:
        """The names of the vector's entries, in order."""
        start = ["has_start", *(f"start_{n}" for n in self.start_features)] if self.start_features else []
        return [*TEXT_FEATURES, *start]

    @property
    def width(self) -> int:
        return len(self.names)

    def __call__(self, trace, question: str) -> np.ndarray:
        """The vector of one trace (``positions`` (P,), ``features`` (P, F)) and its question text. (width,)"""
        text = text_features(question)
        if not self.start_features:
            return text
        feats = np.asarray(trace.features)
        if feats.ndim != 2 or feats.shape[1] != len(self.feature_names):
            raise ValueError(f"a trace with {feats.shape[-1]} feature columns; the featurizer reads "
                             f"{len(self.feature_names)} ({self.feature_names[:4]}...)")
        has_start = len(trace.positions) > 0 and int(trace.positions[0]) == 0
        start = feats[0, self._columns] if has_start else np.zeros(len(self._columns), np.float32)
        return np.concatenate([text, [float(has_start)], start]).astype(np.float32)
