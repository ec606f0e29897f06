"""The harvester on a tiny random Llama: schedule, cached vs naive probes, probing leaves the trace
unchanged, storage round-trip, resume after a kill, and bad input."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import tiny_lm
from maml_stop.data.corpus import TraceCorpus
from maml_stop.data import store
from maml_stop.harvest.cli import harvest
from maml_stop.probe.features import SCALAR_FEATURES, ProbeFeaturizer
from maml_stop.probe.engine import ProbingGenerator
from maml_stop.probe.forcing import encode_trigger
from maml_stop.probe.schedule import ProbeSchedule

PROMPTS = ["Question: What is 3 + 4?\nAnswer:", "Calculate 7 * 6.", "Think step by step. Wait", "yes"]


@pytest.fixture(scope="module")
def tok():
    return tiny_lm.build_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_lm.build_model(tok)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_lm.save_tiny(tmp_path_factory.mktemp("tiny_lm"))


def _gen(model, tok, mode="cache", schedule=None, **kw):
    schedule = schedule or ProbeSchedule(every_n=5, boundary=True, cues=("Wait",), max_probes=20)
    return ProbingGenerator(model, tok, schedule, max_new_tokens=kw.pop("max_new_tokens", 24), probe_mode=mode,
                            featurizer=ProbeFeaturizer(model.config.hidden_size, proj_dim=8), **kw)


# -- schedule --------------------------------------------------------------------------------------
def test_schedule_every_n_positions():
    s = ProbeSchedule(every_n=8)
    assert [n for n in range(0, 40) if s.reason(n, "x")] == [8, 16, 24, 32]


def test_schedule_boundary_cue_gap_and_cap():
    s = ProbeSchedule(every_n=None, boundary=True, cues=("Wait",), min_gap=3, max_probes=2)
    assert s.reason(5, ".\n") == "boundary"
    assert s.reason(5, "ait", tail=" so. Wait") == "cue"
    assert s.reason(5, ",", tail=" Wait,") is None  # punctuation after the cue: already probed at the cue
    assert s.reason(5, " the") is None
    assert s.due(6, s.event("\n"), last_probe=5, n_probes=1) is None  # gap
    assert s.due(8, s.event("\n"), last_probe=5, n_probes=1) == "boundary"
    assert s.due(20, s.event("\n"), last_probe=5, n_probes=2) is None  # cap


def test_schedule_that_never_fires_is_an_error():
    with pytest.raises(ValueError, match="never fires"):
        ProbeSchedule(every_n=None)
    with pytest.raises(ValueError, match="never fires within max_new_tokens=16"):
        ProbeSchedule(every_n=32).check_fires_within(16)


def test_generated_probe_positions_follow_schedule(model, tok):
    res = _gen(model, tok, schedule=ProbeSchedule(every_n=4, max_probes=3), max_new_tokens=30).run(PROMPTS)
    for r in res:
        n = len(r.generated_ids)
        expected = [p for p in (4, 8, 12) if p < n or (p == n and not r.ended_by_eos)]
        assert [p.position for p in r.probes] == expected
        assert all(p.reason == "every_n" for p in r.probes)


# -- probes ----------------------------------------------------------------------------------------
def test_probing_leaves_the_trace_unchanged(model, tok):
    probed = _gen(model, tok, "cache").run(PROMPTS)
    plain = _gen(model, tok, "none").run(PROMPTS)
    assert sum(len(r.probes) for r in probed) > 0
    for a, b in zip(probed, plain):
        assert a.generated_ids == b.generated_ids
        assert not b.probes


def test_unprobed_run_equals_transformers_generate(model, tok):
    ours = _gen(model, tok, "none", max_new_tokens=16).run(PROMPTS[:1])[0]
    enc = tok(PROMPTS[:1], return_tensors="pt", add_special_tokens=False)
    ref = model.generate(**enc, max_new_tokens=16, do_sample=False)[0, enc["input_ids"].shape[1]:].tolist()
    assert ours.generated_ids == ref[: len(ours.generated_ids)]


def test_cached_probes_equal_naive_probes(model, tok):
    cached = _gen(model, tok, "cache").run(PROMPTS)
    naive = _gen(model, tok, "naive").run(PROMPTS)
    n = 0
    for a, b in zip(cached, naive):
        assert a.generated_ids == b.generated_ids
        assert [p.position for p in a.probes] == [p.position for p in b.probes]
        for pa, pb in zip(a.probes, b.probes):
            n += 1
            assert pa.answer_ids == pb.answer_ids
            np.testing.assert_allclose(pa.logprobs, pb.logprobs, atol=1e-4)
        for fa, fb in zip(a.features, b.features):
            np.testing.assert_allclose(fa, fb, atol=1e-3)
    assert n >= 8


def test_features_have_named_width_and_no_lookahead(model, tok):
    g = _gen(model, tok, "cache", max_new_tokens=30)
    full = g.run(PROMPTS[:2])
    short = _gen(model, tok, "cache", max_new_tokens=12).run(PROMPTS[:2])
    names = g.featurizer.feature_names
    assert len(names) == 8 + len(SCALAR_FEATURES)
    for a, b in zip(full, short):
        assert all(f.shape == (len(names),) for f in a.features)
        # the features of a probe do not depend on how long the generation goes on afterwards
        for fa, fb in zip(a.features, b.features):
            np.testing.assert_allclose(fa, fb, atol=1e-5)


def test_sampling_is_seeded(model, tok):
    a = _gen(model, tok, "none", do_sample=True, seed=3).run(PROMPTS)
    b = _gen(model, tok, "none", do_sample=True, seed=3).run(PROMPTS)
    assert [r.generated_ids for r in a] == [r.generated_ids for r in b]


def test_trigger_encoding_and_empty_trigger(tok):
    ids, ok = encode_trigger(tok, "\nFinal answer:")
    assert ok and ids
    with pytest.raises(ValueError, match="tokenizes to no tokens"):
        encode_trigger(tok, "")


# -- storage, CLI, resume ---------------------------------------------------------------------------
def _harvest(out, model_dir, **kw):
    args = dict(out=str(out), model=model_dir, families=["basic_arithmetic", "count_bits"], n_per_family=10,
                dtype="float32", batch_size=4, shard_size=5, max_new_tokens=20, every_n=5, boundary=True)
    args.update(kw)
    return harvest(**args)


def test_harvest_round_trip(tmp_path, model_dir):
    summary = _harvest(tmp_path / "c", model_dir)
    assert summary["traces"] == 20 and summary["remaining"] == 0
    meta = store.read_meta(tmp_path / "c")
    assert meta["model_weights"]["weights"]  # sha256 of the weight file is recorded
    # how the tokenizer split the answer trigger is recorded with the corpus
    assert meta["prompt"]["trigger_ids"] and meta["prompt"]["trigger_roundtrip"] is True
    ds = store.load_dataset(tmp_path / "c")
    assert len(ds) == 20 and len(set(ds["trace_id"])) == 20
    row = ds[0]
    assert len(row["probe_positions"]) == len(row["probe_em"]) == len(row["features"])
    for r in ds:
        if r["features"]:
            assert len(r["features"][0]) == len(meta["feature_names"])
        assert r["reasoning_tokens"] <= 20
        if r["hit_cap"]:
            assert r["reasoning_tokens"] == 20
    corpus = TraceCorpus.load(tmp_path / "c", min_probes=0)
    assert corpus.families == ["basic_arithmetic", "count_bits"] and len(corpus) == 20
    # rerunning the finished harvest stores nothing new
    again = _harvest(tmp_path / "c", model_dir)
    assert again["traces"] == 0 and len(store.load_dataset(tmp_path / "c")) == 20


def test_harvest_records_cap_hits(tmp_path, model_dir):
    _harvest(tmp_path / "c", model_dir, max_new_tokens=6, every_n=3, boundary=False)
    ds = store.load_dataset(tmp_path / "c")
    capped = [r for r in ds if r["hit_cap"]]
    assert capped, "a random model rarely says EOS within 6 tokens: some traces must hit the cap"
    assert all(r["reasoning_tokens"] == 6 for r in capped)


def test_resume_after_kill(tmp_path, model_dir):
    out = tmp_path / "c"
    code = (
        "import sys; from maml_stop.harvest.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    cmd = [sys.executable, "-c", code, "--out", str(out), "--model", model_dir,
           "--families", "[basic_arithmetic, count_bits, gcd]", "--n_per_family", "20", "--dtype", "float32",
           "--batch_size", "2", "--shard_size", "2", "--max_new_tokens", "40", "--every_n", "5", "--hash_weights", "false"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(store.shard_paths(out)) < 3:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = store.stored_trace_ids(out)
    assert 0 < len(before) < 60, "the kill must land mid-harvest"
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ds = store.load_dataset(out)
    assert len(ds) == 60 and len(set(ds["trace_id"])) == 60
    assert before <= set(ds["trace_id"])


def test_max_per_family_harvests_a_prefix_that_extends(tmp_path, model_dir):
    """A capped harvest stores the first questions of the full recipe's order; raising the cap adds the
    next ones and leaves the stored traces as they were."""
    from maml_stop.harvest.cli import harvest_order
    from tasks import get_family

    order = [f"{q.id}#0" for q in harvest_order(get_family("count_bits"), "count_bits", 10, seed=0)]
    kw = dict(families=["count_bits"], max_new_tokens=10, shard_size=3, hash_weights=False)
    capped = _harvest(tmp_path / "c", model_dir, max_per_family=4, **kw)
    assert capped["traces"] == 4 and capped["remaining"] == 0
    first = store.load_dataset(tmp_path / "c")
    assert set(first["trace_id"]) == set(order[:4])
    texts = {r["trace_id"]: r["generated_text"] for r in first}
    more = _harvest(tmp_path / "c", model_dir, max_per_family=7, **kw)
    assert more["traces"] == 3
    again = store.load_dataset(tmp_path / "c")
    assert set(again["trace_id"]) == set(order[:7])
    assert all(texts[r["trace_id"]] == r["generated_text"] for r in again if r["trace_id"] in texts)
    with pytest.raises(ValueError, match="max_per_family"):
        _harvest(tmp_path / "d", model_dir, max_per_family=0, **kw)


def test_resume_with_other_settings_is_refused(tmp_path, model_dir):
    _harvest(tmp_path / "c", model_dir, n_per_family=3)
    with pytest.raises(store.CorpusError, match="different 'schedule'"):
        _harvest(tmp_path / "c", model_dir, n_per_family=3, every_n=7)


def test_model_without_chat_template(tmp_path):
    d = tiny_lm.save_tiny(tmp_path / "plain", chat_template=False)
    _harvest(tmp_path / "c", d, n_per_family=3, families=["basic_arithmetic"])
    meta = store.read_meta(tmp_path / "c")
    assert meta["model"]["chat_template"] is False
    ds = store.load_dataset(tmp_path / "c")
    assert len(ds) == 3


def test_bad_inputs(tmp_path, model_dir):
    with pytest.raises(ValueError, match="unknown task family 'nope'"):
        _harvest(tmp_path / "a", model_dir, families=["nope"])
    with pytest.raises(ValueError, match="no task families"):
        _harvest(tmp_path / "b", model_dir, families=[])
    with pytest.raises(ValueError, match="never fires"):
        _harvest(tmp_path / "c", model_dir, every_n=64, boundary=False, max_new_tokens=20)
    with pytest.raises(FileNotFoundError):
        _harvest(tmp_path / "d", "/nonexistent/model")


def test_corrupt_shard_is_named(tmp_path, model_dir):
    _harvest(tmp_path / "c", model_dir, n_per_family=3, families=["basic_arithmetic"])
    shard = store.shard_paths(tmp_path / "c")[0]
    shard.write_bytes(b"not parquet")
    with pytest.raises(store.CorpusError, match="corrupt trace shard"):
        store.load_dataset(tmp_path / "c")


def test_schema_version_mismatch(tmp_path):
    store.write_meta(tmp_path, {"feature_names": ["a"]})
    meta = (tmp_path / store.META_FILE).read_text().replace('"schema_version": 1', '"schema_version": 0')
    (tmp_path / store.META_FILE).write_text(meta)
    with pytest.raises(store.CorpusError, match="schema version 0"):
        store.read_meta(tmp_path)


def test_schedule_align_defers_boundaries_to_shared_steps():
    s = ProbeSchedule(every_n=32, boundary=True, align=8)
    assert s.event("\n") == "boundary"
    assert s.due(13, pending="boundary") is None  # waits for the next multiple of 8
    assert s.due(16, pending="boundary") == "boundary"
    assert s.due(32, pending=None) == "every_n"


def test_aligned_probes_land_on_the_grid(model, tok):
    sched = ProbeSchedule(every_n=None, boundary=True, cues=("Wait",), align=4, max_probes=50)
    for r in _gen(model, tok, schedule=sched, max_new_tokens=40).run(PROMPTS):
        assert all(p.position % 4 == 0 for p in r.probes)


def test_rescore_recomputes_labels_and_stability_features(tmp_path, model_dir):
    from maml_stop.harvest.rescore import rescore, stability_features

    assert [s["run_length"] for s in stability_features(["4", "4", None, "5", "5", "5"])] == [1, 2, 1, 1, 2, 3]
    _harvest(tmp_path / "c", model_dir, n_per_family=3)
    before = store.load_dataset(tmp_path / "c").to_list()
    path = store.shard_paths(tmp_path / "c")[0]
    import pyarrow.parquet as pq
    rows = pq.read_table(path).to_pylist()
    rows[0]["final_em"] = not rows[0]["final_em"]  # a stale label
    store.rewrite_shard(path, rows)
    changed = rescore(tmp_path / "c")
    assert changed["final_em"] == 1 and changed["traces"] == len(before)
    after = store.load_dataset(tmp_path / "c").to_list()
    key = lambda r: r["trace_id"]  # noqa: E731
    for a, b in zip(sorted(before, key=key), sorted(after, key=key)):
        assert a["final_em"] == b["final_em"] and a["probe_em"] == b["probe_em"]
        np.testing.assert_allclose(np.asarray(a["features"], dtype=float), np.asarray(b["features"], dtype=float))
    assert store.read_meta(tmp_path / "c")["rescored"]["final_em"] == 1
