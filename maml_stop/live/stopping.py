"""Live stopping inside ``model.generate()``: a transformers ``StoppingCriteria``, and its offline replay.

At the probe points of a schedule, :class:`LiveStopping` computes the probe's features with the same
:class:`~maml_stop.probe.features.ProbeFeaturizer` the harvester used, forces an answer from the current
prefix (answer trigger + short greedy answer) on a *copy* of the generation's KV cache where its mode
asks for one, asks the (adapted) stopping predictor for P(stopping here keeps the answer correct), and
stops a row at the first probe whose probability reaches the stop threshold ``tau``. The forced answer of
that probe is the row's answer (``criteria.answers``); rows that never stop end as usual and their own final answer
counts. The forced-answer loop, the schedule decision and the answer extraction are the harvester's own
(:func:`maml_stop.probe.engine.force_answers`, :func:`~maml_stop.probe.engine.probe_reason`, the
family's ``extract_probe_answer``; issue 10), so live features are the features the predictor was
trained on.

    >>> criteria = LiveStopping(model, tok, predictor, tau=0.8, prompt_length=None,
    ...                         feature_names=names, featurizer=featurizer, schedule=schedule,
    ...                         family=get_family("gsm_symbolic"), mode="every")              # doctest: +SKIP
    >>> out = model.generate(**enc, stopping_criteria=StoppingCriteriaList([criteria]))     # doctest: +SKIP
    >>> criteria.answers, criteria.stopped_at                                               # doctest: +SKIP

Modes (:data:`MODES`; the same rule runs offline in :func:`replay`):

* ``"every"``: force an answer at every probe point; the predictor reads any of the features. Every
  feature equals the harvester's.
* ``"free"``: decide at every probe point on **free** features only (``feature_cost``); force an answer
  only where the row stops: that answer is the output, and the only one paid. A predictor that reads a
  paid feature is refused.
* ``"gated"``: a *gate* predictor on free features decides at every probe point whether to force an
  answer; where it does, the stop predictor (free and paid features) decides whether to stop. Every
  forced answer is paid, also the ones that do not stop.

Features where not every probe forces an answer (free, gated): the window features (hidden-state
summary, entropies) restart at every probe point, forced or not, and ``probe_index`` counts every probe
point, so all **free** features equal the harvester's. Of the **paid** features, the answer confidence
(``logprob_*``, ``answer_tokens``) is that probe's own; answer **stability** (``answer_empty``,
``same_as_prev``, ``run_length``, ``n_distinct``) is computed over the row's **forced answers only**, as
if the unforced probe points had not existed; at a probe point whose answer is not forced the paid
features are NaN (``criteria.features``). The predictors see sequences: in ``every`` and ``free`` mode
the features of every probe point of the row so far; in ``gated`` mode the gate sees every probe
point's features, the stop predictor the forced probe points' only. In ``every`` mode stability over
forced answers is stability over all answers: the harvester's.

Start and cap probes: with ``schedule.at_start``, the start probe (position 0) runs at the first call,
on the cache of the prompt alone. With ``schedule.at_cap`` and ``max_new_tokens`` given, a row still
running at the cap is decided there like at any probe point, and its answer is forced there in every
mode (the answer of a capped run, DESIGN.md), stored in ``answers`` even when the row did not stop.

How it sees the generation without changing it: :mod:`maml_stop.live.hooks`.

One criterion serves any number of ``generate`` calls, of any batch size (issue 16): a forward on an
empty cache, or on another cache object than the previous forward's, is the prefill of a new generation,
where all per-generation state is reset and the prompt length is read (the cache length after it; a
``prompt_length`` given to the constructor is checked against it). The results of the latest generation
are in ``answers``, ``stopped_at``, ``features`` and so on.

What it refuses (issue 29): beam search (``num_beams > 1``: beams reorder the cache under the per-row
state) and ``use_cache=False`` (no cache to probe from) raise a ValueError at the first step, instead of
crashing or leaving empty results. Its hooks go at ``remove_hooks()``, at the end of a ``with`` block, or
when the criterion is garbage-collected.
"""

from __future__ import annotations

import logging
import weakref
from typing import Callable

import numpy as np
import torch
from torch import nn
from transformers import StoppingCriteria

