"""``MetaStoppingModule``: meta-training of the stopping predictor (LightningModule), and
:func:`load_predictor` for the code that uses a trained checkpoint (evaluation, the adapt script).

One training step = one meta-batch of episodes: for each episode the :class:`InnerLoopAdapter` adapts
the predictor on the support set (under ``torch.enable_grad()``, inside the adapter), the adapted
clone's loss on the query set is the outer loss, averaged over the meta-batch; the outer optimiser
updates the initialisation (and Meta-SGD's rates). Validation/test adapt on seeded fixed episodes of
the held-out families and log, on the query sets:

* ``val/loss``: after adaptation (the number to monitor);
* ``val/loss_unadapted``: the meta-trained predictor without adaptation;
* ``val/loss_random_init``: the same architecture and adapter from the random initialisation that
  meta-training started from (same ``init_seed``), adapted on the same support sets: what
  meta-training buys over plain few-shot fine-tuning.

**Several processes** (``trainer.strategy: ddp`` or ``ddp_spawn``, ``trainer.devices``, ``trainer.num_nodes``):
each rank adapts on its share of every meta-batch (:class:`~maml_stop.data.datamodule.TraceDataModule`), DDP
averages the ranks' meta-gradients, which is the single-process meta-gradient of the mean over the whole
meta-batch. ``train/loss`` is averaged over the ranks (``sync_dist``; equal shares). The validation and
test losses are torchmetrics ``MeanMetric`` objects over episodes, whose states are summed over every rank
when they compute, so ``val/loss``, which picks ``best.ckpt``, is the mean over all validation episodes
even when the ranks' shares differ in size (Lightning's ``sync_dist`` of batch-size-weighted tensors
averages the episode counts as integers, rounding 2.5 down to 2). The result is one process's up to the
order of floating-point sums (``tests/test_ddp.py``: weights and losses within 1e-5), provided nothing
random runs inside a step (``model.predictor.dropout: 0``).

Validation and test need ``Trainer(inference_mode=False)`` (set in every YAML and enforced by the CLI):
the inner loop takes gradients.

>>> predictor, adapter, meta = load_predictor("runs/quickstart/checkpoints/best.ckpt")   # doctest: +SKIP
>>> adapted = adapter.adapt(support_batch)                                              # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Mapping

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MeanMetric

import maml_stop
from maml_stop import SCHEMA_VERSION
from maml_stop.data.batches import DataError
from maml_stop.data.datamodule import EpisodeBatch
from maml_stop.data.provenance import corpus_provenance
from maml_stop.learn.adapter import AdapterConfig, InnerLoopAdapter
from maml_stop.learn.predictor import PredictorConfig, StoppingPredictor
from maml_stop.learn.checkpoint_io import CheckpointLoadError, safe_load

__all__ = ["MetaStoppingModule", "load_predictor", "migrate_hyper_parameters", "with_features", "MOVED_KEYS", "check_feature_names", "CheckpointError", "CKPT_KEY"]

log = logging.getLogger(__name__)

CKPT_KEY = "maml_stop"  # our section of a Lightning checkpoint
EVAL_LOSSES = ("loss", "loss_unadapted", "loss_random_init")  # logged as val/<name>, test/<name>
_L2L_FIRST = "_import_learn2learn_core_first"  # see MetaStoppingModule.__getstate__


class CheckpointError(ValueError):
    """A checkpoint that this code cannot use (not ours, other schema, other features)."""


def check_feature_names(checkpoint_names: list[str] | None, corpus_names: list[str] | None) -> None:
    """Raise :class:`CheckpointError` when a checkpoint was trained on other features than the data
    provides (``corpus_names``: the datamodule's ``feature_names``, i.e. its ``data.features`` subset)."""
    if checkpoint_names is None or corpus_names is None or list(checkpoint_names) == list(corpus_names):
        return
    raise CheckpointError(
        "the checkpoint was trained on other features than the corpus provides:\n"
        f"  checkpoint ({len(checkpoint_names)}): {list(checkpoint_names)}\n"
        f"  corpus     ({len(corpus_names)}): {list(corpus_names)}\n"
        "Use a corpus harvested with the same feature set, or meta-train on this one; a checkpoint trained "
        "on a feature subset needs the same data.features (it records the subset as its feature_names)."
    )


def with_features(config: PredictorConfig, n_features: int) -> PredictorConfig:
    """``config`` with the data's feature width (its own ``n_features``: 0 = unset, or the same width)."""
    if config.n_features not in (0, n_features):
        raise ValueError(f"model.predictor.n_features={config.n_features} but the data has {n_features} features "
                         "(leave it unset: the CLI links model.n_features)")
    return dataclasses.replace(config, n_features=n_features)


# the flat module arguments of before the nested configs -> the config that holds them now
MOVED_KEYS = {**{f.name: "predictor" for f in dataclasses.fields(PredictorConfig) if f.name != "n_features"},
              **{f.name: "adapter" for f in dataclasses.fields(AdapterConfig)}}


def migrate_hyper_parameters(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """Hyper-parameters of a checkpoint written before the nested configs (flat ``hidden``, ``inner_lr``,
    ..., ``backend``) as the module takes them now (``predictor: {...}``, ``adapter: {...}``); newer ones
    unchanged."""
    out = dict(hparams)
    for key in ("predictor", "adapter"):
        flat = {name: out.pop(name) for name, home in MOVED_KEYS.items() if home == key and name in out}
        if flat:
            out[key] = {**dict(out.get(key) or {}), **flat}
    return out


class MetaStoppingModule(LightningModule):
    """Meta-trains a :class:`StoppingPredictor` through an :class:`InnerLoopAdapter`."""

    def __init__(
        self,
        n_features: int,
        feature_names: list[str] | None = None,
        predictor: PredictorConfig = PredictorConfig(),
        adapter: AdapterConfig = AdapterConfig(),
        eval_inner_steps: int | None = None,
        compare_random_init: bool = True,
        init_seed: int = 0,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        """``n_features`` and ``feature_names`` come from the data (linked by the CLI; ``predictor``'s
        own ``n_features`` stays 0 or equals it); ``predictor`` and ``adapter`` build the predictor and
        its inner loop (YAML ``model.predictor.hidden``, ``model.adapter.inner_lr``, ``model.adapter.backend``
        (``learn2learn`` or ``torch_func``, which needs no learn2learn), ...; a mapping of their fields is
        taken too); ``init_seed`` fixes the predictor's initialisation (and so the random-init comparison);
        ``eval_inner_steps`` (default the adapter's ``inner_steps``) is the number of inner steps at
        validation/test; ``lr_scheduler`` is stepped every optimiser step."""
        super().__init__()
        self.predictor_config = with_features(PredictorConfig.coerce(predictor), n_features)
        self.adapter_config = AdapterConfig.coerce(adapter)
        # plain dicts in the hyper-parameters: a checkpoint stays loadable weights-only
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler", "predictor", "adapter"])
        self.hparams.update(predictor=self.predictor_config.to_dict(), adapter=self.adapter_config.to_dict())
        if feature_names is not None and len(feature_names) != n_features:
            raise ValueError(f"{len(feature_names)} feature names for n_features={n_features}")
        self.feature_names = list(feature_names) if feature_names is not None else None
        self._provenance: dict | None = None  # the corpus recipe (maml_stop.data.provenance), set in setup()
        self.eval_inner_steps = eval_inner_steps
        self.compare_random_init = compare_random_init
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        with torch.random.fork_rng():
            torch.manual_seed(init_seed)
            predictor = StoppingPredictor.from_config(self.predictor_config)
        self.adapter = InnerLoopAdapter.from_config(predictor, self.adapter_config)
        # the initialisation meta-training starts from (not a parameter, not in the state_dict)
        self._init_state = {k: v.detach().clone() for k, v in self.adapter.state_dict().items()}
        self._random_init: InnerLoopAdapter | None = None
        # one metric object per stage and loss: means over episodes, over every rank (module docstring);
        # their states are not persistent (no checkpoint keys)
        self.eval_losses = nn.ModuleDict(
            {stage: nn.ModuleDict({name: MeanMetric() for name in EVAL_LOSSES}) for stage in ("val", "test")}
        )

    @property
    def predictor(self) -> StoppingPredictor:
        return self.adapter.predictor

    # ---- data-dependent set-up ----------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule if self._trainer is not None else None
        if dm is None or not hasattr(dm, "normalisation_stats"):
            log.warning("no TraceDataModule: normalisation statistics are left as they are")
            return
        if dm.n_features != self.predictor.n_features:
            raise DataError(
                f"the corpus has {dm.n_features} features {dm.feature_names}; the predictor expects "
                f"{self.predictor.n_features} (do not set model.n_features by hand: the CLI links it)"
            )
        check_feature_names(self.feature_names, dm.feature_names)
        self._provenance = corpus_provenance(getattr(dm, "meta", None) or {})
        if self.adapter.loss_kind == "cost" and getattr(dm, "weighting", "cost") != "cost":
            raise ValueError(
                "model.adapter.loss: cost weights probes by ProbeBatch.weights, which data.weighting: "
                f"{dm.weighting!r} leaves at 1.0; set data.weighting: cost (or model.adapter.loss: balanced/bce)"
            )
        # statistics of the meta-training families; a checkpoint restored after setup() overrides them
        self.predictor.set_normalisation(*dm.normalisation_stats())

    # ---- steps -------------------------------------------------------------------------------------
    def inner_steps_at(self, stage: str) -> int | None:
        """Inner steps of a ``stage`` step (None: the adapter's ``inner_steps``)."""
        return None if stage == "train" else self.eval_inner_steps

    def adapt_episode(self, episode: EpisodeBatch, stage: str = "val") -> StoppingPredictor:
        """The predictor adapted on one episode's support set as a ``stage`` step adapts it, through
        the one road (:meth:`InnerLoopAdapter.fit_support`); :meth:`_shared_step` adapts a whole
        meta-batch at once with :meth:`InnerLoopAdapter.episode_losses`, tested equal to it."""
        return self.adapter.fit_support(episode.support, steps=self.inner_steps_at(stage))

    def _shared_step(self, batch: list[EpisodeBatch], stage: str) -> Tensor:
        steps = self.inner_steps_at(stage)
        pairs = [(ep.support, ep.query) for ep in batch]
        losses = self.adapter.episode_losses(pairs, steps)  # (E,) loss(adapt(support), query) per episode
        loss = losses.mean()
        if stage == "train":  # every rank has meta_batch_size / world_size episodes: the mean of means
            self.log("train/loss", loss, batch_size=len(batch), prog_bar=True, sync_dist=True)
            return loss
        per_episode = {"loss": losses}
        per_episode["loss_unadapted"] = torch.stack([self.adapter.loss(self.predictor, ep.query) for ep in batch])
        if self.compare_random_init:
            per_episode["loss_random_init"] = self._random_init_adapter().episode_losses(pairs, steps)
        for name, values in per_episode.items():
            metric = self.eval_losses[stage][name]
            metric.update(values.detach())
            self.log(f"{stage}/{name}", metric, prog_bar=name == "loss")
        return loss

    def training_step(self, batch: list[EpisodeBatch], batch_idx: int) -> Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: list[EpisodeBatch], batch_idx: int) -> Tensor:
        return self._shared_step(batch, "val")

    def test_step(self, batch: list[EpisodeBatch], batch_idx: int) -> Tensor:
        return self._shared_step(batch, "test")

    def _random_init_adapter(self) -> InnerLoopAdapter:
        """The adapter at the initialisation meta-training started from, with the current statistics."""
        if self._random_init is None:
            pred = StoppingPredictor.from_config(self.predictor.config())
            ref = InnerLoopAdapter.from_config(pred, self.adapter.config())
            ref.load_state_dict(self._init_state)
            # kept out of the submodules: never optimised, never checkpointed
            object.__setattr__(self, "_random_init", ref.to(self.device))
        self._random_init.predictor.set_normalisation(self.predictor.feature_mean, self.predictor.feature_std)
        self._random_init.train(self.training)
        return self._random_init

    def on_validation_epoch_start(self) -> None:
        self._check_grad_mode()

    def on_test_epoch_start(self) -> None:
        self._check_grad_mode()

    @staticmethod
    def _check_grad_mode() -> None:
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                "validation/test adapt the predictor on support sets and need gradients, but the Trainer "
                "runs them in inference mode: use Trainer(inference_mode=False) (trainer.inference_mode: "
                "false in the YAML)"
            )

    # ---- optimisation ------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- pickling (ddp_spawn sends the module to fresh interpreters) ----------------------------------
    def __getstate__(self) -> dict[str, Any]:
        """The state, led (learn2learn backend) by an entry whose unpickling imports learn2learn's MAML
        core through :mod:`maml_stop.learn.l2l`: the learner objects that follow name classes of
        ``learn2learn.algorithms``, which a fresh interpreter would otherwise import by running
        ``learn2learn/__init__.py`` (it imports gym and torchvision and fails)."""
        state = super().__getstate__()
        if self.adapter_config.backend == "learn2learn":
            state = {_L2L_FIRST: _Learn2LearnCore(), **state}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        state.pop(_L2L_FIRST, None)
        super().__setstate__(state)

    # ---- checkpoints -------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CKPT_KEY] = {
            "schema_version": SCHEMA_VERSION,
            "code_version": maml_stop.__version__,
            "feature_names": self.feature_names,
            # the corpus recipe its features came from (maml_stop.data.provenance), checked where it is used
            "provenance": self._provenance,
            "predictor": self.predictor.config().to_dict(),
            "adapter": self.adapter.config().to_dict(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        info = _section(checkpoint, "<checkpoint>")
        check_feature_names(info.get("feature_names"), self.feature_names)
        self._provenance = self._provenance or info.get("provenance")


class _Learn2LearnCore:
    """Unpickles as ``None`` after importing learn2learn's MAML core (``MetaStoppingModule.__getstate__``)."""

    def __reduce__(self) -> tuple[Any, tuple]:
        return (_import_learn2learn_core, ())


def _import_learn2learn_core() -> None:
    from maml_stop.learn import l2l

    l2l.MAML  # noqa: B018  (the first access imports the MAML core, without learn2learn/__init__.py)
    return None


def _section(checkpoint: dict[str, Any], path: str) -> dict[str, Any]:
    if CKPT_KEY not in checkpoint:
        raise CheckpointError(f"{path} is not a maml_stop checkpoint: no {CKPT_KEY!r} entry (keys: {sorted(checkpoint)})")
    info = checkpoint[CKPT_KEY]
    if info.get("schema_version") != SCHEMA_VERSION:
        raise CheckpointError(
            f"{path} was written for trace schema version {info.get('schema_version')!r}; this code reads "
            f"version {SCHEMA_VERSION}"
        )
    return info


def load_predictor(
    checkpoint_path: str | Path, backend: str | None = None
) -> tuple[StoppingPredictor, InnerLoopAdapter, dict[str, Any]]:
    """The meta-trained predictor (in eval mode), its adapter (same algorithm, inner-loop settings and
    adaptation backend as in training; ``backend`` overrides the backend: both give the same results and
    load the same weights, so a learn2learn-trained checkpoint adapts with ``"torch_func"`` where
    learn2learn is not installed) and the checkpoint's metadata: ``feature_names``, ``schema_version``,
    ``predictor``/``adapter`` configs (as stored: dicts; the loaded ones typed are
    ``predictor.config()``, ``adapter.config()``), ``hyper_parameters``, ``data`` (the datamodule's
    hyper-parameters: corpus and family split, empty when it was fitted without one), ``epoch``,
    ``global_step``.

    Check the corpus you adapt on with ``check_feature_names(meta["feature_names"], corpus.feature_names)``.
    """
    path = str(checkpoint_path)
    if not Path(path).is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:  # weights-only, checked first: a checkpoint can be a pickle that runs code
        ckpt = safe_load(path, what="checkpoint")
    except CheckpointLoadError as err:
        raise CheckpointError(str(err)) from None
    info = _section(ckpt, path)
    predictor = StoppingPredictor.from_config(PredictorConfig(**info["predictor"]))
    adapter_config = AdapterConfig(**info["adapter"])  # checkpoints from before backends: learn2learn
    if backend is not None:
        adapter_config = dataclasses.replace(adapter_config, backend=backend)
    adapter = InnerLoopAdapter.from_config(predictor, adapter_config)
    prefix = "adapter."
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    adapter.load_state_dict(state)
    adapter.eval()
    meta = {**info, "hyper_parameters": migrate_hyper_parameters(ckpt.get("hyper_parameters", {})),
            "data": dict(ckpt.get("datamodule_hyper_parameters") or {}),
            "epoch": ckpt.get("epoch"), "global_step": ckpt.get("global_step"), "path": path}
    return predictor, adapter, meta
