"""The objective of the RL stopping policy (:mod:`maml_stop.learn.rl`): the rewards of every stop a
policy can take (:class:`RewardTable`), the exact expected reward of the stochastic policy, the greedy
policy "stop at the first p >= 0.5" (the one rule, :func:`maml_stop.decide.rule.first_hits`), sampled
rollouts and the REINFORCE surrogate loss with its baselines. Torch alone: no Lightning here.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from maml_stop.data.accounting import full_cost, stop_cost, stop_costs
from maml_stop.data.batches import ProbeBatch
from maml_stop.data.corpus import Trace
from maml_stop.decide.rule import NEVER, first_hits

__all__ = ["RLConfig", "RewardTable", "Rollouts", "BASELINES", "padded_logits", "stop_distribution", "expected_reward",
           "greedy_stops", "sample_rollouts", "bernoulli_entropy", "policy_gradient_loss", "policy_figures"]

BASELINES = ("mean", "learned", "none")


@dataclass(frozen=True)
class RLConfig:
    """The policy-gradient objective (tuned values: ``experiments/rl.yaml``)."""

    lam: float = 0.1  # EM a full trace's worth of tokens is worth: R = EM - lam * tokens / full tokens
    baseline: str = "mean"  # mean (leave-one-out over the trace's rollouts) | learned (value head) | none
    entropy_coef: float = 0.0  # weight of the entropy bonus of the stop decisions taken
    samples: int = 4  # rollouts per trace per step (baseline 'mean' needs >= 2)
    traces_per_step: int = 64  # training traces per step (drawn without replacement)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lam) and self.lam >= 0):
            raise ValueError(f"lam (the token price, in EM per full trace) must be finite and >= 0; got {self.lam}")
        if self.baseline not in BASELINES:
            raise ValueError(f"unknown baseline {self.baseline!r}; valid baselines: {', '.join(BASELINES)}")
        if not (math.isfinite(self.entropy_coef) and self.entropy_coef >= 0):
            raise ValueError(f"entropy_coef must be finite and >= 0; got {self.entropy_coef}")
        if self.samples < 1 or self.traces_per_step < 1:
            raise ValueError(f"samples and traces_per_step must be >= 1; got {self.samples}, {self.traces_per_step}")
        if self.baseline == "mean" and self.samples < 2:
            raise ValueError(f"baseline 'mean' is the mean reward of a trace's other rollouts: it needs samples >= 2; "
                             f"got samples={self.samples} (or choose baseline: learned | none)")

    def to_dict(self) -> dict:
        return asdict(self)


# ---- the rewards of every stop a policy can take ---------------------------------------------------------
@dataclass
class RewardTable:
    """EM and tokens of every stop on a list of traces, padded to (T, P) (P: the most probes of a trace).
    Tokens are :mod:`maml_stop.data.accounting`'s, divided by the trace's full-generation cost."""

    stop_em: Tensor  # (T, P) float: EM of the forced answer at probe i (0 on padding)
    stop_tokens: Tensor  # (T, P) float: tokens of stopping at probe i having run probes 0..i, / full
    end_em: Tensor  # (T,) float: the final answer's EM (never stopping)
    end_tokens: Tensor  # (T,) float: tokens of never stopping (every probe run), / full
    mask: Tensor  # (T, P) bool: the trace has probe i

    @classmethod
    def from_traces(cls, traces: Sequence[Trace]) -> "RewardTable":
        if not traces:
            raise ValueError("a reward table needs at least one trace")
        width = max(t.n_probes for t in traces)
        n = len(traces)
        stop_em, stop_tokens = np.zeros((n, width)), np.zeros((n, width))
        mask = np.zeros((n, width), dtype=bool)
        end_em, end_tokens = np.zeros(n), np.zeros(n)
        for i, t in enumerate(traces):
            full = max(full_cost(t), 1)
            p = t.n_probes
            stop_em[i, :p] = np.asarray(t.labels) > 0.5
            stop_tokens[i, :p] = stop_costs(t)[0] / full
            mask[i, :p] = True
            end_em[i] = float(t.final_em)
            end_tokens[i] = stop_cost(t, None)[0] / full
        f32 = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
        return cls(f32(stop_em), f32(stop_tokens), f32(end_em), f32(end_tokens), torch.from_numpy(mask))

    def __len__(self) -> int:
        return int(self.mask.shape[0])

    @property
    def width(self) -> int:
        return int(self.mask.shape[1])

    def gather(self, index: Tensor) -> "RewardTable":
        return RewardTable(self.stop_em[index], self.stop_tokens[index], self.end_em[index], self.end_tokens[index],
                           self.mask[index])

    def to(self, device: torch.device | str) -> "RewardTable":
        return RewardTable(*(getattr(self, k).to(device) for k in ("stop_em", "stop_tokens", "end_em", "end_tokens", "mask")))

    def rewards(self, lam: float) -> tuple[Tensor, Tensor]:
        """Rewards of stopping at each probe (T, P) (0 on padding) and of never stopping (T,)."""
        return (self.stop_em - lam * self.stop_tokens) * self.mask, self.end_em - lam * self.end_tokens


def padded_logits(values: Tensor, batch: ProbeBatch, width: int) -> Tensor:
    """Per-probe values of a :class:`ProbeBatch` (N,) laid out per trace: (T, width), 0 on padding."""
    out = values.new_zeros(batch.n_traces, width)
    return out.index_put((batch.trace_index, batch.probe_index), values)


# ---- the policy: first Bernoulli stop ---------------------------------------------------------------------
def stop_distribution(logits: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """P(the policy stops at probe i) (T, P) and P(it never stops) (T,), for stop logits (T, P)."""
    log_p, log_q = F.logsigmoid(logits), F.logsigmoid(-logits).masked_fill(~mask, 0.0)
    survive = torch.cumsum(log_q, dim=-1) - log_q  # (T, P) log P(no stop before probe i)
    return torch.exp(survive + log_p) * mask, torch.exp(log_q.sum(dim=-1))


def expected_reward(logits: Tensor, table: RewardTable, lam: float) -> Tensor:
    """The exact expected reward of the stochastic policy on each trace (differentiable). (T,)"""
    p_stop, p_never = stop_distribution(logits, table.mask)
    r_stop, r_end = table.rewards(lam)
    return (p_stop * r_stop).sum(dim=-1) + p_never * r_end


def greedy_stops(logits: Tensor, mask: Tensor, tau: float = 0.5) -> Tensor:
    """Stop index of the deterministic policy "first probe with p >= tau" (the one rule,
    :func:`maml_stop.decide.rule.first_hits`) (T,) long, -1 = never."""
    return first_hits(torch.sigmoid(logits), tau, mask)


def _at(stops: Tensor, per_probe: Tensor, end: Tensor) -> Tensor:
    """``per_probe`` (T, P) at the stop indices (..., T), ``end`` (T,) where they are -1."""
    shape = stops.shape
    flat = stops.reshape(-1, shape[-1])  # (S, T)
    picked = per_probe.unsqueeze(0).expand(flat.shape[0], -1, -1).gather(-1, flat.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(flat >= 0, picked, end.unsqueeze(0)).reshape(shape)


@dataclass
class Rollouts:
    """``S`` sampled passes of the policy over ``T`` traces."""

    stops: Tensor  # (S, T) long: probe stopped at, -1 = never
    visited: Tensor  # (S, T, P) bool: the policy decided at probe i (no stop before it)
    log_terms: Tensor  # (S, T, P) log-probability of the decision taken at each visited probe (0 elsewhere)
    rewards: Tensor  # (S, T)


def sample_rollouts(logits: Tensor, table: RewardTable, lam: float, samples: int,
                    generator: torch.Generator | None = None) -> Rollouts:
    """Sample ``samples`` passes: at each probe the policy stops with probability sigmoid(logit)."""
    mask = table.mask
    u = torch.rand((samples, *logits.shape), generator=generator).to(logits.device)  # (S, T, P)
    fire = (u < torch.sigmoid(logits.detach())) & mask  # would stop here if it got here
    earlier = torch.cumsum(fire.long(), dim=-1) - fire.long()  # (S, T, P) stops wanted before probe i
    visited = (earlier == 0) & mask
    stops = torch.where(fire.any(dim=-1), fire.float().argmax(dim=-1), torch.full(fire.shape[:2], NEVER, dtype=torch.long, device=fire.device))
    log_p, log_q = F.logsigmoid(logits), F.logsigmoid(-logits)
    log_terms = torch.where(fire, log_p, log_q) * visited  # (S, T, P)
    r_stop, r_end = table.rewards(lam)
    return Rollouts(stops, visited, log_terms, _at(stops, r_stop, r_end))


def bernoulli_entropy(logits: Tensor) -> Tensor:
    p = torch.sigmoid(logits)
    return -(p * F.logsigmoid(logits) + (1 - p) * F.logsigmoid(-logits))


def policy_gradient_loss(logits: Tensor, table: RewardTable, config: RLConfig, values: Tensor | None = None,
                         generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """The REINFORCE surrogate loss (its gradient estimates minus the gradient of the expected reward)
    on sampled rollouts, with the ``config``'s baseline and entropy bonus; ``values`` (T, P) are the
    learned baseline's per-probe values (``baseline='learned'``; their squared error is added to the
    loss). Returns the loss and detached statistics (``reward``, ``entropy``, ``stopped``, ``value_loss``)."""
    ro = sample_rollouts(logits, table, config.lam, config.samples, generator)
    reward = ro.rewards  # (S, T)
    stats: dict[str, Tensor] = {}
    if config.baseline == "learned":
        if values is None:
            raise ValueError("baseline 'learned' needs the value head's per-probe values")
        advantage = (reward.unsqueeze(-1) - values.detach().unsqueeze(0)) * ro.visited  # (S, T, P)
        pg = -(advantage * ro.log_terms).sum(dim=-1).mean()
        sq = (values.unsqueeze(0) - reward.unsqueeze(-1)) ** 2 * ro.visited
        value_loss = sq.sum() / ro.visited.sum().clamp(min=1)
        stats["value_loss"] = value_loss.detach()
    else:
        if config.baseline == "mean":
            s = reward.shape[0]
            baseline = (reward.sum(dim=0, keepdim=True) - reward) / (s - 1)  # (S, T) leave-one-out
        else:
            baseline = torch.zeros_like(reward)
        pg = -((reward - baseline) * ro.log_terms.sum(dim=-1)).mean()
        value_loss = reward.new_zeros(())
    entropy = (bernoulli_entropy(logits).unsqueeze(0) * ro.visited).sum(dim=-1).mean()  # per pass
    loss = pg - config.entropy_coef * entropy + value_loss
    stats.update(reward=reward.mean().detach(), entropy=entropy.detach(), stopped=(ro.stops >= 0).float().mean())
    return loss, stats


@torch.no_grad()
def policy_figures(logits: Tensor, table: RewardTable, lam: float) -> dict[str, float]:
    """The stochastic policy's exact expected reward and the greedy policy's (first p >= 0.5) reward,
    EM, tokens (fraction of full generation) and share of traces it stops early; full generation's EM."""
    stops = greedy_stops(logits, table.mask)
    r_stop, r_end = table.rewards(lam)
    return {
        "reward": float(expected_reward(logits, table, lam).mean()),
        "reward_greedy": float(_at(stops.unsqueeze(0), r_stop, r_end).mean()),
        "em_greedy": float(_at(stops.unsqueeze(0), table.stop_em, table.end_em).mean()),
        "tokens_greedy": float(_at(stops.unsqueeze(0), table.stop_tokens, table.end_tokens).mean()),
        "stopped_greedy": float((stops >= 0).float().mean()),
        "full_em": float(table.end_em.mean()),
    }