from maml_stop.live.hooks import check_decoding, final_norm, mid_module, remove_handles, weak_hook
from maml_stop.live.recipe import live_parts
from maml_stop.live.rule import MODES, Replay, StopRule, _Row, replay  # Replay, replay: re-exported
from maml_stop.probe.forcing import (RowSchedule, answer_end_test, encode_trigger, eos_ids, force_answers,
                                     forced_features, probe_reason, sub_cache, unforced_features)
from maml_stop.probe.features import ProbeFeaturizer, entropy_from_logits
from maml_stop.probe.schedule import ProbeSchedule
from maml_stop.probe.think import check_think_trigger, think_schedule

log = logging.getLogger(__name__)

__all__ = ["LiveStopping", "StopRule", "replay", "Replay", "MODES"]


class LiveStopping(StoppingCriteria):
    """Stop each row at the first probe where its mode's rule fires (see module doc).

    ``feature_names``: the predictor's features in its input order (a subset of the featurizer's);
    answers are extracted by ``family.extract_probe_answer`` or a given ``answer_fn`` (the harvest's:
    there is no default); ``gate``/``gate_threshold``/``gate_feature_names`` serve ``mode="gated"``;
    ``max_new_tokens`` (the one given to ``generate``) lets a ``schedule.at_cap`` probe run at the cap;
    ``reasoning_format="think"`` (:mod:`maml_stop.probe.think`): the trigger must close the think block and
    probing ends once the model closed it, as in a think-mode harvest (the prompt must open the block:
    ``family.render_prompt(q, tok, "think")``). Every tensor it makes lives on the model's device."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        predictor: nn.Module,
        tau: float,
        prompt_length: int | None,
        feature_names: list[str],
        featurizer: ProbeFeaturizer,
        schedule: ProbeSchedule,
        answer_trigger: str = "\nFinal answer:",
        answer_fn: Callable[[str], str | None] | None = None,
        answer_max_tokens: int = 12,
        *,
        family=None,
        mode: str = "every",
        gate: nn.Module | None = None,
        gate_threshold: float = 0.5,
        gate_feature_names: list[str] | None = None,
        max_new_tokens: int | None = None,
        reasoning_format: str = "plain",
    ) -> None:
        schedule = think_schedule(schedule, reasoning_format)  # checks the format's name too
        if reasoning_format == "think":
            check_think_trigger(answer_trigger)
        self.reasoning_format = reasoning_format
        if (answer_fn is None) == (family is None):
            raise ValueError("give exactly one of family= (its extract_probe_answer, what the harvest used) and "
                             "answer_fn=; live answers must be extracted as the predictor's training traces were")
        self.answer_fn = answer_fn if answer_fn is not None else family.extract_probe_answer
        self.rule = StopRule(featurizer.feature_names, predictor, tau, mode, feature_names, gate,
                             gate_threshold, gate_feature_names)
        self.mode, self.tau = mode, tau
        self.model, self.tokenizer, self.predictor = model, tokenizer, self.rule.predictor
        if prompt_length is not None and prompt_length < 1:
            raise ValueError(f"prompt_length must be a positive token count or None (read from each prefill), "
                             f"got {prompt_length}")
        if answer_max_tokens < 1 or (max_new_tokens is not None and max_new_tokens < 1):
            raise ValueError("answer_max_tokens and max_new_tokens must be >= 1")
        if schedule.at_cap and max_new_tokens is None:
            log.warning("the schedule probes at the cap (at_cap), but LiveStopping was not given max_new_tokens: "
                        "no cap probe will run")
        self.expected_prompt_length = prompt_length  # checked against each prefill; None: not checked
        # per-row taus of the next generations (None: ``tau``; inf: never stops); see serve/
        self.row_taus: list[float] | None = None
        self.prompt_length: int | None = None  # of the current generation, read from its prefill
        self.featurizer, self.schedule = featurizer, schedule
        self.answer_max_tokens, self.max_new_tokens = answer_max_tokens, max_new_tokens
        self.trigger_ids, _ = encode_trigger(tokenizer, answer_trigger)
        self.eos = eos_ids(model, tokenizer)
        self._is_answer_end = answer_end_test(tokenizer, self.eos)
        self._texts: dict[int, str] = {}
        self._probing = False
        self._uncached = False  # the latest forward ran without a KV cache (generate(use_cache=False))
        self._hooks = [
            model.register_forward_pre_hook(weak_hook(self._before_forward), with_kwargs=True),
            model.register_forward_hook(weak_hook(self._on_forward), with_kwargs=True),
            final_norm(model).register_forward_hook(weak_hook(self._on_norm)),
        ]
        self._finalizer = weakref.finalize(self, remove_handles, self._hooks)  # garbage-collected: hooks removed
        k = featurizer.mid_layer
        self._mid_from_norm = False
        if k is not None:
            mid = mid_module(model, k)
            if mid is None:
                self._mid_from_norm = True
            else:
                self._hooks.append(mid.register_forward_hook(weak_hook(self._on_mid)))
        self.reset()

    @classmethod
    def from_adapted(cls, path, model: nn.Module, tokenizer, mode: str | None = None,
                     max_new_tokens: int | None = None) -> "LiveStopping":
        """Live stopping built from an adapted artifact alone (``maml-stop adapt``; issue 10): its
        predictor, tau and feature subset, and the probe recipe it carries (featurizer on
        ``model.config.hidden_size``, schedule, answer trigger and budget, the family that extracts the
        answers, the live mode, the token cap for a cap probe). ``mode`` / ``max_new_tokens`` override
        the recipe's (give ``generate`` the same ``max_new_tokens``). The criterion runs on the model's
        device (move the model there first, e.g. ``load_model(spec, device="cuda")``). Raises
        :class:`~maml_stop.live.artifact.AdaptError` for an artifact without a complete recipe (naming
        the missing fields), a model of another hidden size, or features the recipe does not make.

        >>> criteria = LiveStopping.from_adapted("runs/adapted/gcd.pt", model, tok)              # doctest: +SKIP
        >>> model.generate(**enc, max_new_tokens=criteria.max_new_tokens,
        ...                stopping_criteria=StoppingCriteriaList([criteria]))                   # doctest: +SKIP
        """
        parts = live_parts(path, model)
        return cls(model, tokenizer, parts.pop("predictor"), parts.pop("tau"), None, parts.pop("feature_names"),
                   parts.pop("featurizer"), parts.pop("schedule"), **{**parts, "mode": mode or parts["mode"],
                   "max_new_tokens": max_new_tokens or parts["max_new_tokens"]})

    # -- state -----------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the current generation (the forward hooks call this at each new generation's prefill)."""
        self.state = None
        self.prompt_length = None
        self.cache = None
        self.mask = None
        self._hidden = None
        self._mid = None
        self._steps = 0  # generation forwards seen (prefill = 1)
        self._observed: torch.Tensor | None = None  # (b,) per row: forwards already in its features
        self._clock: list[RowSchedule] = []
        self._rows: list[_Row] = []
        self._done: list[bool] = []  # ended by EOS
        self.features: list[list[np.ndarray]] = []  # per row, features of its probes (NaN: paid, not forced)
        self.forced: list[list[bool]] = []  # per row and probe: was its answer forced (paid)?
        self.reasons: list[list[str]] = []  # per row and probe: why it fired (every_n, boundary, cue, start, cap)
        self.probabilities: list[list[float | None]] = []  # stop predictor's P per probe (None: not asked)
        self.gate_probabilities: list[list[float | None]] = []  # gated mode: the gate's P per probe
        self.probe_answers: list[list[str | None]] = []  # per probe: the extracted answer (None: none, or not forced)
        self.answers: list[str | None] = []  # per row: the forced answer it stopped with, or its cap answer
        self.stopped_at: list[int | None] = []  # per row: tokens generated when it stopped (None: did not stop)
        self.positions: list[list[int]] = []  # per row and probe: tokens generated before it (0: the start probe)

    def remove_hooks(self) -> None:
        """Detach from the model (also done when the criterion is garbage-collected or a ``with`` ends)."""
        remove_handles(self._hooks)

    def __enter__(self) -> "LiveStopping":
        return self

    def __exit__(self, *exc) -> None:
        self.remove_hooks()

    def _on_norm(self, module, args, output) -> None:
        if not self._probing:
            self._hidden = output[:, -1, :].detach().float()  # (b, H)
            if self._mid_from_norm:
                self._mid = self._hidden

    def _on_mid(self, module, args, output) -> None:
        if not self._probing:
            out = output[0] if isinstance(output, tuple) else output
            self._mid = out[:, -1, :].detach().float()  # (b, H)

    def _before_forward(self, module, args, kwargs) -> None:
        """A forward on an empty cache, or on another cache object than the last one, is the prefill
        of a new generation: reset everything recorded about the previous one."""
        if self._probing:
            return
        cache = kwargs.get("past_key_values")
        if cache is None:  # a plain forward, or generate(use_cache=False): refused if generate calls us
            self.reset()
            self._uncached = True
            return
        self._uncached = False
        if cache is not self.cache or cache.get_seq_length() == 0:
            self.reset()

    def _on_forward(self, module, args, kwargs, output) -> None:
        if self._probing:
            return
        cache = kwargs.get("past_key_values")
        if cache is None:
            return
        self.cache = cache
        self.mask = kwargs.get("attention_mask")
        logits = output.logits[:, -1, :].detach().float()  # (b, V)
        b = logits.shape[0]
        if self.state is None:  # the prefill: the prompt is what the cache holds now
            self.prompt_length = cache.get_seq_length()
            if self.expected_prompt_length is not None and self.expected_prompt_length != self.prompt_length:
                raise ValueError(
                    f"LiveStopping was given prompt_length={self.expected_prompt_length}, but this generation's "
                    f"prompt is {self.prompt_length} tokens (padded); pass prompt_length=None to read it from "
                    "each generation"
                )
            self.state = self.featurizer.new_state(b)
            self._clock = [RowSchedule() for _ in range(b)]
            rows = self.row_taus if self.row_taus is not None else [None] * b
            if len(rows) != b:
                raise ValueError(f"row_taus has {len(rows)} entries for a batch of {b} rows")
            self._rows = [self.rule.new_row(t) for t in rows]
            self._done = [False] * b
            for name in ("features", "forced", "reasons", "probabilities", "gate_probabilities", "probe_answers",
                         "positions"):
                setattr(self, name, [[] for _ in range(b)])
            self.answers, self.stopped_at = [None] * b, [None] * b
            self._observed = torch.zeros(b, dtype=torch.long)
        self._steps += 1
        rows = (self._observed < self._steps).nonzero().squeeze(-1)  # not already observed by a probe
        if rows.numel():
            mid = None if self.featurizer.mid_layer is None else self._mid[rows.to(self._mid.device)].cpu()
            dev = rows.to(logits.device)
            self.featurizer.observe(self.state, rows, self._hidden[dev].cpu(), entropy_from_logits(logits[dev]).cpu(),
                                    mid)
            self._observed[rows] = self._steps

    def _text(self, token: int) -> str:
        if token not in self._texts:
            self._texts[token] = self.tokenizer.decode([token])
        return self._texts[token]

    # -- probes ----------------------------------------------------------------------------------
    @torch.no_grad()
    def _probe(self, rows: list[int], reasons: list[str], n: int, newest: torch.Tensor | None) -> None:
        """Probe ``rows`` after ``n`` generated tokens on a cache copy: feed each row's ``newest`` token
        (not yet run by generate; None for the start probe) and observe it, decide by the mode's rule,
        force the answers it asks for, and record features, answers and stops."""
        index = torch.tensor(rows)  # on the CPU, for the featurizer state
        device = self.cache.layers[0].keys.device
        dindex = index.to(device)
        cache = sub_cache(self.cache, dindex)
        if self.mask is not None:
            mask = self.mask[dindex]
        else:  # generate passes no mask when nothing is padded
            mask = torch.ones(len(rows), self.cache.get_seq_length(), dtype=torch.long, device=device)
        pos = mask.sum(-1)  # next position id per row (mask covers the cached tokens)
        self._probing = True
        try:
            if newest is not None:
                mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
                out = self.model(input_ids=newest[dindex][:, None], attention_mask=mask, position_ids=pos[:, None],
                                 past_key_values=cache, use_cache=True, output_hidden_states=True, logits_to_keep=1)
                k = self.featurizer.mid_layer
                mid = None if k is None else out.hidden_states[k][:, -1, :].float()
                self.featurizer.observe(self.state, index, out.hidden_states[-1][:, -1, :].float().cpu(),
                                        entropy_from_logits(out.logits[:, -1, :]).cpu(),
                                        None if mid is None else mid.cpu())
                self._observed[index] = self._steps + 1  # newest token observed: skip it when generate runs it
                pos = pos + 1
            # the rule's decision before any answer (free features), then the answers it asks for
            vecs, windows, force, wanted, stop = {}, {}, [], set(), set()
            for j, (r, reason) in enumerate(zip(rows, reasons)):
                if self.mode == "every":
                    force.append(j)
                    wanted.add(r)
                    continue
                vecs[r], windows[r] = unforced_features(self.featurizer, self.state, r, n, len(self.features[r]))
                wants, stops = self.rule.before_answer(self._rows[r], vecs[r])
                if wants:
                    wanted.add(r)
                if wants or reason == "cap":  # a capped run's answer is forced at the cap (DESIGN.md)
                    force.append(j)
                if stops:
                    stop.add(r)
            answers: dict[int, tuple[list[int], list[float]]] = {}
            if force:
                fi = torch.tensor(force, device=device)
                fcache = cache if len(force) == len(rows) else sub_cache(cache, fi)
                ids, lps = force_answers(self.model, fcache, mask[fi], pos[fi], self.trigger_ids,
                                         self.answer_max_tokens, self._is_answer_end)
                answers = {rows[j]: (a, lp) for j, a, lp in zip(force, ids, lps)}
        finally:
            self._probing = False
        for r, reason in zip(rows, reasons):
            answer = None
            if r in answers:
                a_ids, a_lps = answers[r]
                answer = self.answer_fn(self.tokenizer.decode(a_ids, skip_special_tokens=True))
                if self.mode == "every":
                    vecs[r] = self.featurizer.probe_features(self.state, r, answer, a_lps, n)
                    self.rule.before_answer(self._rows[r], vecs[r])
                else:
                    vecs[r] = forced_features(self.featurizer, self.state, r, windows[r], answer, a_lps, n,
                                              len(self.features[r]))
                if r in wanted and self.rule.after_answer(self._rows[r], vecs[r]):  # not for a cap-only answer
                    stop.add(r)
            self.features[r].append(vecs[r])
            self.forced[r].append(r in answers)
            self.reasons[r].append(reason)
            self.positions[r].append(n)
            self.probe_answers[r].append(answer)
            self.probabilities[r].append(self._rows[r].stop_p[-1])
            self.gate_probabilities[r].append(self._rows[r].gate_p[-1])
            if r in stop:
                self.stopped_at[r] = n
            if r in stop or reason == "cap":
                self.answers[r] = answer

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        b = input_ids.shape[0]
        stop = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
        check_decoding(self.state is not None, self._uncached, b, len(self._rows))
        if self.state is None:
            return stop
        n = input_ids.shape[1] - self.prompt_length  # tokens generated so far
        if n == 1 and self.schedule.at_start:  # the start probe: on the prompt's cache, before token 1 runs
            self._probe(list(range(b)), ["start"] * b, 0, None)
            for r in range(b):
                probe_reason(self.schedule, self._clock[r], 0, [])  # the start probe in the row's schedule
        generated = input_ids[:, self.prompt_length:]
        due, reasons = [], []
        at_cap = self.max_new_tokens is not None and n == self.max_new_tokens
        for r in range(b):
            if self.stopped_at[r] is not None:
                stop[r] = True
                continue
            if self._done[r] or int(generated[r, -1]) in self.eos:
                self._done[r] = True  # ended by EOS: generate handles it
                continue
            recent = [self._text(int(t)) for t in generated[r, -4:]]
            reason = probe_reason(self.schedule, self._clock[r], n, recent, at_cap=at_cap)
            if reason:
                due.append(r)
                reasons.append(reason)
        if due:
            self._probe(due, reasons, n, input_ids[:, -1])
            for r in due:
                stop[r] = self.stopped_at[r] is not None
        return stop
