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
import inspect
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
# how the model reasons: "plain" (in the open), "think" (inside <think> ... </think>, e.g. DeepSeek-R1
# distills, Qwen3): the prompt opens the think block and the forced answer first closes it
REASONING_FORMATS = ("plain", "think")


def check_reasoning_format(reasoning_format: str) -> str:
    if reasoning_format not in REASONING_FORMATS:
        raise TaskError(f"unknown reasoning_format {reasoning_format!r}; valid: {', '.join(REASONING_FORMATS)}")
    return reasoning_format


def think_trigger(trigger: str = DEFAULT_TRIGGER) -> str:
    """The answer trigger of think mode: close the think block, then ``trigger``.

    >>> think_trigger()
    '\\n</think>\\n\\nFinal answer:'
    """
    return "\n" + answers.THINK_CLOSE + "\n\n" + trigger.lstrip("\n")


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


def check_name(name: str) -> str:
    """A family name, checked: it names the corpus folder ``shards/<name>/`` and opens every question id
    ``"<name>/<hash>"`` (trace ids add ``"#<sample>"``), so it must be one path part without ``#``."""
    if not isinstance(name, str) or not name.strip() or name != name.strip() or name.startswith(".") \
            or any(c in name for c in "/\\#"):
        raise TaskError(f"family name {name!r} cannot name a shard folder and question ids: use a non-blank name "
                        "without '/', '\\', '#', surrounding spaces or a leading '.' (e.g. 'gsm8k_test')")
    return name


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise TaskError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")


class TaskError(ValueError):
    """A task family asked for something it cannot give (unknown family or split, too few questions,
    a missing field, an empty source). The message names the valid choices."""


