"""The cascade live (issue 28 item 4): a small model that hands a question to a large one mid-request.

:class:`CascadeGenerator` holds both models. The small model generates under
:class:`~maml_stop.live.stopping.LiveStopping` in mode ``"free"`` whose predictor is the router's
**escalation score** ``1 - P(the small model's full run will be right)`` (:class:`Escalation`), read on
the free features of every probe point; a row whose score reaches ``tau`` stops there (the one first-hit
rule) and its question goes to the large model, which generates from the prompt in full. Rows that never
fire keep the small model's answer. This is the offline :class:`~maml_stop.decide.policies.cascade.EscalateAtProbe`
decision (tested equal on tiny models, ``tests/test_cascade.py``): same features, same probe, same
switch point.

Accounting: ``small_tokens`` of an escalated row is the small model's tokens at the switch
(``LiveStopping.stopped_at``: the offline ``positions[i]``). ``LiveStopping`` forces an answer at the
probe where a free-mode row stops; the cascade discards it, and its few tokens are left out of the
offline accounting (a live run spends them; a criterion that skips that answer would not).

>>> gen = CascadeGenerator(small, small_tok, large, large_tok, router, tau=0.6, feature_names=free,
...                        featurizer=feat, schedule=sched, family=family, max_new_tokens=256)   # doctest: +SKIP
>>> [r.model for r in gen.generate(prompts)]                                                   # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn
from transformers import StoppingCriteriaList

from maml_stop.live.stopping import LiveStopping

__all__ = ["Escalation", "CascadeResult", "CascadeGenerator"]


class Escalation(nn.Module):
    """The escalation score's logit: ``-router(batch)``, so ``sigmoid`` of it is ``1 - P(right)``."""

    def __init__(self, router: nn.Module) -> None:
        super().__init__()
        self.router = router

    def forward(self, batch) -> torch.Tensor:
        return -self.router(batch)


@dataclass(frozen=True)
class CascadeResult:
    """One request's outcome."""

    model: str  # "small" or "large": whose answer this is
    text: str  # the answering model's generated text
    answer: str | None  # extracted by the family
    small_tokens: int  # tokens the small model generated (to the switch, for an escalated row)
    large_tokens: int  # tokens the large model generated (0: not escalated)
    escalated_at: int | None  # small-model tokens at the switch (None: not escalated)


def _generated(ids: torch.Tensor, eos: set[int], pad: int | None) -> list[int]:
    """A row's generated tokens up to and including its first EOS (padding dropped)."""
    out = []
    for t in ids.tolist():
        if pad is not None and t == pad and t not in eos:
            break
        out.append(t)
        if t in eos:
            break
    return out


class CascadeGenerator:
    """Answer prompts with the small model, switching a row to the large model where the router fires."""

    def __init__(self, small: nn.Module, small_tokenizer, large: nn.Module, large_tokenizer, router: nn.Module,
                 tau: float, feature_names: Sequence[str], featurizer, schedule, family, max_new_tokens: int,
                 large_max_new_tokens: int | None = None, answer_trigger: str = "\nFinal answer:",
                 answer_max_tokens: int = 10) -> None:
        if not 0.0 <= tau <= 1.0:
            raise ValueError(f"tau is an escalation probability in [0, 1]; got {tau}")
        self.small, self.small_tokenizer, self.large, self.large_tokenizer = small, small_tokenizer, large, large_tokenizer
        self.family, self.tau = family, tau
        self.max_new_tokens = max_new_tokens
        self.large_max_new_tokens = large_max_new_tokens or max_new_tokens
        self.criterion = LiveStopping(small, small_tokenizer, Escalation(router), tau, None, list(feature_names),
                                      featurizer, schedule, answer_trigger=answer_trigger, family=family, mode="free",
                                      answer_max_tokens=answer_max_tokens, max_new_tokens=max_new_tokens)

    def close(self) -> None:
        """Remove the criterion's hooks from the small model."""
        self.criterion.remove_hooks()

    def _run(self, model, tok, prompts: Sequence[str], max_new: int, criteria=None) -> tuple[list[list[int]], int]:
        tok.padding_side = "left"
        enc = tok(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new, do_sample=False, pad_token_id=tok.pad_token_id,
                                 stopping_criteria=criteria)
        eos = {int(model.generation_config.eos_token_id)} if isinstance(model.generation_config.eos_token_id, int) \
            else set(model.generation_config.eos_token_id or [])
        n = enc["input_ids"].shape[1]
        return [_generated(row[n:], eos, tok.pad_token_id) for row in out], n

    def generate(self, prompts: Sequence[str]) -> list[CascadeResult]:
        """One batch: the small model with the router's switch, then the escalated rows on the large model."""
        rows, _ = self._run(self.small, self.small_tokenizer, prompts, self.max_new_tokens,
                            StoppingCriteriaList([self.criterion]))
        switched = list(self.criterion.stopped_at)
        up = [i for i, s in enumerate(switched) if s is not None]
        large_rows = dict(zip(up, self._run(self.large, self.large_tokenizer, [prompts[i] for i in up],
                                            self.large_max_new_tokens)[0])) if up else {}
        results = []
        for i, ids in enumerate(rows):
            if i in large_rows:
                text = self.large_tokenizer.decode(large_rows[i], skip_special_tokens=True)
                results.append(CascadeResult("large", text, self.family.extract_answer(text), int(switched[i]),
                                             len(large_rows[i]), int(switched[i])))
            else:
                text = self.small_tokenizer.decode(ids, skip_special_tokens=True)
                results.append(CascadeResult("small", text, self.family.extract_answer(text), len(ids), 0, None))
        return results
