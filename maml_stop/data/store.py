"""Storage of trace corpora: HF ``datasets``-readable parquet shards plus a metadata file.

Layout of a corpus folder::

    corpus/
      meta.json                 schema version, model identity (path, sha256), prompt, schedule,
                                feature names, code version, harvest settings
      shards/<family>/<split>-00000.parquet   one row per trace (columns: TRACE_COLUMNS)

Shards are written atomically (to a temporary name, then ``os.replace``), so an interrupted harvest
leaves only whole shards; the harvester resumes by skipping question ids already stored.

Per-probe columns are lists of equal length ``n_probes``; ``features`` is a list of float16 vectors of
width ``len(meta["feature_names"])``.

Optional columns (:data:`OPTIONAL_SCHEMA`) follow the required ones in a shard that has them: a shard is
written with those its rows carry (a think-mode harvest: ``think_tokens``, ``after_think_tokens``), and
read with the optional columns of any shard of the corpus, null where a shard lacks them; a corpus
written before they existed reads exactly as before.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from maml_stop import SCHEMA_VERSION

META_FILE = "meta.json"
SHARD_DIR = "shards"

TRACE_SCHEMA = pa.schema(
    [
        ("trace_id", pa.string()),  # "<question id>#<sample index>"
        ("question_id", pa.string()),
        ("family", pa.string()),
        ("split", pa.string()),  # question split of the family (train/validation/test)
        ("question", pa.string()),
        ("gold", pa.string()),
        ("model", pa.string()),
        ("prompt_tokens", pa.int32()),
        ("generated_text", pa.string()),
        ("final_answer", pa.string()),  # null when the generation states no answer
        ("final_em", pa.bool_()),
        ("reasoning_tokens", pa.int32()),  # every token the model generated (its own answer included)
        ("hit_cap", pa.bool_()),  # stopped by max_new_tokens rather than EOS
        ("probe_positions", pa.list_(pa.int32())),  # generated tokens before the probe
        ("probe_reasons", pa.list_(pa.string())),  # what fired the probe: every_n|boundary|cue
        ("probe_answers", pa.list_(pa.string())),  # extracted probe answer ("" when none)
        ("probe_texts", pa.list_(pa.string())),  # raw forced continuation
        ("probe_em", pa.list_(pa.bool_())),
        ("probe_tokens", pa.list_(pa.int32())),  # cost of the probe: trigger + answer tokens
        ("probe_answer_tokens", pa.list_(pa.int32())),  # answer tokens alone
        ("probe_logprob_mean", pa.list_(pa.float32())),
        ("probe_logprob_min", pa.list_(pa.float32())),
        ("features", pa.list_(pa.list_(pa.float16()))),  # (n_probes, n_features)
    ]
)
TRACE_COLUMNS = TRACE_SCHEMA.names
OPTIONAL_SCHEMA = pa.schema(
    [
        ("think_tokens", pa.int32()),  # think mode: generated tokens inside <think> ... </think> (the close included)
        ("after_think_tokens", pa.int32()),  # think mode: generated tokens after </think>; the two add up to
        # reasoning_tokens (maml_stop.probe.think)
    ]
)
OPTIONAL_COLUMNS = OPTIONAL_SCHEMA.names


def _schema_with(optional: Iterable[str]) -> pa.Schema:
    """The trace schema plus the optional columns named in ``optional`` (in :data:`OPTIONAL_SCHEMA` order)."""
    extra = set(optional)
    return pa.schema(list(TRACE_SCHEMA) + [f for f in OPTIONAL_SCHEMA if f.name in extra])
_TRACE_ID = re.compile(r"(?P<question>.+)#(?P<sample>\d+)")


def make_trace_id(question_id: str, sample: int = 0) -> str:
    """The id of a question's ``sample``-th trace: ``"<question id>#<sample>"``.

    >>> make_trace_id("gcd/0123456789ab")
    'gcd/0123456789ab#0'
    """
    return f"{question_id}#{sample}"


def question_id_of(trace_id: str) -> str:
    """The question id of a trace id ``"<question id>#<sample>"`` (the one parser of trace ids: support and
    query sets never split a question). An id without a ``#<sample>`` tail is its own question.

    >>> question_id_of("gcd/0123456789ab#3"), question_id_of("t7")
    ('gcd/0123456789ab', 't7')
    """
    m = _TRACE_ID.fullmatch(trace_id)
    return m.group("question") if m else trace_id


class CorpusError(ValueError):
    """A corpus folder, shard or metadata file that cannot be used."""


def write_meta(root: str | Path, meta: dict[str, Any]) -> None:
    meta = {"schema_version": SCHEMA_VERSION, **meta}
    atomic_write_bytes(Path(root) / META_FILE, json.dumps(meta, indent=2, sort_keys=True).encode())


def read_meta(root: str | Path) -> dict[str, Any]:
    path = Path(root) / META_FILE
    if not path.is_file():
        raise CorpusError(f"{root} is not a trace corpus: {META_FILE} is missing")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CorpusError(f"{path} is not valid JSON: {err}") from err
    version = meta.get("schema_version")
    if version != SCHEMA_VERSION:
        raise CorpusError(
            f"{root} has trace schema version {version!r}; this code reads version {SCHEMA_VERSION}. "
            "Re-harvest it or use the maml_stop release that wrote it."
        )
    for key in ("feature_names",):
        if key not in meta:
            raise CorpusError(f"{path} lacks the key {key!r}; keys present: {sorted(meta)}")
    return meta


def _new_file_mode(path: Path) -> int:
    """The mode ``open(path, "w")`` would leave: the old file's when it exists, else 0o666 less the umask
    (``mkstemp`` alone gives 0600, and other users could not read a corpus, issue 29)."""
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        mask = os.umask(0o022)
        os.umask(mask)
        return 0o666 & ~mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all: a temporary file in the same folder, synced, then
    ``os.replace`` (the one atomic writer of the project: shards, meta.json, artifacts, the study's records).
    A failed write (a full disk) leaves the previous file at ``path`` as it was and raises an OSError
    naming ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _new_file_mode(path))
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise type(err)(err.errno, f"could not write {path}: {err.strerror or err}; "
                        "the previous file there, if any, is unchanged") from err
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def shard_paths(root: str | Path, family: str | None = None) -> list[Path]:
    base = Path(root) / SHARD_DIR
    pattern = f"{family}/*.parquet" if family else "*/*.parquet"
    return sorted(base.glob(pattern))


def write_shard(root: str | Path, family: str, split: str, rows: list[dict[str, Any]], worker: str = "") -> Path:
    """Write ``rows`` as the next shard of (family, split), atomically. Returns its path.

    ``worker`` (e.g. ``"w1of2"``) tags the shards of one of several harvest workers writing into one
    folder: each worker numbers its own shards, so two workers never pick the same file name."""
    if not rows:
        raise ValueError("refusing to write an empty shard")
    missing = [c for c in TRACE_COLUMNS if c not in rows[0]]
    if missing:
        raise CorpusError(f"trace rows lack columns {missing}")
    folder = Path(root) / SHARD_DIR / family
    folder.mkdir(parents=True, exist_ok=True)
    tag = f"-{worker}" if worker else ""
    path = folder / f"{split}-{next_shard_index(folder, split, worker):05d}{tag}.parquet"
    rewrite_shard(path, rows)
    return path


def next_shard_index(folder: str | Path, split: str, worker: str = "") -> int:
    """One past the highest shard index of ``split`` (of ``worker``'s shards) in ``folder`` (0 when
    there is none).

    Not the number of shards: after a corrupt shard was deleted, counting would hand out the index of
    the highest shard still there and overwrite it on every write (issue 16)."""
    tag = re.escape(f"-{worker}") if worker else ""
    found = [int(m.group(1)) for p in Path(folder).glob(f"{split}-*.parquet")
             if (m := re.fullmatch(rf"{re.escape(split)}-(\d+){tag}\.parquet", p.name))]
    return max(found, default=-1) + 1


def rewrite_shard(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Write ``rows`` (in the trace schema) to the shard ``path``, atomically (new or replaced)."""
    schema = _schema_with(c for c in OPTIONAL_COLUMNS if any(c in r for r in rows))
    table = pa.Table.from_pylist([{c: r.get(c) for c in schema.names} for r in rows], schema=schema)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    atomic_write_bytes(Path(path), sink.getvalue().to_pybytes())


