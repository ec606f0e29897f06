"""The meta-selection study (issue 25): meta-learned selectors against ``em_target`` on held-out families.

For every fold (leave-one-family-out, or grouped folds with ``folds: N``), the held-out families' fixed
episodes (the protocol's: same sampler, same seed) and the training families' simulated episodes come
from :func:`~.simulate.nested_sweeps`; every selector of :data:`STUDY_SELECTORS` is fitted on the
training families only (the ``_cal`` ones also meta-calibrate their margin there) and applied to each
held-out episode's K support shots; the query figures are its outcome. Nothing is tuned on a held-out
family. Writes ``results.json`` and ``results.md`` (:mod:`.summary`) into ``out``.

    maml-stop meta-select --config experiments/meta_select.yaml
    maml-stop meta-select --config experiments/meta_select.yaml --export em_target_cal 16 runs/em_target_cal.json
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from maml_stop.decide.meta.features import FamilyEpisodes, SupportStats
from maml_stop.decide.meta.outcomes import EpisodeSweeps
from maml_stop.decide.meta.rules import EmpiricalBayesSelector, LearnedMapSelector, MetaSelector, SupportDrop, SupportLTT
from maml_stop.decide.meta.relaxed import FamilyTensors
from maml_stop.evaluate.meta_select.decision import DECISION_METHODS, decision_fold
from maml_stop.evaluate.meta_select.simulate import ProbeRecipe, nested_sweeps
from maml_stop.learn.decision_maml import DecisionMAMLConfig
from maml_stop.evaluate.grouped_folds import grouped_folds
from maml_stop.data.corpus import TraceCorpus
from maml_stop.evaluate.meta_select.summary import write_summary

log = logging.getLogger(__name__)

__all__ = ["MetaSelectConfig", "STUDY_SELECTORS", "run", "main"]


@dataclass(frozen=True)
class StudySelector:
    """A selector of the study, built from (delta, family_alpha), and its twin without meta-training
    (fitted on the held-out support alone) for the paired comparison."""

    make: Callable[[float, float], MetaSelector]
    twin: str


STUDY_SELECTORS: dict[str, StudySelector] = {
    "em_target": StudySelector(lambda d, a: SupportDrop(d, family_alpha=None), twin="em_target"),
    "ltt": StudySelector(lambda d, a: SupportLTT(d), twin="ltt"),
    "em_target_cal": StudySelector(lambda d, a: SupportDrop(d, family_alpha=a), twin="em_target"),
    "eb_support_only": StudySelector(lambda d, a: EmpiricalBayesSelector(d, family_alpha=None, meta=False),
                                     twin="eb_support_only"),
    "meta_eb": StudySelector(lambda d, a: EmpiricalBayesSelector(d, family_alpha=None), twin="eb_support_only"),
    "meta_eb_cal": StudySelector(lambda d, a: EmpiricalBayesSelector(d, family_alpha=a), twin="eb_support_only"),
    "meta_map": StudySelector(lambda d, a: LearnedMapSelector(d, family_alpha=None), twin="em_target"),
    "meta_map_cal": StudySelector(lambda d, a: LearnedMapSelector(d, family_alpha=a), twin="em_target"),
}
TWINS: dict[str, str] = {**{name: s.twin for name, s in STUDY_SELECTORS.items()}, **DECISION_METHODS}  # for the summary
METHODS = (*STUDY_SELECTORS, *DECISION_METHODS)  # every name ``selectors`` may list


MOVED_KEYS = {"shots": "k", "decision_shots": "decision_k"}  # a study YAML of before issue 31's names is refused


@dataclass
class MetaSelectConfig:
    """Settings of the study (tuned values in experiments/meta_select*.yaml)."""

    corpus: str = "experiments/corpus/qwen05"
    out: str = "runs/meta_select"
    families: list[str] | None = None  # study families (None: every family of the corpus)
    families_file: str | None = None  # or a JSON file with a "kept" list (corpus v2's pilot)
    folds: int | None = None  # None: leave one family out; N: grouped folds (evaluate/grouped_folds.py)
    val_families: int = 1  # grouped folds' validation families (they join the training families here)
    k: list[int] = field(default_factory=lambda: [16])  # K
    episodes: int = 50  # fixed episodes per held-out family and K (the protocol's)
    train_episodes: int = 20  # simulated episodes per training family and K
    groups: int | None = None  # cross-fitting groups of training families (None: leave one out)
    seed: int = 0
    delta: float = 0.01  # the EM-drop target (1 point)
    alpha: float = 0.1  # the meta-calibrated margin's miss rate over families (the selectors' family_alpha)
    taus: list[float] = field(default_factory=lambda: [0.99, 0.97, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6, 0.5, 0.4,
                                                        0.3, 0.2, 0.1])
    selectors: list[str] = field(default_factory=lambda: list(STUDY_SELECTORS))
    probe: ProbeRecipe = field(default_factory=ProbeRecipe)
    decision: DecisionMAMLConfig = field(default_factory=DecisionMAMLConfig)  # maml_decision's meta-training
    decision_k: list[int] | None = None  # the K at which the decision methods run (None: every K of k)
    against: list[str] = field(default_factory=list)  # further selectors every method is compared with (paired)
    n_resamples: int = 2000  # paired bootstrap over episodes
    min_probes: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.probe, dict):
            self.probe = ProbeRecipe(**self.probe)
        if isinstance(self.decision, dict):
            self.decision = DecisionMAMLConfig(**self.decision)
        unknown = [s for s in self.selectors if s not in METHODS]
        if unknown or "em_target" not in self.selectors:
            raise ValueError(f"unknown selectors {unknown} (em_target is required, the comparison's baseline); "
                             f"valid: {', '.join(METHODS)}")
        for s in [*self.selectors, *self.against]:
            if TWINS.get(s, s) not in self.selectors:
                raise ValueError(f"selector {s!r} is compared with {TWINS.get(s, s)!r}: list it in selectors too")
        missing = sorted(set(self.decision_k or []) - set(self.k))
        if missing:
            raise ValueError(f"decision_k {missing} are not in k {self.k}")

    @classmethod
    def from_yaml(cls, path: str | Path) -> "MetaSelectConfig":
        import yaml

        data = yaml.safe_load(Path(path).read_text()) or {}
        moved = {old: new for old, new in MOVED_KEYS.items() if old in data}
        if moved:
            raise ValueError(f"{path}: " + "; ".join(f"{old!r} is now {new!r}" for old, new in moved.items())
                             + " (issue 31: K is k)")
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"{path}: unknown settings {unknown}; valid: {', '.join(cls.__dataclass_fields__)}")
        return cls(**data)


def _folds(cfg: MetaSelectConfig, families: list[str]) -> list[tuple[list[str], list[str]]]:
    """(held-out families, training families) per fold."""
    if cfg.folds is None:
        return [([h], [f for f in families if f != h]) for h in families]

    return [(list(f.test), [x for x in families if x not in set(f.test)])
            for f in grouped_folds(families, n_folds=cfg.folds, n_val=cfg.val_families, seed=cfg.seed)]


def _figures(sweeps: EpisodeSweeps, choice: np.ndarray) -> dict[str, list]:
    drop, savings = sweeps.query_figures()
    rows = np.arange(len(choice))
    return {"em_drop": drop[rows, choice].tolist(), "savings": savings[rows, choice].tolist(),
            "choice": choice.tolist()}


def _hindsight(sweeps: EpisodeSweeps, delta: float) -> dict[str, list]:
    """The one candidate with the largest mean query savings whose mean query drop is within ``delta``
    (full generation when none): the curve figure, chosen on the queries, never a selector."""
    drop, savings = sweeps.query_figures()
    ok = drop.mean(0) <= delta + 1e-9
    j = int(np.argmax(np.where(ok, savings.mean(0), -np.inf)))
    return {**_figures(sweeps, np.full(drop.shape[0], j)), "curve_drop": drop.mean(0).tolist(),
            "curve_savings": savings.mean(0).tolist()}


def evaluate_fold(cfg: MetaSelectConfig, held: dict[str, dict[int, EpisodeSweeps]],
                  train: dict[str, dict[int, EpisodeSweeps]]) -> tuple[dict, dict]:
    """Every selector fitted on ``train`` and applied to ``held``: (family -> K -> selector -> figures,
    K -> selector -> fitted state and calibration)."""
    results: dict = {h: {} for h in held}
    fitted: dict = {}
    for k in cfg.k:
        families = {f: FamilyEpisodes.from_sweeps(by_k[k]) for f, by_k in train.items()}
        fitted[str(k)] = {}
        for name in [s for s in cfg.selectors if s in STUDY_SELECTORS]:
            selector = STUDY_SELECTORS[name].make(cfg.delta, cfg.alpha).fit_families(families)
            fitted[str(k)][name] = selector.state_dict()
            for h, by_k in held.items():
                stats = SupportStats.from_sums(by_k[k].support_sums())
                results[h].setdefault(str(k), {})[name] = _figures(by_k[k], selector.decide(stats))
        for h, by_k in held.items():
            results[h][str(k)]["hindsight"] = _hindsight(by_k[k], cfg.delta)
    return results, fitted


def run(cfg: MetaSelectConfig) -> dict[str, Any]:
    """Run the study; write results.json and results.md into ``cfg.out``; return the results."""
    import torch


    torch.set_num_threads(1)
    started = time.time()
    corpus = TraceCorpus.load(cfg.corpus, min_probes=cfg.min_probes)
    families = list(cfg.families or (json.loads(Path(cfg.families_file).read_text())["kept"] if cfg.families_file
                                     else corpus.families))
    missing = [f for f in families if f not in corpus.families]
    if missing:
        raise ValueError(f"families {missing} are not in {cfg.corpus}; it holds {corpus.families}")
    by_family = {f: corpus.traces(f) for f in families}
    decision = [s for s in cfg.selectors if s in DECISION_METHODS]
    tables = {f: FamilyTensors.from_traces(by_family[f]) for f in families} if decision else {}
    results: dict[str, Any] = {"config": asdict(cfg), "families": [], "results": {}, "fitted": {}}
    for i, (heldout, train) in enumerate(_folds(cfg, families)):
        held, sims = nested_sweeps(by_family, heldout, train, cfg.probe, cfg.taus, cfg.k, cfg.episodes,
                                   cfg.train_episodes, cfg.seed, cfg.groups)
        fold_results, fitted = evaluate_fold(cfg, held, sims)
        if decision:
            extra, extra_fitted = decision_fold(by_family, tables, heldout, train, cfg.probe, cfg.decision,
                                                cfg.decision_k or cfg.k, cfg.taus, cfg.delta, cfg.episodes,
                                                cfg.seed, decision)
            for h, by_k in extra.items():
                for k, methods in by_k.items():
                    fold_results[h][k].update(methods)
            for k, states in extra_fitted.items():
                fitted[k].update(states)
        results["results"].update(fold_results)
        results["families"].extend(heldout)
        results["fitted"][",".join(heldout)] = fitted
        log.info("fold %d/%s (%s) done after %.0f s", i + 1, cfg.folds or len(families), heldout, time.time() - started)
    results["seconds"] = round(time.time() - started, 1)
    write_summary(results, cfg.out, TWINS)
    return results


def export_state(cfg: MetaSelectConfig, selector: str, k: int, path: str | Path) -> dict[str, Any]:
    """Fit ``selector`` at K = ``k`` on every study family (nothing held out: a deployment's selector for a
    new family) and write its state as JSON, for ``maml-stop adapt --selector_state``."""
    import torch


    if selector not in STUDY_SELECTORS:
        raise ValueError(f"unknown selector {selector!r}; valid: {', '.join(STUDY_SELECTORS)}")
    torch.set_num_threads(1)
    corpus = TraceCorpus.load(cfg.corpus, min_probes=cfg.min_probes)
    families = list(cfg.families or (json.loads(Path(cfg.families_file).read_text())["kept"] if cfg.families_file
                                     else corpus.families))
    by_family = {f: corpus.traces(f) for f in families}
    _, sims = nested_sweeps(by_family, [], families, cfg.probe, cfg.taus, [k], cfg.episodes, cfg.train_episodes,
                            cfg.seed, cfg.groups)
    fitted = STUDY_SELECTORS[selector].make(cfg.delta, cfg.alpha).fit_families(
        {f: FamilyEpisodes.from_sweeps(by_k[k]) for f, by_k in sims.items()})
    state = fitted.state_dict()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(state, indent=1, default=str))
    return state


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="a YAML of MetaSelectConfig settings")
    parser.add_argument("--report_only", default=None, help="rebuild results.md from this results.json")
    parser.add_argument("--out", default=None, help="override the config's out")
    parser.add_argument("--export", nargs=3, metavar=("SELECTOR", "K", "STATE_JSON"), default=None,
                        help="fit SELECTOR at K on every family and write its state (for maml-stop adapt --selector_state)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.report_only:

        results = json.loads(Path(args.report_only).read_text())
        write_summary(results, args.out or Path(args.report_only).parent, TWINS)
        return 0
    if not args.config:
        parser.error("--config is required (or --report_only)")
    cfg = MetaSelectConfig.from_yaml(args.config)
    if args.export:
        name, k, path = args.export
        export_state(cfg, name, int(k), path)
        return 0
    if args.out:
        cfg.out = args.out
    run(cfg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
