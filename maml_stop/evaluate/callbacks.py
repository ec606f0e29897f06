"""EM/token evaluation during meta-training (a Lightning callback).

At the end of a validation epoch, :class:`EMTokenEvaluation` adapts the module's predictor (through its
own :class:`~maml_stop.learn.adapter.InnerLoopAdapter`) on the support sets of the datamodule's fixed
validation episodes (:meth:`maml_stop.data.datamodule.TraceDataModule.eval_episodes`, the very episodes
``val/loss`` is measured on: ``data.val_episodes`` per validation family, K = ``data.k``, query =
``data.eval_q``), chooses the threshold on each support set, scores the query sets against full
generation, and logs::

    val/savings_at_delta        % of tokens saved with the support-chosen threshold (the headline)
    val/em_drop                 its EM drop against full generation (fraction; 0.01 = 1 point)
    val/curve_savings_at_delta  savings at EM drop <= delta with the best threshold in hindsight
    val/curve_auc               area under the attainable EM-vs-tokens envelope
    val/oracle_savings          what the oracle saves on the same queries
    val/brier, val/ece          calibration of the adapted predictor on query probe points

and saves the EM-vs-tokens curve as ``<log dir>/em_tokens/epoch=NNN.png`` (rank zero only).

Under several processes (``trainer.strategy: ddp``) each rank evaluates its share of the episodes
(:func:`maml_stop.data.episodes.rank_share`) and the metrics' ``compute`` sums their states over every
rank (torchmetrics' sync on compute, on the adapter's device so that NCCL can reduce them): the figures
are those of one process on all the episodes, identical on every rank.

YAML (``trainer.callbacks``)::

    - class_path: maml_stop.evaluate.callbacks.EMTokenEvaluation
      init_args: {delta: 0.01, threshold_method: em_target}
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_only

from maml_stop.data.episodes import rank_share
from maml_stop.evaluate import metrics as M
from maml_stop.decide.policies import DEFAULT_TAUS, OraclePolicy, ProbePolicy, evaluate_policy, sweep_policy
from maml_stop.decide.registry import SELECTORS, make_selector
from maml_stop.evaluate.report.plots import pyplot

__all__ = ["EMTokenEvaluation"]

log = logging.getLogger(__name__)


class EMTokenEvaluation(Callback):
    """Adapt on fixed validation episodes, sweep thresholds, log EM/token figures, save the curve."""

    def __init__(
        self,
        delta: float = 0.01,
        threshold_method: str = "em_target",
        ltt_alpha: float = 0.1,
        taus: list[float] | None = None,
        every_n_epochs: int = 1,
        seed: int = 0,
        save_plot: bool = True,
        crossfit: bool = False,
    ) -> None:
        """Episodes: the datamodule's validation episodes (module docstring); ``taus`` default
        :data:`maml_stop.decide.policies.DEFAULT_TAUS`; ``crossfit`` chooses tau on out-of-sample support
        scores (see :class:`~maml_stop.decide.policies.ProbePolicy`), its halves drawn with ``seed``."""
        super().__init__()
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1; got {every_n_epochs}")
        if not 0.0 <= delta < 1.0:
            raise ValueError(f"delta is an EM drop as a fraction in [0, 1) (0.01 = 1 point); got {delta}")
        if threshold_method not in SELECTORS:
            raise ValueError(f"unknown threshold_method {threshold_method!r}; valid: {', '.join(SELECTORS)}")
        self.delta = delta
        self.selector = make_selector(threshold_method, delta=delta, alpha=ltt_alpha)
        self.taus = list(taus) if taus is not None else list(DEFAULT_TAUS)
        self.every_n_epochs, self.seed, self.save_plot = every_n_epochs, seed, save_plot
        self.crossfit = crossfit
        self.history: list[dict[str, float]] = []

    # ---- the decision part: pure given the adapter and the episodes -----------------------------------
    def evaluate(self, adapter: Any, episodes: Sequence[Any], eval_steps: int | None = None) -> tuple[dict[str, float], dict]:
        """Figures (see the module docstring) and the pooled EM-vs-tokens curve over ``episodes``. Under
        ``torch.distributed`` the metrics sum their states over every process when they compute, so each
        process passes its own share of the episodes; that reduction runs on the adapter's device (the
        process group's: CUDA for NCCL)."""
        policy = ProbePolicy(adapter=adapter, selector=self.selector, taus=self.taus, adapt_steps=eval_steps,
                             crossfit=self.crossfit, seed=self.seed, name="maml")
        oracle = OraclePolicy()
        curve = M.EMTokensCurve(n_thresholds=len(self.taus))
        auc = M.CurveAUC(n_thresholds=len(self.taus))
        at_delta = M.SavingsAtEMDrop(n_thresholds=len(self.taus), delta=self.delta)
        savings, oracle_savings = M.TokenSavings(), M.TokenSavings()
        em, full_em = M.EMAtStop(), M.EMAtStop()
        brier, ece = M.BrierScore(), M.ExpectedCalibrationError()
        for ep in episodes:
            policy.fit(ep.support)
            sweep = sweep_policy(policy, ep.query)
            args = [torch.from_numpy(a) for a in (sweep.em, sweep.tokens, sweep.full_em, sweep.full_tokens)]
            for m in (curve, auc, at_delta):
                m.update(*args)
            out = evaluate_policy(policy, ep.query)
            savings.update(torch.from_numpy(out.total_tokens), torch.from_numpy(out.full_tokens))
            em.update(torch.from_numpy(out.em))
            full_em.update(torch.from_numpy(out.full_em))
            ref = evaluate_policy(oracle, ep.query)
            oracle_savings.update(torch.from_numpy(ref.total_tokens), torch.from_numpy(ref.full_tokens))
            probs = torch.from_numpy(np.concatenate(policy.probabilities(ep.query)))
            labels = torch.from_numpy(np.concatenate([t.labels for t in ep.query]).astype(np.float64))
            brier.update(probs, labels)
            ece.update(probs, labels)
        device = next(adapter.parameters(), torch.empty(0)).device if hasattr(adapter, "parameters") else None
        if device is not None and device.type != "cpu":
            for m in (curve, auc, at_delta, savings, oracle_savings, em, full_em, brier, ece):
                m.to(device)
        figures = {
            "savings_at_delta": float(savings.compute()),
            "em_drop": float(full_em.compute() - em.compute()),
            "curve_savings_at_delta": float(at_delta.compute()),
            "curve_auc": float(auc.compute()),
            "oracle_savings": float(oracle_savings.compute()),
            "brier": float(brier.compute()),
            "ece": float(ece.compute()),
        }
        c = curve.compute()
        return figures, {k: torch.atleast_1d(v).tolist() for k, v in c.items()}

    @staticmethod
    def episodes(trainer: Trainer) -> list:
        """The episodes evaluated on: the datamodule's validation episodes (``eval_episodes("val")``)."""
        dm = trainer.datamodule
        if dm is None or not callable(getattr(dm, "eval_episodes", None)):
            raise RuntimeError(
                "EMTokenEvaluation needs a TraceDataModule (trainer.datamodule with eval_episodes); "
                f"got {type(dm).__name__}"
            )
        return dm.eval_episodes("val")

    # ---- hooks: the only side effects ----------------------------------------------------------------
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        episodes = self.episodes(trainer)
        if not episodes:
            return
        steps = getattr(pl_module, "eval_inner_steps", None)
        share = rank_share(episodes, trainer.global_rank, trainer.world_size)  # all of them on one process
        figures, curve = self.evaluate(pl_module.adapter, share, steps)
        for name, value in figures.items():  # already over every rank's share: sync_dist averages equal values
            pl_module.log(f"val/{name}", value, batch_size=len(episodes), sync_dist=True)
        self.history.append({"epoch": trainer.current_epoch, **figures})
        if self.save_plot:
            # on every rank: under DDP trainer.log_dir is a broadcast from rank zero, which a read inside
            # the rank-zero-only writer would wait on forever
            folder = Path(trainer.log_dir or trainer.default_root_dir) / "em_tokens"
            self._save_curve(folder, trainer.current_epoch, curve, figures)

    @rank_zero_only
    def _save_curve(self, folder: Path, epoch: int, curve: Mapping[str, list], figures: Mapping[str, float]) -> None:
        plt = pyplot()
        folder.mkdir(parents=True, exist_ok=True)
        fig, ax = plt.subplots(figsize=(4.5, 3.6))
        ax.plot(curve["cost"], curve["em"], ".-", label="MAML-adapted probe (tau sweep)")
        ax.plot([1.0], [curve["full_em"][0]], "ks", label="full generation")
        ax.set_xlabel("tokens / full generation")
        ax.set_ylabel("EM")
        ax.set_title(
            f"epoch {epoch}: {100 * figures['savings_at_delta']:.1f}% saved, "
            f"EM drop {100 * figures['em_drop']:.1f} pt", fontsize=9,
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(folder / f"epoch={epoch:03d}.png", dpi=100)
        plt.close(fig)

    # ---- resume ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
