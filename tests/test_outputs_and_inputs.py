"""Issue 29 B and C: files get the umask's mode; output paths are checked before the work; a failed write
leaves the previous artifact; values are checked where they enter; one error style for every subcommand;
stale temporary files are cleaned; Ctrl-C stops a harvest after the shard in progress."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import tiny_lm
from maml_stop import cli
from maml_stop.data import store
from maml_stop.data.outputs import OutputError, check_output_file
from maml_stop.harvest.cli import harvest, harvest_order, split_counts
from trace_helpers import write_tiny_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.ckpt")


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_atomic_writes_get_the_umask_mode(tmp_path, mask):
    old = os.umask(mask)
    try:
        store.write_meta(tmp_path, {"feature_names": ["a"]})
        store.write_shard(tmp_path, "fam", "train", [dict.fromkeys(store.TRACE_COLUMNS)])
    finally:
        os.umask(old)
    for path in (tmp_path / store.META_FILE, store.shard_paths(tmp_path)[0]):
        assert path.stat().st_mode & 0o777 == 0o666 & ~mask, oct(path.stat().st_mode)


def test_a_failed_write_keeps_the_previous_file_and_names_the_path(tmp_path, monkeypatch):
    path = tmp_path / "meta.json"
    store.atomic_write_bytes(path, b"old")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match=f"could not write {path}: No space left on device"):
        store.atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["meta.json"]


def test_output_file_checks(tmp_path):
    (tmp_path / "a_file").write_text("x")
    for bad, match in ((tmp_path, "is a folder"), (tmp_path / "a_file" / "x.pt", "is a file, not a folder")):
        with pytest.raises(OutputError, match=match):
            check_output_file(bad, "--out")
    assert check_output_file(tmp_path / "new" / "x.pt", "--out").parent.is_dir()


def test_adapt_out_checked_before_the_work_and_a_full_disk_keeps_the_old_artifact(tiny_corpus, ckpt, tmp_path,
                                                                                    monkeypatch, capsys):
    from maml_stop.live import adapt as adapt_mod

    args = ["--checkpoint", ckpt, "--corpus", tiny_corpus, "--family", "fam_c", "--k", "4"]
    calls = []
    real = adapt_mod.adapt
    monkeypatch.setattr(adapt_mod, "adapt", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    assert adapt_mod.main([*args, "--out", str(tmp_path)]) == 2
    assert f"--out {tmp_path} is a folder" in capsys.readouterr().err and not calls  # refused before the work
    out = tmp_path / "a.pt"
    assert adapt_mod.main([*args, "--out", str(out)]) == 0
    before = out.read_bytes()
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
    assert adapt_mod.main([*args, "--seed", "3", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"could not write {out}: No space left on device" in err and "Traceback" not in err
    assert out.read_bytes() == before  # the previous artifact, intact
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("extra", [["--threshold_method", "fixed", "--tau", "1.01"], ["--tau", "-0.1"],
                                   ["--taus", "[0.5, 2]"]])
def test_adapt_refuses_thresholds_outside_0_1(tiny_corpus, ckpt, tmp_path, capsys, extra):
    from maml_stop.live.adapt import main

    out = tmp_path / "a.pt"
    assert main(["--checkpoint", ckpt, "--corpus", tiny_corpus, "--family", "fam_c", "--k", "4", *extra,
                 "--out", str(out)]) == 2
    assert "tau and taus are probabilities in [0, 1]" in capsys.readouterr().err and not out.exists()


def test_compare_confidence_and_non_results_files(tmp_path, capsys):
    from test_compare import _pair

    a, b = _pair(0.05, 0.0)
    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    pa.write_text(json.dumps(a))
    pb.write_text(json.dumps(b))
    for conf in ("1.5", "0", "-1"):
        assert cli.main(["compare", str(pa), str(pb), "--confidence", conf, "--n_resamples", "50"]) == 2
        assert "confidence must be in (0, 1)" in capsys.readouterr().err
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"hello": 1}))
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    for bad in (other, broken, listed):
        assert cli.main(["compare", str(bad), str(pb)]) == 2
        err = capsys.readouterr().err
        assert f"{bad} is not a results file of maml-stop evaluate" in err and len(err.strip().splitlines()) == 1
        assert cli.main(["evaluate", "--report_only", str(bad)]) == 2
        err = capsys.readouterr().err
        assert f"{bad} is not a results file" in err and "Traceback" not in err


def test_one_error_style_for_every_subcommand(tmp_path, capsys):
    missing = str(tmp_path / "nothing")
    for args in (["datasheet", missing], ["harvest", "--out", missing, "--model", "x", "--families", "[nope]"],
                 ["evaluate", "--corpus", missing, "--methods", "[full]"]):
        assert cli.main(args) == 2, args
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"maml-stop {args[0]}: ") and len(err.splitlines()) == 1, err
        assert "Traceback" not in err and "--debug" in err
    with pytest.raises(store.CorpusError):
        cli.main(["datasheet", missing, "--debug"])


def test_bad_temperature_and_exact_n_per_family(tmp_path):
    for t in (-1, 0, float("nan")):
        with pytest.raises(ValueError, match="temperature must be a number > 0"):
            harvest(out=str(tmp_path / "c"), model="/nonexistent", families=["gcd"], do_sample=True, temperature=t)
    from tasks import get_family

    for n in (12, 8, 2, 5, 300, 160):
        assert sum(split_counts(n).values()) == n
        assert len(harvest_order(get_family("gcd"), "gcd", n, 0)) == n
    assert split_counts(300) == {"train": 210, "validation": 30, "test": 60}  # recipes: unchanged order


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_lm.save_tiny(tmp_path_factory.mktemp("tiny_lm"))


def test_stale_temporary_files_are_cleaned_at_the_next_start(tmp_path, model_dir):
    out = tmp_path / "c"
    (out / "shards" / "gcd").mkdir(parents=True)
    stale = [out / ".meta.json.abc123.tmp", out / "shards" / "gcd" / ".train-00000.parquet.x1y2.tmp"]
    for p in stale:
        p.write_bytes(b"half")
    summary = harvest(out=str(out), model=model_dir, families=["gcd"], n_per_family=3, dtype="float32",
                      batch_size=3, shard_size=3, max_new_tokens=8, every_n=4, hash_weights=False)
    assert summary["remaining"] == 0 and not any(p.exists() for p in stale)


@pytest.mark.slow
def test_sigint_stops_after_the_current_shard(tmp_path, model_dir):
    out = tmp_path / "c"
    args = ["--out", str(out), "--model", model_dir, "--families", "[basic_arithmetic, gcd]", "--n_per_family", "30",
            "--dtype", "float32", "--batch_size", "3", "--shard_size", "3", "--max_new_tokens", "16", "--every_n", "4",
            "--hash_weights", "false"]
    code = "import sys; from maml_stop.cli import main; sys.exit(main(['harvest', *sys.argv[1:]]))"
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 120
    while not store.shard_paths(out):
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert "the same command resumes it" in err
    stored = store.stored_trace_ids(out)  # whole shards only, each readable
    assert 0 < len(stored) < 60
    assert not list(out.rglob(".*.tmp"))
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(store.stored_trace_ids(out)) == 60


def test_harvest_out_checked_before_the_model_loads(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(OSError, match="corpus folder .* is not writable"):  # not a model error: the model path is bad too
        harvest(out=str(blocker / "corpus"), model="/nonexistent/model", families=["gcd"], n_per_family=3)


def test_the_summary_names_a_dataset_family_by_its_own_name(tmp_path, model_dir):
    import json

    data = tmp_path / "tiny.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n"
                            for i in range(6)))
    summary = harvest(out=str(tmp_path / "c"), model=model_dir, families=["dataset"], n_per_family=3,
                      family_args={"dataset": {"path": str(data), "name": "my_data"}}, dtype="float32",
                      batch_size=3, shard_size=3, max_new_tokens=8, every_n=4, hash_weights=False)
    assert list(summary["per_family"]) == ["my_data"] and summary["per_family"]["my_data"]["traces"] == 3
