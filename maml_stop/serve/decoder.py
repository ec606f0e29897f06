"""Continuous batching: one greedy decode loop whose rows join and leave while it runs (issue 27).

HF ``generate()`` runs a fixed batch to its end, so a request that arrives while a batch runs waits for
all of it. :class:`Decoder` holds the *active* rows and their KV cache instead: :meth:`Decoder.add` runs
the prefill of new rows and merges their cache into the running one (left-padded to a common length; the
attention mask hides the padding and position ids count real tokens, as ``generate`` does), and
:meth:`Decoder.step` runs **one forward for every active row**, probes the rows whose schedule is due,
drops the rows that stopped, emitted EOS or reached the token cap (each reported at once through
``done``) and trims padding columns no row needs any more.

A row with a :class:`LiveSpec` takes the live stopping decision of
:class:`~maml_stop.live.stopping.LiveStopping` from the same parts: the featurizer observes the hidden
state and next-token entropy of every forward of the row (prompt's last token, then each generated token),
:func:`~maml_stop.probe.forcing.probe_reason` decides when it probes (start and cap probes included),
:func:`~maml_stop.probe.forcing.force_answers` forces the answer on a copy of its cache,
:class:`~maml_stop.live.rule.StopRule` (the first-hit rule of :mod:`maml_stop.decide.rule`) decides at the
row's own tau, in mode ``every`` or ``free``. One difference in how, none in what: ``LiveStopping``
sees a token chosen by ``generate`` before it runs and feeds it to the probe's cache copy; here the step's
forward runs it for all rows first and a probe copies the cache after it (one forward less per probe).
Tested against ``generate()`` with ``LiveStopping``: the same tokens, probes, answers and stop points, for a
row alone and for rows in a fixed batch (``tests/test_serve_decoder.py``).

Greedy decoding only, with the model's raw logits: a generation config that asks ``generate`` for a
logits processor in greedy mode (a repetition penalty, ...) is refused, naming the setting.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from transformers.cache_utils import DynamicCache

from maml_stop.live.rule import StopRule
from maml_stop.live.stopping import LiveStopping
from maml_stop.probe.features import FeatureState, ProbeFeaturizer, entropy_from_logits
from maml_stop.probe.forcing import (RowSchedule, answer_end_test, force_answers, forced_features, probe_reason,
                                     sub_cache, unforced_features)
from maml_stop.probe.schedule import ProbeSchedule

log = logging.getLogger(__name__)

__all__ = ["Decoder", "LiveSpec", "LiveRecord", "GREEDY_PROCESSORS"]

# generation-config fields under which generate() changes greedy tokens (field: its neutral values)
GREEDY_PROCESSORS = {"repetition_penalty": (None, 1.0), "no_repeat_ngram_size": (None, 0), "bad_words_ids": (None,),
                     "min_length": (None, 0),
                     "min_new_tokens": (None, 0), "suppress_tokens": (None, []), "begin_suppress_tokens": (None, []),
                     "sequence_bias": (None,), "forced_bos_token_id": (None,), "forced_eos_token_id": (None,)}


@dataclass(frozen=True)
class LiveSpec:
    """The probe recipe of an arm, as :class:`LiveStopping` would run it (:meth:`from_parts` builds it
    through a LiveStopping, so the schedule's think mode, the trigger ids and the answer extraction are its)."""

    featurizer: ProbeFeaturizer
    schedule: ProbeSchedule
    trigger_ids: list[int]
    answer_fn: Callable[[str], str | None]
    answer_max_tokens: int
    max_new_tokens: int | None
    reasoning_format: str

    @classmethod
    def from_parts(cls, model, tokenizer, predictor, feature_names: list[str], featurizer: ProbeFeaturizer,
                   schedule: ProbeSchedule, mode: str, **rest: Any) -> "LiveSpec":
        """``rest``: LiveStopping's other constructor arguments (an artifact's recipe, ``live_parts``)."""
        template = LiveStopping(model, tokenizer, predictor, math.inf, None, feature_names, featurizer, schedule,
                                **rest, mode=mode)
        template.remove_hooks()
        return cls(template.featurizer, template.schedule, list(template.trigger_ids), template.answer_fn,
                   template.answer_max_tokens, template.max_new_tokens, template.reasoning_format)


class LiveRecord:
    """One live row's probes, in the shape of a one-row :class:`LiveStopping`'s results (``features[0]``,
    ``stopped_at[0]``, ...), so that :func:`~maml_stop.live.generate.result_row` and the service's trace
    writer read it as they read a criterion's row 0."""

    def __init__(self, spec: LiveSpec, rule: StopRule, tau: float | None) -> None:
        self.featurizer, self.trigger_ids, self.reasoning_format = spec.featurizer, spec.trigger_ids, spec.reasoning_format
        self.spec, self.rule, self.mode = spec, rule, rule.mode
        self.row = rule.new_row(tau)  # the rule's state of this row
        self.clock = RowSchedule()
        for name in ("features", "forced", "reasons", "probabilities", "gate_probabilities", "probe_answers",
                     "positions"):
            setattr(self, name, [[]])
        self.answers: list[str | None] = [None]
        self.stopped_at: list[int | None] = [None]


@dataclass
class _Active:
    key: Any  # the caller's (a job)
    generated: list[int]
    live: LiveRecord | None
    slot: int = -1  # its row in the featurizer pool's state (live rows)
    due: str | None = None  # the probe reason at the newest token (run after the next forward)
    ended: bool = False


@dataclass
class _Pool:
    """A featurizer's running state with a slot per active live row."""

    state: FeatureState
    free: list[int] = field(default_factory=list)


class Decoder:
    """The active rows of a continuous batch (module docstring). ``done(key, generated, live)`` is called
    once per row, when it leaves (``live``: its :class:`LiveRecord`, None for a plain row); ``cap`` is
    the token cap of every row."""

    def __init__(self, model, tokenizer, cap: int, eos: set[int], done: Callable[[Any, list[int], LiveRecord | None], None],
                 max_rows: int) -> None:
        config = getattr(model, "generation_config", None)
        for name, neutral in GREEDY_PROCESSORS.items():
            value = getattr(config, name, None)
            if value not in neutral:
                raise ValueError(f"the model's generation config sets {name}={value!r}: generate() would change "
                                 f"greedy tokens with it, the continuous decoder does not (neutral: {neutral}); "
                                 "serve with batch.engine: generate")
        self.model, self.tokenizer, self.cap, self.eos, self.done = model, tokenizer, cap, set(eos), done
        self.max_rows = max_rows
        self.device = next(model.parameters()).device
        self.is_answer_end = answer_end_test(tokenizer, self.eos)
        self.rows: list[_Active] = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # (B, L) of the cached tokens
        self._pools: dict[int, _Pool] = {}
        self._texts: dict[int, str] = {}
        self.steps = self.step_rows = 0  # forwards run (prefills included) and their rows

    # -- rows join ------------------------------------------------------------------------------
    @torch.no_grad()
    def add(self, entries: Sequence[tuple[Any, list[int], LiveRecord | None]]) -> None:
        """Prefill ``(key, prompt ids, live record or None)`` rows (one left-padded forward) and merge them
        into the running batch; their first token is chosen, their start probes run."""
        if len(self.rows) + len(entries) > self.max_rows:
            raise ValueError(f"{len(self.rows)} active rows + {len(entries)} new ones exceed max_rows={self.max_rows}")
        width = max(len(p) for _, p, _ in entries)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos)
        ids = torch.tensor([[pad] * (width - len(p)) + list(p) for _, p, _ in entries], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for _, p, _ in entries], device=self.device)
        pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        cache = DynamicCache()
        new = [_Active(key, [], live) for key, _, live in entries]
        logits, hidden = self._forward(ids, mask, pos, cache, any(r.live for r in new))
        self._merge(cache, mask)
        first = len(self.rows)
        self.rows += new
        for row in new:
            if row.live is not None:
                row.slot = self._take_slot(row.live.featurizer)
        index = list(range(first, len(self.rows)))
        self._observe(index, logits, hidden)
        starts = [i for i in index if self.rows[i].live is not None and self.rows[i].live.spec.schedule.at_start]
        self._probes(starts, {i: "start" for i in starts}, zero=True)
        for i in starts:  # the start probe in the row's schedule
            probe_reason(self.rows[i].live.spec.schedule, self.rows[i].live.clock, 0, [])
        tokens = logits.argmax(-1).tolist()  # greedy, as generate()
        for i in index:
            self._choose(self.rows[i], tokens[i - first])
        self._drop()

    # -- one step -------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> None:
        """One forward of every active row's newest token, the probes that are due, the next tokens."""
        if not self.rows:
            return
        ids = torch.tensor([[r.generated[-1]] for r in self.rows], device=self.device)
        mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
        pos = self.mask.sum(-1, keepdim=True)  # real tokens before: the new token's position id
        logits, hidden = self._forward(ids, mask, pos, self.cache, any(r.live for r in self.rows))
        self.mask = mask
        index = list(range(len(self.rows)))
        self._observe(index, logits, hidden)
        due = {i: r.due for i, r in enumerate(self.rows) if r.due}
        self._probes(list(due), due)
        tokens = logits.argmax(-1).tolist()  # greedy, as generate()
        for i, row in enumerate(self.rows):
            if row.live is not None and row.live.stopped_at[0] is not None or len(row.generated) >= self.cap:
                row.ended = True  # stopped at its probe, or its cap probe ran
            else:
                self._choose(row, tokens[i])
        self._drop()

    def _forward(self, ids, mask, pos, cache, hidden: bool):
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                         output_hidden_states=hidden, logits_to_keep=1)
        self.steps += 1
        self.step_rows += ids.shape[0]
        return out.logits[:, -1, :].float(), out.hidden_states if hidden else None  # (b, V)

    def _choose(self, row: _Active, token: int) -> None:
        """Append the row's next token; decide whether it ends now and which probe its next forward owes."""
        row.generated.append(token)
        n, live = len(row.generated), row.live
        row.due = None
        if live is not None and live.stopped_at[0] is not None:  # stopped at its start probe
            row.ended = True
        elif row.generated[-1] in self.eos:
            row.ended = True
        else:
            if live is not None:
                recent = [self._text(t) for t in row.generated[-4:]]
                cap = live.spec.max_new_tokens
                row.due = probe_reason(live.spec.schedule, live.clock, n, recent, at_cap=cap is not None and n == cap)
            row.ended = n >= self.cap and not row.due

    def _text(self, token: int) -> str:
        if token not in self._texts:
            self._texts[token] = self.tokenizer.decode([token])
        return self._texts[token]

    # -- features and probes --------------------------------------------------------------------
    def _take_slot(self, featurizer: ProbeFeaturizer) -> int:
        pool = self._pools.get(id(featurizer))
        if pool is None:
            pool = self._pools[id(featurizer)] = _Pool(featurizer.new_state(self.max_rows), list(range(self.max_rows)))
        slot = pool.free.pop(0)
        s = pool.state
        for t in (s.h_sum, s.m_sum, s.m_last, s.h_last, s.count, s.ent_sum, s.ent_last):
            if t is not None:
                t[slot] = 0
        s.answers[slot] = []
        return slot

    def _observe(self, index: list[int], logits: torch.Tensor, hidden) -> None:
        """Add this forward to the live rows' features (logits, hidden: of the forward's rows, in ``index``'s order)."""
        groups: dict[int, list[int]] = {}
        for j, i in enumerate(index):
            if self.rows[i].live is not None:
                groups.setdefault(id(self.rows[i].live.featurizer), []).append(j)
        for js in groups.values():
            live = self.rows[index[js[0]]].live
            k = live.featurizer.mid_layer
            jt = torch.tensor(js, device=self.device)
            slots = torch.tensor([self.rows[index[j]].slot for j in js])
            mid = None if k is None else hidden[k][jt, -1, :].float().cpu()
            live.featurizer.observe(self._pools[id(live.featurizer)].state, slots, hidden[-1][jt, -1, :].float().cpu(),
                                    entropy_from_logits(logits[jt]).cpu(), mid)

    def _probes(self, index: list[int], reasons: dict[int, str], zero: bool = False) -> None:
        groups: dict[int, list[int]] = {}
        for i in index:
            groups.setdefault(id(self.rows[i].live.spec), []).append(i)
        for rows in groups.values():
            self._probe(rows, [reasons[i] for i in rows], zero)

    @torch.no_grad()
    def _probe(self, index: list[int], reasons: list[str], zero: bool) -> None:
        """Probe rows ``index`` (one spec) on a copy of their cache: the rule's decision, the answers it
        forces, the record (LiveStopping's ``_probe`` for rows that may stand at different positions)."""
        rows = [self.rows[i] for i in index]
        spec = rows[0].live.spec
        pool = self._pools[id(spec.featurizer)]
        di = torch.tensor(index, device=self.device)
        mask = self.mask[di]
        pos = mask.sum(-1)
        ns = [0 if zero else len(r.generated) for r in rows]
        vecs, windows, force, wanted, stop = {}, {}, [], set(), set()
        for j, (row, reason) in enumerate(zip(rows, reasons)):
            live = row.live
            if live.mode == "every":
                force.append(j)
                wanted.add(j)
                continue
            vecs[j], windows[j] = unforced_features(spec.featurizer, pool.state, row.slot, ns[j], len(live.features[0]))
            wants, stops = live.rule.before_answer(live.row, vecs[j])
            if wants:
                wanted.add(j)
            if wants or reason == "cap":  # a capped run's answer is forced at the cap (DESIGN.md)
                force.append(j)
            if stops:
                stop.add(j)
        answers: dict[int, tuple[list[int], list[float]]] = {}
        if force:
            fi = torch.tensor([index[j] for j in force], device=self.device)
            ids, lps = force_answers(self.model, sub_cache(self.cache, fi), self.mask[fi], pos[torch.tensor(force, device=self.device)],
                                     spec.trigger_ids, spec.answer_max_tokens, self.is_answer_end)
            answers = {j: (a, lp) for j, a, lp in zip(force, ids, lps)}
        for j, (row, reason) in enumerate(zip(rows, reasons)):
            live, answer = row.live, None
            if j in answers:
                a_ids, a_lps = answers[j]
                answer = spec.answer_fn(self.tokenizer.decode(a_ids, skip_special_tokens=True))
                if live.mode == "every":
                    vecs[j] = spec.featurizer.probe_features(pool.state, row.slot, answer, a_lps, ns[j])
                    live.rule.before_answer(live.row, vecs[j])
                else:
                    vecs[j] = forced_features(spec.featurizer, pool.state, row.slot, windows[j], answer, a_lps, ns[j],
                                              len(live.features[0]))
                if j in wanted and live.rule.after_answer(live.row, vecs[j]):  # not for a cap-only answer
                    stop.add(j)
            live.features[0].append(vecs[j])
            live.forced[0].append(j in answers)
            live.reasons[0].append(reason)
            live.positions[0].append(ns[j])
            live.probe_answers[0].append(answer)
            live.probabilities[0].append(live.row.stop_p[-1])
            live.gate_probabilities[0].append(live.row.gate_p[-1])
            if j in stop:
                live.stopped_at[0] = ns[j]
            if j in stop or reason == "cap":
                live.answers[0] = answer

    # -- the cache ------------------------------------------------------------------------------
    def _merge(self, cache: DynamicCache, mask: torch.Tensor) -> None:
        """Append rows (their prefill ``cache`` and ``mask``) to the running cache, left-padding the shorter."""
        if self.cache is None:
            self.cache, self.mask = cache, mask
            return
        a, b = self.mask.shape[1], mask.shape[1]
        width = max(a, b)

        def left(t: torch.Tensor, n: int) -> torch.Tensor:  # (B, heads, L, d) or (B, L) padded to width
            if n == width:
                return t
            shape = list(t.shape)
            shape[-2 if t.dim() == 4 else -1] = width - n
            return torch.cat([t.new_zeros(shape), t], dim=-2 if t.dim() == 4 else -1)

        self.cache = DynamicCache(ddp_cache_data=[
            (torch.cat([left(old.keys, a), left(new.keys, b)]), torch.cat([left(old.values, a), left(new.values, b)]))
            for old, new in zip(self.cache.layers, cache.layers)])
        self.mask = torch.cat([left(self.mask, a), left(mask, b)])

    def _drop(self) -> None:
        """Report and remove the rows that ended; cut the padding columns no remaining row attends to."""
        ended = [r for r in self.rows if r.ended]
        if not ended:
            return
        keep = [i for i, r in enumerate(self.rows) if not r.ended]
        self.rows = [self.rows[i] for i in keep]
        for row in ended:
            if row.live is not None:
                self._pools[id(row.live.featurizer)].free.append(row.slot)
        if not keep:
            self.cache = self.mask = None
        else:
            mask = self.mask[keep]
            first = int(np.argmax(mask.any(0).cpu().numpy()))  # the first column some row attends to
            ki = torch.tensor(keep, device=self.device)
            self.cache = DynamicCache(ddp_cache_data=[(layer.keys[ki, :, first:], layer.values[ki, :, first:])
                                                      for layer in self.cache.layers])
            self.mask = mask[:, first:]
        for row in ended:
            self.done(row.key, row.generated, row.live)

    def fail(self) -> list[Any]:
        """Forget every active row (after an error); their keys."""
        keys = [r.key for r in self.rows]
        for row in self.rows:
            if row.live is not None:
                self._pools[id(row.live.featurizer)].free.append(row.slot)
        self.rows, self.cache, self.mask = [], None, None
        return keys
