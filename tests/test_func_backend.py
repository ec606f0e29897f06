"""The torch.func adaptation backend against learn2learn: same adapted weights, same meta-gradients, same
episode-batched results; a fit with it; the package without learn2learn; the bad-backend error."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from lightning.pytorch import Trainer

from maml_stop.data.batches import ProbeBatch
from maml_stop.data.datamodule import TraceDataModule
from maml_stop.learn.adapter import BACKENDS, AdapterConfig, InnerLoopAdapter
from maml_stop.learn.module import MetaStoppingModule, load_predictor
from maml_stop.learn.predictor import PredictorConfig, StoppingPredictor
from test_adapter import N_FEATURES
from test_adapter import episode_batch as adapter_episode_batch

# (algorithm, first_order): MAML second and first order, ANIL, Meta-SGD second and first order
SETTINGS = [("maml", False), ("maml", True), ("anil", False), ("anil", True), ("metasgd", False), ("metasgd", True)]


def episode_batch(seed: int, n_traces: int = 5, probes: int = 4, shift: float = 0.0) -> ProbeBatch:
    """test_adapter's seeded episode batch (labels follow feature 0), five traces by default."""
    return adapter_episode_batch(seed, n_traces=n_traces, probes=probes, shift=shift)


def pair(algorithm: str, first_order: bool, kind: str = "mlp", **kw) -> tuple[InnerLoopAdapter, InnerLoopAdapter]:
    """A learn2learn adapter and a torch_func adapter with the same initial weights."""
    out = []
    for backend in ("learn2learn", "torch_func"):
        torch.manual_seed(0)
        predictor = StoppingPredictor(N_FEATURES, hidden=16, depth=2 if kind != "gru" else 1, kind=kind)
        args = dict(inner_lr=0.3, inner_steps=3, first_order=first_order, backend=backend)
        args.update(kw)
        out.append(InnerLoopAdapter(predictor, algorithm, **args))
    ref, fn = out
    if algorithm == "metasgd":  # rates away from their constant start, as after some outer steps
        with torch.no_grad():
            for a, b in zip(ref.lrs, fn.lrs):
                b.copy_(a.uniform_(0.1, 0.5))
    return ref, fn


def assert_same_grads(loss_ref: torch.Tensor, ref: InnerLoopAdapter, loss_fn: torch.Tensor, fn: InnerLoopAdapter) -> None:
    """Meta-gradients w.r.t. every parameter of the adapters (predictor and, for Meta-SGD, lrs) agree."""
    names = [n for n, _ in ref.named_parameters()]
    assert names == [n for n, _ in fn.named_parameters()]
    g_ref = torch.autograd.grad(loss_ref, list(ref.parameters()), allow_unused=True)
    g_fn = torch.autograd.grad(loss_fn, list(fn.parameters()), allow_unused=True)
    for name, a, b in zip(names, g_ref, g_fn):
        if a is None:
            assert b is None, name
            continue
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("algorithm,first_order", SETTINGS)
def test_adapted_weights_and_meta_gradients_match_learn2learn(algorithm, first_order):
    ref, fn = pair(algorithm, first_order)
    support, query = episode_batch(1, shift=0.5), episode_batch(2, shift=0.5)
    a_ref, a_fn = ref.adapt(support), fn.adapt(support)
    assert type(a_fn) is StoppingPredictor and a_fn is not fn.predictor
    p_ref, p_fn = dict(a_ref.named_parameters()), dict(a_fn.named_parameters())
    assert list(p_ref) == list(p_fn)
    for name in p_ref:
        torch.testing.assert_close(p_fn[name], p_ref[name], rtol=0, atol=1e-6, msg=lambda m: f"{name}: {m}")
    changed = "head.weight"
    assert not torch.equal(p_fn[changed], dict(fn.predictor.named_parameters())[changed])
    assert_same_grads(ref.loss(a_ref, query), ref, fn.loss(a_fn, query), fn)
    if algorithm == "anil":
        assert a_fn.body is fn.predictor.body  # only the head is adapted, the body is shared


def test_second_order_differs_from_first_order():
    """The parity above is not vacuous: second-order meta-gradients of the torch_func backend differ
    from its first-order ones, and match learn2learn's each."""
    support, query = episode_batch(1, shift=0.5), episode_batch(2, shift=0.5)
    grads = {}
    for fo in (False, True):
        _, fn = pair("maml", fo)
        grads[fo] = torch.autograd.grad(fn.loss(fn.adapt(support), query), list(fn.parameters()))
    assert max((a - b).abs().max() for a, b in zip(grads[False], grads[True])) > 1e-4


