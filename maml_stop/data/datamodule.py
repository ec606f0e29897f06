"""``TraceDataModule``: episodes of a stored trace corpus for meta-training, validation and test.

* training: ``steps_per_epoch`` meta-batches per epoch, each ``meta_batch_size`` random episodes from
  the meta-training families (K support + Q query traces each), drawn by a seeded
  :class:`maml_stop.data.episodes.EpisodeSampler` (same seed, same episodes);
* validation / test: ``val_episodes`` / ``test_episodes`` fixed episodes per validation / test family
  (seeded, identical on every epoch and every run), query = ``eval_q`` traces (None: all the others).
  :meth:`TraceDataModule.eval_episodes` is their one source (the EM/token callback reads them too).

**Feature subsets** (issue 10): ``data.features`` names the columns the predictor reads: a list of
feature names (in the predictor's input order), or a cost class, ``free`` (from the generation's own
forward pass) or ``paid`` (needs a forced answer), or ``all`` / null (every column). The cost class of a
name is the corpus ``meta.json``'s ``feature_costs`` where it has them, else
:func:`maml_stop.probe.features.feature_cost`. Every trace's features are narrowed to those columns
before anything else sees them (:func:`select_features`), so batches, normalisation statistics and the
EM/token callback all read the subset.

**Cost-sensitive losses** (issue 13 item 4): ``data.weighting: cost`` fills ``ProbeBatch.weights`` with the
cost weights that ``model.adapter.loss: cost`` reads, and ``data.cost_lambda`` (lambda >= 0, default 1) is their
trade-off between tokens lost by stopping late and EM lost by stopping early; the same lambda sets every
batch's ``cost_weights`` and ``stop_penalty``, which the adapter's query losses (``balanced/cost``,
``balanced/expected_cost``) read whatever the weighting (:mod:`maml_stop.data.batches`).

**Several processes** (``trainer.strategy: ddp``/``ddp_spawn``, ``devices``, ``num_nodes``): every rank
draws the same global meta-batch of ``meta_batch_size`` episodes from the same seeded sampler and adapts on
its share (:func:`maml_stop.data.episodes.rank_share`, ``meta_batch_size / world_size`` episodes), so DDP's
gradient average is the single-process mean over the meta-batch; the fixed validation/test episodes are
split the same way, without padding (the loaders are iterables that Lightning does not re-shard), and
``val/loss`` is their mean over every rank (``sync_dist``). ``meta_batch_size`` must be a multiple of the
number of processes.

Every trace is collated to tensors once (:class:`maml_stop.data.batches.TraceTensors`); an episode is then a few
tensor gathers. A batch is a list of :class:`EpisodeBatch`.

What the model learns from the data (wired in :mod:`maml_stop.learn.cli`):

* ``n_features`` and ``feature_names`` (read from the corpus ``meta.json``, narrowed to ``features``) are
  linked to the model with ``LightningCLI.link_arguments(..., apply_on="instantiate")``, so a checkpoint
  records the feature subset it was trained on;
* the normalisation statistics are computed on the **meta-training families only**
  (:meth:`normalisation_stats`) and copied into the predictor's buffers by
  ``MetaStoppingModule.setup`` (a hook, not a link: they need the corpus loaded, and a checkpoint's own
  statistics, restored after ``setup``, win when validating or testing a checkpoint).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from maml_stop.data.corpus import TraceCorpus
from maml_stop.data.batches import WEIGHTINGS, DataError, ProbeBatch, TraceTensors, check_cost_lambda
from maml_stop.data import store
from maml_stop.data.episodes import Episode, EpisodeSampler, FamilySplit, rank_share
from maml_stop.probe.features import feature_cost

__all__ = ["TraceDataModule", "EpisodeBatch", "DEFAULT_CORPUS", "FEATURE_SHORTHANDS", "resolve_features",
           "select_features"]

log = logging.getLogger(__name__)

DEFAULT_CORPUS = "experiments/corpus/qwen05"


@dataclass
class EpisodeBatch:
    """One episode as tensors."""

    family: str
    support: ProbeBatch
    query: ProbeBatch


FEATURE_SHORTHANDS = ("all", "free", "paid")  # data.features as a word: every column, or one cost class


def resolve_features(spec: str | list[str] | None, names: list[str], costs: dict[str, str] | None = None,
                     what: str = "data.features") -> list[str]:
    """The feature names that ``spec`` selects from a corpus whose columns are ``names``.

    ``spec``: None or ``"all"`` (every name, in the corpus order), ``"free"`` / ``"paid"`` (the names of
    that cost class, in the corpus order; ``costs`` is the corpus ``feature_costs``, a name it lacks is
    classed by :func:`maml_stop.probe.features.feature_cost`), or a list of names (that order). Raises
    :class:`DataError` naming an unknown name, a repeated one, or an empty selection (``what``: the
    setting named in the message).

    >>> resolve_features("paid", ["h0", "entropy_mean", "run_length"])
    ['run_length']
    """
    names = list(names)
    if spec is None or spec == "all":
        return names
    if isinstance(spec, str):
        if spec not in FEATURE_SHORTHANDS:
            raise DataError(f"{what}: unknown shorthand {spec!r}; give one of {', '.join(FEATURE_SHORTHANDS)} "
                            f"or a list of feature names of the corpus: {names}")
        costs = costs or {}

        def cost(name: str) -> str:
            try:
                return costs.get(name) or feature_cost(name)
            except ValueError as err:
                raise DataError(f"{what}: {spec!r} needs the cost class of every feature, and the corpus "
                                f"meta.json has no feature_costs for it: {err}") from None

        chosen = [n for n in names if cost(n) == spec]
    else:
        chosen = list(spec)
        unknown = [n for n in chosen if n not in names]
        if unknown:
            raise DataError(f"{what}: unknown feature names {unknown}; the corpus has {len(names)} features: {names}")
        repeated = sorted({n for n in chosen if chosen.count(n) > 1})
        if repeated:
            raise DataError(f"{what} names {repeated} more than once")
    if not chosen:
        raise DataError(f"{what}: {spec!r} selects no feature of the corpus {names}")
    return chosen


def select_features(corpus: TraceCorpus, subset: list[str] | None) -> TraceCorpus:
    """``corpus`` with every trace's features narrowed to the columns ``subset`` (in that order); the
    metadata's ``feature_names`` (and ``feature_costs``) become the subset's. The corpus itself when
    ``subset`` is None or all its names in order (nothing copied)."""
    if subset is None or list(subset) == corpus.feature_names:
        return corpus
    subset = resolve_features(list(subset), corpus.feature_names)
    index = np.asarray([corpus.feature_names.index(n) for n in subset])
    meta = {**corpus.meta, "feature_names": list(subset)}
    if isinstance(corpus.meta.get("feature_costs"), dict):
        meta["feature_costs"] = {n: corpus.meta["feature_costs"][n] for n in subset if n in corpus.meta["feature_costs"]}
    traces = [dataclasses.replace(t, features=np.ascontiguousarray(t.features[:, index]))  # (P, F_subset)
              for f in corpus.families for t in corpus.traces(f)]
    return TraceCorpus(traces, meta, corpus.root)


def _identity(batch):  # DataLoader collate: items are already meta-batches
    return batch


class _RandomMetaBatches(IterableDataset):
    """``steps`` meta-batches of random training episodes per pass, from one persistent seeded sampler
    (so epochs differ from each other but two runs with the same seed are identical). Process ``rank``
    of ``world_size`` yields its share of each global meta-batch (every rank draws all of it)."""

    def __init__(self, sampler: EpisodeSampler, tensors: TraceTensors, meta_batch_size: int, steps: int,
                 rank: int = 0, world_size: int = 1) -> None:
        self.sampler, self.tensors, self.meta_batch_size, self.steps = sampler, tensors, meta_batch_size, steps
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[EpisodeBatch]]:
        for _ in range(self.steps):
            episodes = rank_share(self.sampler.sample_batch(self.meta_batch_size), self.rank, self.world_size)
            yield [_to_tensors(e, self.tensors) for e in episodes]


class _FixedMetaBatches(IterableDataset):
    """This rank's fixed evaluation meta-batches, as an iterable so that Lightning does not shard them a
    second time (its DistributedSampler would pad with repeated meta-batches)."""

    def __init__(self, batches: list[list[EpisodeBatch]]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[EpisodeBatch]]:
        return iter(self.batches)


def _to_tensors(episode: Episode, tensors: TraceTensors) -> EpisodeBatch:
    return EpisodeBatch(episode.family, tensors.collate(episode.support), tensors.collate(episode.query))


class TraceDataModule(LightningDataModule):
    """Episodes of the stored trace corpus at ``corpus`` (see the module docstring).

    Family split: explicit ``train_families`` / ``val_families`` / ``test_families`` lists, or
    ``fold`` (leave-one-family-out over the sorted families: test = family ``fold``, validation = the
    next ``n_val_families``); train defaults to every other family. ``features``: the feature subset
    (:func:`resolve_features`; None = every column). ``weighting`` / ``cost_lambda``: the probe weights
    and the lambda of the cost-sensitive losses (module docstring).
    """

    def __init__(
        self,
        corpus: str = DEFAULT_CORPUS,
        train_families: list[str] | None = None,
        val_families: list[str] | None = None,
        test_families: list[str] | None = None,
        fold: int | None = None,
        n_val_families: int = 1,
        k: int = 16,
        q: int = 64,
        eval_q: int | None = None,
        meta_batch_size: int = 8,
        steps_per_epoch: int = 100,
        val_episodes: int = 10,
        test_episodes: int = 50,
        family_weighting: str = "uniform",
        weighting: str = "uniform",
        min_probes: int = 1,
        seed: int = 0,
        features: list[str] | str | None = None,
        cost_lambda: float = 1.0,
    ) -> None:
        super().__init__()
        if weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {weighting!r}; valid: {', '.join(WEIGHTINGS)}")
        self.cost_lambda = check_cost_lambda(cost_lambda, "data.cost_lambda")
        for name, value in (("k", k), ("min_probes", min_probes), ("q", q), ("meta_batch_size", meta_batch_size),
                            ("steps_per_epoch", steps_per_epoch), ("val_episodes", val_episodes),
                            ("test_episodes", test_episodes)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1; got {value}")
        self.save_hyperparameters()
        self.corpus_path = corpus
        self.k, self.q, self.eval_q = k, q, eval_q
        self.meta_batch_size, self.steps_per_epoch = meta_batch_size, steps_per_epoch
        self.val_episodes, self.test_episodes = val_episodes, test_episodes
        self.family_weighting, self.weighting, self.min_probes, self.seed = family_weighting, weighting, min_probes, seed
        self.features = features
        self._split_args = dict(train=train_families, val=val_families, test=test_families, fold=fold, n_val=n_val_families)
        self._meta: dict | None = None
        self.corpus: TraceCorpus | None = None
        self.split: FamilySplit | None = None
        self._tensors: TraceTensors | None = None
        self._train_sampler: EpisodeSampler | None = None
        self._resumed_rng: dict | None = None  # sampler RNG state from a checkpoint, applied once set up
        self._eval: dict[tuple[str, int, int], list[list[EpisodeBatch]]] = {}  # (stage, rank, world size) ->
        self._eval_traces: dict[str, list[Episode]] = {}  # stage -> its fixed episodes (eval_episodes)

    # ---- what the model needs to know (linked in the CLI) -------------------------------------------
    @property
    def meta(self) -> dict:
        if self._meta is None:
            path = Path(self.corpus_path)
            if not (path / store.META_FILE).is_file():
                raise store.CorpusError(
                    f"no trace corpus at {self.corpus_path!r} (resolved to {path.resolve()}): {store.META_FILE} "
                    f"is missing. Harvest one with `maml-stop harvest` or point --data.corpus at a corpus folder."
                )
            self._meta = store.read_meta(path)
        return self._meta

    @property
    def corpus_feature_names(self) -> list[str]:
        """Every feature column the corpus stores."""
        return list(self.meta["feature_names"])

    @property
    def feature_names(self) -> list[str]:
        """The columns the predictor reads: ``features`` resolved against the corpus (all by default)."""
        return resolve_features(self.features, self.corpus_feature_names, self.meta.get("feature_costs"))

    @property
    def n_features(self) -> int:
        return len(self.feature_names)

    # ---- loading ------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.corpus is not None:
            return
        self.meta  # noqa: B018  (clear error first when the path holds no corpus)
        # TraceCorpus.load checks the stored feature width itself (a CorpusError naming the shard)
        corpus = TraceCorpus.load(self.corpus_path, min_probes=self.min_probes)
        self.corpus = select_features(corpus, self.feature_names)  # the subset's columns (itself: all)
        if self.features is not None:
            log.info("feature subset %r: %d of %d features", self.features, self.n_features, len(corpus.feature_names))
        self.split = FamilySplit.resolve(self.corpus.families, **self._split_args)
        log.info("families: train %s, val %s, test %s", self.split.train, self.split.val, self.split.test)
        by_family = {f: self.corpus.traces(f) for f in self.corpus.families}
        every = [t for f in self.split.train + self.split.val + self.split.test for t in by_family[f]]
        self._tensors = TraceTensors(every, weighting=self.weighting, n_features=self.n_features,
                                     cost_lambda=self.cost_lambda)
        self._train_sampler = EpisodeSampler(
            by_family, self.k, self.q, families=self.split.train,
            family_weights=self.family_weighting, seed=self.seed,
        )
        self._restore_sampler()
        # fixed evaluation episodes (checked now: too-small families fail before training starts)
        self._eval_sampler = EpisodeSampler(
            by_family, self.k, self.eval_q, families=self.split.val + self.split.test, seed=self.seed
        ) if self.split.val or self.split.test else None

    # ---- resuming: checkpoints carry the training sampler's RNG -----------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Saved in every checkpoint: the training sampler's RNG state, so that a fit resumed from a
        checkpoint draws the episodes the uninterrupted fit would have drawn."""
        if self._train_sampler is None:
            return {}
        return {"train_sampler_rng": self._train_sampler.rng.bit_generator.state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resumed_rng = state_dict.get("train_sampler_rng")
        self._restore_sampler()

    def _restore_sampler(self) -> None:
        if self._resumed_rng is not None and self._train_sampler is not None:
            self._train_sampler.rng.bit_generator.state = self._resumed_rng
            self._resumed_rng = None

    def normalisation_stats(self) -> tuple[Tensor, Tensor]:
        """Per-feature mean and std over every probe point of the meta-training families. (F,), (F,)"""
        self.setup()
        feats = np.concatenate([t.features for f in self.split.train for t in self.corpus.traces(f)])
        mean, std = feats.mean(axis=0, dtype=np.float64), feats.std(axis=0, dtype=np.float64)
        return torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)

    def collate(self, traces) -> ProbeBatch:
        """Probe points of traces of this corpus (from the pre-collated tensors)."""
        self.setup()
        return self._tensors.collate(traces)

    def fixed_episodes(self, families: list[str], n: int, seed: int) -> list[EpisodeBatch]:
        """``n`` seeded fixed episodes per family, as tensors (query: ``eval_q`` traces)."""
        return [_to_tensors(ep, self._tensors) for ep in self._fixed_trace_episodes(families, n, seed)]

    def _fixed_trace_episodes(self, families: list[str], n: int, seed: int) -> list[Episode]:
        self.setup()
        if self._eval_sampler is None:
            raise DataError("no validation or test families in the split")
        return [ep for fam in families for ep in self._eval_sampler.fixed_episodes(fam, n, seed)]

    def eval_episodes(self, stage: str) -> list[Episode]:
        """The fixed episodes (of traces) of stage ``"val"`` or ``"test"``: ``val_episodes`` /
        ``test_episodes`` per validation / test family, seed ``seed + 1`` / ``seed + 2``, K = ``k``,
        query = ``eval_q``. The one source of evaluation episodes during meta-training: the val/test
        loaders collate these (``val/loss``), and :class:`maml_stop.evaluate.callbacks.EMTokenEvaluation`
        adapts on these (``val/savings_at_delta``). Empty (with a warning) without validation families."""
        if stage not in ("val", "test"):
            raise ValueError(f"unknown stage {stage!r}; valid stages: val, test")
        self.setup()
        if stage not in self._eval_traces:
            families = self.split.val if stage == "val" else self.split.test
            if not families and stage == "val":
                log.warning("no validation families: validation is skipped")
                self._eval_traces[stage] = []
            elif not families:
                raise DataError(
                    f"no {stage} families: set data.{stage}_families (or data.fold) to "
                    f"families of the corpus {self.corpus.families}"
                )
            else:
                n = self.val_episodes if stage == "val" else self.test_episodes
                self._eval_traces[stage] = self._fixed_trace_episodes(
                    families, n, seed=self.seed + (1 if stage == "val" else 2)
                )
        return self._eval_traces[stage]

    def process(self) -> tuple[int, int]:
        """(global rank, world size) of this process in the Trainer's run; (0, 1) without a Trainer."""
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _eval_batches(self, stage: str) -> list[list[EpisodeBatch]]:
        """This process's share of the fixed episodes of ``stage``, in meta-batches of
        ``meta_batch_size / world_size``."""
        rank, world = self.process()
        if (stage, rank, world) not in self._eval:
            episodes = self.eval_episodes(stage)
            if world > 1 and episodes:
                episodes = rank_share(episodes, rank, world, what=f"{stage} episodes (data.{stage}_episodes per family)")
            eps = [_to_tensors(ep, self._tensors) for ep in episodes]
            size = max(1, self.meta_batch_size // world)
            self._eval[stage, rank, world] = [eps[i : i + size] for i in range(0, len(eps), size)]
        return self._eval[stage, rank, world]

    # ---- loaders ------------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        self.setup()
        rank, world = self.process()
        if self.meta_batch_size % world:
            raise DataError(
                f"data.meta_batch_size={self.meta_batch_size} does not split evenly over {world} processes "
                f"(devices x num_nodes): use a multiple of {world}, so that every rank adapts on the same "
                "number of episodes and DDP's gradient average is the mean over the meta-batch"
            )
        ds = _RandomMetaBatches(self._train_sampler, self._tensors, self.meta_batch_size, self.steps_per_epoch,
                                rank=rank, world_size=world)
        return DataLoader(ds, batch_size=None, collate_fn=_identity)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(_FixedMetaBatches(self._eval_batches("val")), batch_size=None, collate_fn=_identity)

    def test_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(_FixedMetaBatches(self._eval_batches("test")), batch_size=None, collate_fn=_identity)
