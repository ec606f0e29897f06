"""``maml-stop adapt``: few-shot adaptation of a meta-trained stopping predictor to a new family.

Given a checkpoint, labelled traces of the new family (a corpus folder, or one trace file in the
stored parquet schema) and K, it adapts the predictor on K support questions with the checkpoint's own
:class:`~maml_stop.learn.adapter.InnerLoopAdapter`, chooses the threshold on those K traces alone, and saves
what live generation needs: the adapted predictor, the threshold and the feature names::

    maml-stop adapt --checkpoint runs/quickstart/checkpoints/best.ckpt \\
        --corpus experiments/corpus/qwen05 --family gcd --k 16 --threshold_method em_target \\
        --out runs/adapted/gcd.pt

>>> adapted = load_adapted("runs/adapted/gcd.pt", feature_names=corpus.feature_names)   # doctest: +SKIP
>>> adapted.predict_proba(batch), adapted.threshold                                     # doctest: +SKIP
>>> LiveStopping(model, tok, adapted.predictor, adapted.live_threshold, prompt_length=n,
...              feature_names=adapted.feature_names, featurizer=featurizer, schedule=schedule)  # doctest: +SKIP

When the family has more than K questions, K are drawn with the one support/query split
(:func:`maml_stop.data.episodes.split_support_query`, seeded) and the rest are scored as a held-out check; the
figures are printed and stored in the file.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

import maml_stop
from maml_stop import SCHEMA_VERSION
from maml_stop.data.corpus import Trace, TraceCorpus
from maml_stop.data import store
from maml_stop.evaluate.policies import DEFAULT_TAUS, ProbePolicy, evaluate_policy, fresh_copy
from maml_stop.evaluate.thresholds import SELECTORS, make_selector

__all__ = ["AdaptedPredictor", "AdaptError", "adapt", "load_adapted", "save_adapted", "main", "FORMAT"]

log = logging.getLogger(__name__)

FORMAT = "maml_stop.adapted/1"


class AdaptError(ValueError):
    """Inputs the adaptation script cannot use (empty support, other features, bad file)."""


@dataclass
class AdaptedPredictor:
    """An adapted stopping predictor and its threshold, ready for live generation.

    ``threshold`` None means "never stop early" (the threshold method could not certify any).
    """

    predictor: nn.Module
    threshold: float | None
    feature_names: list[str]
    meta: dict[str, Any] = field(default_factory=dict)

    def check_features(self, feature_names: Sequence[str]) -> None:
        """Raise :class:`AdaptError` unless ``feature_names`` are the ones the predictor was adapted on."""
        _check_names(self.feature_names, list(feature_names), "the adapted predictor", "the given features")

    def predict_proba(self, batch: Any) -> torch.Tensor:
        """P(stopping here keeps the answer correct) at every probe point of a ProbeBatch. (N,)"""
        with torch.no_grad():
            return torch.sigmoid(self.predictor(batch))

    def should_stop(self, probability: float) -> bool:
        return self.threshold is not None and probability >= self.threshold

    @property
    def live_threshold(self) -> float:
        """The threshold as :class:`maml_stop.live.stopping.LiveStopping` takes it (inf = never stop)."""
        return float("inf") if self.threshold is None else float(self.threshold)


def _check_names(expected: Sequence[str] | None, got: Sequence[str] | None, what: str, other: str) -> None:
    if expected is None or got is None or list(expected) == list(got):
        return
    missing = [n for n in expected if n not in got]
    extra = [n for n in got if n not in expected]
    detail = f"missing {missing}, unexpected {extra}" if (missing or extra) else "same names in another order"
    raise AdaptError(
        f"feature-name mismatch between {what} ({len(expected)} features) and {other} ({len(got)} features): "
        f"{detail}.\n  expected: {list(expected)}\n  got:      {list(got)}"
    )


def _load_traces(corpus: str | None, traces: str | None, meta_path: str | None, family: str,
                 checkpoint_names: list[str] | None) -> tuple[list[Trace], list[str]]:
    """Traces of ``family`` and the feature names that describe them."""
    if (corpus is None) == (traces is None):
        raise AdaptError("give exactly one of --corpus (a corpus folder) and --traces (one trace file)")
    if corpus is not None:
        loaded = TraceCorpus.load(corpus)
        return list(loaded.traces(family)), loaded.feature_names
    path = Path(traces)
    if not path.is_file() or path.suffix != ".parquet":
        raise AdaptError(f"--traces must be a parquet trace file in the stored schema; got {traces}")
    # feature names: --meta, else the meta.json of the corpus the file sits in, else the checkpoint's
    meta_file = Path(meta_path) if meta_path else next(
        (p / store.META_FILE for p in path.parents if (p / store.META_FILE).is_file()), None
    )
    if meta_file is not None:
        meta = store.read_meta(meta_file.parent)
    elif checkpoint_names is not None:
        log.warning("no meta.json for %s: assuming the checkpoint's feature names (widths are checked)", path)
        meta = {"feature_names": checkpoint_names}
    else:
        raise AdaptError(f"no meta.json found for {path}; pass --meta with the corpus meta.json")
    # read it with the one corpus loader: a one-shard corpus in a temporary folder
    with tempfile.TemporaryDirectory() as tmp:
        store.write_meta(tmp, {k: v for k, v in meta.items() if k != "schema_version"})
        shard = Path(tmp) / store.SHARD_DIR / family
        shard.mkdir(parents=True)
        os.symlink(path.resolve(), shard / "all-00000.parquet")
        try:
            loaded = TraceCorpus.load(tmp)
        except ValueError as err:
            raise AdaptError(f"{path}: cannot read its traces with feature names {meta['feature_names']}: {err}") from err
    if family not in loaded.families:
        raise AdaptError(f"{path} holds no traces of family {family!r}; families in it: {loaded.families}")
    return list(loaded.traces(family)), loaded.feature_names


def adapt(
    checkpoint: str,
    family: str,
    k: int,
    corpus: str | None = None,
    traces: str | None = None,
    meta: str | None = None,
    threshold_method: str = "em_target",
    delta: float = 0.01,
    alpha: float = 0.1,
    tau: float = 0.5,
    taus: Sequence[float] = DEFAULT_TAUS,
    steps: int | None = None,
    seed: int = 0,
    crossfit: bool = False,
) -> AdaptedPredictor:
    """Adapt the checkpoint's predictor on K labelled traces of ``family`` and choose its threshold."""
    from maml_stop.learn.module import load_predictor
    from maml_stop.data.episodes import split_support_query

    if threshold_method not in SELECTORS:
        raise AdaptError(f"unknown threshold method {threshold_method!r}; valid methods: {', '.join(SELECTORS)}")
    if k < 1:
        raise AdaptError(f"K must be >= 1: an empty support set cannot be adapted on (got K={k})")
    _, adapter, ckpt_meta = load_predictor(checkpoint)
    names = ckpt_meta.get("feature_names")
    pool, corpus_names = _load_traces(corpus, traces, meta, family, names)
    _check_names(names, corpus_names, f"the checkpoint {checkpoint}", f"the traces of {family!r}")
    if not pool:
        raise AdaptError(f"no labelled traces of family {family!r}: the support set would be empty")
    if pool[0].features.shape[1] != adapter.predictor.n_features:
        raise AdaptError(
            f"the traces have {pool[0].features.shape[1]} features; the checkpoint's predictor expects "
            f"{adapter.predictor.n_features}"
        )
    questions = {t.trace_id.split("#", 1)[0] for t in pool}
    if len(questions) < k:
        raise AdaptError(f"family {family!r} has {len(questions)} labelled questions; K={k} asked")
    if len(questions) == k:
        support, heldout = list(pool), []
    else:
        support, heldout = split_support_query(pool, k, None, np.random.default_rng(seed), family=family)
    steps = steps if steps is not None else (ckpt_meta.get("hyper_parameters") or {}).get("eval_inner_steps")
    selector = make_selector(threshold_method, delta=delta, alpha=alpha, value=tau)
    policy = ProbePolicy(adapter=adapter, selector=selector, taus=list(taus), default_tau=tau, adapt_steps=steps,
                         crossfit=crossfit, seed=seed, name="maml")
    policy.fit(support)
    predictor = fresh_copy(policy.model).eval()
    info: dict[str, Any] = {
        "family": family, "k": k, "seed": seed, "threshold_method": threshold_method, "delta": delta,
        "alpha": alpha, "crossfit": crossfit, "checkpoint": str(checkpoint), "adapter": adapter.config(), "inner_steps": steps,
        "support_trace_ids": [t.trace_id for t in support],
        "support": _figures(policy, support),
    }
    if heldout:
        info["heldout"] = _figures(policy, heldout)
    if policy.param is None:
        log.warning("%s found no threshold to certify on K=%d traces: the adapted predictor never stops early",
                    threshold_method, k)
    return AdaptedPredictor(predictor, policy.param, list(names or corpus_names), info)


