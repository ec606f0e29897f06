"""The adapted-predictor file that ``maml-stop adapt`` writes and live generation reads.

Format ``maml_stop.adapted/1``: a ``torch.save`` dict (read back weights-only) with ``format``,
``schema_version``, ``code_version``, ``predictor_config`` (:class:`~maml_stop.learn.predictor.PredictorConfig`
as a dict), ``state_dict`` (a plain :class:`~maml_stop.learn.predictor.StoppingPredictor`), ``threshold``
(float, or None = never stop early), ``feature_names`` and ``meta`` (family, K, support trace ids,
threshold method, support and held-out figures).

>>> adapted = load_adapted("runs/adapted/gcd.pt", feature_names=corpus.feature_names)   # doctest: +SKIP
>>> adapted.predict_proba(batch), adapted.threshold                                     # doctest: +SKIP
>>> LiveStopping(model, tok, adapted.predictor, adapted.live_threshold, prompt_length=n,
...              feature_names=adapted.feature_names, featurizer=featurizer, schedule=schedule)  # doctest: +SKIP
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

import maml_stop
from maml_stop import SCHEMA_VERSION
from maml_stop.learn.checkpoint_io import CheckpointLoadError, safe_load
from maml_stop.learn.predictor import PredictorConfig, StoppingPredictor

__all__ = ["AdaptedPredictor", "AdaptError", "load_adapted", "save_adapted", "check_names", "FORMAT"]

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
        check_names(self.feature_names, list(feature_names), "the adapted predictor", "the given features")

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
    """Write an adapted predictor, its threshold and feature names to ``path`` (torch.save)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "format": FORMAT,
            "schema_version": SCHEMA_VERSION,
            "code_version": maml_stop.__version__,
            "predictor_config": adapted.predictor.config().to_dict(),
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
    predictor = StoppingPredictor.from_config(PredictorConfig(**blob["predictor_config"]))
    predictor.load_state_dict(blob["state_dict"])
    predictor.eval()
    adapted = AdaptedPredictor(predictor, blob["threshold"], list(blob["feature_names"]), dict(blob.get("meta", {})))
    if feature_names is not None:
        adapted.check_features(feature_names)
    return adapted
