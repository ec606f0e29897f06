"""Issue 29 A: one writer per corpus folder (a lock held for the whole harvest), duplicate traces refused
wherever a corpus is loaded (naming the ids and shards) and removed by ``maml-stop harvest --repair``;
an unreadable shard reported as unreadable, not as corrupt."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import tiny_lm
from conftest import write_tiny_corpus
from maml_stop.data import store
from maml_stop.data.corpus import TraceCorpus
from maml_stop.data.lock import LOCK_FILE, CorpusLockedError, corpus_lock
from maml_stop.data.repair import remove_duplicate_traces
from maml_stop.harvest.cli import harvest
from maml_stop.harvest.cli import main as harvest_main
from trace_helpers import write_tiny_checkpoint

CODE = "import sys; from maml_stop.harvest.cli import main; sys.exit(main(sys.argv[1:]))"


def _holder(root: Path, *args: str) -> subprocess.Popen:
    """A process holding ``corpus_lock(root, *args)`` until its stdin closes (it prints "held" first)."""
    code = ("import sys; from maml_stop.data.lock import corpus_lock\n"
            f"with corpus_lock({str(root)!r}, *{tuple(int(a) for a in args)!r}):\n"
            "    print('held', flush=True); sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _release(proc: subprocess.Popen) -> None:
    proc.stdin.close()
    proc.wait(timeout=30)


def test_a_second_writer_refuses_at_once_naming_the_holder(tmp_path):
    out = tmp_path / "c"
    holder = _holder(out)
    try:
        t0 = time.time()
        # a model path that does not exist: refusing before the model loads is the only way to pass
        with pytest.raises(CorpusLockedError, match=rf"pid {holder.pid}\b"):
            harvest(out=str(out), model="/nonexistent/model", families=["gcd"], n_per_family=3)
        assert time.time() - t0 < 5
        with pytest.raises(CorpusLockedError, match=rf"pid {holder.pid}\b"):
            with corpus_lock(out, 0, 2):  # a worker beside a single writer
                pass
    finally:
        _release(holder)
    with corpus_lock(out):  # freed when the holder ended
        pass


def test_workers_share_the_folder_but_not_a_worker_index_or_a_worker_count(tmp_path):
    holder = _holder(tmp_path, "0", "2")
    try:
        with corpus_lock(tmp_path, 1, 2):  # the other worker of the same split: allowed
            pass
        for args, match in (((0, 2), "worker 0 is already running"), ((1, 3), "num_workers=2"),
                            ((), "at the same time")):
            with pytest.raises(CorpusLockedError, match=match) as err:
                with corpus_lock(tmp_path, *args):
                    pass
            assert f"pid {holder.pid}" in str(err.value)
    finally:
        _release(holder)


def test_the_lock_of_a_killed_process_is_taken_over(tmp_path, caplog):
    holder = _holder(tmp_path)
    holder.kill()  # SIGKILL: no clean-up ran, the lock file still names it
    holder.wait()
    assert (tmp_path / LOCK_FILE).read_text().strip() == str(holder.pid)
    with caplog.at_level("WARNING"), corpus_lock(tmp_path):
        assert (tmp_path / LOCK_FILE).read_text().strip() == str(os.getpid())
    assert f"process {holder.pid}, which is no longer running" in caplog.text


@pytest.mark.slow
def test_two_concurrent_harvests_into_one_folder(tmp_path):
    """The issue's run: two harvests into one --out at once. The second refuses at once (exit != 0,
    naming the first's pid, in seconds); the first ends with exactly the traces of an uninterrupted run."""
    model_dir = tiny_lm.save_tiny(tmp_path / "tiny_lm")
    args = ["--model", model_dir, "--families", "[basic_arithmetic, gcd]", "--n_per_family", "20",
            "--dtype", "float32", "--batch_size", "3", "--shard_size", "3", "--max_new_tokens", "16",
            "--every_n", "4", "--hash_weights", "false"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = lambda out: [sys.executable, "-c", CODE, "--out", str(out), *args]  # noqa: E731
    ref = tmp_path / "ref"
    subprocess.run(run(ref), env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    expected = {r["trace_id"]: r["generated_text"] for r in store.load_dataset(ref)}

    out = tmp_path / "shared"
    first = subprocess.Popen(run(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / LOCK_FILE).is_file() or not (out / LOCK_FILE).read_text().strip():
        assert time.time() < deadline and first.poll() is None, "the first harvest never took the lock"
        time.sleep(0.05)
    t0 = time.time()
    second = subprocess.run(run(out), env=env, capture_output=True, text=True)
    assert second.returncode != 0 and time.time() - t0 < 60
    assert f"pid {first.pid}" in second.stderr
    assert first.poll() is None, "the first harvest ended before the second tried: the test proves nothing"
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-2000:]
    got = [(r["trace_id"], r["generated_text"]) for r in store.load_dataset(out)]
    assert len(got) == len(expected) and dict(got) == expected


def _duplicated_corpus(root: Path) -> tuple[str, Path, Path]:
    """The tiny corpus with fam_b's first two traces stored a second time in another shard."""
    write_tiny_corpus(root)
    first = store.shard_paths(root, "fam_b")[0]
    rows = pq.read_table(first).to_pylist()[:2]
    second = store.write_shard(root, "fam_b", "all", rows)
    return rows[0]["trace_id"], first, second


def test_duplicates_are_refused_by_every_loader_naming_ids_and_shards(tmp_path, capsys):
    from maml_stop.evaluate.config import EvaluateConfig
    from maml_stop.evaluate.datasheet import write_datasheet
    from maml_stop.evaluate.protocol import run
    from maml_stop.live.adapt import main as adapt_main

    root = tmp_path / "c"
    tid, first, second = _duplicated_corpus(root)
    named = rf"2 trace id\(s\) more than once: {tid} in {first}, {second}.*harvest --repair --out {root}"
    with pytest.raises(store.CorpusError, match=named):
        TraceCorpus.load(root)
    with pytest.raises(store.CorpusError, match=named):
        write_datasheet(root)
    with pytest.raises(store.CorpusError, match=named):
        run(EvaluateConfig(corpus=str(root), out=str(tmp_path / "ev"), methods=["full"], families=["fam_b"]))
    ckpt = write_tiny_checkpoint(tmp_path / "tiny.ckpt")
    assert adapt_main(["--checkpoint", ckpt, "--corpus", str(root), "--family", "fam_c", "--k", "4",
                       "--out", str(tmp_path / "a.pt")]) == 2
    assert "more than once" in capsys.readouterr().err and not (tmp_path / "a.pt").exists()
    with pytest.raises(store.CorpusError, match="more than once"):
        store.stored_trace_ids(root)  # a resumed harvest refuses too


def test_repair_keeps_one_copy_of_each_trace(tmp_path, capsys):
    root = tmp_path / "c"
    write_tiny_corpus(root)
    clean = {r["trace_id"]: r for r in store.read_table(root).to_pylist()}
    tid, first, second = _duplicated_corpus(tmp_path / "d")
    root = tmp_path / "d"
    rows = pq.read_table(first).to_pylist()
    store.rewrite_shard(first, rows + rows[-1:])  # a copy inside one shard too

    assert harvest_main(["--repair", "--out", str(root), "--dry_run"]) == 0
    assert "would remove 3 duplicate trace(s) of 3 id(s)" in capsys.readouterr().out
    with pytest.raises(store.CorpusError, match="more than once"):
        TraceCorpus.load(root)  # a dry run changes nothing
    report = remove_duplicate_traces(root)
    assert report["removed"] == 3 and report["deleted"] == [str(second)] and report["rewritten"] == [str(first)]
    assert not second.exists()
    repaired = store.read_table(root).to_pylist()
    assert sorted(r["trace_id"] for r in repaired) == sorted(clean)  # every trace once, none lost
    assert {r["trace_id"]: r for r in repaired} == clean  # the rows themselves unchanged
    assert remove_duplicate_traces(root)["removed"] == 0


def test_repair_refuses_beside_a_running_harvest(tmp_path):
    root = tmp_path / "d"
    _duplicated_corpus(root)
    holder = _holder(root)
    try:
        with pytest.raises(CorpusLockedError, match=f"pid {holder.pid}"):
            remove_duplicate_traces(root)
    finally:
        _release(holder)


def test_an_unreadable_shard_is_reported_as_unreadable_not_corrupt(tmp_path, monkeypatch):
    root = tmp_path / "c"
    write_tiny_corpus(root)
    real = pq.read_table

    def denied(path, *a, **kw):
        if Path(path) == store.shard_paths(root, "fam_a")[0]:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *a, **kw)

    monkeypatch.setattr(pq, "read_table", denied)
    for load in (store.read_table, store.stored_trace_ids):
        with pytest.raises(store.CorpusError, match="permission denied") as err:
            load(root)
        assert "corrupt" not in str(err.value) and "Delete" not in str(err.value)


def test_the_datasheet_names_the_command_meta_json_records(tmp_path):
    """Issue 29: a corpus no experiments/ YAML writes gets the harvest command its meta.json records
    (not a made-up experiments/corpus_<name>.yaml), one that parses back to the same arguments."""
    import shlex

    from maml_stop.evaluate.datasheet import write_datasheet

    model_dir = tiny_lm.save_tiny(tmp_path / "tiny_lm")
    out = tmp_path / "mine"
    harvest(out=str(out), model=model_dir, families=["gcd", "lcm"], n_per_family=3, dtype="float32", batch_size=3,
            shard_size=3, max_new_tokens=8, every_n=4, hash_weights=False)
    write_datasheet(out)
    line = next(x for x in (out / "README.md").read_text().splitlines() if x.startswith("- regenerate"))
    assert "corpus_mine.yaml" not in line and "the arguments meta.json records" in line
    command = line.split("`")[1]
    assert command.startswith("maml-stop harvest ")
    argv = shlex.split(command)[2:]
    recorded = store.read_meta(out)["harvest_args"]
    assert argv[argv.index("--families") + 1] == '["gcd", "lcm"]' and argv[argv.index("--out") + 1] == str(out)
    assert {a[2:] for a in argv[::2]} == {k for k in recorded if k in
                                          ("out", "model", "families", "n_per_family", "dtype", "batch_size",
                                           "shard_size", "max_new_tokens", "every_n", "hash_weights")}
