"""Live stopping inside ``model.generate()``: a transformers ``StoppingCriteria``.

At the probe points of a schedule, :class:`LiveStopping` forces an answer from the current prefix
(answer trigger + short greedy answer) on a *copy* of the generation's KV cache, computes the probe's
features with the same :class:`~maml_stop.probe.features.ProbeFeaturizer` the harvester used, asks
the (adapted) stopping predictor for P(stopping here keeps the answer correct), and stops a row at the
first probe whose probability reaches the threshold. The forced answer of that probe is the row's answer
(``criteria.answers``); rows that never stop end as usual and their own final answer counts.

    >>> criteria = LiveStopping(model, tok, predictor, threshold=0.8, prompt_length=None,
    ...                         feature_names=names, featurizer=featurizer, schedule=schedule)  # doctest: +SKIP
    >>> out = model.generate(**enc, stopping_criteria=StoppingCriteriaList([criteria]))     # doctest: +SKIP
    >>> criteria.answers                                                                    # doctest: +SKIP

How it sees the generation without changing it: a forward hook on the model records, at every step,
the cache object, the attention mask, the next-token logits and (via a hook on the final norm) the
last-layer hidden state. When ``generate`` calls the criterion, the newest token has been chosen but not
yet run through the model; a probe therefore feeds that token and then the trigger to its cache copy.
The generation's own cache and tokens are never touched (tested: a run whose threshold is never reached
gives exactly the tokens of a plain ``generate``, and its probe features equal the harvester's).

One criterion serves any number of ``generate`` calls, of any batch size (issue 16): a forward that
starts on an empty cache, or on a cache object other than the one of the previous forward, is the
prefill of a new generation, and all per-generation state (featurizer state, probes, answers, stops)
is reset there. The prompt length is read from that prefill (the cache length after it; with left
padding, the padded prompt length); a ``prompt_length`` given to the constructor is checked against it.
The results of the latest generation are in ``answers``, ``stopped_at``, ``features`` and so on.
"""

from __future__ import annotations

from typing import Callable

import logging

import numpy as np
import torch
from torch import nn
from transformers import StoppingCriteria

from maml_stop.data.batches import ProbeBatch
from maml_stop.probe.features import ProbeFeaturizer, entropy_from_logits
from maml_stop.probe.engine import _sub_cache, encode_trigger, eos_ids
from maml_stop.probe.schedule import ProbeSchedule

log = logging.getLogger(__name__)


def _final_norm(model: nn.Module) -> nn.Module:
    base = getattr(model, "model", None) or getattr(model, "base_model", None)
    norm = getattr(base, "norm", None)
    if norm is None:
        raise ValueError(f"cannot find the final norm of {type(model).__name__} (expected model.model.norm)")
    return norm


