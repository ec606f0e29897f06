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


def _sub_cache(cache: DynamicCache, index: torch.Tensor) -> DynamicCache:
    """A copy of the cache rows ``index`` (the main cache is untouched)."""
    return DynamicCache(ddp_cache_data=[(layer.keys[index], layer.values[index]) for layer in cache.layers])


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
        self.generator = torch.Generator().manual_seed(seed)
        self.eos = eos_ids(model, tokenizer)
        self._eos_tensor = torch.tensor(sorted(self.eos))
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else min(self.eos)
        self._text_cache: dict[int, str] = {}
        self.device = next(model.parameters()).device
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

    def _answer_done(self, token: int) -> bool:
        return token in self.eos or "\n" in self._tok_text(token)

    # -- probes ----------------------------------------------------------------------------------
    def _decode_answers(self, logits: torch.Tensor, cache, mask, next_pos) -> tuple[list[list[int]], list[list[float]]]:
        """Greedy short answers for a sub-batch whose trigger has just been processed."""
        b = logits.shape[0]
        ids: list[list[int]] = [[] for _ in range(b)]
        lps: list[list[float]] = [[] for _ in range(b)]
        open_rows = [True] * b
        for step in range(self.answer_max_tokens):
            logp = torch.log_softmax(logits, dim=-1)
            tok = logp.argmax(-1)  # (b,)
            chosen = logp.gather(1, tok[:, None]).squeeze(1)
            for r in range(b):
                if open_rows[r]:
                    t = int(tok[r])
                    ids[r].append(t)
                    lps[r].append(float(chosen[r]))
                    if self._answer_done(t):
                        open_rows[r] = False
            if not any(open_rows) or step == self.answer_max_tokens - 1:
                break
            mask = torch.cat([mask, mask.new_ones(b, 1)], dim=1)
            logits, _ = self._forward(tok[:, None], mask, next_pos[:, None], cache)
            next_pos = next_pos + 1
        return ids, lps

    def _probe_cached(self, cache, mask, next_pos, index: torch.Tensor):
        sub = _sub_cache(cache, index)
        b, T = index.shape[0], len(self.trigger_ids)
        trig = torch.tensor(self.trigger_ids, device=self.device).expand(b, T)
        sub_mask = torch.cat([mask[index], mask.new_ones(b, T)], dim=1)
        pos = next_pos[index][:, None] + torch.arange(T, device=self.device)
        logits, _ = self._forward(trig, sub_mask, pos, sub)
        return self._decode_answers(logits, sub, sub_mask, next_pos[index] + T)

    def _probe_naive(self, sequences: list[list[int]]):
        """Re-encode each prefix + trigger from scratch (one row at a time, no padding)."""
        all_ids, all_lps = [], []
        for seq in sequences:
            full = torch.tensor([seq + self.trigger_ids], device=self.device)
            cache = DynamicCache()
            mask = torch.ones_like(full)
            pos = torch.arange(full.shape[1], device=self.device)[None]
            logits, _ = self._forward(full, mask, pos, cache)
            ids, lps = self._decode_answers(logits, cache, mask, torch.tensor([full.shape[1]], device=self.device))
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
        last_probe: list[int | None] = [None] * B
        pending: list[str | None] = [None] * B  # boundary/cue seen since the row's last probe

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
                    if n == 0:  # the start probe: an answer with no reasoning
                        reason = "start"
                    else:
                        gen = results[r].generated_ids
                        event = self.schedule.event(self._tok_text(gen[-1]), "".join(self._tok_text(t) for t in gen[-4:]))
                        pending[r] = event or pending[r]
                        scheduled = sum(p.reason != "start" for p in results[r].probes)  # start/cap probes: outside the cap
                        reason = self.schedule.due(n, pending[r], last_probe[r], scheduled)
                        if n == self.max_new_tokens and self.schedule.at_cap:
                            # the row is still running at the cap: its answer is forced here, whatever
                            # else would have fired at this token (every_n often divides the cap)
                            reason = "cap"
                    if reason:
                        pending[r] = None
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
                        last_probe[r] = n
            if n >= self.max_new_tokens:
                break
            nxt = self._choose(logits)  # (b,)
            finished = torch.isin(nxt, self._eos_tensor.to(nxt.device))
            for j, r in enumerate(rows.tolist()):
                results[r].generated_ids.append(int(nxt[j]))
                if finished[j]:
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
