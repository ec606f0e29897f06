"""``maml-stop evaluate``: the leave-one-family-out EM/token protocol of ``DESIGN.md``.

For every held-out family and every K, ``episodes`` fixed episodes (``EpisodeSampler.fixed_episodes``,
the same for every method) each give K support questions and a query set. Every method is fitted on the
support set alone (a learned probe is adapted there and its threshold chosen there) and scored on the
query set against full generation of the same traces. Writes into ``out``:

* ``results.json``: per family, K and method, the per-episode figures (see :func:`evaluate_family`);
* ``results.md``: tables (per family and mean, 95% intervals over episodes) and the written analysis;
* ``curves_k<K>.png`` (EM vs tokens per family, every method), ``savings_vs_k.png``, ``calibration.png``.

>>> main(["--config", "experiments/evaluate.yaml", "--checkpoint", "runs/fit/best.ckpt"])  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from maml_stop.evaluate import metrics as M
from maml_stop.data.corpus import Trace, TraceCorpus
from maml_stop.evaluate.policies import (
    DEFAULT_TAUS,
    AnswerConfidence,
    AnswerConsistency,
    EqualEMOracle,
    FirstProbe,
    FullGeneration,
    OraclePolicy,
    ProbePolicy,
    StoppingPolicy,
    ThresholdedPolicy,
    TokenBudget,
    evaluate_policy,
    fresh_copy,
    sweep_policy,
    train_predictor,
)
from maml_stop.evaluate.thresholds import SELECTORS, SupportSweep, ThresholdSelector, make_selector

log = logging.getLogger(__name__)

__all__ = ["EvaluateConfig", "METHODS", "build_policies", "evaluate_episode", "evaluate_family", "run", "main"]

METHODS = ("full", "first_probe", "budget", "consistency", "confidence", "pooled", "finetuned", "scratch", "maml",
           "oracle", "oracle_equal_em")
NEEDS_CHECKPOINT = ("maml",)
PROBE_METHODS = ("pooled", "finetuned", "scratch", "maml")


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
    train_config: str | None = None  # LightningCLI fit config: meta-train one checkpoint per held-out family
    families: list[str] | None = None  # held-out families (default: the checkpoint's test families)
    source_families: list[str] | None = None  # pooled-probe families (default: the checkpoint's, else all others)
    splits: list[str] | None = None  # question splits of the held-out family to use (default: all)
    shots: list[int] = field(default_factory=lambda: [4, 8, 16, 32])  # K (support questions)
    episodes: int = 50  # fixed episodes per family and K
    query: int | None = None  # query questions per episode (None: every question not in support)
    seed: int = 0  # seed of the fixed episodes
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    threshold_methods: list[str] = field(default_factory=lambda: ["em_target", "ltt", "fixed"])  # first = headline
    delta: float = 0.01  # EM-drop target as a fraction (0.01 = 1 point)
    ltt_delta: float | None = None  # EM-drop target of Learn-then-Test (default: delta)
    ltt_alpha: float = 0.1  # LTT risk level
    fixed_tau: float = 0.5  # probe threshold of the 'fixed' method
    crossfit: bool = False  # adapted probes: choose tau on out-of-sample support scores (two halves)
    taus: list[float] = field(default_factory=lambda: list(DEFAULT_TAUS))  # probe thresholds swept
    consistency_windows: list[int] = field(default_factory=lambda: [8, 6, 5, 4, 3, 2])
    confidence_levels: list[float] = field(default_factory=lambda: [0.999, 0.99, 0.98, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5])
    budget_quantiles: list[float] = field(default_factory=lambda: [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1])
    predictor: dict[str, Any] = field(default_factory=lambda: {"hidden": 64, "depth": 2, "kind": "mlp"})  # without a checkpoint
    pooled_steps: int = 300  # full-batch steps training the pooled probe
    pooled_lr: float = 0.5
    finetune_steps: int = 20  # steps fine-tuning the pooled probe on the K support traces
    finetune_lr: float = 0.1
    scratch_steps: int = 100  # steps training a probe from scratch on the K support traces
    scratch_lr: float = 0.5
    calibration_bins: int = 10
    min_probes: int = 1  # traces with fewer probes are dropped when loading the corpus
    progress: bool = True  # tqdm progress bars


# ---------------------------------------------------------------------------------------------------
# checkpoints


@dataclass
class Fold:
    """One held-out family with what its methods need."""

    family: str
    adapter: Any | None  # meta-trained InnerLoopAdapter (None without a checkpoint)
    sources: list[str]  # families the pooled probe trains on
    checkpoint: str | None = None
    eval_steps: int | None = None  # inner steps at evaluation (the checkpoint's eval_inner_steps)


def load_checkpoint(path: str, corpus: TraceCorpus) -> tuple[Any, dict[str, Any], dict[str, list[str]]]:
    """The meta-trained adapter of a checkpoint, its metadata, and the family split it was trained with
    (``train``/``val``/``test`` resolved against the corpus families; empty when not recorded).
    Raises when the checkpoint's feature names differ from the corpus's."""
    from maml_stop.learn.module import check_feature_names, load_predictor
    from maml_stop.data.episodes import FamilySplit

    _, adapter, meta = load_predictor(path)
    check_feature_names(meta.get("feature_names"), corpus.feature_names)
    hp = meta["data"]
    split: dict[str, list[str]] = {}
    if any(hp.get(key) is not None for key in ("train_families", "val_families", "test_families", "fold")):
        resolved = FamilySplit.resolve(
            corpus.families, hp.get("train_families"), hp.get("val_families"), hp.get("test_families"),
            hp.get("fold"), hp.get("n_val_families", 1),
        )
        split = {"train": resolved.train, "val": resolved.val, "test": resolved.test}
    return adapter, meta, split


def _train_fold(cfg: EvaluateConfig, family: str, corpus: TraceCorpus, out: Path) -> str:
    """Meta-train one checkpoint with ``family`` held out, in process (``maml-stop fit`` with
    ``train_config``): test = [family], validation = the config's validation families other than it (or
    the next family), checkpoints and CSV/TensorBoard logs under ``out/folds/<family>`` (its output root,
    whatever paths the config names; a rerun replaces the folder). Returns the best (else last) checkpoint."""
    import shutil

    import yaml

    from maml_stop.learn.cli import cli_main

    data = (yaml.safe_load(Path(cfg.train_config).read_text()) or {}).get("data", {}) or {}
    val = [f for f in data.get("val_families") or [] if f != family]
    if not val:
        others = [f for f in corpus.families if f != family]
        val = [others[corpus.families.index(family) % len(others)]]
    folder = out / "folds" / family
    shutil.rmtree(folder, ignore_errors=True)  # no file of an earlier evaluation survives in the fold
    args = [  # run=False: no subcommand; we call trainer.fit ourselves
        "--config", str(cfg.train_config), f"--data.corpus={cfg.source_corpus or cfg.corpus}", "--data.fold=null",
        "--data.train_families=null", f"--data.val_families=[{','.join(val)}]", f"--data.test_families=[{family}]",
        f"--trainer.default_root_dir={folder}",
    ]
    log.info("meta-training the fold of %s: maml-stop fit %s", family, " ".join(args))
    # follow_root: the config's logger save_dir / checkpoint dirpath move under the fold's folder too
    # (they would mix every fold's files with the main job's)
    cli = cli_main(args, run=False, follow_root=True)
    callback = cli.trainer.checkpoint_callback  # the first ModelCheckpoint: best.ckpt in our YAMLs
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    path = (callback.best_model_path or callback.last_model_path) if callback is not None else ""
    if not path:
        path = str(folder / "final.ckpt")
        cli.trainer.save_checkpoint(path)
    return path


# ---------------------------------------------------------------------------------------------------
# policies and episodes


def build_policies(
    cfg: EvaluateConfig,
    methods: Sequence[str],
    adapter: Any | None,
    pooled: torch.nn.Module | None,
    predictor_config: dict[str, Any],
    inner_loss: str = "balanced",
    maml_steps: int | None = None,
) -> dict[str, StoppingPolicy]:
    """Every requested method as a policy; learned probes share the selector-free threshold grid."""
    from maml_stop.learn.adapter import InnerLoopAdapter
    from maml_stop.learn.predictor import StoppingPredictor

    probe = dict(taus=cfg.taus, default_tau=cfg.fixed_tau)
    adapted = dict(crossfit=cfg.crossfit, seed=cfg.seed)
    policies: dict[str, StoppingPolicy] = {}
    for name in methods:
        if name == "full":
            policies[name] = FullGeneration()
        elif name == "oracle":
            policies[name] = OraclePolicy()
        elif name == "first_probe":
            policies[name] = FirstProbe()
        elif name == "oracle_equal_em":
            policies[name] = EqualEMOracle()
        elif name == "budget":
            policies[name] = TokenBudget(quantiles=cfg.budget_quantiles)
        elif name == "consistency":
            policies[name] = AnswerConsistency(windows=cfg.consistency_windows)
        elif name == "confidence":
            policies[name] = AnswerConfidence(levels=cfg.confidence_levels)
        elif name == "pooled":
            policies[name] = ProbePolicy(predictor=pooled, name=name, **probe)
        elif name == "finetuned":
            tuner = InnerLoopAdapter(fresh_copy(pooled), algorithm="maml", inner_lr=cfg.finetune_lr,
                                     inner_steps=cfg.finetune_steps, first_order=True, loss=inner_loss)
            policies[name] = ProbePolicy(adapter=tuner, name=name, **probe, **adapted)
        elif name == "scratch":
            with torch.random.fork_rng():
                torch.manual_seed(cfg.seed)
                fresh = StoppingPredictor(**predictor_config)
            trainer = InnerLoopAdapter(fresh, algorithm="maml", inner_lr=cfg.scratch_lr,
                                       inner_steps=cfg.scratch_steps, first_order=True, loss=inner_loss)
            policies[name] = ProbePolicy(adapter=trainer, renormalise=True, name=name, **probe, **adapted)
        elif name == "maml":
            if adapter is None:
                raise ValueError("method 'maml' needs a checkpoint (--checkpoint, --checkpoints or --train_config)")
            policies[name] = ProbePolicy(adapter=adapter, adapt_steps=maml_steps, name=name, **probe, **adapted)
        else:
            raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}")
    return policies


def _figures(out, delta: float) -> dict[str, float]:
    return {
        "savings": float(M.token_savings(torch.from_numpy(out.total_tokens), torch.from_numpy(out.full_tokens))),
        "savings_reasoning": float(M.token_savings(torch.from_numpy(out.reasoning_tokens), torch.from_numpy(out.full_tokens))),
        "em": float(out.em.mean()),
        "full_em": float(out.full_em.mean()),
        "em_drop": float(out.full_em.mean() - out.em.mean()),
        "tokens": float(out.total_tokens.mean()),
        "reasoning_tokens": float(out.reasoning_tokens.mean()),
        "full_tokens": float(out.full_tokens.mean()),
        "stopped": float(out.stopped_early.mean()),
    }


def evaluate_episode(
    policy: StoppingPolicy,
    support: Sequence[Trace],
    query: Sequence[Trace],
    selectors: Mapping[str, ThresholdSelector],
    delta: float,
    n_bins: int = 10,
) -> dict[str, Any]:
    """Fit ``policy`` on ``support`` and score it on ``query``.

    Returns ``thresholds`` (per selector: the chosen ``param`` and the figures of :func:`_figures`),
    the query ``sweep`` (EM and total tokens per candidate, (Q, J)), ``curve_savings`` (savings at EM
    drop <= delta with the best candidate in hindsight), ``auc``, and for learned probes ``probs`` and
    ``labels`` of every query probe point with ``brier`` and ``ece``.
    """
    policy.fit(support)
    record: dict[str, Any] = {"thresholds": {}}
    if isinstance(policy, ThresholdedPolicy):
        sweep = sweep_policy(policy, query)
        for name, selector in selectors.items():
            param = policy.choose(selector)
            policy.param = param
            record["thresholds"][name] = {"param": param, **_figures(evaluate_policy(policy, query), delta)}
    else:
        out = evaluate_policy(policy, query)
        figures = _figures(out, delta)
        for name in selectors:
            record["thresholds"][name] = {"param": None, **figures}
        sweep = SupportSweep(out.em[:, None], out.total_tokens[:, None], out.full_em, out.full_tokens)
    tensors = [torch.from_numpy(a) for a in (sweep.em, sweep.tokens, sweep.full_em, sweep.full_tokens)]
    record["sweep"] = sweep
    record["curve_savings"] = float(M.savings_at_em_drop(*tensors, delta=delta))
    # a single operating point (full generation, oracle) has no curve to integrate
    record["auc"] = float(M.curve_auc(*tensors)) if isinstance(policy, ThresholdedPolicy) else float("nan")
    if isinstance(policy, ProbePolicy):
        probs = torch.from_numpy(np.concatenate(policy.probabilities(query)))
        labels = torch.from_numpy(np.concatenate([t.labels for t in query]).astype(np.float64))
        record.update(probs=probs, labels=labels, brier=float(M.brier_score(probs, labels)),
                      ece=float(M.expected_calibration_error(probs, labels, n_bins)))
    return record


def evaluate_family(
    family: str,
    traces: Sequence[Trace],
    policies: Mapping[str, StoppingPolicy],
    selectors: Mapping[str, ThresholdSelector],
    shots: Sequence[int],
    episodes: int,
    seed: int,
    query: int | None,
    delta: float,
    n_bins: int = 10,
    progress: bool = True,
    calibration: Mapping[str, M.ExpectedCalibrationError] | None = None,
) -> dict[str, dict[str, Any]]:
    """Every method on the same fixed episodes of ``family``, for every K.

    Layout: ``{str(K): {method: {"thresholds": {selector: {figure: [per episode]}}, "curve_savings": [...],
    "auc": [...], "brier": [...], "ece": [...], "curve": {"em": [J], "savings": [J], "cost": [J],
    "full_em": x}}}}`` where ``curve`` pools the query sets of all episodes. ``calibration`` (method ->
    metric) accumulates the probes' query probabilities at the largest K.
    """
    from tqdm.auto import tqdm

    from maml_stop.data.episodes import EpisodeSampler

    sampler = EpisodeSampler({family: list(traces)}, k=min(shots), q=query, seed=seed)
    out: dict[str, dict[str, Any]] = {}
    for k in shots:
        eps = sampler.fixed_episodes(family, n=episodes, seed=seed, k=k, q=query)
        cells: dict[str, dict[str, Any]] = {}
        curves: dict[str, M.EMTokensCurve] = {}
        bar = tqdm(eps, desc=f"{family} K={k}", disable=not progress, leave=False)
        for ep in bar:
            for name, policy in policies.items():
                rec = evaluate_episode(policy, ep.support, ep.query, selectors, delta, n_bins)
                cell = cells.setdefault(name, {"thresholds": {s: {} for s in selectors}, "curve_savings": [], "auc": []})
                for s, figures in rec["thresholds"].items():
                    for key, value in figures.items():
                        cell["thresholds"][s].setdefault(key, []).append(value)
                cell["curve_savings"].append(rec["curve_savings"])
                cell["auc"].append(rec["auc"])
                sweep = rec["sweep"]
                if name not in curves:
                    curves[name] = M.EMTokensCurve(n_thresholds=sweep.em.shape[1])
                curves[name].update(*(torch.from_numpy(a) for a in (sweep.em, sweep.tokens, sweep.full_em, sweep.full_tokens)))
                if "probs" in rec:
                    cell.setdefault("brier", []).append(rec["brier"])
                    cell.setdefault("ece", []).append(rec["ece"])
                    if calibration is not None and k == max(shots) and name in calibration:
                        calibration[name].update(rec["probs"], rec["labels"])
        for name, curve in curves.items():
            c = curve.compute()
            policy = policies[name]
            params = list(policy.candidates) if isinstance(policy, ThresholdedPolicy) and name != "budget" else None
            cells[name]["curve"] = {  # atleast_1d: torchmetrics squeezes one-threshold curves to scalars
                "em": torch.atleast_1d(c["em"]).tolist(), "savings": torch.atleast_1d(c["savings"]).tolist(),
                "cost": torch.atleast_1d(c["cost"]).tolist(),
                "full_em": float(c["full_em"]), "params": params,
            }
        out[str(k)] = cells
    return out


# ---------------------------------------------------------------------------------------------------
# the protocol


def _selectors(cfg: EvaluateConfig) -> dict[str, ThresholdSelector]:
    unknown = [m for m in cfg.threshold_methods if m not in SELECTORS]
    if unknown or not cfg.threshold_methods:
        raise ValueError(f"unknown threshold methods {unknown}; valid methods: {', '.join(SELECTORS)}")
    ltt_delta = cfg.delta if cfg.ltt_delta is None else cfg.ltt_delta
    return {
        m: make_selector(m, delta=ltt_delta if m == "ltt" else cfg.delta, alpha=cfg.ltt_alpha)
        for m in cfg.threshold_methods
    }


def _check(cfg: EvaluateConfig) -> None:
    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; valid methods: {', '.join(METHODS)}")
    if not cfg.shots or any(k < 1 for k in cfg.shots):
        raise ValueError(f"shots must be a non-empty list of K >= 1; got {cfg.shots}")
    if cfg.episodes < 1:
        raise ValueError(f"episodes must be >= 1; got {cfg.episodes}")
    given = [x for x in (cfg.checkpoint, cfg.checkpoints, cfg.train_config) if x]
    if len(given) > 1:
        raise ValueError("give at most one of checkpoint, checkpoints and train_config")
    if not given and any(m in NEEDS_CHECKPOINT for m in cfg.methods):
        raise ValueError(
            "method 'maml' needs a meta-trained checkpoint: pass --checkpoint, --checkpoints or --train_config, "
            f"or leave 'maml' out of --methods (valid methods: {', '.join(METHODS)})"
        )


def _folds(cfg: EvaluateConfig, corpus: TraceCorpus, out: Path, source: TraceCorpus | None = None) -> list[Fold]:
    """Every held-out family (from ``corpus``) with its meta-trained adapter and pooled-probe source
    families (from ``source``, by default the same corpus)."""
    source = corpus if source is None else source
    available = corpus.families

    def check_families(names: Sequence[str], what: str, where: TraceCorpus = corpus) -> None:
        bad = [f for f in names if f not in where.families]
        if bad:
            raise ValueError(f"{what} {bad} are not in the corpus; families in the corpus: {where.families}")

    def fold(family: str, path: str | None, held_out: Sequence[str]) -> Fold:
        adapter, meta, split = load_checkpoint(path, source) if path else (None, {}, {})
        seen = set(split.get("train", [])) | set(split.get("val", []))
        if family in seen:
            raise ValueError(f"family {family!r} was seen in meta-training by {path}; it cannot be held out")
        sources = list(cfg.source_families or split.get("train") or [g for g in source.families if g not in held_out])
        if family in sources:
            raise ValueError(f"held-out family {family!r} is among the pooled-probe source families {sources}")
        check_families(sources, "source families", source)
        steps = (meta.get("hyper_parameters") or {}).get("eval_inner_steps")
        return Fold(family, adapter, sources, path, steps)

    if cfg.checkpoints:
        families = list(cfg.families or cfg.checkpoints)
        missing = [f for f in families if f not in cfg.checkpoints]
        if missing:
            raise ValueError(f"no checkpoint for held-out families {missing}; checkpoints given for {sorted(cfg.checkpoints)}")
        check_families(families, "held-out families")
        return [fold(f, cfg.checkpoints[f], [f]) for f in families]
    if cfg.train_config:
        families = list(cfg.families or available)
        check_families(families, "held-out families")
        return [fold(f, _train_fold(cfg, f, source, out), [f]) for f in families]
    split = load_checkpoint(cfg.checkpoint, source)[2] if cfg.checkpoint else {}
    families = list(cfg.families or split.get("test") or [])
    if not families:
        raise ValueError(
            f"no held-out families: pass --families (families in the corpus: {available}); "
            + ("the checkpoint records no test families" if cfg.checkpoint else "no checkpoint was given")
        )
    check_families(families, "held-out families")
    return [fold(f, cfg.checkpoint, families) for f in families]


def run(cfg: EvaluateConfig) -> dict[str, Any]:
    """Run the protocol; write results.json, results.md and the plots; return the results."""
    _check(cfg)
    torch.set_num_threads(1)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = TraceCorpus.load(cfg.corpus, min_probes=cfg.min_probes)
    source = corpus
    if cfg.source_corpus:
        source = TraceCorpus.load(cfg.source_corpus, min_probes=cfg.min_probes)
        if source.feature_names != corpus.feature_names:
            raise ValueError(
                f"the source corpus {cfg.source_corpus} has other features than the corpus {cfg.corpus}:\n"
                f"  source ({len(source.feature_names)}): {source.feature_names}\n"
                f"  corpus ({len(corpus.feature_names)}): {corpus.feature_names}"
            )
    selectors = _selectors(cfg)
    folds = _folds(cfg, corpus, out, source)
    started = time.time()
    calibration = {m: M.ExpectedCalibrationError(cfg.calibration_bins) for m in cfg.methods if m in PROBE_METHODS}
    results: dict[str, Any] = {
        "corpus": cfg.corpus,
        "source_corpus": cfg.source_corpus,
        "families": [f.family for f in folds],
        "shots": list(cfg.shots),
        "methods": list(cfg.methods),
        "threshold_methods": list(cfg.threshold_methods),
        "episodes": cfg.episodes,
        "delta": cfg.delta,
        "ltt_delta": cfg.delta if cfg.ltt_delta is None else cfg.ltt_delta,
        "ltt_alpha": cfg.ltt_alpha,
        "config": asdict(cfg),
        "feature_names": corpus.feature_names,
        "sources": {},
        "checkpoints": {},
        "results": {},
    }
    for fold in folds:
        family, adapter = fold.family, fold.adapter
        traces = [t for t in corpus.traces(family) if cfg.splits is None or t.split in cfg.splits]
        config = adapter.predictor.config() if adapter is not None else {"n_features": len(corpus.feature_names), **cfg.predictor}
        loss = getattr(adapter, "loss_kind", "balanced")
        pooled = None
        if any(m in cfg.methods for m in ("pooled", "finetuned")):
            source_traces = [t for s in fold.sources for t in source.traces(s)]
            pooled = train_predictor(source_traces, config, cfg.pooled_steps, cfg.pooled_lr, loss, seed=cfg.seed)
        policies = build_policies(cfg, cfg.methods, adapter, pooled, config, loss, maml_steps=fold.eval_steps)
        log.info("evaluating %s (%d traces; pooled probe on %s)", family, len(traces), fold.sources)
        results["sources"][family] = fold.sources
        results["checkpoints"][family] = fold.checkpoint
        results["results"][family] = evaluate_family(
            family, traces, policies, selectors, cfg.shots, cfg.episodes, cfg.seed, cfg.query, cfg.delta,
            cfg.calibration_bins, cfg.progress, calibration,
        )
    results["calibration"] = {}
    for name, metric in calibration.items():
        if metric.count.sum() > 0:
            count = metric.count
            safe = count.clamp(min=1)
            results["calibration"][name] = {
                "count": count.tolist(),
                "confidence": torch.where(count > 0, metric.prob_sum / safe, torch.nan).tolist(),
                "frequency": torch.where(count > 0, metric.label_sum / safe, torch.nan).tolist(),
                "ece": float(metric.compute()),
            }
    results["seconds"] = round(time.time() - started, 1)
    write_results(results, out)
    return results


def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return _json_safe(x.item())
    return x


def write_results(results: dict[str, Any], out: str | Path) -> dict[str, Path]:
    """results.json plus the report (tables, analysis, plots) in ``out``."""
    from maml_stop.evaluate.report import write_report

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    path.write_text(json.dumps(_json_safe(results), indent=1))
    paths = write_report(results, out)
    paths["json"] = path
    return paths


def _parser():
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(
        prog="maml-stop evaluate",
        description="Leave-one-family-out EM/token evaluation of every stopping method on fixed episodes.",
    )
    parser.add_argument("--config", action=ActionConfigFile, help="YAML settings (experiments/evaluate.yaml)")
    parser.add_argument("--report_only", type=str | None, default=None,
                        help="rebuild results.md and the plots from this results.json and exit")
    parser.add_class_arguments(EvaluateConfig)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--report_only", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.report_only:  # no evaluation: the corpus and the rest of the settings are not needed
        path = Path(known.report_only)
        paths = write_results(json.loads(path.read_text()), path.parent)
        print(f"report written: {paths['table']}")
        return 0
    parser = _parser()
    ns = parser.parse_args(argv)
    fields = {f: ns[f] for f in EvaluateConfig.__dataclass_fields__}
    cfg = EvaluateConfig(**fields)
    results = run(cfg)
    print(f"results: {Path(cfg.out) / 'results.json'}; report: {Path(cfg.out) / 'results.md'} ({results['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
