"""What live stopping needs, read from an adapted artifact alone (issue 10): the predictor, tau (its
stop threshold) and feature subset of ``maml-stop adapt``'s file, and the probe recipe it carries (featurizer on the
model's hidden size, schedule, answer trigger and budget, the family that extracts the answers, the live
mode, the token cap). :meth:`maml_stop.live.stopping.LiveStopping.from_adapted` builds the criterion
from it."""

from __future__ import annotations

from typing import Any

from torch import nn

from maml_stop.probe.features import ProbeFeaturizer
from maml_stop.probe.schedule import ProbeSchedule
from maml_stop.live.artifact import AdaptError, load_adapted, missing_recipe_fields
from tasks import get_family
from tasks.answers import extract_probe
from tasks.base import TaskError


def live_parts(path, model: nn.Module) -> dict[str, Any]:
    """The constructor arguments of ``LiveStopping`` for ``model``, from the adapted file ``path``.
    Raises :class:`~maml_stop.live.artifact.AdaptError` for an artifact without a complete recipe (naming
    the missing fields), a model of another hidden size, or features the recipe does not make."""
    adapted = load_adapted(path)
    recipe = adapted.recipe
    missing = missing_recipe_fields(recipe)
    if missing:
        raise AdaptError(
            f"{path} carries no complete probe recipe: missing {missing} (written before recipes existed, or "
            "adapted on traces whose meta.json lacks them). Adapt again with `maml-stop adapt --corpus <corpus>`, "
            "or build LiveStopping(...) by hand with the featurizer and schedule of the harvest."
        )
    spec = recipe["featurizer"]
    hidden = getattr(model.config, "hidden_size", None)
    if hidden != spec["hidden_size"]:
        raise AdaptError(
            f"the model has hidden size {hidden}, but the predictor of {path} was adapted on features of a model "
            f"with hidden size {spec['hidden_size']}: use the model its traces were harvested with"
        )
    featurizer = ProbeFeaturizer(hidden, proj_dim=spec["proj_dim"], proj_seed=spec["proj_seed"],
                                 summary=spec["summary"], mid_layer=spec.get("mid_layer"))
    names = list(adapted.feature_names)
    unknown = [n for n in names if n not in featurizer.feature_names]
    width = getattr(adapted.predictor, "n_features", len(names))
    if unknown or width != len(names):
        raise AdaptError(
            f"the feature subset of {path} does not fit its recipe: "
            + (f"{unknown} are not among the {len(featurizer.feature_names)} features its featurizer makes "
               f"({featurizer.feature_names[:3]}..., {featurizer.config()})" if unknown else
               f"the predictor reads {width} features, the artifact names {len(names)}")
        )
    sched = dict(recipe["schedule"])
    schedule = ProbeSchedule(**{**sched, "cues": tuple(sched.get("cues") or ())})
    extraction = recipe["extraction"]
    family, answer_fn = None, None
    kind = extraction.get("answer_kind")
    try:  # the family's own extract_probe_answer, what the harvest used
        family = get_family(extraction["family"])
        if kind and family.answer_kind != kind:  # a registry family of that name, not the harvested one
            raise TaskError(f"answer kind {family.answer_kind!r}, recorded {kind!r}")
    except TaskError:
        family = None
        if not kind:
            raise AdaptError(f"{path}: family {extraction['family']!r} is not in the registry and the recipe "
                             "records no answer_kind to extract its answers with") from None
        # e.g. a `dataset` family stored under its own name: the same extraction by answer kind
        answer_fn = lambda text: extract_probe(text, kind=kind)  # noqa: E731
    return {"predictor": adapted.predictor, "tau": adapted.live_tau, "feature_names": names,
            "featurizer": featurizer, "schedule": schedule, "answer_trigger": recipe["answer_trigger"],
            "answer_fn": answer_fn, "answer_max_tokens": recipe["answer_max_tokens"], "family": family,
            "mode": recipe["mode"], "max_new_tokens": recipe["max_new_tokens"],
            "reasoning_format": recipe.get("reasoning_format") or "plain"}  # absent in older artifacts: plain