def _figures(policy: ProbePolicy, traces: Sequence[Trace]) -> dict[str, float]:
    out = evaluate_policy(policy, traces)
    return {
        "n_traces": len(traces),
        "em": float(out.em.mean()),
        "full_em": float(out.full_em.mean()),
        "savings": float(1.0 - out.total_tokens.sum() / max(out.full_tokens.sum(), 1.0)),
    }


def save_adapted(adapted: AdaptedPredictor, path: str | Path) -> Path:
    """Write an adapted predictor, its threshold and feature names to ``path`` (torch.save)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "format": FORMAT,
            "schema_version": SCHEMA_VERSION,
            "code_version": maml_stop.__version__,
            "predictor_config": adapted.predictor.config(),
            "state_dict": {k: v.detach().clone() for k, v in adapted.predictor.state_dict().items()},
            "threshold": adapted.threshold,
            "feature_names": list(adapted.feature_names),
            "meta": json.loads(json.dumps(adapted.meta)),
        },
        path,
    )
    return path


def load_adapted(path: str | Path, feature_names: Sequence[str] | None = None) -> AdaptedPredictor:
    """Read what :func:`save_adapted` wrote; with ``feature_names``, check they match (live generation
    passes the names its feature code computes)."""
    from maml_stop.learn.checkpoint_io import CheckpointLoadError, safe_load
    from maml_stop.learn.predictor import StoppingPredictor

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no adapted predictor at {path}")
    try:  # weights-only, checked first: an adapted artifact can be a pickle that runs code
        blob = safe_load(path, what="adapted predictor")
    except CheckpointLoadError as err:
        raise AdaptError(str(err)) from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        keys = sorted(blob) if isinstance(blob, dict) else type(blob).__name__
        raise AdaptError(f"{path} is not an adapted predictor written by `maml-stop adapt` (format {FORMAT}); found {keys}")
    if blob.get("schema_version") != SCHEMA_VERSION:
        raise AdaptError(f"{path} was written for trace schema {blob.get('schema_version')}; this code reads {SCHEMA_VERSION}")
    predictor = StoppingPredictor(**blob["predictor_config"])
    predictor.load_state_dict(blob["state_dict"])
    predictor.eval()
    adapted = AdaptedPredictor(predictor, blob["threshold"], list(blob["feature_names"]), dict(blob.get("meta", {})))
    if feature_names is not None:
        adapted.check_features(feature_names)
    return adapted


def _parser():
    from jsonargparse import ActionConfigFile, ArgumentParser

    p = ArgumentParser(prog="maml-stop adapt", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", action=ActionConfigFile)
    p.add_argument("--checkpoint", type=str, required=True, help="meta-trained checkpoint (maml-stop fit)")
    p.add_argument("--family", type=str, required=True, help="the new family to adapt to")
    p.add_argument("--k", type=int, default=16, help="labelled support questions")
    p.add_argument("--corpus", type=str | None, default=None, help="corpus folder with the family's traces")
    p.add_argument("--traces", type=str | None, default=None, help="or one parquet trace file")
    p.add_argument("--meta", type=str | None, default=None, help="meta.json of --traces (default: found beside it)")
    p.add_argument("--threshold_method", type=str, default="em_target", help=f"one of {', '.join(SELECTORS)}")
    p.add_argument("--delta", type=float, default=0.01, help="EM-drop target (0.01 = 1 point)")
    p.add_argument("--alpha", type=float, default=0.1, help="Learn-then-Test risk level")
    p.add_argument("--tau", type=float, default=0.5, help="threshold of --threshold_method fixed")
    p.add_argument("--taus", type=list[float], default=list(DEFAULT_TAUS), help="thresholds to choose from")
    p.add_argument("--steps", type=int | None, default=None, help="inner steps (default: the checkpoint's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the K-question draw")
    p.add_argument("--crossfit", type=bool, default=False,
                   help="choose the threshold on out-of-sample support scores (adapt on one half, score the other)")
    p.add_argument("--out", type=str, required=True, help="where to write the adapted predictor (.pt)")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    from maml_stop.learn.module import CheckpointError

    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        adapted = adapt(
            args.checkpoint, args.family, args.k, corpus=args.corpus, traces=args.traces, meta=args.meta,
            threshold_method=args.threshold_method, delta=args.delta, alpha=args.alpha, tau=args.tau,
            taus=args.taus, steps=args.steps, seed=args.seed, crossfit=args.crossfit,
        )
    except (AdaptError, store.CorpusError, CheckpointError, FileNotFoundError) as err:
        print(f"maml-stop adapt: {err}", file=sys.stderr)
        return 2
    path = save_adapted(adapted, args.out)
    tau = "never stop early" if adapted.threshold is None else f"tau = {adapted.threshold:g}"
    s = adapted.meta["support"]
    line = f"adapted on K={args.k} traces of {args.family}: {tau}; support EM {s['em']:.3f} (full {s['full_em']:.3f}), savings {100 * s['savings']:.1f}%"
    if "heldout" in adapted.meta:
        h = adapted.meta["heldout"]
        line += f"; held-out ({h['n_traces']} traces) EM {h['em']:.3f} (full {h['full_em']:.3f}), savings {100 * h['savings']:.1f}%"
    print(line)
    print(f"saved: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