@pytest.mark.parametrize("kind", ["delta", "gru"])
@pytest.mark.parametrize("algorithm", ["maml", "metasgd"])
def test_sequence_kinds_match_learn2learn(algorithm, kind):
    ref, fn = pair(algorithm, False, kind=kind)
    support, query = episode_batch(3, shift=0.3), episode_batch(4)
    a_ref, a_fn = ref.adapt(support), fn.adapt(support)
    for (name, a), (_, b) in zip(a_ref.named_parameters(), a_fn.named_parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert_same_grads(ref.loss(a_ref, query), ref, fn.loss(a_fn, query), fn)


@pytest.mark.parametrize("algorithm,first_order", SETTINGS)
def test_episode_losses_and_adapt_episodes_match_learn2learn(algorithm, first_order):
    episodes = [(episode_batch(s, n_traces=2 + s), episode_batch(10 + s, n_traces=2 + 2 * s, shift=0.3 * s))
                for s in range(3)]
    ref, fn = pair(algorithm, first_order)
    l_ref, l_fn = ref.episode_losses(episodes), fn.episode_losses(episodes)
    torch.testing.assert_close(l_fn, l_ref, rtol=1e-6, atol=1e-6)
    assert_same_grads(l_ref.mean(), ref, l_fn.mean(), fn)
    supports = [s for s, _ in episodes]
    with torch.no_grad():
        b_ref = dict(ref.adapt_episodes(supports).named_parameters())
        b_fn = dict(fn.adapt_episodes(supports).named_parameters())
        looped = [fn.fit_support(s) for s in supports]  # the one road, torch_func backend
    for name in b_ref:
        assert b_fn[name].shape[0] == len(supports)
        torch.testing.assert_close(b_fn[name], b_ref[name], rtol=0, atol=1e-6, msg=lambda m: f"{name}: {m}")
        for e, one in enumerate(looped):
            one = one.head if algorithm == "anil" else one
            torch.testing.assert_close(b_fn[name][e], dict(one.named_parameters())[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("algorithm", ["maml", "anil", "metasgd"])
def test_no_grad_is_detached_and_original_untouched(algorithm):
    _, fn = pair(algorithm, False)
    state = {k: v.clone() for k, v in fn.state_dict().items()}
    support, query = episode_batch(1), episode_batch(2)
    with torch.no_grad():
        cheap = fn.adapt(support)
        out = cheap(query)
    assert not out.requires_grad and not cheap.head.weight.requires_grad
    connected = fn.adapt(support)
    torch.testing.assert_close(out, connected(query).detach())
    fn.loss(connected, query).backward()
    assert all(p.grad is not None for p in fn.parameters())
    for key, value in fn.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert all(isinstance(p, torch.nn.Parameter) for p in fn.parameters())


def test_state_dicts_interchange_between_backends():
    ref, fn = pair("metasgd", False)
    assert list(ref.state_dict()) == list(fn.state_dict())
    assert any(k.startswith("lrs.") for k in fn.state_dict())
    fn.load_state_dict(ref.state_dict())
    assert fn.config().backend == "torch_func" and ref.config().backend == "learn2learn"
    assert InnerLoopAdapter.from_config(fn.predictor, fn.config()).backend == "torch_func"


def test_bad_backend_names_the_value_and_the_choices():
    assert BACKENDS == ("learn2learn", "torch_func")
    with pytest.raises(ValueError, match=r"'jax'.*valid: learn2learn, torch_func"):
        InnerLoopAdapter(StoppingPredictor(N_FEATURES, hidden=4, depth=1), backend="jax")
    with pytest.raises(ValueError, match=r"'torchfunc'.*valid: learn2learn, torch_func"):
        MetaStoppingModule(n_features=N_FEATURES, predictor={"hidden": 4, "depth": 1}, adapter={"backend": "torchfunc"})


def test_fit_with_torch_func_backend_and_checkpoint(tiny_corpus, tmp_path):
    torch.manual_seed(0)
    dm = TraceDataModule(tiny_corpus, k=4, q=8, meta_batch_size=2, steps_per_epoch=2, val_episodes=2,
                         test_episodes=2, val_families=["fam_b"], test_families=["fam_c"])
    model = MetaStoppingModule(n_features=dm.n_features, feature_names=dm.feature_names,
                               predictor=PredictorConfig(hidden=16, depth=1),
                               adapter=AdapterConfig("metasgd", inner_lr=0.3, inner_steps=2, backend="torch_func"))
    assert model.hparams.adapter["backend"] == "torch_func" and model.adapter.backend == "torch_func"
    before = {k: v.clone() for k, v in model.adapter.state_dict().items()}
    trainer = Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path, inference_mode=False,
                      num_sanity_val_steps=0, accelerator="cpu", devices=1)
    trainer.fit(model, datamodule=dm)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert {"train/loss", "val/loss", "val/loss_random_init"} <= set(metrics)
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    after = model.adapter.state_dict()
    assert not torch.equal(after["lrs.0"], before["lrs.0"])  # the outer step trained the rates
    assert not torch.equal(after["predictor.head.weight"], before["predictor.head.weight"])
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    _, adapter, meta = load_predictor(path)
    assert adapter.backend == "torch_func" and meta["adapter"]["backend"] == "torch_func"
    assert meta["hyper_parameters"]["adapter"]["backend"] == "torch_func"
    _, l2l_adapter, _ = load_predictor(path, backend="learn2learn")  # same weights, other backend
    support = episode_batch(5)
    with torch.no_grad():
        torch.testing.assert_close(adapter.adapt(support)(support), l2l_adapter.adapt(support)(support),
                                   rtol=1e-5, atol=1e-6)


def test_package_works_without_learn2learn():
    """learn2learn made unimportable (``sys.modules[...] = None``, Python's documented import block):
    maml_stop imports, the torch_func backend adapts and back-propagates, and a learn2learn-backend
    adapter raises the ImportError that names ``model.adapter.backend: torch_func``."""
    code = textwrap.dedent(
        """
        import sys
        sys.modules["learn2learn"] = None  # `import learn2learn` fails; importlib.util.find_spec gives None
        import torch
        torch.set_num_threads(1)
        import maml_stop
        from maml_stop.data.batches import ProbeBatch
        from maml_stop.learn.adapter import InnerLoopAdapter
        from maml_stop.learn.predictor import StoppingPredictor
        b = ProbeBatch(torch.randn(12, 4), (torch.arange(12) % 3 == 0).float(), torch.arange(12) // 4,
                       torch.arange(12) % 4, torch.ones(12))
        for algorithm in ("maml", "anil", "metasgd"):
            adapter = InnerLoopAdapter(StoppingPredictor(4, hidden=8, depth=1), algorithm, inner_steps=3,
                                       backend="torch_func")
            adapted = adapter.adapt(b)
            assert adapter.loss(adapted, b) < adapter.loss(adapter.predictor, b)
            adapter.loss(adapted, b).backward()
            assert adapter.predictor.head.weight.grad is not None
        try:
            InnerLoopAdapter(StoppingPredictor(4, hidden=8, depth=1))
        except ImportError as err:
            assert "model.adapter.backend: torch_func" in str(err) and "scripts/install.sh" in str(err), err
        else:
            raise AssertionError("the learn2learn backend built without learn2learn")
        assert all(sys.modules[k] is None for k in sys.modules if k.split(".")[0] == "learn2learn")
        print("ok without learn2learn")
        """
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "ok without learn2learn" in run.stdout


def test_evaluation_runs_on_the_torch_func_backend(tiny_corpus, tmp_path):
    """The probes the evaluation builds itself (pooled, finetuned, scratch) adapt with evaluate's
    ``backend``; a bad name is refused naming the valid ones."""
    from pathlib import Path

    from maml_stop.evaluate.command import main as evaluate_main

    args = ["--config", str(Path(__file__).resolve().parents[1] / "experiments" / "evaluate.yaml"), "--corpus", tiny_corpus, "--families", "[fam_c]",
            "--source_families", "[fam_a, fam_b]", "--k", "[4]", "--episodes", "2",
            "--methods", "[full, pooled, finetuned, scratch]", "--progress", "false"]
    assert evaluate_main(args + ["--backend", "torch_func", "--out", str(tmp_path / "tf")]) == 0
    assert (tmp_path / "tf" / "results.md").is_file()
    with pytest.raises((ValueError, SystemExit)):
        evaluate_main(args + ["--backend", "jax", "--out", str(tmp_path / "bad")])
