"""Issue 16: a harvest that is interrupted, resumed with other settings, or given bad arguments loses,
duplicates and mixes nothing; the v2 recipe's extra probes (start, cap) and mid-layer features."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

import tiny_lm
from maml_stop.data import store
from maml_stop.harvest.cli import harvest
from maml_stop.probe.features import PAID_FEATURES, ProbeFeaturizer, feature_cost

FAMILIES = ["basic_arithmetic", "count_bits", "gcd"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_lm.save_tiny(tmp_path_factory.mktemp("tiny_lm"))


def _harvest(out, model_dir, **kw):
    args = dict(out=str(out), model=model_dir, families=FAMILIES, n_per_family=10, dtype="float32",
                batch_size=3, shard_size=3, max_new_tokens=12, every_n=4, hash_weights=False)
    args.update(kw)
    return harvest(**args)


def _ids(out):
    ds = store.load_dataset(out)
    ids = list(ds["trace_id"])
    assert len(ids) == len(set(ids)), "a trace stored twice"
    return set(ids)


def test_next_shard_index_follows_the_highest_index(tmp_path):
    for name in ("train-00000.parquet", "train-00002.parquet", "test-00007.parquet", "train-x.parquet"):
        (tmp_path / name).write_bytes(b"")
    assert store.next_shard_index(tmp_path, "train") == 3  # not 2, the count, which would overwrite 00002
    assert store.next_shard_index(tmp_path, "test") == 8
    assert store.next_shard_index(tmp_path, "validation") == 0


def test_deleted_corrupt_shard_then_resume_stores_every_trace_once(tmp_path, model_dir):
    out = tmp_path / "c"
    _harvest(out, model_dir)
    complete = _ids(out)
    assert len(complete) == 30
    # a first shard of a split that has later ones: counting files would then overwrite the last one
    paths = store.shard_paths(out)
    victim = next(p for p in paths if p.name.endswith("-00000.parquet")
                  and any(q.parent == p.parent and q.name.startswith(p.name[:-13]) and q != p for q in paths))
    lost = set(pq.read_table(victim)["trace_id"].to_pylist())
    victim.write_bytes(b"garbage")
    with pytest.raises(store.CorpusError, match="corrupt trace shard"):
        _harvest(out, model_dir)
    victim.unlink()  # what the error tells the user to do
    summary = _harvest(out, model_dir)
    assert summary["traces"] == len(lost) and summary["remaining"] == 0
    assert _ids(out) == complete
    again = _harvest(out, model_dir)  # nothing left to do, nothing lost on a rerun
    assert again["traces"] == 0 and _ids(out) == complete


def test_a_trace_stored_twice_is_an_error(tmp_path, model_dir):
    out = tmp_path / "c"
    _harvest(out, model_dir, families=["gcd"], n_per_family=3)
    path = store.shard_paths(out)[0]
    rows = pq.read_table(path).to_pylist()
    store.rewrite_shard(path.with_name(path.stem.split("-")[0] + "-00099.parquet"), rows[:1])
    with pytest.raises(store.CorpusError, match="1 trace id\(s\) more than once"):
        store.stored_trace_ids(out)


def test_verify_stored_names_missing_traces(tmp_path, model_dir):
    out = tmp_path / "c"
    _harvest(out, model_dir, families=["gcd"], n_per_family=3)
    with pytest.raises(store.CorpusError, match="lacks 1 trace"):
        store.verify_stored(out, _ids(out) | {"gcd/nope#0"})


@pytest.mark.parametrize("change, key", [
    (dict(family_args={"gcd": {"config": {"max_value": 50}}}), "family_settings.gcd"),
    (dict(dtype="bfloat16"), "model.dtype"),
    (dict(n_per_family=20), "order"),
    (dict(seed=1), "generation"),
    (dict(mid_layer=1), "features"),
    (dict(probe_at_cap=True), "schedule"),
])
def test_resume_with_a_changed_setting_is_refused(tmp_path, model_dir, change, key):
    out = tmp_path / "c"
    _harvest(out, model_dir, families=["gcd"], n_per_family=3)
    before = _ids(out)
    with pytest.raises(store.CorpusError, match=f"different '{key}'"):
        _harvest(out, model_dir, **{"families": ["gcd"], "n_per_family": 3, **change})
    assert _ids(out) == before


def test_family_args_of_a_family_not_yet_stored_are_accepted(tmp_path, model_dir):
    out = tmp_path / "c"
    _harvest(out, model_dir, families=["gcd"], n_per_family=3)
    _harvest(out, model_dir, families=["gcd", "lcm"], n_per_family=3, family_args={"lcm": {"config": {"max_value": 50}}})
    assert store.read_meta(out)["family_settings"]["lcm"]["config"]["max_value"] == 50


@pytest.mark.parametrize("kw, match", [
    (dict(shard_size=0), "shard_size must be an integer >= 1, got 0"),
    (dict(shard_size=-3), "shard_size must be an integer >= 1, got -3"),
    (dict(batch_size=0), "batch_size must be an integer >= 1, got 0"),
    (dict(n_per_family=0), "n_per_family must be"),
    (dict(max_shards=0), "max_shards must be"),
    (dict(family_args={"gdc": {"config": {"max_value": 5}}}), r"family_args names \['gdc'\].*gcd"),
    (dict(families=["gcd", "gcd"]), "twice"),
])
def test_bad_arguments_fail_before_the_model_loads(tmp_path, kw, match):
    # the model path does not exist: reaching the model load would raise FileNotFoundError instead
    with pytest.raises(ValueError, match=match):
        _harvest(tmp_path / "c", "/nonexistent/model", **kw)


def test_out_that_is_a_file_fails_before_the_model_loads(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        _harvest(f, "/nonexistent/model")


def test_start_and_cap_probes_and_the_forced_cap_answer(tmp_path, model_dir):
    out = tmp_path / "c"
    _harvest(out, model_dir, families=["basic_arithmetic"], n_per_family=6, max_new_tokens=10, every_n=4,
             probe_at_start=True, probe_at_cap=True, max_probes=1)
    meta = store.read_meta(out)
    assert meta["generation"]["cap_answer"] == "forced"
    assert meta["schedule"]["at_start"] and meta["schedule"]["at_cap"]
    ds = store.load_dataset(out)
    capped = 0
    for r in ds:
        assert r["probe_positions"][0] == 0 and r["probe_reasons"][0] == "start"
        scheduled = [x for x in r["probe_reasons"] if x not in ("start", "cap")]
        assert len(scheduled) <= 1  # max_probes applies to the scheduled probes only
        if r["hit_cap"]:
            capped += 1
            assert r["probe_positions"][-1] == 10 and r["probe_reasons"][-1] == "cap"
            assert r["final_answer"] == (r["probe_answers"][-1] or None)
            assert r["final_em"] == r["probe_em"][-1]
        else:
            assert "cap" not in r["probe_reasons"]
    assert capped, "a random tiny model rarely ends within 10 tokens"


def test_mid_layer_features_and_cost_classes(tmp_path, model_dir):
    out = tmp_path / "c"
    _harvest(out, model_dir, families=["gcd"], n_per_family=3, proj_dim=4, mid_layer=1)
    meta = store.read_meta(out)
    names = meta["feature_names"]
    assert names[:8] == [f"h{i}" for i in range(4)] + [f"m{i}" for i in range(4)]
    assert meta["features"]["mid_layer"] == 1
    assert {n for n, c in meta["feature_costs"].items() if c == "paid"} == set(PAID_FEATURES)
    ds = store.load_dataset(out)
    f = [v for r in ds for v in r["features"]]
    assert f and all(len(v) == len(names) for v in f)
    assert any(v[0:4] != v[4:8] for v in f)  # the mid layer is not the last layer
    with pytest.raises(ValueError, match="unknown feature 'x1'"):
        feature_cost("x1")
    with pytest.raises(ValueError, match="mid_layer=5 but the model has hidden states"):
        _harvest(tmp_path / "d", model_dir, families=["gcd"], n_per_family=3, mid_layer=5)


def test_featurizer_without_mid_layer_keeps_v1_config():
    fz = ProbeFeaturizer(8, proj_dim=4)
    assert "mid_layer" not in fz.config() and not any(n.startswith("m") and n[1:].isdigit() for n in fz.feature_names)


@pytest.mark.slow
def test_chaos_kills_and_a_corrupt_shard_end_with_exactly_the_uninterrupted_traces(tmp_path, model_dir):
    """Issue 16: a harvest killed at random points ten times, with a shard corrupted and deleted once,
    ends with exactly the traces (ids and texts) of an uninterrupted run."""
    ref = tmp_path / "ref"
    args = ["--model", model_dir, "--families", "[basic_arithmetic, count_bits, gcd]", "--n_per_family", "30",
            "--dtype", "float32", "--batch_size", "3", "--shard_size", "3", "--max_new_tokens", "16",
            "--every_n", "4", "--hash_weights", "false"]
    code = "import sys; from maml_stop.harvest.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = lambda out: [sys.executable, "-c", code, "--out", str(out), *args]  # noqa: E731
    subprocess.run(run(ref), env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    expected = {r["trace_id"]: r["generated_text"] for r in store.load_dataset(ref)}
    assert len(expected) == 90

    out, rng = tmp_path / "chaos", random.Random(0)
    for kill in range(10):
        proc = subprocess.Popen(run(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(2.0, 6.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if kill == 4 and store.shard_paths(out):
            victim = rng.choice(store.shard_paths(out))
            victim.write_bytes(victim.read_bytes()[: 40])  # a torn file
            with pytest.raises(store.CorpusError, match="corrupt"):
                store.stored_trace_ids(out)
            victim.unlink()
    subprocess.run(run(out), env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    got = {r["trace_id"]: r["generated_text"] for r in store.load_dataset(out)}
    assert len(store.load_dataset(out)) == 90
    assert got == expected


def test_cap_probe_is_the_cap_even_where_every_n_divides_the_cap(tmp_path, model_dir):
    out = tmp_path / "c"
    _harvest(out, model_dir, families=["basic_arithmetic"], n_per_family=6, max_new_tokens=12, every_n=4,
             probe_at_cap=True)
    capped = [r for r in store.load_dataset(out) if r["hit_cap"]]
    assert capped
    for r in capped:
        assert r["probe_positions"][-1] == 12 and r["probe_reasons"][-1] == "cap"
        assert r["probe_positions"].count(12) == 1


def test_rescore_keeps_the_forced_cap_answer(tmp_path, model_dir):
    from maml_stop.harvest.rescore import rescore

    out = tmp_path / "c"
    _harvest(out, model_dir, families=["basic_arithmetic"], n_per_family=6, max_new_tokens=10, probe_at_cap=True)
    before = {r["trace_id"]: (r["final_answer"], r["final_em"]) for r in store.load_dataset(out)}
    assert rescore(out)["final_em"] == 0
    assert {r["trace_id"]: (r["final_answer"], r["final_em"]) for r in store.load_dataset(out)} == before


def test_two_workers_into_one_folder_store_exactly_the_traces_of_one_run(tmp_path, model_dir):
    """Issue 15: ``--worker i --num_workers n`` split each family's order into disjoint parts; two
    workers started together on one folder store exactly the traces (ids and texts) of a single run."""
    single = tmp_path / "single"
    _harvest(single, model_dir, families=["gcd", "lcm"], n_per_family=10)
    expected = {r["trace_id"]: r["generated_text"] for r in store.load_dataset(single)}
    out = tmp_path / "shared"
    args = ["--model", model_dir, "--families", "[gcd, lcm]", "--n_per_family", "10", "--dtype", "float32",
            "--batch_size", "3", "--shard_size", "3", "--max_new_tokens", "12", "--every_n", "4",
            "--hash_weights", "false", "--out", str(out), "--num_workers", "2"]
    code = "import sys; from maml_stop.harvest.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code, *args, "--worker", str(i)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-2000:]
    got = {r["trace_id"]: r["generated_text"] for r in store.load_dataset(out)}
    assert len(store.load_dataset(out)) == len(expected) and got == expected
    names = {p.name for p in store.shard_paths(out)}
    assert any("-w0of2" in n for n in names) and any("-w1of2" in n for n in names)
    assert sorted(store.read_meta(out)["family_settings"]) == ["gcd", "lcm"]


def test_bad_worker_arguments(tmp_path):
    for kw in (dict(worker=2, num_workers=2), dict(worker=-1), dict(num_workers=0)):
        with pytest.raises(ValueError, match="worker must be in"):
            _harvest(tmp_path / "c", "/nonexistent/model", **kw)


def test_stored_questions_outside_the_order_are_refused(tmp_path, model_dir, monkeypatch):
    """A family whose question generator changed (e.g. depends on PYTHONHASHSEED) is not extended: the
    resumed harvest would mix two question sets (the v2 corpus stored two for ransom_note)."""
    from maml_stop.harvest import cli as harvest_cli

    out = tmp_path / "c"
    _harvest(out, model_dir, families=["gcd"], n_per_family=3)
    real = harvest_cli.harvest_order

    def other_questions(family, name, n, seed):  # the same family drawing other questions
        return real(family, name, n, seed + 1)

    monkeypatch.setattr(harvest_cli, "harvest_order", other_questions)
    with pytest.raises(ValueError, match="not in its question order"):
        _harvest(out, model_dir, families=["gcd"], n_per_family=3)