class TaskFamily(ABC):
    """A source of questions with gold answers and an answer checker (see module docstring).

    ``answer_kind`` (one of :data:`tasks.answers.ANSWER_KINDS`) says how answers are extracted and
    compared; ``numeric`` is ``answer_kind == "number"`` (EM accepts numerically equal answers).
    """

    name: str
    answer_trigger: str = DEFAULT_TRIGGER
    answer_kind: str = "text"
    # a stream of candidates that yields this many already-seen question texts in a row is exhausted
    max_duplicate_run: int = 2000

    def __init__(
        self,
        name: str,
        instruction: str = DEFAULT_INSTRUCTION,
        system_prompt: str | None = DEFAULT_SYSTEM,
        answer_trigger: str = DEFAULT_TRIGGER,
        answer_kind: str | None = None,
    ) -> None:
        if "{question}" not in instruction:
            raise TaskError(f"instruction must contain the placeholder '{{question}}', got {instruction!r}")
        if not answer_trigger.strip():
            raise TaskError("answer_trigger must not be blank (e.g. '\\nFinal answer:')")
        check_name(name)
        self.name = name
        self.instruction = instruction
        self.system_prompt = system_prompt
        self.answer_trigger = answer_trigger
        if answer_kind is not None:
            self.answer_kind = answers.check_kind(answer_kind)

    @property
    def numeric(self) -> bool:
        """Answers are numbers: EM also accepts numerically equal answers ("1,234.50" == "1234.5")."""
        return self.answer_kind == "number"

    # -- questions -------------------------------------------------------------------------------
    @abstractmethod
    def _candidates(self, seed: int) -> Iterator[tuple[str, str, dict[str, Any]]]:
        """Yield (question text, gold answer, metadata) in a seed-determined order, possibly endless."""

    def questions(self, split: str, n: int, seed: int = 0) -> list[Question]:
        """``n`` distinct questions of ``split``, deterministic in ``seed``.

        Raises :class:`TaskError` (a ``ValueError``) when the family cannot supply ``n`` questions for
        that split.
        """
        check_split(split)
        if n < 0:
            raise TaskError(f"n must be >= 0, got {n}")
        out: list[Question] = []
        seen: set[str] = set()
        run = 0  # already-seen texts in a row: a finite generator repeats itself once exhausted
        for text, gold, meta in self._candidates(seed):
            if len(out) >= n:
                break
            if text in seen:
                run += 1
                if run >= self.max_duplicate_run:
                    break
                continue
            run = 0
            seen.add(text)
            if split_of(text) == split:
                out.append(Question(question_id(self.name, text), self.name, split, text, gold, meta))
        if len(out) < n:
            raise TaskError(
                f"family {self.name!r} has only {len(out)} distinct {split} questions, {n} were asked for; "
                f"ask for at most {len(out)} or widen the family's configuration"
            )
        return out

    # -- prompts ---------------------------------------------------------------------------------
    def user_message(self, question: Question) -> str:
        return self.instruction.format(question=question.question)

    def render_prompt(self, question: Question, tokenizer: Any = None, reasoning_format: str = "plain") -> str:
        """The prompt text; the tokenizer's chat template is used when it has one.

        ``reasoning_format="think"``: the prompt ends inside an open think block (``<think>\\n``): kept
        when the chat template opens it already (DeepSeek-R1 distills), appended otherwise (Qwen3), so
        that every generated token up to ``</think>`` is thinking."""
        check_reasoning_format(reasoning_format)
        user = self.user_message(question)
        if tokenizer is not None and getattr(tokenizer, "chat_template", None):
            messages = []
            if self.system_prompt:
                messages.append({"role": "system", "content": self.system_prompt})
            messages.append({"role": "user", "content": user})
            prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            head = f"{self.system_prompt}\n\n" if self.system_prompt else ""
            prompt = f"{head}Question: {user}\nAnswer: "
        if reasoning_format == "think" and not prompt.rstrip().endswith(answers.THINK_OPEN):
            prompt += f"{answers.THINK_OPEN}\n"
        return prompt

    # -- answers ---------------------------------------------------------------------------------
    def extract_answer(self, text: str) -> str | None:
        """The answer stated in a full generation, or None when it states none."""
        return answers.extract_final(text, kind=self.answer_kind)

    def extract_probe_answer(self, text: str) -> str | None:
        """The answer in the short continuation that follows :attr:`answer_trigger` (its first line).

        ``text`` is the forced continuation alone: nothing generated after the probe point is seen.
        """
        return answers.extract_probe(text, kind=self.answer_kind)

    def canonical_answer(self, answer: str | None) -> object | None:
        """A comparable form of an extracted answer (e.g. for answer stability across probes)."""
        return None if answer is None else answers.canonical(answer, self.answer_kind)

    def score(self, answer: str | None, question: Question) -> bool:
        """Exact match of an extracted answer against the question's gold answer."""
        if answer is None:
            return False
        return answers.exact_match(answer, question.gold, kind=self.answer_kind)


# -- registry --------------------------------------------------------------------------------------
_REGISTRY: dict[str, Callable[..., TaskFamily]] = {}


def register_family(name: str, factory: Callable[..., TaskFamily]) -> None:
    """Register ``factory`` (a class or a function returning a family) under ``name``."""
    if name in _REGISTRY:
        raise TaskError(f"family {name!r} is already registered")
    _REGISTRY[name] = factory


def list_families() -> list[str]:
    return sorted(_REGISTRY)


def get_family(name: str, /, **kwargs: Any) -> TaskFamily:
    """A family by registry name; keyword arguments go to its constructor."""
    if name not in _REGISTRY:
        raise TaskError(f"unknown task family {name!r}; valid families: {', '.join(sorted(_REGISTRY))}")
    factory = _REGISTRY[name]
    params = inspect.signature(factory).parameters
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as err:
        required = [p for p, v in params.items() if v.default is inspect.Parameter.empty]
        raise TaskError(
            f"family {name!r}: {err}; required: {', '.join(required) or 'nothing'}; "
            f"accepted: {', '.join(params)}"
        ) from None
    return factory(**kwargs)
