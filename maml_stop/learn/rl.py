"""``RLStoppingModule``: a stopping policy trained by policy gradient on the meta-training families.

The stopping predictor's output is read as a **policy**: at probe point ``i`` of a trace it stops with
probability ``p_i = sigmoid(logit_i)`` (a Bernoulli decision; the first stop ends the trace). The reward
of one pass over a trace is

    R = EM at the stop - lam * tokens / full-generation tokens

with the EM of the forced answer at the stop probe (the final answer's EM when it never stops) and the
tokens the one accounting home charges (:mod:`maml_stop.data.accounting`: stopping at ``i`` costs
``positions[i]`` plus the probes ``0..i``; never stopping costs every reasoning token plus every probe),
divided by the trace's plain full-generation cost, so that ``lam`` is the EM a whole trace's worth of
tokens is worth (``lam = 0.1``: saving all of a trace's tokens pays for a tenth of a right answer).

Training is REINFORCE (Williams 1992) on ``samples`` rollouts of each of ``traces_per_step`` training
traces per step, drawn at random from the meta-training families (``data.train_families``; the
datamodule's training episodes carry no token accounting, so its training loader only paces the steps:
``data.steps_per_epoch`` steps an epoch). Baselines (``baseline``):

* ``mean``: each rollout's baseline is the mean reward of the other rollouts of the same trace (the
  leave-one-out baseline of Kool et al. 2019, "Buy 4 REINFORCE samples, get a baseline for free";
  unbiased, needs ``samples >= 2``);
* ``learned``: a per-decision value ``V(probe features)`` (a linear head on the predictor's normalised
  inputs, ``value_head``, fitted by squared error to the return), subtracted at each decision taken;
* ``none``: plain REINFORCE.

``entropy_coef`` adds the entropy of the stop decisions taken as a bonus (exploration).

A trace records every probe, so the expected reward of the policy is a finite sum
(:func:`expected_reward`): ``val/reward`` and ``test/reward`` are that exact expectation on every trace
of the validation / test families (no sampling noise), ``val/loss`` is its negative (what the
quickstart's ``EarlyStopping`` and ``ModelCheckpoint`` monitor), and the tests check the estimator
against its gradient. ``val/reward_greedy``, ``val/em_greedy``, ``val/tokens_greedy`` (fraction of full
generation) and ``val/stopped_greedy`` score the deterministic policy "stop at the first ``p >= 0.5``".

The module is a :class:`~maml_stop.learn.module.MetaStoppingModule` with another objective: the same
predictor and :class:`~maml_stop.learn.adapter.InnerLoopAdapter` (``model.adapter.inner_lr``, ``inner_steps``,
``loss``: how the evaluation adapts the RL-trained init on K support traces through
``InnerLoopAdapter.fit_support``), the same normalisation hook and the same checkpoint layout, so
:func:`maml_stop.learn.module.load_predictor` reads its checkpoints (their ``maml_stop`` entry adds
``objective: rl`` and the ``rl`` settings).

    maml-stop fit --config experiments/quickstart.yaml --config experiments/rl.yaml
    maml-stop fit --config experiments/quickstart.yaml --model maml_stop.learn.rl.RLStoppingModule --model.lam 0.2
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from maml_stop.data.batches import ProbeBatch, TraceTensors
from maml_stop.data.corpus import Trace
from maml_stop.learn.adapter import AdapterConfig
from maml_stop.learn.module import CKPT_KEY, MetaStoppingModule
from maml_stop.learn.predictor import PredictorConfig
from maml_stop.learn.rl_objective import (BASELINES, RewardTable, Rollouts, RLConfig, expected_reward, greedy_stops,
                                          padded_logits, policy_figures, policy_gradient_loss, sample_rollouts,
                                          stop_distribution)

__all__ = ["RLConfig", "RLStoppingModule", "RewardTable", "Rollouts", "BASELINES", "padded_logits",
           "stop_distribution", "expected_reward", "greedy_stops", "sample_rollouts", "policy_gradient_loss",
           "policy_figures"]

log = logging.getLogger(__name__)


# ---- the LightningModule ---------------------------------------------------------------------------------
class RLStoppingModule(MetaStoppingModule):
    """A :class:`StoppingPredictor` trained as a stopping policy by REINFORCE (module docstring)."""

    def __init__(
        self,
        n_features: int,
        feature_names: list[str] | None = None,
        predictor: PredictorConfig = PredictorConfig(),
        adapter: AdapterConfig = AdapterConfig(),
        eval_inner_steps: int | None = None,
        lam: float = RLConfig.lam,
        baseline: str = RLConfig.baseline,
        entropy_coef: float = RLConfig.entropy_coef,
        samples: int = RLConfig.samples,
        traces_per_step: int = RLConfig.traces_per_step,
        rl_seed: int = 0,
        init_seed: int = 0,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        """``predictor`` and ``adapter`` are :class:`MetaStoppingModule`'s (the adapter is what
        the evaluation's ``rl`` method adapts on K support traces with); ``lam``, ``baseline``,
        ``entropy_coef``, ``samples``, ``traces_per_step`` are :class:`RLConfig`'s; ``rl_seed`` seeds
        the draw of training traces and rollouts (saved in checkpoints, so a resumed fit goes on alike)."""
        self.rl_config = RLConfig(lam, baseline, entropy_coef, samples, traces_per_step)  # checked first
        super().__init__(
            n_features, feature_names, predictor=predictor, adapter=adapter, eval_inner_steps=eval_inner_steps,
            compare_random_init=False, init_seed=init_seed, optimizer=optimizer, lr_scheduler=lr_scheduler,
        )
        width = n_features * (3 if self.predictor_config.kind == "delta" else 1)  # predictor.inputs(batch) width
        with torch.random.fork_rng():
            torch.manual_seed(init_seed + 1)
            # the learned baseline's V(probe): outside ``adapter.*``, so load_predictor leaves it out
            self.value_head = nn.Linear(width, 1) if baseline == "learned" else None
        self.generator = torch.Generator().manual_seed(rl_seed)
        self._data: dict[str, tuple[TraceTensors, RewardTable] | None] = {}
        self._traces: dict[str, list[Trace]] = {}

    # ---- data -------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        super().setup(stage)  # normalisation statistics of the meta-training families, feature checks
        dm = self.trainer.datamodule if self._trainer is not None else None
        if dm is None or not hasattr(dm, "split"):
            return
        dm.setup()
        for name, families in (("train", dm.split.train), ("val", dm.split.val), ("test", dm.split.test)):
            self._traces[name] = [t for f in families for t in dm.corpus.traces(f)]
        self._data = {}

    def use_traces(self, stage: str, traces: Sequence[Trace]) -> None:
        """Set the traces of a stage by hand (without a datamodule: tests, notebooks)."""
        self._traces[stage] = list(traces)
        self._data.pop(stage, None)

    def stage_data(self, stage: str) -> tuple[TraceTensors, RewardTable] | None:
        """The traces of ``stage`` collated once with their reward table (None without traces)."""
        if stage not in self._data:
            traces = self._traces.get(stage) or []
            self._data[stage] = (TraceTensors(traces), RewardTable.from_traces(traces)) if traces else None
        return self._data[stage]

    def logits(self, batch: ProbeBatch, table: RewardTable, model: nn.Module | None = None) -> Tensor:
        """The policy's stop logits laid out per trace. (T, P)"""
        model = self.predictor if model is None else model
        return padded_logits(model(batch), batch, table.width)

    def rl_loss(self, batch: ProbeBatch, table: RewardTable) -> tuple[Tensor, dict[str, Tensor]]:
        """:func:`policy_gradient_loss` of the predictor on ``batch`` (the traces of ``table``)."""
        values = None
        if self.value_head is not None:
            values = padded_logits(self.value_head(self.predictor.inputs(batch)).squeeze(-1), batch, table.width)
        return policy_gradient_loss(self.logits(batch, table), table, self.rl_config, values, self.generator)

    # ---- steps ------------------------------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """One policy-gradient step on ``traces_per_step`` random training traces (``batch``, the
        datamodule's episodes, only paces the steps: module docstring)."""
        data = self.stage_data("train")
        if data is None:
            raise ValueError("RLStoppingModule has no training traces: set data.train_families (or data.fold) to "
                             "families of the corpus, or call use_traces('train', traces)")
        tensors, table = data
        n = min(self.rl_config.traces_per_step, len(table))
        index = torch.randperm(len(table), generator=self.generator)[:n]
        batch_ = tensors.gather(index.numpy()).to(self.device)
        loss, stats = self.rl_loss(batch_, table.gather(index).to(self.device))
        self.log("train/loss", loss, batch_size=n, prog_bar=True)
        for key, value in stats.items():
            self.log(f"train/{key}", value, batch_size=n)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Nothing per batch: the figures are computed once on every validation trace (epoch end)."""

    def test_step(self, batch: Any, batch_idx: int) -> None:
        """Nothing per batch: the figures are computed once on every test trace (epoch end)."""

    def stage_figures(self, stage: str) -> dict[str, float] | None:
        """:func:`policy_figures` of the current policy on every trace of ``stage`` (None without)."""
        data = self.stage_data(stage)
        if data is None:
            return None
        tensors, table = data
        was = self.training
        self.eval()
        with torch.no_grad():
            batch = tensors.gather(np.arange(len(table))).to(self.device)
            figures = policy_figures(self.logits(batch, table.to(self.device)), table.to(self.device), self.rl_config.lam)
        self.train(was)
        return figures

    def _log_stage(self, stage: str) -> None:
        figures = self.stage_figures(stage)
        if figures is None:
            return
        n = len(self._traces[stage])
        self.log(f"{stage}/reward", figures["reward"], batch_size=n, prog_bar=True)
        self.log(f"{stage}/loss", -figures["reward"], batch_size=n)  # what the quickstart's callbacks monitor
        for key in ("reward_greedy", "em_greedy", "tokens_greedy", "stopped_greedy", "full_em"):
            self.log(f"{stage}/{key}", figures[key], batch_size=n)

    def on_validation_epoch_end(self) -> None:
        self._log_stage("val")

    def on_test_epoch_end(self) -> None:
        self._log_stage("test")

    # ---- checkpoints ------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)  # the layout load_predictor reads
        checkpoint[CKPT_KEY].update(objective="rl", rl=self.rl_config.to_dict())
        checkpoint["rl_generator"] = self.generator.get_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if "rl_generator" in checkpoint:
            self.generator.set_state(checkpoint["rl_generator"])
