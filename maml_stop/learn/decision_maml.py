"""MAML through the decision (issue 25 item 3): meta-learn a probe's initialisation *and* the margin of its
threshold selection on what is measured, the query outcome of the selected policy.

The decision of an episode (K labelled support traces of one family):

1. **probe**: the meta-learned initialisation adapted on the support by the project's adapter
   (:class:`~maml_stop.learn.adapter.InnerLoopAdapter`, ``maml``, balanced BCE, ``inner_steps`` steps,
   episode-batched);
2. **selection**: ``em_target`` with a margin on the support sweep of cross-fitted scores (each half of
   the support scored by the probe adapted on the other half, as the protocol does): the candidate tau
   with the largest support savings whose support drop + ``margin`` <= delta, full generation (always a
   candidate) when none (:func:`maml_stop.decide.meta.rules.decide`); ``margin`` is meta-learned.

Meta-training smooths both steps (:mod:`maml_stop.decide.meta.relaxed`): the first-hit rule by
``sigmoid((p - tau) / T)`` survival products, the selection by a softmax over the candidates (full
generation's score 0) of ``S_j - rho * relu(D_j + margin - delta)`` at temperature ``selection_temperature``
(support drop ``D_j`` and savings ``S_j`` of the smoothed rule). The outer loss is the selected policy's
expected query outcome, per training family ``f`` ``-S_f + lambda_f * (D_f - target)``, one Lagrange
multiplier per family raised by dual ascent while its mean query drop exceeds ``target``: every
training family is held to the drop target, not only their average. Meta-gradients run through the
inner steps (second order unless ``first_order``). The zero-step twin (:meth:`DecisionMAML.zero_step`)
is the same decision from the initialisation (the pooled probe, margin ``margin_init``): ``em_target`` on
the probe adapted to the support, without the outer loop.

>>> model = DecisionMAML(StoppingPredictor(4, depth=0), DecisionMAMLConfig(outer_steps=2), taus, 0.01)  # doctest: +SKIP
>>> history = model.meta_train(families, k=16)                                                     # doctest: +SKIP
>>> model.evaluate(table, supports)["em_drop"]                                                     # doctest: +SKIP
"""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from maml_stop.data.batches import ProbeBatch
from maml_stop.decide.meta.rules import decide
from maml_stop.decide.meta.relaxed import FamilyTensors, episode_figures, hard_outcome, relaxed_outcome
from maml_stop.learn.adapter import InnerLoopAdapter
from maml_stop.learn.predictor import StoppingPredictor

log = logging.getLogger(__name__)

__all__ = ["DecisionMAMLConfig", "DecisionMAML", "support_batches"]


@dataclass
class DecisionMAMLConfig:
    """Settings of the decision's meta-training (tuned values in experiments/meta_select*.yaml)."""

    inner_steps: int = 5  # probe adaptation steps on the support
    inner_lr: float = 0.5  # their step size
    first_order: bool = False  # FOMAML through the probe's inner steps
    temperature: float = 0.05  # T of sigmoid((p - tau) / T), in probability units
    selection_temperature: float = 0.02  # of the softmax over candidates, in units of savings
    rho: float = 20.0  # the smoothed selection's price of support drop beyond delta - margin
    margin_init: float = 0.0  # the selection's margin (EM fraction) before meta-training: em_target's 0
    target: float = 0.005  # the mean query drop each training family is held to (delta less a safety margin)
    outer_steps: int = 100  # meta-training steps (every training family in each)
    learn_init: bool = True  # meta-learn the probe's initialisation (False: the margin alone, the probe stays)
    outer_lr: float = 0.01  # Adam, for the probe's weights
    margin_lr: float = 0.002  # Adam, for the margin (EM fraction per step)
    meta_batch: int = 4  # episodes per training family per step
    lambda_init: float = 10.0  # each family's Lagrange multiplier at the start
    dual_lr: float = 100.0  # its dual-ascent step per unit of excess drop
    backend: str = "torch_func"  # the adapter's backend (learn2learn gives the same numbers)
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.temperature, self.selection_temperature) <= 0 or self.outer_steps < 0 or self.meta_batch < 1:
            raise ValueError(f"need temperature, selection_temperature > 0, outer_steps >= 0, meta_batch >= 1; got "
                             f"{self.temperature}, {self.selection_temperature}, {self.outer_steps}, {self.meta_batch}")


