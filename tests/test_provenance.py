"""Issue 29 D: a checkpoint records the recipe of its corpus (projection seed, layers, model weights, probe
schedule and prompt) and an adapted artifact the recipe of its traces; both are checked where they are
used (evaluate, adapt, generate), with an explicit override."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import write_tiny_corpus
from maml_stop.data import store
from maml_stop.data.provenance import ProvenanceError, corpus_provenance
from test_fit_paths import fit_args
from test_feature_subsets import FAMILY, _artifact, harvested  # noqa: F401  (harvested: a fixture)

RECIPE = {"model_weights": {"spec": "m", "weights": {"model.safetensors": "ab" * 32}},
          "features": {"hidden_size": 16, "proj_dim": 4, "proj_seed": 0, "summary": "mean"},
          "schedule": {"every_n": 16}, "prompt": {"answer_trigger": "\nFinal answer:"}}


def _corpus(root: Path, **change) -> str:
    write_tiny_corpus(root)
    meta = json.loads(json.dumps(RECIPE))
    for key, value in change.items():  # e.g. features__proj_seed=1
        part, field = key.split("__")
        meta[part] = {**meta[part], field: value}
    store.write_meta(root, {**store.read_meta(root), **meta})
    return str(root)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A checkpoint meta-trained (a few steps, LightningCLI) on a corpus with a recorded recipe."""
    from maml_stop.learn.cli import cli_main

    root = tmp_path_factory.mktemp("prov")
    corpus = _corpus(root / "c")
    cli_main(fit_args(corpus, root / "run", steps=2))
    return corpus, str(root / "run" / "checkpoints" / "last.ckpt")


def test_fit_records_the_corpus_recipe(fitted):
    from maml_stop.learn.module import load_predictor

    corpus, ckpt = fitted
    recorded = load_predictor(ckpt)[2]["provenance"]
    assert recorded == corpus_provenance(store.read_meta(corpus)) and len(recorded["hash"]) == 64


@pytest.mark.parametrize("change, named", [({"features__proj_seed": 1}, "features.proj_seed: 0 vs 1"),
                                           ({"model_weights__weights": {"model.safetensors": "cd" * 32}},
                                            "model.model.safetensors"),
                                           ({"schedule__every_n": 32}, "schedule.every_n: 16 vs 32")])
def test_evaluate_and_adapt_refuse_a_corpus_of_another_recipe(fitted, tmp_path, capsys, change, named):
    from maml_stop.evaluate.config import EvaluateConfig
    from maml_stop.evaluate.protocol import run
    from maml_stop.live.adapt import main as adapt_main

    _, ckpt = fitted
    other = _corpus(tmp_path / "other", **change)
    cfg = dict(corpus=other, checkpoint=ckpt, out=str(tmp_path / "ev"), methods=["full", "maml"], k=[4],
               episodes=1, families=["fam_c"], progress=False)
    with pytest.raises(ProvenanceError, match=named):
        run(EvaluateConfig(**cfg))
    args = ["--checkpoint", ckpt, "--corpus", other, "--family", "fam_c", "--k", "4", "--out", str(tmp_path / "a.pt")]
    assert adapt_main(args) == 2
    assert named in capsys.readouterr().err and not (tmp_path / "a.pt").exists()
    assert adapt_main([*args, "--allow_other_recipe", "true"]) == 0  # the explicit override
    assert run(EvaluateConfig(**cfg, allow_other_recipe=True))["methods"] == ["full", "maml"]


def test_the_same_recipe_passes_and_the_artifact_records_it(fitted, tmp_path):
    from maml_stop.live.adapt import adapt

    corpus, ckpt = fitted
    same = _corpus(tmp_path / "copy")  # another folder, the same recipe
    adapted = adapt(ckpt, "fam_c", 4, corpus=same)
    assert adapted.meta["provenance"] == corpus_provenance(store.read_meta(corpus))


def test_a_checkpoint_without_provenance_still_loads_with_a_warning(fitted, tmp_path, caplog):
    import torch

    from maml_stop.learn.module import CKPT_KEY
    from maml_stop.live.adapt import adapt

    corpus, ckpt = fitted
    old = torch.load(ckpt, map_location="cpu", weights_only=False)
    old[CKPT_KEY].pop("provenance")  # as written before issue 29
    torch.save(old, tmp_path / "old.ckpt")
    with caplog.at_level("WARNING", logger="maml_stop.data.provenance"):
        adapted = adapt(str(tmp_path / "old.ckpt"), "fam_c", 4, corpus=_corpus(tmp_path / "other", features__proj_seed=1))
    assert "records no corpus recipe" in caplog.text
    assert adapted.meta["provenance"]["parts"]["features"]["proj_seed"] == 1


def test_generate_refuses_another_model_of_the_same_width(harvested, tmp_path, capsys):  # noqa: F811
    import tiny_lm
    from maml_stop import cli
    from maml_stop.harvest.model import model_identity
    from maml_stop.live.artifact import save_adapted

    model_dir = str(Path(harvested[0]).parent / "tiny_lm")
    _, adapted = _artifact(harvested, tmp_path, store.read_meta(harvested[0])["feature_names"])
    adapted.meta["provenance"]["parts"]["model"] = model_identity(model_dir)["weights"]  # as hash_weights: true
    path = str(save_adapted(adapted, tmp_path / "hashed.pt"))
    other = tiny_lm.save_tiny(tmp_path / "other_lm", seed=1)  # the same architecture, other weights
    common = ["generate", "--adapted", path, "--question", "What is 2 + 3?"]
    assert cli.main([*common, "--model", model_dir]) == 0
    capsys.readouterr()
    assert cli.main([*common, "--model", other]) == 2
    assert "is not the model the traces" in capsys.readouterr().err
    assert cli.main([*common, "--model", other, "--allow_other_model", "true"]) == 0


def test_an_artifact_without_provenance_still_generates(harvested, tmp_path, caplog):  # noqa: F811
    from maml_stop import cli
    from maml_stop.live.artifact import save_adapted

    model_dir = str(Path(harvested[0]).parent / "tiny_lm")
    _, adapted = _artifact(harvested, tmp_path, store.read_meta(harvested[0])["feature_names"])
    adapted.meta.pop("provenance")  # as written before issue 29
    path = str(save_adapted(adapted, tmp_path / "old.pt"))
    with caplog.at_level("WARNING", logger="maml_stop.live.generate"):
        assert cli.main(["generate", "--adapted", path, "--question", "What is 2 + 3?", "--model", model_dir]) == 0
    assert "cannot check that" in caplog.text