class LiveStopping(StoppingCriteria):
    """Stop each row at the first probe whose predicted P(correct) >= ``threshold`` (see module doc)."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        predictor: nn.Module,
        threshold: float,
        prompt_length: int | None,
        feature_names: list[str],
        featurizer: ProbeFeaturizer,
        schedule: ProbeSchedule,
        answer_trigger: str = "\nFinal answer:",
        answer_fn: Callable[[str], str | None] = lambda s: s.strip().split("\n")[0] or None,
        answer_max_tokens: int = 12,
    ) -> None:
        if featurizer.feature_names != list(feature_names):
            raise ValueError(
                "the featurizer's features differ from the predictor's: "
                f"{featurizer.feature_names[:3]}... ({len(featurizer.feature_names)}) vs "
                f"{list(feature_names)[:3]}... ({len(feature_names)})"
            )
        if not 0.0 <= threshold <= 1.0 and threshold != float("inf"):
            raise ValueError(f"threshold must lie in [0, 1] (or inf: never stop), got {threshold}")
        self.model, self.tokenizer, self.predictor = model, tokenizer, predictor.eval()
        self.threshold = threshold
        if prompt_length is not None and prompt_length < 1:
            raise ValueError(f"prompt_length must be a positive token count or None (read from each prefill), "
                             f"got {prompt_length}")
        self.expected_prompt_length = prompt_length  # checked against each prefill; None: not checked
        self.prompt_length: int | None = None  # of the current generation, read from its prefill
        self.featurizer, self.schedule = featurizer, schedule
        self.answer_fn = answer_fn
        self.answer_max_tokens = answer_max_tokens
        self.trigger_ids, _ = encode_trigger(tokenizer, answer_trigger)
        self.eos = eos_ids(model, tokenizer)
        self._texts: dict[int, str] = {}
        self._probing = False
        self._warned_no_cache = False
        self._hooks = [
            model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
            model.register_forward_hook(self._on_forward, with_kwargs=True),
            _final_norm(model).register_forward_hook(self._on_norm),
        ]
        self.reset()

    # -- state -----------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the current generation (the forward hooks call this at each new generation's prefill)."""
        self.state = None
        self.prompt_length = None
        self.cache = None
        self.mask = None
        self._hidden = None
        self._steps = 0  # generation forwards seen (prefill = 1)
        self._observed: torch.Tensor | None = None  # (b,) per row: forwards already in its features
        self.last_probe: list[int | None] = []
        self.pending: list[str | None] = []
        self.features: list[list[np.ndarray]] = []  # per row, features of its probes
        self.probabilities: list[list[float]] = []
        self.probe_answers: list[list[str | None]] = []
        self.answers: list[str | None] = []  # per row: the forced answer it stopped with (None: did not stop)
        self.stopped_at: list[int | None] = []

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _on_norm(self, module, args, output) -> None:
        if not self._probing:
            self._hidden = output[:, -1, :].detach().float()  # (b, H)

    def _before_forward(self, module, args, kwargs) -> None:
        """A forward on an empty cache, or on another cache object than the last one, is the prefill
        of a new generation: reset everything recorded about the previous one."""
        if self._probing:
            return
        cache = kwargs.get("past_key_values")
        if cache is None:
            if not self._warned_no_cache:
                log.warning("LiveStopping saw a forward without a KV cache (use_cache=False?): it probes only "
                            "inside generate() with a cache; such a generation gets no probes")
                self._warned_no_cache = True
            self.reset()
            return
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
            self.last_probe, self.pending = [None] * b, [None] * b
            self.features = [[] for _ in range(b)]
            self.probabilities = [[] for _ in range(b)]
            self.probe_answers = [[] for _ in range(b)]
            self.answers, self.stopped_at = [None] * b, [None] * b
            self._observed = torch.zeros(b, dtype=torch.long)
        self._steps += 1
        rows = (self._observed < self._steps).nonzero().squeeze(-1)  # not already observed by a probe
        if rows.numel():
            self.featurizer.observe(self.state, rows, self._hidden[rows], entropy_from_logits(logits[rows]))
            self._observed[rows] = self._steps

    def _text(self, token: int) -> str:
        if token not in self._texts:
            self._texts[token] = self.tokenizer.decode([token])
        return self._texts[token]

    # -- probes ----------------------------------------------------------------------------------
    def _forward(self, ids, mask, pos, cache):
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                         use_cache=True, output_hidden_states=True, logits_to_keep=1)
        return out.logits[:, -1, :].float(), out.hidden_states[-1][:, -1, :].float()

    @torch.no_grad()
    def _probe(self, rows: list[int], last_tokens: torch.Tensor) -> tuple[list[list[int]], list[list[float]]]:
        """Feed each row's newest token, observe it, then trigger + greedy answer, on a cache copy."""
        index = torch.tensor(rows)
        cache = _sub_cache(self.cache, index)
        if self.mask is not None:
            mask = self.mask[index]
        else:  # generate passes no mask when nothing is padded
            mask = torch.ones(len(rows), self.cache.get_seq_length(), dtype=torch.long)
        pos = mask.sum(-1)  # next position id per row (mask covers the cached tokens)
        self._probing = True
        try:
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
            logits, hidden = self._forward(last_tokens[index][:, None], mask, pos[:, None], cache)
            self.featurizer.observe(self.state, index, hidden, entropy_from_logits(logits))
            T = len(self.trigger_ids)
            trig = torch.tensor(self.trigger_ids).expand(len(rows), T)
            mask = torch.cat([mask, mask.new_ones(len(rows), T)], dim=1)
            logits, _ = self._forward(trig, mask, pos[:, None] + 1 + torch.arange(T), cache)
            nxt = pos + 1 + T
            ids: list[list[int]] = [[] for _ in rows]
            lps: list[list[float]] = [[] for _ in rows]
            open_rows = [True] * len(rows)
            for step in range(self.answer_max_tokens):
                logp = torch.log_softmax(logits, -1)
                tok = logp.argmax(-1)
                for j in range(len(rows)):
                    if open_rows[j]:
                        t = int(tok[j])
                        ids[j].append(t)
                        lps[j].append(float(logp[j, t]))
                        open_rows[j] = not (t in self.eos or "\n" in self._text(t))
                if not any(open_rows) or step == self.answer_max_tokens - 1:
                    break
                mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
                logits, _ = self._forward(tok[:, None], mask, nxt[:, None], cache)
                nxt = nxt + 1
        finally:
            self._probing = False
        return ids, lps

    def _score(self, row: int) -> float:
        feats = torch.from_numpy(np.stack(self.features[row]))  # (P, F)
        p = feats.shape[0]
        batch = ProbeBatch(features=feats, labels=torch.zeros(p), trace_index=torch.zeros(p, dtype=torch.long),
                           probe_index=torch.arange(p), weights=torch.ones(p))
        with torch.no_grad():
            return float(torch.sigmoid(self.predictor(batch)[-1]))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        b = input_ids.shape[0]
        stop = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
        if self.state is None:
            return stop
        n = input_ids.shape[1] - self.prompt_length  # tokens generated so far
        generated = input_ids[:, self.prompt_length:]
        due, reasons = [], []
        for r in range(b):
            if self.stopped_at[r] is not None:
                stop[r] = True
                continue
            if any(int(t) in self.eos for t in generated[r].tolist()):
                continue  # ended by EOS: generate handles it
            toks = generated[r].tolist()
            event = self.schedule.event(self._text(toks[-1]), "".join(self._text(t) for t in toks[-4:]))
            self.pending[r] = event or self.pending[r]
            reason = self.schedule.due(n, self.pending[r], self.last_probe[r], len(self.features[r]))
            if reason:
                due.append(r)
                reasons.append(reason)
        if not due:
            return stop
        ids, lps = self._probe(due, input_ids[:, -1])
        self._observed[torch.tensor(due)] = self._steps + 1  # newest token observed: skip it when generate runs it
        for r, a_ids, a_lps in zip(due, ids, lps):
            answer = self.answer_fn(self.tokenizer.decode(a_ids, skip_special_tokens=True))
            self.features[r].append(self.featurizer.probe_features(self.state, r, answer, a_lps, n))
            self.probe_answers[r].append(answer)
            self.last_probe[r], self.pending[r] = n, None
            prob = self._score(r)
            self.probabilities[r].append(prob)
            if prob >= self.threshold:
                self.stopped_at[r] = n
                self.answers[r] = answer
                stop[r] = True
        return stop
