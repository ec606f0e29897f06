"""The common interface of task families, and the registry.

A **task family** is a source of questions with gold answers and an answer checker. Every family:

* draws questions for a split (``train``/``validation``/``test``) deterministically from a seed; the
  three question pools never overlap (a question's split is a hash of its text, so no question text can
  land in two splits, whatever the seed);
* renders the prompt (through the tokenizer's chat template when it has one);
* extracts an answer from generated text (:meth:`TaskFamily.extract_answer`, for a full generation, and
  :meth:`TaskFamily.extract_probe_answer`, for the short continuation after the answer trigger);
* scores exact match (:meth:`TaskFamily.score`), normalised string match, numeric match for numbers.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

from tasks import answers

SPLITS = ("train", "validation", "test")
# fraction of the question pool in each split, by hash of the question text
_SPLIT_EDGES = {"train": (0.0, 0.7), "validation": (0.7, 0.8), "test": (0.8, 1.0)}

DEFAULT_SYSTEM = "You are a helpful assistant."
DEFAULT_INSTRUCTION = (
    "{question}\n\nThink step by step, briefly. Then give the answer on a last line of the form "
    "'Final answer: <answer>'."
)
DEFAULT_TRIGGER = "\nFinal answer:"


@dataclass(frozen=True)
class Question:
    """One question of a family with its gold answer."""

    id: str  # stable within the family: "<family>/<sha1 of question text>[:12]"
    family: str
    split: str
    question: str
    gold: str
    metadata: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


def split_of(text: str) -> str:
    """The split a question text belongs to (deterministic, independent of any seed)."""
    h = int(hashlib.sha1(text.encode("utf-8")).hexdigest()[:8], 16) / 0xFFFFFFFF
    for name, (lo, hi) in _SPLIT_EDGES.items():
        if lo <= h < hi or (hi == 1.0 and h == 1.0):
            return name
    raise AssertionError(h)  # pragma: no cover


def question_id(family: str, text: str) -> str:
    return f"{family}/{hashlib.sha1(text.encode('utf-8')).hexdigest()[:12]}"


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")


class TaskFamily(ABC):
    """A source of questions with gold answers and an answer checker (see module docstring)."""

    name: str
    answer_trigger: str = DEFAULT_TRIGGER
    numeric: bool = False  # answers are numbers: EM also accepts numerically equal answers

    def __init__(
        self,
        name: str,
        instruction: str = DEFAULT_INSTRUCTION,
        system_prompt: str | None = DEFAULT_SYSTEM,
        answer_trigger: str = DEFAULT_TRIGGER,
    ) -> None:
        if "{question}" not in instruction:
            raise ValueError("instruction must contain the placeholder '{question}'")
        self.name = name
        self.instruction = instruction
        self.system_prompt = system_prompt
        self.answer_trigger = answer_trigger

    # -- questions -------------------------------------------------------------------------------
    @abstractmethod
    def _candidates(self, seed: int) -> Iterator[tuple[str, str, dict[str, Any]]]:
        """Yield (question text, gold answer, metadata) in a seed-determined order, possibly endless."""

    def questions(self, split: str, n: int, seed: int = 0) -> list[Question]:
        """``n`` distinct questions of ``split``, deterministic in ``seed``.

        Raises ``ValueError`` when the family cannot supply ``n`` questions for that split.
        """
        check_split(split)
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        out: list[Question] = []
        seen: set[str] = set()
        for text, gold, meta in self._candidates(seed):
            if len(out) >= n:
                break
            if text in seen or split_of(text) != split:
                continue
            seen.add(text)
            out.append(Question(question_id(self.name, text), self.name, split, text, gold, meta))
        if len(out) < n:
            raise ValueError(
                f"family {self.name!r} has only {len(out)} distinct {split} questions, {n} were asked for"
            )
        return out

    # -- prompts ---------------------------------------------------------------------------------
    def user_message(self, question: Question) -> str:
        return self.instruction.format(question=question.question)

    def render_prompt(self, question: Question, tokenizer: Any = None) -> str:
        """The prompt text; the tokenizer's chat template is used when it has one."""
        user = self.user_message(question)
        if tokenizer is not None and getattr(tokenizer, "chat_template", None):
            messages = []
            if self.system_prompt:
                messages.append({"role": "system", "content": self.system_prompt})
            messages.append({"role": "user", "content": user})
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        head = f"{self.system_prompt}\n\n" if self.system_prompt else ""
        return f"{head}Question: {user}\nAnswer: "

    # -- answers ---------------------------------------------------------------------------------
    def extract_answer(self, text: str) -> str | None:
        """The answer stated in a full generation, or None when it states none."""
        return answers.extract_final(text, numeric=self.numeric)

    def extract_probe_answer(self, text: str) -> str | None:
        """The answer in the short continuation that follows :attr:`answer_trigger`."""
        return answers.extract_probe(text, numeric=self.numeric)

    def score(self, answer: str | None, question: Question) -> bool:
        """Exact match of an extracted answer against the question's gold answer."""
        if answer is None:
            return False
        return answers.exact_match(answer, question.gold, numeric=self.numeric)


# -- registry --------------------------------------------------------------------------------------
_REGISTRY: dict[str, Callable[..., TaskFamily]] = {}


def register_family(name: str, factory: Callable[..., TaskFamily]) -> None:
    if name in _REGISTRY:
        raise ValueError(f"family {name!r} is already registered")
    _REGISTRY[name] = factory


def _ensure_loaded() -> None:
    # importing the modules registers their families
    from tasks import dataset_family, reasoning_gym_families  # noqa: F401


def list_families() -> list[str]:
    _ensure_loaded()
    return sorted(_REGISTRY)


def get_family(name: str, **kwargs: Any) -> TaskFamily:
    """A family by registry name; keyword arguments go to its constructor."""
    _ensure_loaded()
    if name not in _REGISTRY:
        raise ValueError(f"unknown task family {name!r}; valid families: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](**kwargs)


def get_families(names: Sequence[str]) -> list[TaskFamily]:
    return [get_family(n) for n in names]
