"""The settings of ``maml-stop evaluate`` (:class:`EvaluateConfig`); the command is
:mod:`maml_stop.evaluate.command`.

Tuned values (the K grid, the episode count, every threshold grid) live in ``experiments/evaluate.yaml``;
experiment files add overrides on top of it (several ``--config`` files are read in order, the last
wins)::

    maml-stop evaluate --config experiments/evaluate.yaml --config experiments/main_evaluate.yaml
    maml-stop evaluate --config experiments/evaluate.yaml --config experiments/meta_study.yaml   # grouped folds x counts
    maml-stop evaluate --config experiments/evaluate.yaml --checkpoint runs/quickstart/checkpoints/best.ckpt
    maml-stop evaluate --report_only runs/evaluate/results.json      # rebuild the report from the JSON

The defaults here are small and safe (short grids, for a quick look); the protocol itself is
:mod:`maml_stop.evaluate.protocol`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from maml_stop.decide.rule import DEFAULT_TAUS
from maml_stop.learn.adapter import BACKENDS

__all__ = ["EvaluateConfig", "FoldsConfig", "check_config", "DEFAULT_METHODS", "BASELINE_DTYPES", "FOLD_KINDS"]

# the precisions of the probes an evaluation trains itself (``baseline_dtype``)
BASELINE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64}
FOLD_KINDS = ("one_out", "grouped")  # FoldsConfig.kind

# the methods run when none are listed (every method: maml_stop.evaluate.methods.METHODS)
DEFAULT_METHODS: tuple[str, ...] = ("full", "first_probe", "budget", "consistency", "confidence", "pooled", "finetuned",
                                    "scratch", "maml", "oracle", "oracle_equal_em")


@dataclass
class FoldsConfig:
    """How the held-out families are chosen and meta-trained (:mod:`maml_stop.evaluate.grouped` for ``grouped``).

    ``one_out`` (the default): every held-out family alone, with the checkpoint(s) given or one fold
    meta-trained per family (``train_config``). ``grouped``: the grouped leave-families-out folds of
    :mod:`maml_stop.evaluate.grouped_folds` (variants of one generator held out together, every family
    tested once), each meta-trained on nested subsets of ``counts`` families, once per entry of
    ``EvaluateConfig.algorithms``.
    """

    kind: str = "one_out"  # one_out | grouped
    n: int = 5  # grouped: folds (fewer when the corpus has fewer groups of families)
    val_families: int = 1  # grouped: validation families per fold (whole groups)
    seed: int = 0  # grouped: fold assignment and the nested order of meta-training families
    counts: list[int | str] = field(default_factory=lambda: ["all"])  # grouped: meta-training families per fold
    # grouped: the study's families, a JSON file with "kept" (experiments/corpus_v2_families.json); None:
    # EvaluateConfig.families, else every family of the corpus
    families_file: str | None = None
    min_traces: int = 1  # grouped: refuse a family with fewer traces (an unfinished harvest)


@dataclass
class EvaluateConfig:
    """Settings of ``maml-stop evaluate`` (tuned values live in ``experiments/evaluate.yaml``)."""

    corpus: str  # trace corpus folder (the held-out families' traces)
    # corpus of the meta-training and pooled-probe families (default: ``corpus``). A corpus of another
    # model with the same feature names gives a cross-model check: meta-train on one model's traces,
    # adapt and test on the other's.
    source_corpus: str | None = None
    out: str = "runs/evaluate"  # output folder
    checkpoint: str | None = None  # one meta-trained checkpoint, used for every held-out family
    checkpoints: dict[str, str] | None = None  # held-out family -> checkpoint of that fold
    # a checkpoint whose corpus had another recipe (projection seed, layers, model weights, probe schedule or
    # prompt: maml_stop.data.provenance) than source_corpus/corpus is refused; true: a warning (deliberate use)
    allow_other_recipe: bool = False
    # LightningCLI fit config(s), read in order as repeated ``--config`` files: meta-train one checkpoint
    # per held-out family
    train_config: str | list[str] | None = None
    families: list[str] | None = None  # held-out families (default: the checkpoint's test families)
    source_families: list[str] | None = None  # pooled-probe families (default: the checkpoint's, else all others)
    splits: list[str] | None = None  # question splits of the held-out family to use (default: all)
    # feature subset the probes read (issue 10): feature names, or free / paid / all (None: all). A
    # checkpoint's own subset (its feature_names) is what its folds read; given both, they must agree.
    # With train_config, the folds are meta-trained on it (--data.features).
    features: list[str] | str | None = None
    k: list[int] = field(default_factory=lambda: [4, 8, 16, 32])  # K (support questions per episode), each run
    episodes: int = 50  # fixed episodes per family and K
    query: int | None = None  # query questions per episode (None: every question not in support)
    seed: int = 0  # seed of the fixed episodes
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))  # the cost-aware ones only when listed
    # first = headline; valid: maml_stop.decide.registry.SELECTORS (fixed, em_target, ltt, cost, em_target_backoff)
    threshold_methods: list[str] = field(default_factory=lambda: ["em_target", "ltt", "fixed"])
    delta: float = 0.01  # EM-drop target as a fraction (0.01 = 1 point)
    # em_target_backoff: episodes per source family on which each fold calibrates its back-off (evaluate/backoff.py)
    backoff_episodes: int = 20
    ltt_delta: float | None = None  # EM-drop target of Learn-then-Test (default: delta)
    ltt_alpha: float = 0.1  # LTT risk level
    tau: float = 0.5  # probe threshold of the 'fixed' method
    # the 'cost' method: mean token_price * tokens + wrong_answer_cost * (1 - EM) on support, lowest wins
    token_price: float = 0.001  # price of one generated token (probes included)
    wrong_answer_cost: float = 1.0  # cost of one wrong answer (here: worth 1000 tokens)
    crossfit: bool = False  # adapted probes: choose tau on out-of-sample support scores (two halves)
    # candidate grids (tuned grids: experiments/evaluate.yaml; the short ones here only keep a bare run cheap)
    taus: list[float] = field(default_factory=lambda: list(DEFAULT_TAUS))  # probe thresholds swept: the one default grid
    consistency_windows: list[int] = field(default_factory=lambda: [4, 2])  # agreeing probe answers
    confidence_levels: list[float] = field(default_factory=lambda: [0.99, 0.9])  # forced-answer probability
    budget_quantiles: list[float] = field(default_factory=lambda: [1.0, 0.5])  # of the support's full costs
    predictor: dict[str, Any] = field(default_factory=lambda: {"hidden": 64, "depth": 2, "kind": "mlp"})  # without a checkpoint
    # adaptation backend of the probes built here (pooled, finetuned, scratch, complexity_adapted): learn2learn |
    # torch_func (same results, tests/test_func_backend.py); a checkpoint's own adapter keeps its backend
    backend: str = "learn2learn"
    pooled_steps: int = 300  # full-batch steps training the pooled probe
    pooled_lr: float = 0.5
    finetune_steps: int = 20  # steps fine-tuning the pooled probe on the K support traces
    finetune_lr: float = 0.1
    # precision of the probes trained here, not meta-trained: the pooled probe's training, its fine-tuning on
    # support (finetuned) and the probes from scratch (scratch, the cost-aware methods' scratch parts): float32 |
    # float64. float32 carries another CPU's last-bit BLAS differences into the printed digits (issue 29 item
    # 12); float64 (experiments/evaluate.yaml) does not (tests/test_pooled_reproducible.py)
    baseline_dtype: str = "float32"
    scratch_steps: int = 100  # steps training a probe from scratch on the K support traces
    scratch_lr: float = 0.5
    # cost-aware methods (maml_stop.decide.policies.cost_aware; listed in ``methods`` to run them)
    cost_aware_learner: str = "scratch"  # their learned parts: scratch (trained on support) | maml (the checkpoint)
    gate_threshold: float = 0.5  # gated_probe: force an answer where the gate's P(answer correct) >= this
    sparse_every: int = 2  # sparse: run the inner method on every m-th probe point
    sparse_inner: str = "scratch"  # sparse: the method on the sparse schedule
    give_up_below: float = 0.1  # *_give_up: stop where P(the full run will be right) < this
    # hybrid methods (maml_stop.decide.policies.hybrid; listed in ``methods`` to run them)
    hybrid_inner: str = "maml"  # hybrid_budget, hybrid_floor: the thresholded method capped / floored
    hybrid_max_tokens: int = 128  # hybrid_budget: stop by the last probe at or before this many reasoning tokens
    hybrid_min_tokens: int = 64  # hybrid_floor: no stop before the first probe at or after this many
    hybrid_confidence_level: float = 0.95  # either_/both_consistency_confidence: the confidence part's fixed level
    # ensembles (maml_stop.decide.policies.ensemble; listed in ``methods`` to run them)
    ensemble_learner: str = "maml"  # ensemble_*: the learned part, maml (the checkpoint) | scratch (trained on support)
    ensemble_window: int = 3  # the consistency part's score: run of identical answers / this, capped at 1
    ensemble_part_selector: str = "em_target"  # each part's own threshold (what ensemble_vote counts); registry.SELECTORS
    ensemble_shares: list[float] = field(default_factory=lambda: [1.0, 0.5])  # ensemble_vote: required weight shares swept
    ensemble_default_share: float = 0.5  # ensemble_vote: the share of the 'fixed' threshold method
    # complexity budgets (maml_stop.decide.policies.complexity; listed in ``methods`` to run them)
    complexity_scales: list[float] = field(default_factory=lambda: [2.0, 1.0, 0.5])  # complexity_budget: budget multipliers swept
    complexity_default_scale: float = 1.0  # complexity_budget: the multiplier of the 'fixed' threshold method
    complexity_ridge: float = 10.0  # complexity_budget: ridge penalty on the standardised question features
    complexity_start_probe: bool = True  # also read a start probe's free features (corpora probed at_start)
    complexity_meta_steps: int = 100  # complexity_adapted: MAML steps on the source families
    complexity_meta_lr: float = 0.01  # complexity_adapted: their Adam step size
    complexity_meta_k: int = 8  # complexity_adapted: support questions of a meta-training episode
    complexity_inner_lr: float = 0.1  # complexity_adapted: inner-loop step size (meta-training and support)
    complexity_inner_steps: int = 5  # complexity_adapted: inner steps
    # complexity_capped_maml: the budget cap's fixed multiplier; None: chosen on support (the cap alone within delta)
    complexity_cap_scale: float | None = None
    # the RL stopping policy (maml_stop.learn.rl; methods rl, rl_unadapted, run only when listed)
    # a `maml-stop fit --config experiments/quickstart.yaml --config experiments/rl.yaml` checkpoint for every
    # held-out family, or held-out family -> the checkpoint of its RL fold
    rl_checkpoint: str | dict[str, str] | None = None
    # or meta-train one RL fold per held-out family here, with these `maml-stop fit` configs read in order
    # (as train_config: the fold's split holds the family out; out/rl_folds/<family>, replaced on a rerun)
    rl_train_config: str | list[str] | None = None
    calibration_bins: int = 10
    min_probes: int = 1  # traces with fewer probes are dropped when loading the corpus
    progress: bool = True  # tqdm progress bars
    # held-out families evaluated side by side in forked worker processes (one thread each); the results
    # equal a serial run's (tests/test_evaluate.py). 1: serial, in this process
    workers: int = 1
    # the fast path (issue 26): candidate outcomes in one vectorised pass (maml_stop.decide.outcomes),
    # adapted probes of a family and K batched; false: the per-trace, per-episode reference path (the
    # same results, tests/test_evalspeed.py)
    batched: bool = True
    # the fast path adapts probes with at most this many inner steps for all episodes at once; longer ones
    # (scratch: 100) per episode, where float-order differences would grow into other decisions
    batch_max_steps: int = 100
    # pooled probes kept under cache_dir/pooled, keyed by the content hash of their inputs, reused by any
    # later run with the same ones (maml_stop.evaluate.cache); None: trained in every run
    cache_dir: str | None = None
    folds: FoldsConfig = field(default_factory=FoldsConfig)  # held-out families: one out, or grouped folds x counts
    # grouped folds: name -> a `maml-stop fit` fragment read after train_config and train_overrides; one
    # checkpoint per fold, count and name, evaluated as the method of that name (None: {"maml": {}})
    algorithms: dict[str, dict[str, Any]] | None = None
    train_overrides: dict[str, Any] | None = None  # grouped folds: a fit fragment every fit reads after train_config
    zero_step: bool = False  # grouped folds: also each algorithm's zero-step checkpoint, method zero_step_<name>
    fit_workers: int = 1  # grouped folds: fits side by side in forked processes, before the evaluation
    # the small -> large cascade (issue 28): a CascadeConfig mapping (maml_stop.evaluate.cascade); when set,
    # evaluate runs the cascade protocol on the paired corpora instead (experiments/cascade_evaluate.yaml)
    cascade: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.folds, dict):  # read back from a results.json, or given as a mapping
            self.folds = FoldsConfig(**self.folds)

    @property
    def train_configs(self) -> list[str]:
        """``train_config`` as a list of files (empty without one)."""
        if not self.train_config:
            return []
        return [self.train_config] if isinstance(self.train_config, str) else list(self.train_config)

    @property
    def rl_train_configs(self) -> list[str]:
        """``rl_train_config`` as a list of files (empty without one)."""
        if not self.rl_train_config:
            return []
        return [self.rl_train_config] if isinstance(self.rl_train_config, str) else list(self.rl_train_config)


def check_config(cfg: EvaluateConfig) -> None:
    """Raise a ``ValueError`` naming the valid choices when a setting cannot be run (the methods asked
    for: :func:`maml_stop.evaluate.methods.check_methods`)."""
    if cfg.backend not in BACKENDS:
        raise ValueError(f"unknown adaptation backend {cfg.backend!r}; valid: {', '.join(BACKENDS)}")
    if cfg.baseline_dtype not in BASELINE_DTYPES:
        raise ValueError(f"unknown baseline_dtype {cfg.baseline_dtype!r}; valid: {', '.join(BASELINE_DTYPES)}")
    if not cfg.k or any(k < 1 for k in cfg.k):
        raise ValueError(f"k must be a non-empty list of K >= 1; got {cfg.k}")
    if cfg.workers < 1:
        raise ValueError(f"workers must be >= 1 (1: serial); got {cfg.workers}")
    if cfg.episodes < 1:
        raise ValueError(f"episodes must be >= 1; got {cfg.episodes}")
    if cfg.backoff_episodes < 1:
        raise ValueError(f"backoff_episodes must be >= 1; got {cfg.backoff_episodes}")
    if len([x for x in (cfg.checkpoint, cfg.checkpoints, cfg.train_config) if x]) > 1:
        raise ValueError("give at most one of checkpoint, checkpoints and train_config")
    if cfg.folds.kind not in FOLD_KINDS:
        raise ValueError(f"unknown folds.kind {cfg.folds.kind!r}; valid: {', '.join(FOLD_KINDS)}")
    if cfg.folds.kind == "grouped" and not cfg.train_config:
        raise ValueError("folds.kind grouped meta-trains its folds: give train_config (the `maml-stop fit` configs)")
    if cfg.folds.kind != "grouped" and (cfg.algorithms or cfg.zero_step or cfg.train_overrides):
        raise ValueError("algorithms, train_overrides and zero_step need folds.kind grouped; "
                         f"got folds.kind {cfg.folds.kind!r}")
    if cfg.rl_checkpoint and cfg.rl_train_config:
        raise ValueError("give at most one of rl_checkpoint and rl_train_config")
