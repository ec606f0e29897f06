"""A task family read from any ``datasets`` source: a local JSONL/JSON/CSV/TSV/parquet file, a folder
written by ``Dataset.save_to_disk``, or a hub id (on a machine with hub access; these machines have none).

>>> fam = get_family("dataset", path="gsm8k_test.jsonl", answer_format="gsm8k", name="gsm8k")  # doctest: +SKIP
>>> fam = get_family("dataset", path="arc.parquet", question_field="question", answer_field="answerKey",
...                  answer_format="choice", choices_field="choices", name="arc")  # doctest: +SKIP

Gold answers (``answer_format``):

* ``gsm8k``: the text after the last ``####`` ("...so 42 in all.\\n#### 42" -> "42"); numeric EM;
* ``choice``: multiple choice. The choices field is a list of strings or a ``{"text": [...], "label": [...]}``
  record (ARC style); the gold is a letter ("B"), a label of that record, an index into the choices
  (0-based unless ``choice_index_base=1``), or the text of the right choice. The question shown to the
  model lists the choices as "(A) ...", and the gold becomes the letter; a model answer "(B)", "B)",
  "The answer is B" or the text of choice B all match "B";
* ``text``, ``number`` and the other answer kinds of :mod:`tasks.answers` (``yesno``, ``number_list``, ...):
  the field as it is, compared as that kind. ``numeric=True`` turns ``text`` into ``number``.

Splits: always the question-text hash split of :mod:`tasks.base`, so the three pools never overlap,
whatever the source and the seed. The source's own splits are not honoured as ours (a source "test"
split is rarely disjoint by text from its "train", and many sources have a single split); choose
which of them to read with ``source_split`` (e.g. ``source_split="test"`` to draw only from GSM8K's
test questions), and every question read is then assigned a split by its hash.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
from typing import Any, Iterator, Sequence

from tasks import answers
from tasks.base import (
    DEFAULT_INSTRUCTION,
    DEFAULT_SYSTEM,
    DEFAULT_TRIGGER,
    Question,
    TaskError,
    TaskFamily,
    register_family,
)

log = logging.getLogger(__name__)

ANSWER_FORMATS = ("text", "number", "gsm8k", "choice", "yesno", "number_list", "word_list", "factors", "duration")
# file extension -> (datasets builder, extra load_dataset arguments)
_BUILDERS: dict[str, tuple[str, dict[str, Any]]] = {
    ".jsonl": ("json", {}),
    ".json": ("json", {}),
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"delimiter": "\t"}),
    ".parquet": ("parquet", {}),
    ".arrow": ("arrow", {}),
}
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_CHOICE_LINE = re.compile(r"^\(([A-Z])\) (.*)$", re.MULTILINE)


class DatasetFormatError(answers.AnswerFormatError):
    """A row of the source whose question, answer or choices cannot be read."""


def gsm8k_gold(text: str) -> str:
    """The final answer of a GSM8K-style solution ("...\\n#### 1,234" -> "1234")."""
    if "####" not in text:
        raise DatasetFormatError(f"no '#### <answer>' in a GSM8K-style answer: {text[-80:]!r}")
    gold = text.rsplit("####", 1)[1].strip().replace(",", "").replace("$", "").strip()
    if not gold:
        raise DatasetFormatError(f"nothing after '####' in a GSM8K-style answer: {text[-80:]!r}")
    return gold


def read_choices(value: Any) -> tuple[list[str], list[str] | None]:
    """(choice texts, their source labels or None) from a list of strings or an ARC-style record."""
    if isinstance(value, dict):
        if "text" not in value:
            raise DatasetFormatError(f"a choices record needs a 'text' list, it has keys {sorted(value)}")
        texts, labels = value["text"], value.get("label")
    else:
        texts, labels = value, None
    if isinstance(texts, str) or not isinstance(texts, Sequence) or not texts:
        raise DatasetFormatError(f"choices must be a non-empty list of strings, got {value!r}")
    if len(texts) > len(LETTERS):
        raise DatasetFormatError(f"at most {len(LETTERS)} choices are supported, got {len(texts)}")
    return [str(t) for t in texts], ([str(x) for x in labels] if labels is not None else None)


def choice_gold(gold: Any, texts: Sequence[str], labels: Sequence[str] | None, index_base: int = 0) -> str:
    """The letter of the right choice, from a letter, a source label, an index or the choice text."""
    letters = LETTERS[: len(texts)]
    g = str(gold).strip()
    if labels is not None and g in labels:
        return letters[list(labels).index(g)]
    if len(g) == 1 and g.upper() in letters and g.isalpha():
        return g.upper()
    if isinstance(gold, int) or re.fullmatch(r"\d+", g):
        i = int(g) - index_base
        if 0 <= i < len(texts):
            return letters[i]
        raise DatasetFormatError(f"choice index {g} is out of range for {len(texts)} choices (base {index_base})")
    norm = [answers.normalise(t) for t in texts]
    if answers.normalise(g) in norm:
        return letters[norm.index(answers.normalise(g))]
    raise DatasetFormatError(f"gold {gold!r} is none of the letters {letters}, an index, or a choice text {texts}")


def _malformed_json_line(path: str) -> tuple[int, str, str] | None:
    """(line number from 1, the parser's message, the line's start) of the first line of a JSON Lines file
    that is not a JSON value; for a whole-file ``.json`` document, the line of its first error. None when
    the file parses (``datasets`` then failed for another reason)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    if path.lower().endswith(".json"):
        try:
            json.loads(text)
            return None
        except json.JSONDecodeError as err:
            if not text.lstrip().startswith("{") or err.msg != "Extra data":  # not JSON Lines in a .json file
                lines = text.splitlines()
                line = lines[err.lineno - 1] if 0 < err.lineno <= len(lines) else ""
                return err.lineno, f"{err.msg}, column {err.colno}", line[:80]
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            json.loads(line)
        except json.JSONDecodeError as err:
            return number, f"{err.msg}, column {err.colno}", line[:80]
    return None


