"""Batched generation with forced-answer probes that reuse the KV cache.

At each probe point the answer trigger (e.g. ``"\\nFinal answer:"``) is appended to the current prefix
and a short answer is decoded greedily **without re-encoding the prefix**: the probing rows' KV cache is
copied (``index_select`` on the batch dimension, one memory copy, no compute), the trigger and answer
run on the copy, and the copy is dropped. The main generation continues from its own, untouched cache,
so probing cannot change the trace (tested: probed and unprobed greedy runs give the same tokens).

``probe_mode="naive"`` re-encodes prompt + prefix + trigger from scratch for every probe (the reference
the cached probes are tested against, and the baseline of the harvest benchmark); ``"none"`` generates
without probes.

Rows that reach EOS leave the batch (their cache rows are dropped), so a long trace does not make the
short ones in its batch pay for it. Greedy by default; ``do_sample=True`` samples with a seeded
``torch.Generator``.

The probe engine is shared with live stopping (``maml_stop.live.stopping.LiveStopping``, issue 10):
:func:`force_answers` is the one forced-answer loop, :func:`probe_reason` (with a :class:`RowSchedule`
per row) the one schedule decision, and :func:`unforced_features` / :func:`forced_features` compute a
probe point's features when only some probe points force an answer (the live ``free`` and ``gated``
modes). The harvester forces every probe, so it calls the featurizer directly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from transformers.cache_utils import DynamicCache

from maml_stop.probe.features import ProbeFeaturizer, entropy_from_logits
from maml_stop.probe.schedule import ProbeSchedule

from maml_stop.probe.forcing import (
    RowSchedule,
    answer_end_test,
    encode_trigger,
    eos_ids,
    force_answers,
    probe_reason,
    sub_cache,
)

log = logging.getLogger(__name__)

PROBE_MODES = ("cache", "naive", "none")


@dataclass
class ProbeRecord:
    position: int  # generated tokens before the probe
    reason: str  # every_n | boundary | cue
    text: str  # decoded forced continuation
    answer: str | None  # extracted probe answer
    answer_ids: list[int]  # forced answer tokens (including the newline/EOS that ended it)
    logprobs: list[float]  # log-prob of each forced answer token
    trigger_tokens: int

    @property
    def cost(self) -> int:
        return self.trigger_tokens + len(self.answer_ids)


@dataclass
class TraceResult:
    prompt_tokens: int
    generated_ids: list[int] = field(default_factory=list)  # including the EOS token when one ended it
    ended_by_eos: bool = False
    probes: list[ProbeRecord] = field(default_factory=list)
    features: list[np.ndarray] = field(default_factory=list)  # one (F,) vector per probe

    @property
    def hit_cap(self) -> bool:
        return not self.ended_by_eos


class ProbingGenerator:
    """Generate a batch of traces, probing them on a schedule (see module docstring)."""

    def __init__(
        self,
        model,
        tokenizer,
        schedule: ProbeSchedule,
        answer_trigger: str = "\nFinal answer:",
        featurizer: ProbeFeaturizer | None = None,
        max_new_tokens: int = 256,
        answer_max_tokens: int = 12,
        probe_mode: str = "cache",
        do_sample: bool = False,
        temperature: float = 1.0,
        seed: int = 0,
    ) -> None:
        if probe_mode not in PROBE_MODES:
            raise ValueError(f"unknown probe_mode {probe_mode!r}; valid: {', '.join(PROBE_MODES)}")
        if max_new_tokens < 1 or answer_max_tokens < 1:
            raise ValueError("max_new_tokens and answer_max_tokens must be >= 1")
        if probe_mode != "none":
            schedule.check_fires_within(max_new_tokens)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.schedule = schedule
        self.trigger_ids, self.trigger_roundtrip = encode_trigger(tokenizer, answer_trigger)
        self.featurizer = featurizer or ProbeFeaturizer(model.config.hidden_size, proj_dim=0)
        self.max_new_tokens = max_new_tokens
        self.answer_max_tokens = answer_max_tokens
        self.probe_mode = probe_mode
        self.do_sample = do_sample
        self.temperature = temperature
        self.device = next(model.parameters()).device  # every tensor of the loop lives here (cpu or cuda)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)  # sampling draws on the model's device
        self.eos = eos_ids(model, tokenizer)
        self._eos_tensor = torch.tensor(sorted(self.eos), device=self.device)
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else min(self.eos)
        self._text_cache: dict[int, str] = {}
        self._is_answer_end = answer_end_test(tokenizer, self.eos)
        n_states = model.config.num_hidden_layers + 1  # output_hidden_states: embeddings + every layer
        if self.featurizer.mid_layer is not None and self.featurizer.mid_layer >= n_states:
            raise ValueError(f"mid_layer={self.featurizer.mid_layer} but the model has hidden states 0..{n_states - 1}")
        self._mid: torch.Tensor | None = None  # (b, H) mid-layer hidden state of the last forward

    # -- small helpers ---------------------------------------------------------------------------
    def _tok_text(self, token: int) -> str:
        text = self._text_cache.get(token)
        if text is None:
            text = self._text_cache[token] = self.tokenizer.decode([token])
        return text

    def _forward(self, input_ids, attention_mask, position_ids, cache):
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            output_hidden_states=True,
            logits_to_keep=1,
        )
        # (b, V) next-token logits, (b, H) last-layer hidden state of the last input token
        self._mid = None if self.featurizer.mid_layer is None else out.hidden_states[self.featurizer.mid_layer][:, -1, :].float()
        return out.logits[:, -1, :].float(), out.hidden_states[-1][:, -1, :].float()

    def _choose(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.do_sample:
            return logits.argmax(-1)
        probs = torch.softmax(logits / max(self.temperature, 1e-5), dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)

    # -- probes ----------------------------------------------------------------------------------
    def _probe_cached(self, cache, mask, next_pos, index: torch.Tensor):
        return force_answers(self.model, sub_cache(cache, index), mask[index], next_pos[index], self.trigger_ids,
                             self.answer_max_tokens, self._is_answer_end)

    def _probe_naive(self, sequences: list[list[int]]):
        """Re-encode each prefix + trigger from scratch (one row at a time, no padding)."""
        all_ids, all_lps = [], []
        empty = torch.ones(1, 0, dtype=torch.long, device=self.device)  # no cached tokens
        start = torch.zeros(1, dtype=torch.long, device=self.device)  # position of the first token
        for seq in sequences:
            ids, lps = force_answers(self.model, DynamicCache(), empty, start, seq + self.trigger_ids,
                                     self.answer_max_tokens, self._is_answer_end)
            all_ids += ids
            all_lps += lps
        return all_ids, all_lps

    # -- main loop -------------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, prompts: Sequence[str], answer_fn: Callable[[str], str | None] = lambda s: s.strip() or None,
            on_step: Callable[[int], None] | None = None) -> list[TraceResult]:
        """Generate one trace per prompt. ``answer_fn`` extracts a probe answer from the forced text."""
        if not prompts:
            return []
        tok = self.tokenizer
        prev_side = tok.padding_side
        tok.padding_side = "left"
        try:
            enc = tok(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False)
        finally:
            tok.padding_side = prev_side
        input_ids = enc["input_ids"].to(self.device)
        mask = enc["attention_mask"].to(self.device)
        B = input_ids.shape[0]
        prompt_ids = [input_ids[i][mask[i].bool()].tolist() for i in range(B)]
        results = [TraceResult(prompt_tokens=len(p)) for p in prompt_ids]
        state = self.featurizer.new_state(B)
        clock = [RowSchedule() for _ in range(B)]

        rows = torch.arange(B, device=self.device)  # original row id of each active batch entry
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        logits, hidden = self._forward(input_ids, mask, position_ids, cache)
        mid = self._mid
        next_pos = mask.sum(-1)  # (b,) position id of the next token

        n = 0  # tokens generated so far by every active row
        while True:
            self.featurizer.observe(state, rows.cpu(), hidden.cpu(), entropy_from_logits(logits).cpu(),
                                    None if mid is None else mid.cpu())
            if self.probe_mode != "none" and (n > 0 or self.schedule.at_start):
                due, reasons = [], []
                for j, r in enumerate(rows.tolist()):
                    recent = [self._tok_text(t) for t in results[r].generated_ids[-4:]]
                    reason = probe_reason(self.schedule, clock[r], n, recent, at_cap=n == self.max_new_tokens)
                    if reason:
                        due.append(j)
                        reasons.append(reason)
                if due:
                    index = torch.tensor(due, device=self.device)
                    if self.probe_mode == "cache":
                        ids, lps = self._probe_cached(cache, mask, next_pos, index)
                    else:
                        ids, lps = self._probe_naive([prompt_ids[int(rows[j])] + results[int(rows[j])].generated_ids for j in due])
                    for j, reason, a_ids, a_lps in zip(due, reasons, ids, lps):
                        r = int(rows[j])
                        text = tok.decode(a_ids, skip_special_tokens=True)
                        answer = answer_fn(text)
                        results[r].probes.append(
                            ProbeRecord(n, reason, text, answer, a_ids, a_lps, len(self.trigger_ids))
                        )
                        results[r].features.append(self.featurizer.probe_features(state, r, answer, a_lps, n))
            if n >= self.max_new_tokens:
                break
            nxt = self._choose(logits)  # (b,)
            finished = torch.isin(nxt, self._eos_tensor)
            for r, t, f in zip(rows.tolist(), nxt.tolist(), finished.tolist()):  # one copy to the host per step
                results[r].generated_ids.append(t)
                if f:
                    results[r].ended_by_eos = True
            n += 1
            if on_step is not None:
                on_step(int(rows.shape[0]))
            if bool(finished.any()):
                keep = (~finished).nonzero().squeeze(-1)
                if keep.numel() == 0:
                    break
                cache.batch_select_indices(keep)
                rows, mask, next_pos, nxt = rows[keep], mask[keep], next_pos[keep], nxt[keep]
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            logits, hidden = self._forward(nxt[:, None], mask, next_pos[:, None], cache)
            mid = self._mid
            next_pos = next_pos + 1
        return results
