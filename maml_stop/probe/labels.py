"""How a trace's final answer is read: one rule for the harvester and :mod:`maml_stop.harvest.rescore`.

A run that ends by itself answers with what its text states (``family.extract_answer``). A run that hits
the token cap answers, under ``cap_answer="forced"`` (corpus v2, ``probe_at_cap``), with the answer
forced at the cap: what a deployment with that cap returns, not a number picked out of a truncated text
(issue 10). Under ``cap_answer="text"`` (corpora harvested before the cap probe existed) it is read from
the truncated text as before.
"""

from __future__ import annotations

from typing import Sequence

CAP_ANSWERS = ("text", "forced")


def final_answer(family, text: str, hit_cap: bool, probe_reasons: Sequence[str],
                 probe_answers: Sequence[str | None], cap_answer: str = "text") -> str | None:
    """The final answer of a trace (see module docstring); ``probe_answers`` as extracted."""
    if cap_answer not in CAP_ANSWERS:
        raise ValueError(f"unknown cap_answer {cap_answer!r}; valid: {', '.join(CAP_ANSWERS)}")
    if cap_answer == "forced" and hit_cap:
        if not probe_reasons or probe_reasons[-1] != "cap":
            raise ValueError("a capped trace of a corpus with cap_answer='forced' lacks its cap probe")
        return probe_answers[-1] or None
    return family.extract_answer(text)
