"""``maml-stop adapt``: few-shot adaptation of a meta-trained stopping predictor to a new family.

Given a checkpoint, labelled traces of the new family (a corpus folder, or one trace file in the
stored parquet schema) and K, it adapts the predictor on K support questions with the checkpoint's own
:class:`~maml_stop.learn.adapter.InnerLoopAdapter`, chooses the threshold on those K traces alone, and saves
what live generation needs: the adapted predictor, its tau, the feature names (the checkpoint's
feature subset: the traces are narrowed to its columns) and the probe recipe copied from the corpus
``meta.json`` (schedule, answer trigger and budget, token cap, featurizer, extraction, live mode; see
:func:`maml_stop.live.artifact.probe_recipe`), from which ``LiveStopping.from_adapted`` builds live stopping::

    maml-stop adapt --checkpoint runs/quickstart/checkpoints/best.ckpt \\
        --corpus experiments/corpus/qwen05 --family gcd --k 16 --threshold_method em_target \\
        --out runs/adapted/gcd.pt

The file format (``save_adapted``, ``load_adapted``, ``AdaptedPredictor``) is :mod:`maml_stop.live.artifact`;
the adaptation itself is the one road, :meth:`~maml_stop.learn.adapter.InnerLoopAdapter.fit_support`,
through the learned policy that also chooses the threshold.

When the family has more than K questions, K are drawn with the one support/query split
(:func:`maml_stop.data.episodes.split_support_query`, seeded) and the rest are scored as a held-out check; the
figures are printed and stored in the file.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from maml_stop.data import store
from maml_stop.data.accounting import savings
from maml_stop.data.outputs import check_output_file
from maml_stop.data.provenance import ProvenanceError, check_provenance, corpus_provenance
from maml_stop.data.corpus import Trace, TraceCorpus
from maml_stop.data.episodes import QuestionGroups, split_support_query
from maml_stop.decide.policies import ProbePolicy, evaluate_policy
from maml_stop.decide.registry import SELECTORS, make_selector, selector_from_state
from maml_stop.decide.rule import DEFAULT_TAUS
from maml_stop.learn.predictor import fresh_copy
from maml_stop.data.datamodule import select_features
from maml_stop.learn.module import CheckpointError, load_predictor
from maml_stop.live.artifact import (FORMAT, AdaptedPredictor, AdaptError, check_names, load_adapted, probe_recipe,
                                     save_adapted)

__all__ = ["AdaptedPredictor", "AdaptError", "adapt", "load_adapted", "save_adapted", "main", "FORMAT"]

log = logging.getLogger(__name__)


def _load_traces(corpus: str | None, traces: str | None, meta_path: str | None, family: str,
                 checkpoint_names: list[str] | None) -> TraceCorpus:
    """The traces of ``family`` (a corpus holding them, with the metadata that describes them)."""
    if (corpus is None) == (traces is None):
        raise AdaptError("give exactly one of --corpus (a corpus folder) and --traces (one trace file)")
    if corpus is not None:
        loaded = TraceCorpus.load(corpus)
        loaded.traces(family)  # a CorpusError naming the families when it has none
        return loaded
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
    try:  # the one corpus loader, on this one file
        loaded = TraceCorpus.load_file(path, meta)
    except ValueError as err:
        raise AdaptError(f"{path}: cannot read its traces with feature names {meta['feature_names']}: {err}") from err
    if family not in loaded.families:
        raise AdaptError(f"{path} holds no traces of family {family!r}; families in it: {loaded.families}")
    return loaded


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
    selector_state: str | None = None,
    allow_other_recipe: bool = False,
) -> AdaptedPredictor:
    """Adapt the checkpoint's predictor on K labelled traces of ``family`` and choose its threshold.
    ``selector_state``: a JSON file with a fitted selector's state (a meta-learned rule fitted across
    families, ``maml-stop meta-select --export``), used instead of ``threshold_method``. Traces of another
    recipe than the checkpoint's corpus (:mod:`maml_stop.data.provenance`) are refused unless
    ``allow_other_recipe``; the artifact records the traces' provenance (checked by ``generate``)."""
    fitted = None
    if selector_state is not None:
        try:
            fitted = selector_from_state(json.loads(Path(selector_state).read_text()))
        except (OSError, ValueError) as err:
            raise AdaptError(f"--selector_state {selector_state}: not a selector state ({err})") from err
        threshold_method = fitted.name
    if threshold_method not in SELECTORS:
        raise AdaptError(f"unknown threshold method {threshold_method!r}; valid methods: {', '.join(SELECTORS)}")
    if k < 1:
        raise AdaptError(f"K must be >= 1: an empty support set cannot be adapted on (got K={k})")
    bad = [f"{name} {v!r}" for name, values in (("tau", [tau]), ("taus", list(taus))) for v in values
           if not (isinstance(v, (int, float)) and 0.0 <= v <= 1.0)]
    if bad:  # a probability threshold: an artifact with tau 1.01 would be refused later, by generate
        raise AdaptError(f"tau and taus are probabilities in [0, 1]; got {', '.join(bad)}")
    _, adapter, ckpt_meta = load_predictor(checkpoint)
    names = ckpt_meta.get("feature_names")
    loaded = _load_traces(corpus, traces, meta, family, names)
    provenance = corpus_provenance(loaded.meta)
    check_provenance(ckpt_meta.get("provenance"), provenance, f"the checkpoint {checkpoint}",
                     f"the traces of {corpus or traces}", allow_other_recipe)
    corpus_names = loaded.feature_names
    if names is not None and any(n not in corpus_names for n in names):  # names the missing ones
        check_names(names, corpus_names, f"the checkpoint {checkpoint}", f"the traces of {family!r}")
    # the checkpoint's feature subset: the columns it was trained on (itself when it read them all)
    pool = list(select_features(loaded, names).traces(family))
    if not pool:
        raise AdaptError(f"no labelled traces of family {family!r}: the support set would be empty")
    if pool[0].features.shape[1] != adapter.predictor.n_features:
        raise AdaptError(
            f"the traces have {pool[0].features.shape[1]} features; the checkpoint's predictor expects "
            f"{adapter.predictor.n_features}"
        )
    n_questions = len(QuestionGroups(pool))
    if n_questions < k:
        raise AdaptError(f"family {family!r} has {n_questions} labelled questions; K={k} asked")
    if n_questions == k:
        support, heldout = list(pool), []
    else:
        support, heldout = split_support_query(pool, k, None, np.random.default_rng(seed), family=family)
    steps = steps if steps is not None else (ckpt_meta.get("hyper_parameters") or {}).get("eval_inner_steps")
    selector = fitted if fitted is not None else make_selector(threshold_method, delta=delta, alpha=alpha, value=tau)
    policy = ProbePolicy(adapter=adapter, selector=selector, taus=list(taus), tau=tau, adapt_steps=steps,
                         crossfit=crossfit, seed=seed, name="maml")
    policy.fit(support)
    predictor = fresh_copy(policy.model).eval()
    info: dict[str, Any] = {
        "family": family, "k": k, "seed": seed, "threshold_method": threshold_method, "delta": delta,
        "selector": selector.state_dict(),  # the rule and its state: maml_stop.decide.registry.selector_from_state
        "alpha": alpha, "crossfit": crossfit, "checkpoint": str(checkpoint), "adapter": adapter.config().to_dict(), "inner_steps": steps,
        "support_trace_ids": [t.trace_id for t in support],
        "provenance": provenance,  # the recipe of the traces adapted on: generate checks its model against it
        "support": _figures(policy, support),
    }
    if heldout:
        info["heldout"] = _figures(policy, heldout)
    if policy.param is None:
        log.warning("%s found no threshold to certify on K=%d traces: the adapted predictor never stops early",
                    threshold_method, k)
    names = list(names or corpus_names)
    recipe = probe_recipe(loaded.meta, family, names)
    return AdaptedPredictor(predictor, policy.param, names, info, recipe)