def read_table(root: str | Path, families: Iterable[str] | None = None) -> pa.Table:
    """All shards of a corpus (optionally only some families) as one Arrow table."""
    paths: list[Path] = []
    if families is None:
        paths = shard_paths(root)
    else:
        for fam in families:
            found = shard_paths(root, fam)
            if not found:
                have = sorted({p.parent.name for p in shard_paths(root)})
                raise CorpusError(f"corpus {root} has no traces of family {fam!r}; families present: {have}")
            paths += found
    if not paths:
        raise CorpusError(f"corpus {root} has no trace shards under {SHARD_DIR}/")
    tables = []
    for p in paths:
        t = read_shard(p)
        names = t.schema.names
        if names[:len(TRACE_COLUMNS)] != TRACE_COLUMNS or names[len(TRACE_COLUMNS):] != \
                [c for c in OPTIONAL_COLUMNS if c in names[len(TRACE_COLUMNS):]]:
            raise CorpusError(f"shard {p} has columns {names}, expected {TRACE_COLUMNS} "
                              f"(then optionally {OPTIONAL_COLUMNS})")
        tables.append(t)
    refuse_duplicates(root, {p: t.column("trace_id").to_pylist() for p, t in zip(paths, tables)})
    schema = _schema_with(c for t in tables for c in t.schema.names)
    filled = []
    for t in tables:  # a shard without an optional column another shard has: null there
        for f in schema:
            if f.name not in t.schema.names:
                t = t.append_column(f.name, pa.nulls(t.num_rows, f.type))
        filled.append(t.select(schema.names).cast(schema))
    return pa.concat_tables(filled)


