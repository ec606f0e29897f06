"""Reasoning models that think inside ``<think> ... </think>`` (DeepSeek-R1 distills, Qwen3): the one
home of think mode for the harvester and live stopping.

In think mode (``reasoning_format="think"``) the prompt opens the think block
(:meth:`tasks.base.TaskFamily.render_prompt`), the answer trigger first closes it
(:func:`tasks.base.think_trigger`: ``"\\n</think>\\n\\nFinal answer:"``), and the probe schedule stops
once the model has closed the block itself (:func:`think_schedule`: the decision "stop thinking here"
is taken while it thinks; the cap probe still runs). A generation's tokens split into **think tokens**
(up to and including the token that completes ``</think>``; all of them when the block never closes)
and **answer tokens** after it (:func:`count_think_tokens`); the two add up to the generated tokens.

>>> check_think_trigger("\\nFinal answer:")  # doctest: +IGNORE_EXCEPTION_DETAIL
Traceback (most recent call last):
ValueError: reasoning_format='think' needs an answer trigger that closes the think block ...
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

from tasks.answers import THINK_CLOSE
from tasks.base import check_reasoning_format, think_trigger

__all__ = ["ThinkCount", "count_think_tokens", "check_think_trigger", "think_schedule", "THINK_CLOSE"]


@dataclass(frozen=True)
class ThinkCount:
    think_tokens: int  # generated tokens inside the think block (the one completing </think> included)
    after_think_tokens: int  # generated tokens after </think> (0 when the block never closed)
    closed: bool  # the model closed its think block itself

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_think_trigger(answer_trigger: str) -> str:
    """Raise unless ``answer_trigger`` closes the think block (a forced answer must leave the thinking)."""
    if THINK_CLOSE not in answer_trigger:
        raise ValueError(f"reasoning_format='think' needs an answer trigger that closes the think block "
                         f"(contains {THINK_CLOSE!r}), e.g. {think_trigger()!r}; got {answer_trigger!r}")
    return answer_trigger


def think_schedule(schedule, reasoning_format: str):
    """``schedule`` as think mode runs it (``until="</think>"``: no probe once the model closed the block;
    the cap probe still runs), or unchanged in plain mode."""
    if check_reasoning_format(reasoning_format) == "plain" or schedule.until == THINK_CLOSE:
        return schedule
    return dataclasses.replace(schedule, until=THINK_CLOSE)


def count_think_tokens(tokenizer, ids: Sequence[int], close: str = THINK_CLOSE) -> ThinkCount:
    """Split the generated token ids ``ids`` of a think-mode generation (its prompt opened the block) at
    the token that completes the first ``close``: think tokens up to it (included), answer tokens after.

    ``close`` is usually one added token (Qwen3, R1 distills: found by id); otherwise the prefix whose
    text first contains it is found by bisection on decoded prefixes (special tokens kept)."""
    ids = list(ids)
    n = len(ids)
    single = tokenizer(close, add_special_tokens=False)["input_ids"]
    if len(single) == 1:
        k = next((i + 1 for i, t in enumerate(ids) if t == single[0]), None)
        if k is not None:
            return ThinkCount(k, n - k, True)

    def has(k: int) -> bool:
        return close in tokenizer.decode(ids[:k], skip_special_tokens=False)

    if not has(n):
        return ThinkCount(n, 0, False)
    lo, hi = 1, n  # smallest k with has(k)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if has(mid) else (mid + 1, hi)
    return ThinkCount(lo, n - lo, True)
