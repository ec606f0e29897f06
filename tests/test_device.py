"""Device configuration of the harvest, ``maml-stop generate`` and live stopping: ``cpu`` works, a bad
device string fails naming it, CUDA on a machine without it fails before the model loads, and the
device is an execution setting, not part of the recipe a resumed harvest must match."""

from __future__ import annotations

import json

import pytest
import torch

import tiny_lm
from maml_stop.data import store
from maml_stop.harvest.cli import harvest
from maml_stop.harvest.model import load_model, resolve_device
from maml_stop.live.generate import main as generate_main
from maml_stop.probe.engine import ProbingGenerator
from maml_stop.probe.schedule import ProbeSchedule

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.set_num_threads(1)
    return tiny_lm.save_tiny(tmp_path_factory.mktemp("tiny"))


def _harvest(out, model_dir, **kw):
    args = dict(out=str(out), model=model_dir, families=["basic_arithmetic"], n_per_family=5, dtype="float32",
                batch_size=4, shard_size=5, max_new_tokens=12, every_n=4)
    return harvest(**{**args, **kw})


def test_resolve_device_names_the_bad_value():
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"unknown device 'gpu0'; valid: cpu, cuda, mps"):
        resolve_device("gpu0")
    with pytest.raises(ValueError, match=r"device 'meta' is of type 'meta'; valid"):
        resolve_device("meta")


@no_cuda
def test_cuda_without_cuda_fails_before_the_model_loads(tmp_path):
    with pytest.raises(ValueError, match=r"device 'cuda' asked for, but torch.cuda is not available"):
        load_model(str(tmp_path / "no_such_model"), "float32", device="cuda")  # not the missing folder's error
    with pytest.raises(ValueError, match=r"'cuda:1' asked for, but torch.cuda is not available"):
        _harvest(tmp_path / "c", str(tmp_path / "no_such_model"), device="cuda:1")
    assert not (tmp_path / "c").exists()


def test_harvest_on_cpu_records_the_device_outside_the_recipe(tmp_path, model_dir):
    out = tmp_path / "c"
    _harvest(out, model_dir, device="cpu", max_per_family=2)
    meta = store.read_meta(out)
    assert meta["model"]["device"] == "cpu"
    # a corpus harvested elsewhere on a GPU resumes here on the CPU: the device is no data setting
    meta["model"]["device"] = "cuda"
    (out / store.META_FILE).write_text(json.dumps(meta))
    summary = _harvest(out, model_dir, device="cpu")
    assert summary["remaining"] == 0 and store.read_meta(out)["model"]["device"] == "cpu"
    with pytest.raises(ValueError, match="unknown device 'cpux'"):
        _harvest(out, model_dir, device="cpux")


def test_engine_tensors_live_on_the_model_device(model_dir):
    model, tok = load_model(model_dir, "float32", device="cpu")
    assert next(model.parameters()).device == torch.device("cpu")
    gen = ProbingGenerator(model, tok, ProbeSchedule(every_n=4), max_new_tokens=8, do_sample=True, seed=1)
    assert gen.generator.device == gen.device == gen._eos_tensor.device == torch.device("cpu")
    a, b = gen.run(["Question: What is 3 + 4?\nAnswer:"]), gen.run(["Question: What is 3 + 4?\nAnswer:"])
    assert len(a[0].generated_ids) > 0 and len(a[0].probes) == len(b[0].probes)


def test_generate_refuses_a_bad_device_before_loading(tmp_path, capsys):
    adapted = tmp_path / "a.pt"
    adapted.write_bytes(b"not read: the device is checked first")
    rc = generate_main(["--adapted", str(adapted), "--model", str(tmp_path / "none"), "--question", "1+1?",
                        "--device", "tpu7"])
    assert rc == 2 and "--device: unknown device 'tpu7'" in capsys.readouterr().err
