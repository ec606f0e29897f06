"""What the harvester and live stopping share at a probe point (issue 10, one probe engine):
:func:`force_answers`, the one forced-answer loop on a copy of the KV cache (:func:`sub_cache`);
:func:`probe_reason` with a :class:`RowSchedule` per row, the one schedule decision (start and cap probes
included); :func:`unforced_features` / :func:`forced_features`, a probe point's features when only some
probe points force an answer (the live ``free`` and ``gated`` modes); :func:`eos_ids`,
:func:`encode_trigger`, :func:`answer_end_test`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from typing import Callable, Sequence

import numpy as np
import torch
from transformers.cache_utils import DynamicCache

from maml_stop.probe.features import FeatureState, ProbeFeaturizer, answer_key, feature_cost
from maml_stop.probe.schedule import ProbeSchedule

log = logging.getLogger(__name__)


def eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(model, "generation_config", None), tokenizer):
        value = getattr(src, "eos_token_id", None) if src is not None else None
        if value is None:
            continue
        ids.update([value] if isinstance(value, int) else list(value))
    if not ids:
        raise ValueError("neither the model's generation config nor the tokenizer defines an EOS token")
    return ids


def encode_trigger(tokenizer, trigger: str) -> tuple[list[int], bool]:
    """Token ids of the answer trigger and whether they decode back to exactly the trigger.

    A tokenizer may split a trigger oddly (e.g. merge its leading newline differently than it would in
    running text); the ids are used as they are, and the round-trip flag is recorded in the corpus
    metadata so that such corpora can be recognised."""
    ids = tokenizer(trigger, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"the answer trigger {trigger!r} tokenizes to no tokens")
    roundtrip = tokenizer.decode(ids) == trigger
    if not roundtrip:
        log.warning("answer trigger %r does not round-trip through the tokenizer (decodes to %r)", trigger,
                    tokenizer.decode(ids))
    return ids, roundtrip


def sub_cache(cache: DynamicCache, index: torch.Tensor) -> DynamicCache:
    """A copy of the cache rows ``index`` (the main cache is untouched)."""
    return DynamicCache(ddp_cache_data=[(layer.keys[index], layer.values[index]) for layer in cache.layers])


_sub_cache = sub_cache  # the old private name


def answer_end_test(tokenizer, eos: set[int]) -> Callable[[int], bool]:
    """``is_answer_end(token)`` for :func:`force_answers`: the token is an EOS token or its text holds a
    newline (decoded texts are cached)."""
    texts: dict[int, bool] = {}

    def is_answer_end(token: int) -> bool:
        done = texts.get(token)
        if done is None:
            done = texts[token] = token in eos or "\n" in tokenizer.decode([token])
        return done

    return is_answer_end


def _next_logits(model, input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                past_key_values=cache, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1, :].float()  # (b, V)


def force_answers(
    model,
    cache: DynamicCache,
    mask: torch.Tensor,
    next_pos: torch.Tensor,
    trigger_ids: Sequence[int],
    answer_max_tokens: int,
    is_answer_end: Callable[[int], bool],
) -> tuple[list[list[int]], list[list[float]]]:
    """The one forced-answer loop (harvester and live stopping): feed ``trigger_ids`` to every row of
    ``cache`` (a copy: it is extended in place), then decode greedily until a row's token ends its
    answer (``is_answer_end``: EOS or a newline) or ``answer_max_tokens`` tokens.

    cache: b rows; mask: (b, L) attention mask of the cached tokens (L may be 0 for an empty cache);
    next_pos: (b,) position id of the next token of each row. Returns per row the answer token ids
    (including the token that ended it) and the log-prob of each."""
    b, T = mask.shape[0], len(trigger_ids)
    trig = torch.tensor(list(trigger_ids), device=mask.device).expand(b, T)
    mask = torch.cat([mask, mask.new_ones(b, T)], dim=1)
    logits = _next_logits(model, trig, mask, next_pos[:, None] + torch.arange(T, device=mask.device), cache)
    next_pos = next_pos + T
    ids: list[list[int]] = [[] for _ in range(b)]
    lps: list[list[float]] = [[] for _ in range(b)]
    open_rows = [True] * b
    for step in range(answer_max_tokens):
        logp = torch.log_softmax(logits, dim=-1)
        tok = logp.argmax(-1)  # (b,)
        chosen = logp.gather(1, tok[:, None]).squeeze(1)
        for r in range(b):
            if open_rows[r]:
                t = int(tok[r])
                ids[r].append(t)
                lps[r].append(float(chosen[r]))
                if is_answer_end(t):
                    open_rows[r] = False
        if not any(open_rows) or step == answer_max_tokens - 1:
            break
        mask = torch.cat([mask, mask.new_ones(b, 1)], dim=1)
        logits = _next_logits(model, tok[:, None], mask, next_pos[:, None], cache)
        next_pos = next_pos + 1
    return ids, lps


@dataclass
class RowSchedule:
    """What :func:`probe_reason` keeps per row between its calls."""

    pending: str | None = None  # boundary/cue seen since the row's last probe
    last_probe: int | None = None  # position of the row's last probe
    scheduled: int = 0  # probes that count towards ``max_probes`` (all but the start probe)
    ended: bool = False  # the row generated ``schedule.until`` (e.g. closed its think block): no more probes


def probe_reason(schedule: ProbeSchedule, row: RowSchedule, n_generated: int, recent: Sequence[str],
                 at_cap: bool = False) -> str | None:
    """The one schedule decision (harvester and live stopping): the reason the row probes after
    ``n_generated`` tokens, or None; a probe updates ``row``.

    ``recent``: texts of the row's last (up to 4) generated tokens (the newest last; a cue may span
    tokens); ``at_cap``: the row is still running at the token cap. Position 0 is the start probe
    (``schedule.at_start``: an answer with no reasoning); at the cap, a ``schedule.at_cap`` probe
    replaces whatever else would have fired there (every_n often divides the cap). Start and cap
    probes stand outside ``min_gap`` and ``max_probes``. Once the row's recent tokens contain
    ``schedule.until`` (think mode: ``"</think>"``) only the cap probe fires."""
    if n_generated == 0:
        reason = "start" if schedule.at_start else None
    else:
        tail = "".join(recent)
        row.ended = row.ended or (schedule.until is not None and schedule.until in tail)
        row.pending = schedule.event(recent[-1], tail) or row.pending
        reason = None if row.ended else schedule.due(n_generated, row.pending, row.last_probe, row.scheduled)
        if at_cap and schedule.at_cap:
            reason = "cap"
    if reason:
        row.pending, row.last_probe = None, n_generated
        row.scheduled += reason != "start"
    return reason


# -- features of probe points that may not force an answer (live free/gated modes) -----------------
def _row_window(state: FeatureState, row: int) -> FeatureState:
    """A one-row copy of ``state`` (its window since the last probe and its answers so far)."""
    out = {}
    for f in fields(state):
        value = getattr(state, f.name)
        if isinstance(value, torch.Tensor):
            out[f.name] = value[row:row + 1].clone()
        elif isinstance(value, list):
            out[f.name] = [list(value[row])]
        else:
            out[f.name] = value
    return FeatureState(**out)


def unforced_features(featurizer: ProbeFeaturizer, state: FeatureState, row: int, n_generated: int,
                      probe_index: int) -> tuple[np.ndarray, FeatureState]:
    """Features of a probe point before (or without) its forced answer: the free features as the
    harvester computes them, the paid ones NaN (unknown); ``probe_index`` counts every probe point of
    the row. The row's window restarts, as at any probe. Returns the vector and a one-row copy of the
    window for :func:`forced_features`, should the answer be forced after all."""
    window = _row_window(state, row)
    vec = featurizer.probe_features(state, row, None, [], n_generated)
    state.answers[row].pop()  # no answer was forced here: the stability features skip this probe point
    paid = [i for i, name in enumerate(featurizer.feature_names) if feature_cost(name) == "paid"]
    vec[paid] = np.nan
    vec[featurizer.feature_names.index("probe_index")] = probe_index
    return vec, window


def forced_features(featurizer: ProbeFeaturizer, state: FeatureState, row: int, window: FeatureState,
                    answer: str | None, logprobs: list[float], n_generated: int, probe_index: int) -> np.ndarray:
    """The full features of a probe point whose answer was forced after :func:`unforced_features`
    (``window`` is what that returned): the free features as before, the answer's confidence, and
    answer stability over the row's **forced answers only** (the answer is added to them)."""
    vec = featurizer.probe_features(window, 0, answer, logprobs, n_generated)
    vec[featurizer.feature_names.index("probe_index")] = probe_index
    state.answers[row].append(answer_key(answer))
    return vec