def _figures(policy: ProbePolicy, traces: Sequence[Trace]) -> dict[str, float]:
    out = evaluate_policy(policy, traces)
    return {
        "n_traces": len(traces),
        "em": float(out.em.mean()),
        "full_em": float(out.full_em.mean()),
        "savings": float(savings(out.total_tokens.sum(), out.full_tokens.sum())),
    }


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
    p.add_argument("--selector_state", type=str | None, default=None,
                   help="JSON state of a fitted selector (maml-stop meta-select --export); replaces --threshold_method")
    p.add_argument("--out", type=str, required=True, help="where to write the adapted predictor (.pt)")
    p.add_argument("--allow_other_recipe", type=bool, default=False,
                   help="adapt on traces of another recipe than the checkpoint's corpus (projection seed, layers, "
                        "model weights, probe schedule, prompt): a warning instead of a refusal")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        check_output_file(args.out, "--out")  # a folder, read-only or blocked path: refused before the work
        adapted = adapt(
            args.checkpoint, args.family, args.k, corpus=args.corpus, traces=args.traces, meta=args.meta,
            threshold_method=args.threshold_method, delta=args.delta, alpha=args.alpha, tau=args.tau,
            taus=args.taus, steps=args.steps, seed=args.seed, crossfit=args.crossfit,
            selector_state=args.selector_state, allow_other_recipe=args.allow_other_recipe,
        )
        path = save_adapted(adapted, args.out)  # atomic: a failed write leaves an older artifact intact
    except (AdaptError, store.CorpusError, CheckpointError, ProvenanceError, OSError) as err:
        print(f"maml-stop adapt: {err}", file=sys.stderr)
        return 2
    tau = "never stop early" if adapted.tau is None else f"tau = {adapted.tau:g}"
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
