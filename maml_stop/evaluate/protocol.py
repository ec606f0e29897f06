"""``maml-stop evaluate``: the leave-one-family-out EM/token protocol of ``DESIGN.md``.

For every held-out family and every K, ``episodes`` fixed episodes (``EpisodeSampler.fixed_episodes``,
the same for every method) each give K support questions and a query set. Every method is fitted on the
support set alone (a learned probe is adapted there and its threshold chosen there) and scored on the
query set against full generation of the same traces. Writes into ``out``:

* ``results.json``: per family, K and method, the per-episode figures (see :func:`evaluate_family`);
* ``results.md``: tables (per family and mean, 95% intervals over episodes) and the written analysis;
* ``curves_k<K>.png`` (EM vs tokens per family, every method), ``savings_vs_k.png``, ``calibration.png``.

Settings: :mod:`maml_stop.evaluate.config` (the command line: :mod:`maml_stop.evaluate.command`); held-out
families and their adapters: :mod:`maml_stop.evaluate.folds`; the methods: :mod:`maml_stop.evaluate.methods`. This
module is the loop over families, K and episodes (:func:`evaluate_folds`, one :func:`evaluate_fold` per
held-out family), and the results file. The grouped folds x meta-training family counts of
:mod:`maml_stop.evaluate.grouped` evaluate every count through :func:`evaluate_folds` too.

>>> from maml_stop.evaluate.config import EvaluateConfig                            # doctest: +SKIP
>>> run(EvaluateConfig(corpus="experiments/corpus/qwen05", checkpoint="runs/fit/best.ckpt", methods=["full", "maml"]))
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from maml_stop.data.corpus import Trace, TraceCorpus
from maml_stop.data.episodes import EpisodeSampler
from maml_stop.data.family import laid_out
from maml_stop.decide.policies import (
    ProbePolicy,
    StoppingPolicy,
    ThresholdedPolicy,
    evaluate_policy,
    sweep_policy,
)
from maml_stop.decide.registry import SELECTORS, make_selector
from maml_stop.decide.selector import StopSelector, SupportSweep
from maml_stop.decide.thresholds import BackoffEMTarget
from maml_stop.evaluate import metrics as M
from maml_stop.evaluate.batched import batchable, prefit
from maml_stop.evaluate.config import EvaluateConfig, check_config
from maml_stop.evaluate.fold_columns import check_columns, may_read_subset
from maml_stop.evaluate.fold_pooled import fold_pooled, fold_probe_config, pooled_key, shared_pooled
from maml_stop.evaluate.folds import Fold, resolve_folds
from maml_stop.evaluate.fork import fork_map
from maml_stop.evaluate.methods import PROBE_METHODS, build_policies, check_methods
from maml_stop.evaluate.query_loss import adapted_query_loss
from maml_stop.evaluate.source_fits import calibrate_backoffs, fit_across_families
from maml_stop.evaluate.results_file import write_results
from maml_stop.decide.outcomes import is_enabled, vectorised
from maml_stop.decide.scores import flat_labels

log = logging.getLogger(__name__)

__all__ = ["EvaluateConfig", "build_policies", "calibration_section", "evaluate_episode", "evaluate_family",
           "evaluate_fold", "evaluate_folds", "fork_map", "load_corpora", "run"]


# ---------------------------------------------------------------------------------------------------
# episodes


def _figures(out) -> dict[str, float]:
    fast = is_enabled()  # NumPy sums of the token counts (Outcomes.saved: the same floats as the torch metric)
    return {
        "savings": out.saved(out.total_tokens) if fast else float(M.token_savings(torch.from_numpy(out.total_tokens), torch.from_numpy(out.full_tokens))),
        "savings_reasoning": out.saved(out.reasoning_tokens) if fast else float(M.token_savings(torch.from_numpy(out.reasoning_tokens), torch.from_numpy(out.full_tokens))),
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
    selectors: Mapping[str, StopSelector],
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
        scored: dict[float | None, dict[str, float]] = {}  # on the fast path, selectors that agree share figures
        for name, selector in selectors.items():
            param = policy.choose(selector)  # scored at each selector's choice; the policy is not changed
            if param not in scored or not is_enabled():
                scored[param] = _figures(evaluate_policy(policy, query, param=param))
            record["thresholds"][name] = {"param": param, **scored[param]}
    else:
        out = evaluate_policy(policy, query)
        figures = _figures(out)
        record["thresholds"] = {name: {"param": None, **figures} for name in selectors}
        sweep = SupportSweep(out.em[:, None], out.total_tokens[:, None], out.full_em, out.full_tokens)
    tensors = [torch.from_numpy(a) for a in (sweep.em, sweep.tokens, sweep.full_em, sweep.full_tokens)]
    record["sweep"] = sweep
    both = M.curve_figures(*tensors, delta=delta) if is_enabled() else None  # the fast path: one curve for both
    record["curve_savings"] = float(both[0] if both is not None else M.savings_at_em_drop(*tensors, delta=delta))
    # a single operating point (full generation, oracle) has no curve to integrate
    record["auc"] = float(both[1] if both is not None else M.curve_auc(*tensors)) if isinstance(policy, ThresholdedPolicy) else float("nan")
    if isinstance(policy, ProbePolicy):
        probs = torch.from_numpy(policy.flat_probabilities(query))
        labels = torch.from_numpy(flat_labels(query))
        record.update(probs=probs, labels=labels, brier=float(M.brier_score(probs, labels)),
                      ece=float(M.expected_calibration_error(probs, labels, n_bins)))
    return record


@laid_out  # on the fast path the family's traces are laid out once for every episode (data/family.py)
def evaluate_family(
    family: str,
    traces: Sequence[Trace],
    policies: Mapping[str, StoppingPolicy],
    selectors: Mapping[str, StopSelector],
    ks: Sequence[int],
    episodes: int,
    seed: int,
    query: int | None,
    delta: float,
    n_bins: int = 10,
    progress: bool = True,
    calibration: Mapping[str, list[tuple[torch.Tensor, torch.Tensor]]] | None = None,
    method_selectors: Mapping[tuple[str, int], Mapping[str, StopSelector]] | None = None,
    batch_max_steps: int = 100,
) -> dict[str, dict[str, Any]]:
    """Every method on the same fixed episodes of ``family``, for every K.

    Layout: ``{str(K): {method: {"thresholds": {selector: {figure: [per episode]}}, "curve_savings": [...],
    "auc": [...], "brier": [...], "ece": [...], "curve": {"em": [J], "savings": [J], "cost": [J],
    "full_em": x}}}}`` where ``curve`` pools the query sets of all episodes. ``calibration`` (method ->
    list) collects the probes' query probabilities and labels at the largest K. ``method_selectors``
    ((method, K) -> selectors) replaces ``selectors`` for that method and K (a fold's calibrated
    ``em_target_backoff``). ``batch_max_steps``: adapted probes with at most this many inner steps are
    adapted for all episodes at once (:mod:`maml_stop.evaluate.batched`, on the fast path).
    """
    sampler = EpisodeSampler({family: list(traces)}, k=min(ks), q=query, seed=seed)
    out: dict[str, dict[str, Any]] = {}
    for k in ks:
        eps = sampler.fixed_episodes(family, n=episodes, seed=seed, k=k, q=query)
        cells: dict[str, dict[str, Any]] = {}
        curves: dict[str, M.EMTokensCurve] = {}
        presets = {name: prefit(p, [ep.support for ep in eps]) for name, p in policies.items()
                   if batchable(p, batch_max_steps)}
        bar = tqdm(eps, desc=f"{family} K={k}", disable=not progress, leave=False)
        for e, ep in enumerate(bar):
            for name, policy in policies.items():
                if name in presets:  # adapted with every other episode at once (evaluate/batched.py)
                    policy.preset(*presets[name][e])
                chosen = (method_selectors or {}).get((name, k), selectors)
                rec = evaluate_episode(policy, ep.support, ep.query, chosen, delta, n_bins)
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
                    if calibration is not None and k == max(ks) and name in calibration:
                        calibration[name].append((rec["probs"], rec["labels"]))
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


def selectors_for(cfg: EvaluateConfig) -> dict[str, StopSelector]:
    """The threshold selectors ``cfg.threshold_methods`` names, built with its settings."""
    unknown = [m for m in cfg.threshold_methods if m not in SELECTORS]
    if unknown or not cfg.threshold_methods:
        raise ValueError(f"unknown threshold methods {unknown}; valid methods: {', '.join(SELECTORS)}")
    ltt_delta = cfg.delta if cfg.ltt_delta is None else cfg.ltt_delta
    return {
        m: make_selector(m, delta=ltt_delta if m == "ltt" else cfg.delta, alpha=cfg.ltt_alpha,
                         token_price=cfg.token_price, wrong_answer_cost=cfg.wrong_answer_cost)
        for m in cfg.threshold_methods
    }


def run(cfg: EvaluateConfig) -> dict[str, Any]:
    """Run the protocol; write results.json, results.md and the plots; return the results."""

    with vectorised(cfg.batched):
        return _run(cfg)


def _run(cfg: EvaluateConfig) -> dict[str, Any]:
    check_config(cfg)
    check_methods(cfg)
    torch.set_num_threads(1)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    corpus, source = load_corpora(cfg)
    folds = resolve_folds(cfg, corpus, out, source)
    started = time.time()
    results = evaluate_folds(cfg, folds, corpus, source)
    results["seconds"] = round(time.time() - started, 1)
    write_results(results, out)
    return results


def load_corpora(cfg: EvaluateConfig) -> tuple[TraceCorpus, TraceCorpus]:
    """The held-out corpus and the source corpus (the same object without ``source_corpus``), their
    columns checked up front when every fold reads every column."""
    corpus = TraceCorpus.load(cfg.corpus, min_probes=cfg.min_probes)
    source = corpus
    if cfg.source_corpus:
        source = TraceCorpus.load(cfg.source_corpus, min_probes=cfg.min_probes)
        if not may_read_subset(cfg):  # every fold reads every column: checked before any fold is trained
            check_columns(None, corpus, source, cfg)
    return corpus, source


def evaluate_folds(cfg: EvaluateConfig, folds: Sequence[Fold], corpus: TraceCorpus, source: TraceCorpus) -> dict[str, Any]:
    """Every fold's held-out family evaluated (:func:`evaluate_fold`, ``cfg.workers`` side by side): the
    results dictionary of ``results.json`` (without ``seconds``). Folds with named ``adapters`` (grouped
    folds) add ``all_checkpoints`` and ``query_loss`` (:mod:`maml_stop.evaluate.query_loss`)."""
    selectors = selectors_for(cfg)
    calibration: dict[str, list] = {m: [] for m in cfg.methods if m in PROBE_METHODS}
    results: dict[str, Any] = {
        "corpus": cfg.corpus,
        "source_corpus": cfg.source_corpus,
        "families": [f.family for f in folds],
        "k": list(cfg.k),
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
    if any(f.feature_names is not None for f in folds):  # recorded only where a fold reads a subset (the files of full-feature runs unchanged)
        results["feature_subsets"] = {f.family: f.feature_names or corpus.feature_names for f in folds}
        if len({tuple(v) for v in results["feature_subsets"].values()}) == 1:
            results["feature_names"] = next(iter(results["feature_subsets"].values()))
    narrowed: dict[tuple[str, ...] | None, tuple[TraceCorpus, TraceCorpus]] = {}
    for fold in folds:  # the columns each fold's checkpoint was trained on (or features:), checked up front
        key = None if fold.feature_names is None else tuple(fold.feature_names)
        if key not in narrowed:
            narrowed[key] = check_columns(fold, corpus, source, cfg)
    pooled = shared_pooled(cfg, narrowed, folds)  # a probe several folds share, trained once before them
    done = fork_map(evaluate_fold, folds, cfg.workers, cfg, narrowed, selectors, tuple(calibration), pooled)
    for fold, (family_results, collected, losses) in zip(folds, done):  # in fold order, whatever order they finished in
        results["sources"][fold.family] = fold.sources
        results["checkpoints"][fold.family] = fold.checkpoint
        if fold.rl_checkpoint is not None:
            results.setdefault("rl_checkpoints", {})[fold.family] = fold.rl_checkpoint
        if fold.adapters is not None:
            results.setdefault("all_checkpoints", {})[fold.family] = {n: a[2] for n, a in fold.adapters.items()}
            results.setdefault("query_loss", {})[fold.family] = losses
        results["results"][fold.family] = family_results
        for name, pairs in collected.items():
            calibration[name].extend(pairs)
    results["calibration"] = calibration_section(calibration, cfg.calibration_bins)
    return results


def evaluate_fold(cfg: EvaluateConfig, narrowed: Mapping, selectors: Mapping[str, StopSelector],
                  calibration: Sequence[str], shared: Mapping[str, Any],
                  fold: Fold) -> tuple[dict[str, Any], dict[str, list], dict[str, Any]]:
    """One fold's held-out family: its policies built and evaluated on its episodes (its pooled probe from
    ``shared`` when several folds share it, :mod:`maml_stop.evaluate.fold_pooled`). Returns its results,
    its calibration pairs (method -> list, for the ``calibration`` methods) and, for a fold with named
    ``adapters``, the adapted query loss of each (and of the pooled probe; else empty)."""
    family, adapter = fold.family, fold.adapter
    fold_corpus, fold_source = narrowed[None if fold.feature_names is None else tuple(fold.feature_names)]
    traces = [t for t in fold_corpus.traces(family) if cfg.splits is None or t.split in cfg.splits]
    config, loss = fold_probe_config(cfg, fold, len(fold_corpus.feature_names))
    pooled = None
    if any(m in cfg.methods for m in ("pooled", "finetuned")):
        pooled = shared.get(pooled_key(cfg, fold, len(fold_source.feature_names)))
        pooled = fold_pooled(cfg, narrowed, fold) if pooled is None else pooled  # read from cache_dir when trained before
    policies = build_policies(cfg, cfg.methods, adapter, pooled, config, loss, maml_steps=fold.eval_steps,
                              rl_checkpoint=fold.rl_checkpoint, feature_names=fold_corpus.feature_names)
    for name, (named, steps, _) in (fold.adapters or {}).items():  # grouped folds: one adapted probe per checkpoint
        policies[name] = build_policies(cfg, ["maml"], named, pooled, config, loss, maml_steps=steps)["maml"]
    backoffs = calibrate_backoffs(cfg, fold, fold_source, policies, selectors)
    learned = fit_across_families(cfg, fold, fold_source, policies, selectors)
    log.info("evaluating %s (%d traces; pooled probe on %s)", family, len(traces), fold.sources)
    collected: dict[str, list] = {m: [] for m in calibration}
    method_selectors = {key: {**selectors, **learned.get(key, {}),
                              **({"em_target_backoff": BackoffEMTarget(cfg.delta, backoffs[key].backoff)}
                                 if key in backoffs else {})}
                        for key in {**backoffs, **learned}}
    family_results = evaluate_family(
        family, traces, policies, selectors, cfg.k, cfg.episodes, cfg.seed, cfg.query, cfg.delta,
        cfg.calibration_bins, cfg.progress, collected, method_selectors, cfg.batch_max_steps,
    )
    for (name, k), c in backoffs.items():
        family_results[str(k)][name]["backoff"] = c.to_json()
    for (name, k), fitted in learned.items():
        family_results[str(k)][name]["selector_states"] = {s: sel.state_dict() for s, sel in fitted.items()}
    losses: dict[str, Any] = {}
    if fold.adapters is not None:
        args = (traces, family, cfg.k, cfg.episodes, cfg.seed, cfg.query)
        losses = {name: adapted_query_loss(named, None, *args, steps) for name, (named, steps, _) in fold.adapters.items()}
        if pooled is not None:
            losses["pooled"] = adapted_query_loss(adapter, pooled, *args, None)
    return family_results, collected, losses


def calibration_section(collected: Mapping[str, list[tuple[torch.Tensor, torch.Tensor]]], n_bins: int) -> dict[str, Any]:
    """Reliability-diagram data (:func:`maml_stop.evaluate.metrics.calibration_bins`) and ECE per probe
    method, over the query probe points it collected (methods that collected none are left out)."""
    section: dict[str, Any] = {}
    for name, pairs in collected.items():
        if not pairs:
            continue
        probs = torch.cat([p for p, _ in pairs])  # (N,) every query probe point
        labels = torch.cat([y for _, y in pairs])  # (N,)
        if probs.numel() == 0:
            continue
        bins = M.calibration_bins(probs, labels, n_bins)
        section[name] = {
            "count": bins["count"].tolist(),
            "confidence": bins["confidence"].tolist(),
            "frequency": bins["frequency"].tolist(),
            "ece": float(M.expected_calibration_error(probs, labels, n_bins)),
        }
    return section
