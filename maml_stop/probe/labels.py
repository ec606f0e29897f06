"""How a trace's final answer is read: one rule for the harvester, :mod:`maml_stop.harvest.rescore` and
the token accounting (:func:`cap_probe_index`).

A run that ends by itself answers with what its text states (``family.extract_answer``). A run that hits
the token cap answers, under ``cap_answer="forced"``, with the answer forced at the cap: what a
deployment with that cap returns, not a number picked out of a truncated text (issue 10). The probe at
the cap is the one with reason ``"cap"`` (corpus v2, ``probe_at_cap``) or, in a corpus harvested before
that reason existed, a scheduled probe whose position is the cap (the bundled corpora probe every 32
tokens up to the 256-token cap, so every capped trace has one: they were rescored with this rule).
Under ``cap_answer="text"`` the answer is read from the truncated text as before. Under the forced rule
full generation pays for that forced answer too (:mod:`maml_stop.data.accounting`).
"""

from __future__ import annotations

from typing import Sequence

CAP_ANSWERS = ("text", "forced")


def cap_probe_index(hit_cap: bool, probe_reasons: Sequence[str], probe_positions: Sequence[int] | None = None,
                    reasoning_tokens: int | None = None) -> int | None:
    """Index of the probe forced at the token cap of a capped trace (the last probe, when its reason is
    ``"cap"`` or its position is the cap), else None."""
    if not hit_cap or not len(probe_reasons):
        return None
    last = len(probe_reasons) - 1
    if probe_reasons[last] == "cap":
        return last
    if probe_positions is not None and reasoning_tokens is not None and int(probe_positions[last]) >= int(reasoning_tokens):
        return last
    return None


def final_answer(family, text: str, hit_cap: bool, probe_reasons: Sequence[str],
                 probe_answers: Sequence[str | None], cap_answer: str = "text",
                 probe_positions: Sequence[int] | None = None, reasoning_tokens: int | None = None) -> str | None:
    """The final answer of a trace (see module docstring); ``probe_answers`` as extracted."""
    if cap_answer not in CAP_ANSWERS:
        raise ValueError(f"unknown cap_answer {cap_answer!r}; valid: {', '.join(CAP_ANSWERS)}")
    if cap_answer == "forced" and hit_cap:
        i = cap_probe_index(hit_cap, probe_reasons, probe_positions, reasoning_tokens)
        if i is None:
            raise ValueError("a capped trace of a corpus with cap_answer='forced' lacks its cap probe "
                             "(a last probe with reason 'cap' or at the cap position)")
        return probe_answers[i] or None
    return family.extract_answer(text)