def load_source(path: str, subset: str | None = None, source_split: str | None = None) -> Any:
    """A ``datasets.Dataset`` from a local file or folder, or a hub id; ``source_split`` picks one of
    its splits (default: every split, concatenated in the source's order)."""
    import datasets

    ext = os.path.splitext(path)[1].lower()
    try:
        if os.path.isfile(path):
            if ext not in _BUILDERS:
                raise TaskError(f"cannot read {path!r}: unknown extension {ext!r}; valid: {', '.join(_BUILDERS)}")
            if os.path.getsize(path) == 0:
                raise TaskError(f"dataset {path!r} has no rows (the file is empty)")
            builder, extra = _BUILDERS[ext]
            source = datasets.load_dataset(builder, data_files=path, **extra)
        elif os.path.isdir(path) and (
            os.path.exists(os.path.join(path, "dataset_info.json")) or os.path.exists(os.path.join(path, "dataset_dict.json"))
        ):
            source = datasets.load_from_disk(path)
        elif ext in _BUILDERS or path.startswith((".", "/", "~")):
            raise TaskError(f"dataset file {path!r} does not exist")
        else:
            source = datasets.load_dataset(path, subset)
    except TaskError:
        raise
    except Exception as err:  # noqa: BLE001  datasets raises many types (offline hub, bad file)
        if os.path.isfile(path) and "corresponds to no data" in str(err):  # datasets' word for an empty file
            raise TaskError(f"dataset {path!r} has no rows") from err
        bad = _malformed_json_line(path) if os.path.isfile(path) and ext in (".jsonl", ".json") else None
        if bad is not None:
            raise TaskError(f"dataset {path!r}: line {bad[0]} is not valid JSON ({bad[1]}): {bad[2]!r}") from err
        raise TaskError(f"cannot load dataset {path!r} (subset {subset!r}): {type(err).__name__}: {err}") from err
    if isinstance(source, datasets.Dataset):
        source = datasets.DatasetDict({"train": source})
    if source_split is not None:
        if source_split not in source:
            raise TaskError(f"dataset {path!r} has no split {source_split!r}; valid: {', '.join(source)}")
        return source[source_split]
    return datasets.concatenate_datasets([source[s] for s in source]) if len(source) > 1 else next(iter(source.values()))