def support_batches(table: FamilyTensors, supports: Sequence[np.ndarray]) -> list[ProbeBatch]:
    """The support traces of each episode as a :class:`ProbeBatch` (rows of a trace contiguous, in probe
    order; balanced loss weights computed by the adapter)."""
    out = []
    mask = table.mask.numpy() > 0
    for idx in supports:
        m = mask[idx]  # (K, P)
        trace, probe = np.nonzero(m)
        feats = table.features[idx][torch.from_numpy(trace), torch.from_numpy(probe)]
        labels = table.labels[idx].numpy()[trace, probe].astype(np.float32)
        out.append(ProbeBatch(feats, torch.from_numpy(labels), torch.from_numpy(trace), torch.from_numpy(probe),
                              torch.ones(len(trace))))
    return out


class DecisionMAML(nn.Module):
    """The meta-learned decision (module docstring): a probe initialisation and the selection's margin,
    over the candidate thresholds ``taus`` (conservative -> aggressive) at the drop target ``delta``."""

    def __init__(self, predictor: StoppingPredictor, config: DecisionMAMLConfig, taus: Sequence[float],
                 delta: float = 0.01) -> None:
        super().__init__()
        if predictor.kind != "mlp":
            raise ValueError(f"the decision's meta-training scores padded traces: kind 'mlp' only; got {predictor.kind!r}")
        if not taus:
            raise ValueError("need at least one candidate threshold")
        self.config, self.delta = config, float(delta)
        self.register_buffer("taus", torch.tensor([float(t) for t in taus], dtype=torch.float64))
        self.adapter = InnerLoopAdapter(predictor, "maml", config.inner_lr, config.inner_steps, config.first_order,
                                        "balanced", config.backend)
        self.margin = nn.Parameter(torch.tensor(float(config.margin_init), dtype=torch.float64))
        self.lambdas: dict[str, float] = {}  # each training family's Lagrange multiplier after meta_train

    def zero_step(self) -> "DecisionMAML":
        """The twin without meta-training: a copy of this model as it is now (call before meta_train)."""
        return copy.deepcopy(self)

    def _probs(self, table: FamilyTensors, supports: Sequence[np.ndarray]) -> tuple[Tensor, Tensor]:
        """(E, N, P) probabilities of every trace under each episode's probe adapted on its whole support
        (what the query sees), and (E, N, P) cross-fitted ones (what the support sweep sees: each support
        half scored by the probe adapted on the other half, as the protocol's adapted methods do)."""
        halves = [np.array_split(np.asarray(idx)[np.random.default_rng(self.config.seed + e).permutation(len(idx))], 2)
                  for e, idx in enumerate(supports)]
        sets = [*supports, *(h[0] for h in halves), *(h[1] for h in halves)]  # 3E support sets, adapted at once
        adapted = self.adapter.adapt_episodes(support_batches(table, sets))
        n, p, f = table.features.shape
        x = self.adapter.predictor.inputs(ProbeBatch(table.features.reshape(n * p, f), torch.zeros(n * p),
                                                     torch.zeros(n * p, dtype=torch.long),
                                                     torch.zeros(n * p, dtype=torch.long), torch.ones(n * p)))
        logits = adapted.logits_from_inputs(x.unsqueeze(0).expand(len(sets), -1, -1))  # (3E, N * P)
        probs = torch.sigmoid(logits.double()).reshape(len(sets), n, p)
        e = len(supports)
        in_first = torch.zeros(e, n, 1, dtype=torch.bool)
        for i, h in enumerate(halves):
            in_first[i, torch.as_tensor(h[0])] = True
        crossed = torch.where(in_first, probs[2 * e:], probs[e:2 * e])  # first half by the second's probe
        return probs[:e], crossed

    @staticmethod
    def _weights(table: FamilyTensors, supports: Sequence[np.ndarray]) -> np.ndarray:
        """(E, N) 0/1 support membership."""
        w = np.zeros((len(supports), len(table)))
        for e, idx in enumerate(supports):
            w[e, np.asarray(idx)] = 1.0
        return w

    def outcomes(self, table: FamilyTensors, supports: Sequence[np.ndarray]) -> tuple[Tensor, Tensor, Tensor]:
        """Smoothed (E,) query drop and savings of the softly selected policy, and the (E, J + 1)
        selection weights (column 0: full generation). Differentiable."""
        weights = torch.from_numpy(self._weights(table, supports))
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.config.learn_init):
            probs, crossed = self._probs(table, supports)
        taus = self.taus.expand(len(supports), -1)  # (E, J)
        em, tokens, _ = relaxed_outcome(table, probs, taus, self.config.temperature)  # (E, J, N)
        q_drop, q_saved = episode_figures(table, em, tokens, 1.0 - weights)  # (E, J) query
        em, tokens, _ = relaxed_outcome(table, crossed, taus, self.config.temperature)
        s_drop, s_saved = episode_figures(table, em, tokens, weights)  # (E, J) support, cross-fitted
        score = s_saved - self.config.rho * torch.relu(s_drop + self.margin - self.delta)
        zero = torch.zeros_like(score[:, :1])
        pick = torch.softmax(torch.cat([zero, score], 1) / self.config.selection_temperature, dim=1)  # (E, J + 1)
        return (pick[:, 1:] * q_drop).sum(1), (pick[:, 1:] * q_saved).sum(1), pick

    def evaluate(self, table: FamilyTensors, supports: Sequence[np.ndarray]) -> dict[str, list]:
        """The hard decision of each episode and its query figures: per-episode lists ``em_drop``,
        ``savings``, ``tau`` (None: full generation)."""
        self.eval()
        with torch.no_grad():
            probs, crossed = (a.numpy() for a in self._probs(table, supports))
        weights = self._weights(table, supports)
        taus = np.broadcast_to(self.taus.numpy(), (len(supports), len(self.taus)))
        em, tokens, _ = hard_outcome(table, probs, taus)  # (E, J, N)
        q_drop, q_saved = episode_figures(table, em, tokens, 1.0 - weights)
        em, tokens, _ = hard_outcome(table, crossed, taus)
        s_drop, s_saved = episode_figures(table, em, tokens, weights)  # cross-fitted support sweep
        choice = decide(s_drop, s_saved, self.delta, float(self.margin.detach()))  # (E,) 0 full generation, j + 1 tau_j
        rows = np.arange(len(supports))
        zero = np.zeros((len(supports), 1))
        return {"em_drop": np.hstack([zero, q_drop])[rows, choice].tolist(),
                "savings": np.hstack([zero, q_saved])[rows, choice].tolist(),
                "tau": [None if c == 0 else float(self.taus[c - 1]) for c in choice]}

    # -- meta-training
    def meta_train(self, families: Mapping[str, FamilyTensors], k: int) -> list[dict]:
        """``outer_steps`` Adam steps on the per-family Lagrangian over the ``families`` (random episodes
        of ``k`` support traces drawn at random, the rest of the family as the query: one trace per
        question in the corpora here; evaluation uses the protocol's question-level episodes); returns a
        short history."""
        cfg = self.config
        rng = np.random.default_rng(cfg.seed)
        lam = {f: float(cfg.lambda_init) for f in families}
        groups = [{"params": [self.margin], "lr": cfg.margin_lr}]
        if cfg.learn_init:
            groups.append({"params": list(self.adapter.parameters()), "lr": cfg.outer_lr})
        opt = torch.optim.Adam(groups)
        history = []
        self.train()
        for step in range(cfg.outer_steps):
            loss = torch.zeros((), dtype=torch.float64)
            drops, saves = {}, {}
            for f, table in families.items():
                supports = [rng.choice(len(table), size=min(k, len(table) - 1), replace=False)
                            for _ in range(cfg.meta_batch)]
                drop, saved, _ = self.outcomes(table, supports)
                d, s = drop.mean(), saved.mean()
                loss = loss + (-s + lam[f] * (d - cfg.target)) / len(families)
                drops[f], saves[f] = float(d.detach()), float(s.detach())
            opt.zero_grad()
            loss.backward()
            opt.step()
            for f in families:  # dual ascent: a family over the target raises its price
                lam[f] = max(0.0, lam[f] + cfg.dual_lr * (drops[f] - cfg.target))
            if step % 10 == 0 or step == cfg.outer_steps - 1:
                history.append({"step": step, "loss": float(loss.detach()), "margin": float(self.margin.detach()),
                                "mean_drop": float(np.mean(list(drops.values()))),
                                "worst_drop": max(drops.values()), "saved": float(np.mean(list(saves.values())))})
                log.info("decision MAML step %d: %s", step, history[-1])
        self.lambdas = lam
        return history

    def state(self) -> dict:
        """What results.json records of the fitted decision (the probe's weights aside)."""
        return {"margin": float(self.margin.detach()), "lambdas": dict(self.lambdas),
                "config": asdict(self.config)}
