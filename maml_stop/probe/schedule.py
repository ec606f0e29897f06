"""Probe schedules: where along a generation the harvester (or live stopping) forces an answer.

A probe point is the moment after ``n`` generated tokens, before token ``n + 1`` is chosen. A schedule
fires on any combination of:

* ``every_n``: every N generated tokens (N, 2N, ...);
* ``boundary``: right after a step boundary, a generated token whose text contains a newline (or, with
  ``sentence_boundaries``, ends a sentence);
* ``cue``: right after a cue word such as "Wait" or "Alternatively" (the cue is already generated, so
  there is no look-ahead).

``min_gap`` keeps probes at least that many tokens apart (the every-N probes too), and ``max_probes``
caps probes per trace. Two probes stand outside gap and cap: ``at_start`` forces an answer before any
reasoning (position 0: the answer with no chain of thought; its hidden-state summary is the prompt's
last token, a free summary of the question), and ``at_cap`` forces one at the token cap of a trace that
reaches it (what a deployment with that cap returns: the full run's answer of a capped trace). A schedule only sees what is known at that moment (tokens so far).
``until`` ends a row's probing once its generated text contains that string (think mode: ``"</think>"``,
:mod:`maml_stop.probe.think`: no probe after the model closed its think block; the cap probe still runs).

``align`` makes probes batch-friendly: a boundary or cue seen since the row's last probe makes the row
due at the next multiple of ``align`` generated tokens, so the rows of a batch probe together instead of
each at its own step (a probe event costs a few forward passes whatever the number of rows in it).
The probe point then lies up to ``align - 1`` tokens after the boundary: still no look-ahead, and a row's
probe points do not depend on the other rows of its batch. ``align=1`` probes at the boundary itself.

>>> s = ProbeSchedule(every_n=4, max_probes=2)
>>> [n for n in range(1, 13) if s.reason(n, "x")]
[4, 8, 12]
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

DEFAULT_CUES = ("Wait", "Alternatively", "Hmm", "However", "Let me check", "Double-check")
_SENTENCE_END = re.compile(r"[.!?]\s*$")


@dataclass(frozen=True)
class ProbeSchedule:
    every_n: int | None = 32  # probe every N generated tokens (None: off)
    boundary: bool = False  # probe after a token containing a newline
    sentence_boundaries: bool = False  # with boundary: also after a token that ends a sentence
    cues: tuple[str, ...] = ()  # probe right after one of these words is generated
    min_gap: int = 1  # at least this many tokens between two probes of a trace
    max_probes: int = 16  # cap on probes per trace
    first_at: int = 1  # no probe before this many generated tokens
    align: int = 1  # boundary/cue probes wait for the next multiple of this many tokens (see above)
    at_start: bool = False  # also probe at position 0, before any reasoning (reason "start")
    at_cap: bool = False  # also probe a trace that reaches the token cap, at the cap (reason "cap")
    until: str | None = None  # no probe (but the cap probe) once a row's last tokens contain this text

    def __post_init__(self) -> None:
        if self.every_n is not None and self.every_n < 1:
            raise ValueError(f"every_n must be >= 1 or None, got {self.every_n}")
        if self.max_probes < 0 or self.min_gap < 1 or self.first_at < 0 or self.align < 1:
            raise ValueError("max_probes must be >= 0, min_gap >= 1, first_at >= 0 and align >= 1")
        if self.until is not None and not self.until:
            raise ValueError("until must be a non-empty string (e.g. '</think>') or None")
        if self.every_n is None and not self.boundary and not self.cues:
            raise ValueError("the probe schedule never fires: set every_n, boundary or cues")
        object.__setattr__(self, "cues", tuple(self.cues))

    def check_fires_within(self, max_new_tokens: int) -> None:
        """Raise when no probe can fire before the token cap (a harvest would record nothing)."""
        if self.max_probes == 0:
            raise ValueError("max_probes is 0: the probe schedule never fires")
        reachable = self.boundary or bool(self.cues) or (self.every_n is not None and self.every_n <= max_new_tokens)
        if not reachable or self.first_at > max_new_tokens:
            raise ValueError(
                f"the probe schedule never fires within max_new_tokens={max_new_tokens} "
                f"(every_n={self.every_n}, first_at={self.first_at}, boundary={self.boundary}, cues={self.cues})"
            )

    def event(self, last_token: str, tail: str = "") -> str | None:
        """A boundary or cue that the last generated token completes (``last_token`` is its text,
        ``tail`` the text of the last few tokens, for cue words that span tokens), or None."""
        if self.boundary:
            if "\n" in last_token:
                return "boundary"
            if self.sentence_boundaries and _SENTENCE_END.search(last_token):
                return "boundary"
        if self.cues and last_token.strip(" ,:"):  # the last token is part of a word, not punctuation after it
            text = (tail or last_token).rstrip(" ,:")
            if any(text.endswith(cue) for cue in self.cues):
                return "cue"
        return None

    def due(self, n_generated: int, pending: str | None = None, last_probe: int | None = None,
            n_probes: int = 0) -> str | None:
        """The reason a probe fires after ``n_generated`` tokens, or None. ``pending`` is the event
        (boundary/cue) seen since the row's last probe, if any; gap, cap and alignment apply."""
        if n_generated < max(self.first_at, 1) or n_probes >= self.max_probes:
            return None
        if last_probe is not None and n_generated - last_probe < self.min_gap:
            return None
        if self.every_n is not None and n_generated % self.every_n == 0:
            return "every_n"
        if pending and n_generated % self.align == 0:
            return pending
        return None

    def reason(self, n_generated: int, last_token: str, tail: str = "") -> str | None:
        """:meth:`due` for a row whose only event is the one its last token completes (no gap or cap)."""
        return self.due(n_generated, self.event(last_token, tail))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["cues"] = list(self.cues)
        for key in ("at_start", "at_cap", "until"):  # absent = off: corpora written before these still match
            if not d[key]:
                del d[key]
        return d