def load_dataset(root: str | Path, families: Iterable[str] | None = None):
    """The corpus as a Hugging Face ``datasets.Dataset`` (metadata checked first)."""
    import datasets

    read_meta(root)
    return datasets.Dataset(read_table(root, families))


def duplicate_trace_ids(ids_by_shard: dict[Path, list[str]]) -> dict[str, list[Path]]:
    """trace id -> the shards storing it (a shard once per copy), for every id stored more than once.

    >>> duplicate_trace_ids({Path("a"): ["x#0", "y#0"], Path("b"): ["y#0", "z#0", "z#0"]})
    {'y#0': [PosixPath('a'), PosixPath('b')], 'z#0': [PosixPath('b'), PosixPath('b')]}
    """
    where: dict[str, list[Path]] = {}
    for path, ids in ids_by_shard.items():
        for i in ids:
            where.setdefault(i, []).append(path)
    return {i: ps for i, ps in sorted(where.items()) if len(ps) > 1}


def refuse_duplicates(root: str | Path, ids_by_shard: dict[Path, list[str]]) -> None:
    """Raise CorpusError naming the trace ids stored more than once and their shards (such a trace would
    count twice in every figure), with the command that keeps one copy of each (issue 29)."""
    twice = duplicate_trace_ids(ids_by_shard)
    if twice:
        shown = "; ".join(f"{i} in {', '.join(str(p) for p in ps)}" for i, ps in list(twice.items())[:5])
        more = f" and {len(twice) - 5} more" if len(twice) > 5 else ""
        raise CorpusError(f"corpus {root} stores {len(twice)} trace id(s) more than once: {shown}{more}. "
                          f"Keep one copy of each with: maml-stop harvest --repair --out {root}")


def read_shard(path: Path, columns: list[str] | None = None) -> pa.Table:
    """One shard (or some of its columns). A shard this process may not read is reported as such (it may
    be whole: deleting it would lose good traces); a damaged one as corrupt, to delete and re-harvest."""
    try:
        return pq.read_table(path, columns=columns)
    except PermissionError as err:
        raise CorpusError(f"cannot read trace shard {path}: permission denied ({err}). The shard itself may be "
                          "fine: give this user read access to it (do not delete it).") from err
    except Exception as err:  # pyarrow raises several types for damaged files
        raise CorpusError(f"corrupt trace shard {path}: {err}. Delete it and resume the harvest.") from err


def shard_trace_ids(path: Path) -> list[str]:
    """The trace ids of one shard, in row order (a CorpusError naming the shard when it cannot be read)."""
    return read_shard(path, ["trace_id"]).column("trace_id").to_pylist()


def stored_trace_ids(root: str | Path) -> set[str]:
    """trace ids already stored (for resuming a harvest). A trace id stored twice is an error: the
    corpus would count that trace twice."""
    ids_by_shard = {p: shard_trace_ids(p) for p in shard_paths(root)}
    refuse_duplicates(root, ids_by_shard)
    return {i for ids in ids_by_shard.values() for i in ids}


def verify_stored(root: str | Path, trace_ids: Iterable[str]) -> None:
    """Raise CorpusError unless every one of ``trace_ids`` is stored, readable, exactly once (a harvest
    checks what it wrote before it reports success)."""
    stored = stored_trace_ids(root)
    missing = sorted(set(trace_ids) - stored)
    if missing:
        raise CorpusError(f"corpus {root} lacks {len(missing)} trace(s) this harvest wrote, e.g. {missing[:3]}; "
                          "resume the harvest to write them again")
