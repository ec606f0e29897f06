"""The adapted-predictor file that ``maml-stop adapt`` writes and live generation reads.

Format ``maml_stop.adapted/2``: a ``torch.save`` dict (read back weights-only) with ``format``,
``schema_version``, ``code_version``, ``predictor_config`` (:class:`~maml_stop.learn.predictor.PredictorConfig`
as a dict), ``state_dict`` (a plain :class:`~maml_stop.learn.predictor.StoppingPredictor`), ``tau``
(the stop threshold; a float, or None = never stop early), ``feature_names`` and ``meta`` (family, K, support trace ids,
threshold method, ``selector``: the rule's state, support and held-out figures) and ``recipe`` (issue 10: how the probes that feed the
predictor are made, copied from the ``meta.json`` of the corpus the support traces came from, see
:func:`probe_recipe`; absent in older files: ``recipe`` None, which still loads but cannot build live
stopping). ``feature_names`` is the predictor's input, the feature subset it was trained on. Files of
format ``maml_stop.adapted/1`` (tau stored as ``threshold``, before issue 31) load through
:func:`migrate_adapted`.

>>> adapted = load_adapted("runs/adapted/gcd.pt", feature_names=corpus.feature_names)   # doctest: +SKIP
>>> adapted.predict_proba(batch), adapted.tau                                           # doctest: +SKIP
>>> criteria = LiveStopping.from_adapted("runs/adapted/gcd.pt", model, tok)                 # doctest: +SKIP
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

import maml_stop
from maml_stop import SCHEMA_VERSION
from maml_stop.data.store import atomic_write_bytes
from maml_stop.decide.rule import reached
from maml_stop.learn.checkpoint_io import CheckpointLoadError, safe_load
from maml_stop.learn.predictor import PredictorConfig, StoppingPredictor
from maml_stop.probe.features import feature_cost

__all__ = ["AdaptedPredictor", "AdaptError", "load_adapted", "save_adapted", "check_names", "probe_recipe",
           "live_mode", "migrate_adapted", "missing_recipe_fields", "FORMAT", "RECIPE_FIELDS", "FEATURIZER_FIELDS"]

FORMAT = "maml_stop.adapted/2"
# older formats load_adapted reads, through migrate_adapted: /1 stored tau as "threshold" (issue 31)
OLD_FORMATS = ("maml_stop.adapted/1",)
# what live stopping needs to make the probes the predictor was trained on (recipe keys)
RECIPE_FIELDS = ("schedule", "answer_trigger", "answer_max_tokens", "max_new_tokens", "featurizer", "extraction",
                 "mode")
FEATURIZER_FIELDS = ("hidden_size", "proj_dim", "proj_seed", "summary")  # + mid_layer (None: no mid-layer summary)


def live_mode(feature_names: Sequence[str], costs: dict[str, str] | None = None) -> str:
    """The live mode a predictor on ``feature_names`` runs in: ``"free"`` when every feature is free
    (``costs``, the corpus ``feature_costs``, else :func:`~maml_stop.probe.features.feature_cost`; a
    name of no known class counts as paid), else ``"every"``."""
    def cost(name: str) -> str:
        try:
            return (costs or {}).get(name) or feature_cost(name)
        except ValueError:
            return "paid"

    return "free" if all(cost(n) == "free" for n in feature_names) else "every"


def probe_recipe(meta: dict[str, Any], family: str, feature_names: Sequence[str]) -> dict[str, Any]:
    """The probe recipe of an adapted predictor on ``feature_names``, from the ``meta.json`` (``meta``)
    of the corpus its support traces of ``family`` came from: ``schedule`` (``ProbeSchedule.to_dict``),
    ``answer_trigger``, ``answer_max_tokens``, ``max_new_tokens``, ``featurizer`` (hidden_size, proj_dim,
    proj_seed, summary, mid_layer), ``extraction`` (the family whose ``extract_probe_answer`` reads the
    forced answers, and its answer kind), ``mode`` (:func:`live_mode`), ``reasoning_format`` (``plain``
    or ``think``: :mod:`maml_stop.probe.think`; optional, ``plain`` for corpora that do not record it). A
    field the metadata lacks is None (:func:`missing_recipe_fields` lists them)."""
    prompt, generation = meta.get("prompt") or {}, meta.get("generation") or {}
    features = meta.get("features") or {}
    featurizer = None
    if all(k in features for k in FEATURIZER_FIELDS):
        featurizer = {k: features[k] for k in FEATURIZER_FIELDS}
        featurizer["mid_layer"] = features.get("mid_layer")
    settings = (meta.get("family_settings") or {}).get(family) or {}
    return json.loads(json.dumps({
        "schedule": meta.get("schedule"),
        "answer_trigger": prompt.get("answer_trigger"),
        "answer_max_tokens": generation.get("answer_max_tokens"),
        "max_new_tokens": generation.get("max_new_tokens"),
        "featurizer": featurizer,
        "extraction": {"family": family, "answer_kind": settings.get("answer_kind")},
        "mode": live_mode(feature_names, meta.get("feature_costs")),
        "reasoning_format": prompt.get("reasoning_format", "plain"),
    }))


def missing_recipe_fields(recipe: dict[str, Any] | None) -> list[str]:
    """The :data:`RECIPE_FIELDS` a recipe lacks (all of them for None: a file written before recipes)."""
    if recipe is None:
        return list(RECIPE_FIELDS)
    return [k for k in RECIPE_FIELDS if recipe.get(k) is None]


class AdaptError(ValueError):
    """Inputs the adaptation script cannot use (empty support, other features, bad file)."""


@dataclass
class AdaptedPredictor:
    """An adapted stopping predictor and its stop threshold ``tau``, ready for live generation.

    ``tau`` None means "never stop early" (the threshold method could not certify any);
    ``feature_names`` is the predictor's input (its feature subset); ``recipe`` how its probes are made
    (:func:`probe_recipe`; None in files written before it).
    """

    predictor: nn.Module
    tau: float | None
    feature_names: list[str]
    meta: dict[str, Any] = field(default_factory=dict)
    recipe: dict[str, Any] | None = None

    def check_features(self, feature_names: Sequence[str]) -> None:
        """Raise :class:`AdaptError` unless ``feature_names`` are the ones the predictor was adapted on."""
        check_names(self.feature_names, list(feature_names), "the adapted predictor", "the given features")

    def predict_proba(self, batch: Any) -> torch.Tensor:
        """P(stopping here keeps the answer correct) at every probe point of a ProbeBatch. (N,)"""
        with torch.no_grad():
            return torch.sigmoid(self.predictor(batch))

    def should_stop(self, probability: float) -> bool:
        return reached(probability, self.tau)

    @property
    def live_tau(self) -> float:
        """``tau`` as :class:`maml_stop.live.stopping.LiveStopping` takes it (inf = never stop)."""
        return float("inf") if self.tau is None else float(self.tau)


def check_names(expected: Sequence[str] | None, got: Sequence[str] | None, what: str, other: str) -> None:
    if expected is None or got is None or list(expected) == list(got):
        return
    missing = [n for n in expected if n not in got]
    extra = [n for n in got if n not in expected]
    detail = f"missing {missing}, unexpected {extra}" if (missing or extra) else "same names in another order"
    raise AdaptError(
        f"feature-name mismatch between {what} ({len(expected)} features) and {other} ({len(got)} features): "
        f"{detail}.\n  expected: {list(expected)}\n  got:      {list(got)}"
    )


def save_adapted(adapted: AdaptedPredictor, path: str | Path) -> Path:
    """Write an adapted predictor, its tau, feature names and probe recipe to ``path`` (torch.save)."""
    path = Path(path)
    buffer = io.BytesIO()
    torch.save(
        {
            "format": FORMAT,
            "schema_version": SCHEMA_VERSION,
            "code_version": maml_stop.__version__,
            "predictor_config": adapted.predictor.config().to_dict(),
            "state_dict": {k: v.detach().clone() for k, v in adapted.predictor.state_dict().items()},
            "tau": adapted.tau,
            "feature_names": list(adapted.feature_names),
            "meta": json.loads(json.dumps(adapted.meta)),
            "recipe": None if adapted.recipe is None else json.loads(json.dumps(adapted.recipe)),
        },
        buffer,
    )
    atomic_write_bytes(path, buffer.getvalue())  # a failed write (full disk) leaves an older artifact intact
    return path


def migrate_adapted(blob: dict[str, Any]) -> dict[str, Any]:
    """An artifact dict of an older format (:data:`OLD_FORMATS`) as :data:`FORMAT` writes it; the current
    format unchanged. ``maml_stop.adapted/1`` stored tau under ``threshold``."""
    if blob.get("format") not in OLD_FORMATS:
        return blob
    out = {k: v for k, v in blob.items() if k != "threshold"}
    out.update(format=FORMAT, tau=blob.get("threshold"))
    return out


def load_adapted(path: str | Path, feature_names: Sequence[str] | None = None) -> AdaptedPredictor:
    """Read what :func:`save_adapted` wrote; with ``feature_names``, check they match (live generation
    passes the names its feature code computes)."""

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no adapted predictor at {path}")
    try:  # weights-only, checked first: an adapted artifact can be a pickle that runs code
        blob = safe_load(path, what="adapted predictor")
    except CheckpointLoadError as err:
        raise AdaptError(str(err)) from None
    if not isinstance(blob, dict) or blob.get("format") not in (FORMAT, *OLD_FORMATS):
        keys = sorted(blob) if isinstance(blob, dict) else type(blob).__name__
        raise AdaptError(f"{path} is not an adapted predictor written by `maml-stop adapt` (format {FORMAT}); found {keys}")
    blob = migrate_adapted(blob)
    if blob.get("schema_version") != SCHEMA_VERSION:
        raise AdaptError(f"{path} was written for trace schema {blob.get('schema_version')}; this code reads {SCHEMA_VERSION}")
    predictor = StoppingPredictor.from_config(PredictorConfig(**blob["predictor_config"]))
    predictor.load_state_dict(blob["state_dict"])
    predictor.eval()
    recipe = blob.get("recipe")  # absent in files written before recipes: still usable offline
    adapted = AdaptedPredictor(predictor, blob["tau"], list(blob["feature_names"]), dict(blob.get("meta", {})),
                               dict(recipe) if recipe is not None else None)
    if feature_names is not None:
        adapted.check_features(feature_names)
    return adapted
