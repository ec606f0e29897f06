"""The RL stopping policy (maml_stop/learn/rl.py): the reward's accounting by hand, the policy-gradient
estimator against the exact gradient, a known optimum found by training, a tiny `maml-stop fit`, the
checkpoint through load_predictor, the evaluation's rl / rl_unadapted methods, and bad settings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from maml_stop.data.batches import collate_traces
from maml_stop.learn.predictor import PredictorConfig
from maml_stop.learn.rl import (
    RLConfig,
    RLStoppingModule,
    RewardTable,
    expected_reward,
    greedy_stops,
    padded_logits,
    policy_figures,
    policy_gradient_loss,
    stop_distribution,
)
from trace_helpers import make_trace

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def test_reward_table_is_the_accounting_by_hand():
    # probes at 10, 20, 30 reasoning tokens, 5 tokens each; 40 reasoning tokens in all (full generation)
    t = make_trace([0, 1, 1], step=10, probe_cost=5, reasoning_tokens=40, final_em=True)
    table = RewardTable.from_traces([t])
    # stop at i: positions[i] + probes 0..i -> 15, 30, 45 tokens; never: 40 + 15 = 55; all / 40
    assert torch.allclose(table.stop_tokens, torch.tensor([[15 / 40, 30 / 40, 45 / 40]]))
    assert torch.allclose(table.end_tokens, torch.tensor([55 / 40]))
    r_stop, r_end = table.rewards(lam=0.2)
    assert torch.allclose(r_stop, torch.tensor([[0 - 0.2 * 15 / 40, 1 - 0.2 * 30 / 40, 1 - 0.2 * 45 / 40]]))
    assert torch.allclose(r_end, torch.tensor([1 - 0.2 * 55 / 40]))
    # p = 1/2 at every probe: stops at 0, 1, 2 w.p. 1/2, 1/4, 1/8, never 1/8
    logits = torch.zeros(1, 3)
    p_stop, p_never = stop_distribution(logits, table.mask)
    assert torch.allclose(p_stop, torch.tensor([[0.5, 0.25, 0.125]])) and torch.allclose(p_never, torch.tensor([0.125]))
    want = 0.5 * r_stop[0, 0] + 0.25 * r_stop[0, 1] + 0.125 * r_stop[0, 2] + 0.125 * r_end[0]
    assert torch.allclose(expected_reward(logits, table, 0.2), want.reshape(1))
    # greedy: first p >= 0.5; logits (-1, 2, 3) stop at probe 1, all negative never stops
    assert greedy_stops(torch.tensor([[-1.0, 2.0, 3.0], [-1.0, -1.0, -1.0]]), table.gather(torch.tensor([0, 0])).mask).tolist() == [1, -1]
    figures = policy_figures(torch.tensor([[-1.0, 2.0, 3.0]]), table, 0.2)
    assert figures["em_greedy"] == 1.0 and figures["tokens_greedy"] == pytest.approx(30 / 40)
    assert figures["reward_greedy"] == pytest.approx(1 - 0.2 * 30 / 40)


def test_padding_of_traces_of_different_lengths():
    traces = [make_trace([1], trace_id="a"), make_trace([0, 0, 1], trace_id="b")]
    table = RewardTable.from_traces(traces)
    assert table.mask.tolist() == [[True, False, False], [True, True, True]]
    batch = collate_traces(traces)
    logits = padded_logits(torch.arange(4.0), batch, table.width)
    assert logits.tolist() == [[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]]
    p_stop, p_never = stop_distribution(torch.zeros(2, 3), table.mask)
    assert torch.allclose(p_stop.sum(1) + p_never, torch.ones(2))  # a distribution over the probes that exist
    assert p_stop[0, 1:].abs().sum() == 0


@pytest.mark.parametrize("baseline", ["none", "mean", "learned"])
@pytest.mark.parametrize("first_correct", [True, False])
def test_policy_gradient_has_the_sign_and_size_of_the_exact_gradient(baseline, first_correct):
    """One parameter theta, the stop logit at every probe. When the first probe is right, stopping there
    is the best reward (fewest tokens), so the loss must fall as theta rises; when it is wrong and the
    final answer right, the reverse. The REINFORCE estimate matches d/dtheta of -E[R] (exact sum)."""
    t = make_trace([1 if first_correct else 0, 1, 1], step=10, probe_cost=5, reasoning_tokens=40, final_em=True)
    table = RewardTable.from_traces([t])
    config = RLConfig(lam=0.5, baseline=baseline, samples=40_000)
    theta = torch.zeros((), requires_grad=True)
    values = torch.full((1, 3), 0.3) if baseline == "learned" else None  # any state baseline keeps it unbiased
    loss, stats = policy_gradient_loss(theta.expand(1, 3), table, config, values, torch.Generator().manual_seed(0))
    (estimate,) = torch.autograd.grad(loss, theta)
    exact_theta = torch.zeros((), requires_grad=True)
    (exact,) = torch.autograd.grad(-expected_reward(exact_theta.expand(1, 3), table, 0.5).sum(), exact_theta)
    assert (exact < 0) == first_correct and abs(float(exact)) > 0.05
    assert torch.sign(estimate) == torch.sign(exact)
    assert float(estimate) == pytest.approx(float(exact), abs=0.05 + 0.1 * abs(float(exact)))
    assert float(stats["reward"]) == pytest.approx(float(expected_reward(torch.zeros(1, 3), table, 0.5)), abs=0.02)


def _stairs(n: int = 24) -> list:
    """Traces whose forced answer is right from probe 2 on: stopping at probe 2 is the best reward for a
    small lam (EM 1 at the fewest tokens), stopping at probe 0 for a huge one. Features: the probe's
    one-hot position, plus noise."""
    rng = np.random.default_rng(0)
    feats = lambda: np.eye(5) + 0.1 * rng.normal(size=(5, 5))  # noqa: E731
    return [make_trace([0, 0, 1, 1, 1], step=10, probe_cost=2, reasoning_tokens=60, final_em=True,
                       features=feats(), trace_id=f"q{i}#0") for i in range(n)]


def _train(lam: float, steps: int = 300) -> tuple[RLStoppingModule, list]:
    torch.manual_seed(0)
    traces = _stairs()
    module = RLStoppingModule(n_features=5, predictor=PredictorConfig(hidden=16, depth=1), lam=lam, samples=8, traces_per_step=len(traces))
    module.use_traces("train", traces)
    opt = torch.optim.Adam(module.parameters(), lr=0.05)
    tensors, table = module.stage_data("train")
    batch = tensors.gather(np.arange(len(traces)))
    for _ in range(steps):
        loss, _ = module.rl_loss(batch, table)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return module, traces


@pytest.mark.parametrize("lam, best", [(0.3, 2), (100.0, 0)])
def test_training_finds_the_known_optimum(lam, best):
    module, traces = _train(lam)
    tensors, table = module.stage_data("train")
    with torch.no_grad():
        stops = greedy_stops(module.logits(tensors.gather(np.arange(len(traces))), table), table.mask)
    assert stops.tolist() == [best] * len(traces)
    module.use_traces("val", traces)
    figures = module.stage_figures("val")
    r_stop, _ = table.rewards(lam)
    assert figures["reward"] == pytest.approx(float(r_stop[:, best].mean()), abs=0.05 * max(1.0, lam))


def test_bad_settings_name_the_valid_choices():
    with pytest.raises(ValueError, match="unknown baseline 'bogus'; valid baselines: mean, learned, none"):
        RLConfig(baseline="bogus")
    with pytest.raises(ValueError, match="needs samples >= 2"):
        RLConfig(baseline="mean", samples=1)
    with pytest.raises(ValueError, match="lam .* >= 0"):
        RLStoppingModule(n_features=3, lam=-1.0)
    from maml_stop.evaluate.config import EvaluateConfig
    from maml_stop.evaluate.methods import check_methods

    with pytest.raises(ValueError, match=r"methods \['rl'\] need an RL checkpoint"):
        check_methods(EvaluateConfig(corpus="c", methods=["full", "rl"]))


def test_cli_picks_the_model_class(tiny_corpus, tmp_path):
    from maml_stop.learn.cli import cli_main
    from maml_stop.learn.module import MetaStoppingModule
    from test_configs import tiny_args

    args = tiny_args(EXPERIMENTS / "quickstart.yaml", tiny_corpus, tmp_path) + ["--data.k=4", "--data.q=8"]
    assert type(cli_main(args, run=False).model) is MetaStoppingModule  # the default class is unchanged
    cli = cli_main(args + ["--model", "maml_stop.learn.rl.RLStoppingModule", "--model.lam", "0.25"], run=False)
    assert isinstance(cli.model, RLStoppingModule) and cli.model.rl_config.lam == 0.25
    assert cli.model.hparams["predictor"]["hidden"] == 32 and cli.model.predictor.n_features == 8  # quickstart keys, data link
    with pytest.raises(ValueError, match="unknown baseline 'bogus'; valid baselines: mean, learned, none"):
        cli_main(args + ["--config", str(EXPERIMENTS / "rl.yaml"), "--model.baseline=bogus"], run=False)


def test_cli_names_the_model_settings_a_subclass_drops(tiny_corpus, tmp_path, caplog):
    """A config's model keys that the chosen class does not take are named in a warning (jsonargparse
    drops them silently); the RL module takes the adaptation backend."""
    import logging

    from maml_stop.learn.cli import cli_main
    from test_configs import tiny_args

    extra = tmp_path / "extra.yaml"
    extra.write_text("model:\n  compare_random_init: true\n  adapter:\n    backend: torch_func\n")
    args = tiny_args(EXPERIMENTS / "quickstart.yaml", tiny_corpus, tmp_path) + ["--data.k=4", "--data.q=8"]
    with caplog.at_level(logging.WARNING, logger="maml_stop.learn.cli"):
        cli = cli_main(args + ["--config", str(extra), "--config", str(EXPERIMENTS / "rl.yaml")], run=False)
    assert isinstance(cli.model, RLStoppingModule) and cli.model.adapter_config.backend == "torch_func"
    assert cli.model.adapter_config.inner_lr == 0.3 and cli.model.predictor_config.hidden == 32  # merged with the quickstart
    warned = [r.getMessage() for r in caplog.records if "are ignored" in r.getMessage()]
    assert len(warned) == 1 and "['compare_random_init']" in warned[0] and "RLStoppingModule" in warned[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="maml_stop.learn.cli"):
        cli_main(args + ["--config", str(extra)], run=False)  # the default class takes both
    assert not [r for r in caplog.records if "are ignored" in r.getMessage()]


def test_tiny_fit_then_load_and_evaluate(tiny_corpus, tmp_path):
    """`maml-stop fit` of the RL module on the tiny corpus; its best checkpoint through load_predictor
    (the maml road) and the evaluation's rl / rl_unadapted methods on the held-out family."""
    from maml_stop.cli import main
    from maml_stop.data.corpus import TraceCorpus
    from maml_stop.data.episodes import EpisodeSampler
    from maml_stop.evaluate.config import EvaluateConfig
    from maml_stop.evaluate.methods import build_policies
    from maml_stop.decide.policies import ProbePolicy, probe_outcome
    from maml_stop.evaluate.protocol import evaluate_episode
    from maml_stop.decide.registry import make_selector
    from maml_stop.learn.module import load_predictor
    from maml_stop.learn.predictor import PredictorConfig
    from test_configs import tiny_args

    args = ["fit", "--config", str(EXPERIMENTS / "quickstart.yaml")] + tiny_args(EXPERIMENTS / "rl.yaml", tiny_corpus, tmp_path) + [
        "--trainer.max_steps=20", "--data.steps_per_epoch=10", "--trainer.check_val_every_n_epoch=1",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        "--data.k=4", "--data.q=8", "--data.val_episodes=2", "--data.test_episodes=2",
    ]
    assert main(args) == 0
    metrics = (tmp_path / "logs" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/reward", "val/reward", "val/loss", "val/em_greedy", "val/tokens_greedy"} <= set(metrics)
    ckpt = tmp_path / "checkpoints" / "best.ckpt"
    predictor, adapter, meta = load_predictor(ckpt)
    assert meta["objective"] == "rl" and meta["rl"]["lam"] == 0.1 and adapter.inner_steps == 3
    assert meta["data"]["test_families"] == ["fam_c"]

    cfg = EvaluateConfig(corpus=tiny_corpus, rl_checkpoint=str(ckpt), taus=[0.9, 0.5, 0.1])
    policies = build_policies(cfg, ["rl", "rl_unadapted"], None, None, PredictorConfig(n_features=8))
    assert isinstance(policies["rl"], ProbePolicy)
    traces = TraceCorpus.load(tiny_corpus).traces("fam_c")
    ep = EpisodeSampler({"fam_c": traces}, k=4, q=8, seed=0).fixed_episodes("fam_c", n=1, seed=0)[0]
    selectors = {"em_target": make_selector("em_target", delta=0.01)}
    for name, policy in policies.items():
        rec = evaluate_episode(policy, ep.support, ep.query, selectors, delta=0.01)
        assert 0.0 <= rec["thresholds"]["em_target"]["em"] <= 1.0, name
    # rl_unadapted: the predictor's own p >= 0.5, the default accounting
    unadapted = policies["rl_unadapted"]
    for t in ep.query:
        with torch.no_grad():
            p = torch.sigmoid(predictor(collate_traces([t]))).numpy()
        hits = np.flatnonzero(p >= 0.5)
        index = int(hits[0]) if hits.size else None
        assert unadapted.stop_index(t) == index and unadapted.outcome(t) == probe_outcome(t, index)
    # a family the checkpoint trained on cannot be held out
    seen = TraceCorpus.load(tiny_corpus).traces("fam_a")[:4]
    for policy in policies.values():
        with pytest.raises(ValueError, match="trained or validated on \\['fam_a'\\]"):
            policy.fit(seen)


def _rl_fit_config(tmp_path: Path) -> Path:
    """A tiny RL fit config (the quickstart's RL settings, a few steps) for maml-stop evaluate's RL folds."""
    config = tmp_path / "rl_fit.yaml"
    config.write_text(
        "trainer:\n  max_steps: 4\n  inference_mode: false\n  enable_progress_bar: false\n"
        "  enable_model_summary: false\n  num_sanity_val_steps: 0\n  check_val_every_n_epoch: 1\n"
        "  callbacks:\n    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
        "      init_args: {monitor: val/loss, mode: min, filename: best}\n"
        "model:\n  class_path: maml_stop.learn.rl.RLStoppingModule\n"
        "  init_args: {hidden: 8, depth: 1, inner_steps: 1, first_order: true, traces_per_step: 8, samples: 2}\n"
        "data: {val_families: [fam_a], k: 4, q: 8, meta_batch_size: 2, steps_per_epoch: 2, val_episodes: 1}\n"
    )
    return config


@pytest.mark.slow
def test_rl_train_config_trains_one_rl_fold_per_held_out_family(tiny_corpus, tmp_path):
    """rl_train_config: every held-out family gets its own RL fold, which never trained or validated on it."""
    from maml_stop.evaluate.config import EvaluateConfig
    from maml_stop.evaluate.protocol import run
    from maml_stop.learn.module import load_predictor

    out = tmp_path / "out"
    results = run(EvaluateConfig(corpus=tiny_corpus, rl_train_config=str(_rl_fit_config(tmp_path)), out=str(out),
                                 k=[4], episodes=2, methods=["full", "rl", "rl_unadapted"], progress=False))
    assert results["families"] == ["fam_a", "fam_b", "fam_c"]
    for fam in results["families"]:
        ckpt = Path(results["rl_checkpoints"][fam])
        assert ckpt.is_file() and ckpt.parent == out / "rl_folds" / fam / "checkpoints"
        data = load_predictor(ckpt)[2]["data"]
        assert data["test_families"] == [fam] and fam not in data["val_families"]
        assert results["results"][fam]["4"]["rl"]["thresholds"]["em_target"]["savings"]


def test_rl_checkpoint_per_family_is_the_fold_of_that_family(tiny_corpus, tmp_path, monkeypatch):
    """rl_checkpoint as family -> path: each held-out family's rl methods read its own path; a held-out
    family without one is refused, naming the families given."""
    from maml_stop.data.corpus import TraceCorpus
    from maml_stop.evaluate import methods
    from maml_stop.evaluate.config import EvaluateConfig, check_config
    from maml_stop.evaluate.folds import rl_checkpoints

    corpus = TraceCorpus.load(tiny_corpus)
    cfg = EvaluateConfig(corpus=tiny_corpus, methods=["full", "rl"], families=["fam_b", "fam_c"],
                         rl_checkpoint={"fam_b": "b.ckpt", "fam_c": "c.ckpt"})
    check_config(cfg)
    methods.check_methods(cfg)
    assert rl_checkpoints(cfg, ["fam_b", "fam_c"], corpus, tmp_path) == ["b.ckpt", "c.ckpt"]
    with pytest.raises(ValueError, match=r"no RL checkpoint for held-out families \['fam_a'\].*\['fam_b', 'fam_c'\]"):
        rl_checkpoints(cfg, ["fam_a", "fam_b"], corpus, tmp_path)
    # one path: every family; no RL method listed: none
    assert rl_checkpoints(EvaluateConfig(corpus=tiny_corpus, methods=["rl"], rl_checkpoint="x.ckpt"),
                          ["fam_a", "fam_b"], corpus, tmp_path) == ["x.ckpt", "x.ckpt"]
    assert rl_checkpoints(EvaluateConfig(corpus=tiny_corpus, methods=["full"], rl_checkpoint={"fam_b": "b"}),
                          ["fam_a"], corpus, tmp_path) == [None]
    # build_policies hands the fold's own path to the rl builder
    seen = []
    monkeypatch.setitem(methods.BUILDERS, "rl", lambda c: seen.append(c.rl_checkpoint) or object())
    from maml_stop.learn.predictor import PredictorConfig

    methods.build_policies(cfg, ["rl"], None, None, PredictorConfig(n_features=8), rl_checkpoint="c.ckpt")
    assert seen == ["c.ckpt"]
    with pytest.raises(ValueError, match="at most one of rl_checkpoint and rl_train_config"):
        check_config(EvaluateConfig(corpus=tiny_corpus, methods=["rl"], rl_checkpoint="x", rl_train_config="y.yaml"))
    with pytest.raises(ValueError, match="rl_train_config"):
        methods.check_methods(EvaluateConfig(corpus=tiny_corpus, methods=["rl"]))


def test_cli_names_the_new_home_of_a_flat_model_key(tmp_path):
    """A YAML or flag of before the nested configs (``model.hidden``, ``--model.inner_lr``) is refused
    with the key it moved to, before LightningCLI parses anything."""
    from maml_stop.learn.cli import cli_main

    old = tmp_path / "old.yaml"
    old.write_text("model:\n  hidden: 32\n  init_seed: 0\n")
    with pytest.raises(ValueError, match=r"model.hidden -> model.predictor.hidden, model.inner_lr -> model.adapter.inner_lr"):
        cli_main(["fit", "--config", str(old), "--model.inner_lr=0.3"], run=False)