class DatasetFamily(TaskFamily):
    """Questions and gold answers read from a ``datasets`` source (see the module docstring).

    Args:
        path: local file (.jsonl/.json/.csv/.tsv/.parquet/.arrow), a ``save_to_disk`` folder, or a hub id.
        question_field: column holding the question text.
        answer_field: column holding the gold answer.
        answer_format: how to read the gold (:data:`ANSWER_FORMATS`).
        choices_field: column holding the choices (needed by ``answer_format="choice"``).
        name: family name (question ids and traces carry it); give each source its own.
        numeric: compare answers as numbers; None: from ``answer_format`` (number, gsm8k).
        source_split: which split of the source to read; None reads them all.
        subset: the source's configuration name (hub datasets with several).
        skip_malformed: skip rows whose answer cannot be read (logged) instead of raising.
        choice_index_base: 0 or 1, for gold answers given as an index into the choices.
    """

    def __init__(
        self,
        path: str,
        question_field: str = "question",
        answer_field: str = "answer",
        answer_format: str = "text",
        choices_field: str | None = None,
        name: str = "dataset",
        numeric: bool | None = None,
        source_split: str | None = None,
        subset: str | None = None,
        skip_malformed: bool = False,
        choice_index_base: int = 0,
        instruction: str = DEFAULT_INSTRUCTION,
        system_prompt: str | None = DEFAULT_SYSTEM,
        answer_trigger: str = DEFAULT_TRIGGER,
    ) -> None:
        if answer_format not in ANSWER_FORMATS:
            raise TaskError(f"unknown answer_format {answer_format!r}; valid: {', '.join(ANSWER_FORMATS)}")
        if answer_format == "choice" and not choices_field:
            raise TaskError("answer_format='choice' needs choices_field (the column holding the choices)")
        if choice_index_base not in (0, 1):
            raise TaskError(f"choice_index_base must be 0 or 1, got {choice_index_base}")
        kind = {"gsm8k": "number", "choice": "choice"}.get(answer_format, answer_format)
        if numeric is True and kind in ("text", "number"):
            kind = "number"
        elif numeric is False and kind == "number":
            kind = "text"
        elif numeric is not None and kind not in ("text", "number"):
            raise TaskError(f"numeric={numeric} does not apply to answer_format={answer_format!r}; leave it None")
        super().__init__(name, instruction, system_prompt, answer_trigger, kind)
        self.path = path
        self.question_field = question_field
        self.answer_field = answer_field
        self.answer_format = answer_format
        self.choices_field = choices_field
        self.choice_index_base = choice_index_base
        self.rows = self._read(load_source(path, subset, source_split), skip_malformed)

    def _read(self, source: Any, skip_malformed: bool) -> list[tuple[str, str, dict[str, Any]]]:
        columns = list(source.column_names)
        for role, field in (("question_field", self.question_field), ("answer_field", self.answer_field),
                            ("choices_field", self.choices_field)):
            if field is not None and field not in columns:
                raise TaskError(f"{role}={field!r} is not a column of {self.path!r}; columns: {', '.join(columns)}")
        if len(source) == 0:
            raise TaskError(f"dataset {self.path!r} has no rows")
        rows, skipped = [], 0
        for i, record in enumerate(source):
            try:
                rows.append(self._row(i, record))
            except DatasetFormatError as err:
                if not skip_malformed:
                    raise DatasetFormatError(
                        f"row {i} of {self.path!r} ({self.answer_field}={str(record[self.answer_field])[-80:]!r}): "
                        f"{err}; fix the row, choose another answer_format, or pass skip_malformed=True"
                    ) from err
                skipped += 1
        if skipped:
            log.warning("%s: skipped %d of %d rows whose answer could not be read", self.name, skipped, len(source))
        if not rows:
            raise TaskError(f"dataset {self.path!r}: every one of its {len(source)} rows was malformed")
        return rows

    def _row(self, i: int, record: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
        question, raw = record[self.question_field], record[self.answer_field]
        if question is None or not str(question).strip():
            raise DatasetFormatError("empty question")
        if raw is None or not str(raw).strip():
            raise DatasetFormatError("empty answer")
        text, meta = str(question).strip(), {"row": i}
        if self.answer_format == "gsm8k":
            gold = gsm8k_gold(str(raw))
            if self.numeric and answers.parse_number(gold) is None:
                raise DatasetFormatError(f"the answer after '####' is not a number: {gold!r}")
        elif self.answer_format == "choice":
            texts, labels = read_choices(record[self.choices_field])
            gold = choice_gold(raw, texts, labels, self.choice_index_base)
            text += "\n\n" + "\n".join(f"({LETTERS[j]}) {t}" for j, t in enumerate(texts))
            meta["choices"] = texts
        else:
            gold = str(raw).strip()
            if answers.canonical(gold, self.answer_kind) is None:
                raise DatasetFormatError(f"the answer {gold!r} cannot be read as {self.answer_kind!r}")
        return text, gold, meta

    def __len__(self) -> int:
        return len(self.rows)

    def _candidates(self, seed: int) -> Iterator[tuple[str, str, dict[str, Any]]]:
        order = list(range(len(self.rows)))
        random.Random(seed).shuffle(order)
        for i in order:
            yield self.rows[i]

    def choices_of(self, question: Question) -> list[str]:
        """The choices of a question: from its metadata, else read back from its text "(A) ..." lines."""
        if "choices" in question.metadata:
            return list(question.metadata["choices"])
        return [m.group(2) for m in _CHOICE_LINE.finditer(question.question)]

    def score(self, answer: str | None, question: Question) -> bool:
        if answer is None:
            return False
        if self.answer_kind != "choice":
            return super().score(answer, question)
        letter = answers.canonical(answer, "choice")
        if letter is None:  # the model wrote a choice's text
            norm = [answers.normalise(t) for t in self.choices_of(question)]
            a = answers.normalise(answer)
            letter = LETTERS[norm.index(a)] if a in norm else None
        return letter == question.gold


register_family("dataset", DatasetFamily)
