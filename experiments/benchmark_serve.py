"""Loopback load benchmark of ``maml-stop serve`` (issue 27): concurrency 1-16 against 127.0.0.1, p50/p95
latency, tokens/s against plain batched ``generate()`` on the same prompts, requests stopped early.

    .venv/bin/python experiments/benchmark_serve.py                        # the tiny local model (built here)
    .venv/bin/python experiments/benchmark_serve.py --model "$(bash scripts/fetch_models.sh qwen05)" --artifact runs/adapted/gcd.pt \\
        --concurrency 1 2 4 8 16 --requests 64 --out experiments/results/serve_bench.json

Three services, each a ``maml-stop serve`` on a free loopback port, fed by a closed loop of ``c`` clients
(httpx, bounded: ``--requests`` per level), no feedback runs (``sample_rate`` 0):

* ``idle``: the artifact's tau removed (never stop): the service serves plain ``generate()``
  (no probes): what the service costs on top of the model;
* ``never``: tau = 1 (live stopping probes and forces every answer but never fires: the probing cost);
* ``stop``: the artifact's own tau: how many stop early and what it saves in wall time;
* ``decoder`` (not by default): no service, no HTTP: the continuous decoder (serve/decoder.py) in this
  process, plain rows, a closed loop of ``c`` slots (a row joins when one ends): the decoder's own
  tokens/s against plain ``generate()``, without the cost of a request outside the model.

Each service runs once per ``--engines`` entry (``batch.engine``): ``continuous`` (rows join the running batch,
serve/decoder.py) and ``generate`` (one ``generate()`` per batch, the path before it), so that old and new are
measured in the same run. The baseline runs ``generate()`` directly on batches of ``c`` prompts, right before each service's level
(the load of a shared machine moves: each ratio compares runs a few seconds apart; ``x cpu`` compares tokens per
CPU second instead, the service process's user + system time against this process's, which other jobs on
the machine move much less than wall time). tokens/s counts generated
(reasoning) tokens, the client's output; ``total/s`` adds every forced-answer token. Without
``--model`` the tiny random Llama of tests/tiny_lm.py serves an artifact adapted on a corpus harvested
here: its figures measure the service's overhead, not a real model's savings. The service runs in its own
process (``maml-stop serve``, max_batch = the highest concurrency), the baseline and the clients in this one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # tests/tiny_lm.py, tests/trace_helpers.py for the tiny run

log = logging.getLogger("benchmark_serve")
FAMILY = "basic_arithmetic"


def tiny_setup(root: Path) -> tuple[str, str]:
    """The tiny model, a corpus harvested with it and an artifact adapted on it (tau at the median probe)."""
    import torch

    import tiny_lm
    from maml_stop.data import store
    from maml_stop.data.batches import collate_traces
    from maml_stop.data.corpus import TraceCorpus
    from maml_stop.harvest.cli import harvest
    from maml_stop.live.adapt import adapt, save_adapted
    from trace_helpers import write_tiny_checkpoint

    model_dir = tiny_lm.save_tiny(root / "tiny_lm")
    harvest(out=str(root / "corpus"), model=model_dir, families=[FAMILY], n_per_family=8, dtype="float32",
            batch_size=4, shard_size=8, max_new_tokens=32, every_n=4, boundary=True, align=2, max_probes=10,
            proj_dim=8, mid_layer=1, probe_at_start=False, probe_at_cap=True, hash_weights=False)
    names = store.read_meta(root / "corpus")["feature_names"]
    ckpt = write_tiny_checkpoint(root / "tiny.ckpt", feature_names=names)
    adapted = adapt(ckpt, FAMILY, k=4, corpus=str(root / "corpus"), threshold_method="fixed", tau=0.5)
    probs = adapted.predict_proba(collate_traces(TraceCorpus.load(root / "corpus").traces(FAMILY)))
    adapted.tau = float(torch.quantile(probs, 0.5))
    return model_dir, str(save_adapted(adapted, root / "tiny.pt"))


def variant(artifact: str, root: Path, tau: float | None) -> str:
    from maml_stop.live.artifact import load_adapted, save_adapted

    adapted = load_adapted(artifact)
    adapted.tau = tau
    return str(save_adapted(adapted, root / f"{'none' if tau is None else tau}.pt"))


async def _load(port: int, prompts: list[str], concurrency: int) -> tuple[list[float], list[dict], float]:
    import httpx

    latencies, bodies, queue = [], [], list(prompts)

    async def client(c: httpx.AsyncClient) -> None:
        while queue:
            prompt = queue.pop()
            t0 = time.perf_counter()
            r = await c.post("/v1/completions", json={"prompt": prompt})
            r.raise_for_status()
            latencies.append(time.perf_counter() - t0)
            bodies.append(r.json())

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=600) as c:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(c) for _ in range(concurrency)))
        return latencies, bodies, time.perf_counter() - t0


@contextlib.contextmanager
def server(model_dir: str | None, artifact: str, db: Path, extra: list[str]):
    """``maml-stop serve`` in a subprocess (its own interpreter: no GIL shared with the clients) on a free
    loopback port with the options ``extra`` (``--model`` too unless ``model_dir`` is None); yields the port."""
    with server_process(model_dir, artifact, db, extra) as (port, _pid):
        yield port


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (``/proc/<pid>/stat``, Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def server_process(model_dir: str | None, artifact: str, db: Path, extra: list[str]):
    """:func:`server`, yielding ``(port, pid)``: the pid reads the service's CPU time (:func:`cpu_seconds`)."""
    import socket
    import subprocess
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "maml_stop.cli", "serve", *extra, *(["--model", model_dir] if model_dir else []),
           "--artifact", artifact, "--db", str(db), "--port", str(port)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    log_path = db.with_suffix(".log")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"serve exited with {proc.returncode}: {' '.join(cmd)}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("serve did not answer within 300 s") from None
                time.sleep(0.3)
        yield port, proc.pid
    except Exception:
        sys.stderr.write(f"--- the service's log ({log_path}), last lines:\n")
        sys.stderr.write("\n".join(log_path.read_text(errors="replace").splitlines()[-40:]) + "\n")
        raise
    finally:
        proc.terminate()
        proc.wait(60)


def _counters(port: int) -> dict[str, float]:
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    out = {}
    for name in ("generate_calls", "generate_rows", "generate_seconds"):
        line = next(x for x in text.splitlines() if x.startswith(f"maml_stop_{name}_total "))
        out[name] = float(line.split()[-1])
    return out


def serve_level(port: int, prompts: list[str], concurrency: int, pid: int | None = None) -> dict:
    before, cpu0 = _counters(port), cpu_seconds(pid) if pid else float("nan")
    lat, bodies, wall = asyncio.run(_load(port, prompts, concurrency))
    after, cpu = _counters(port), (cpu_seconds(pid) - cpu0) if pid else float("nan")
    calls = after["generate_calls"] - before["generate_calls"]
    reasoning = sum(b["maml_stop"]["reasoning_tokens"] for b in bodies)
    total = sum(b["usage"]["completion_tokens"] for b in bodies)
    return {"requests": len(bodies), "wall_s": wall, "p50_ms": 1000 * float(np.percentile(lat, 50)),
            "p95_ms": 1000 * float(np.percentile(lat, 95)), "tokens_per_s": reasoning / wall,
            "total_per_s": total / wall, "stopped_early": sum(b["maml_stop"]["stopped_early"] for b in bodies),
            "cpu_s": cpu, "tokens_per_cpu_s": reasoning / cpu if cpu == cpu and cpu > 0 else float("nan"),
            "reasoning_tokens": reasoning, "mean_batch": (after["generate_rows"] - before["generate_rows"]) / max(calls, 1),
            "in_generate": (after["generate_seconds"] - before["generate_seconds"]) / wall}


def plain_level(model, tok, prompts: list[str], concurrency: int, cap: int) -> dict:
    import torch

    from maml_stop.probe.forcing import eos_ids

    eos = set(eos_ids(model, tok))
    tok.padding_side = "left"
    pad = tok.pad_token_id if tok.pad_token_id is not None else min(eos)
    generated, t0, cpu0 = 0, time.perf_counter(), time.process_time()
    for i in range(0, len(prompts), concurrency):
        enc = tok(prompts[i:i + concurrency], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            seqs = model.generate(**enc, max_new_tokens=cap, do_sample=False, pad_token_id=pad)
        for row in seqs[:, enc["input_ids"].shape[1]:].tolist():
            first = next((j for j, t in enumerate(row) if t in eos), None)
            generated += len(row) if first is None else first + 1
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return {"requests": len(prompts), "wall_s": wall, "tokens_per_s": generated / wall, "reasoning_tokens": generated,
            "cpu_s": cpu, "tokens_per_cpu_s": generated / cpu}


def decoder_level(model, tok, prompts: list[str], concurrency: int, cap: int) -> dict:
    """The continuous decoder in this process on plain rows: ``concurrency`` slots, a row joins when one ends."""
    from maml_stop.probe.forcing import eos_ids
    from maml_stop.serve.decoder import Decoder

    eos = set(eos_ids(model, tok))
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    out: dict[int, list[int]] = {}
    dec = Decoder(model, tok, cap, eos, lambda key, generated, live: out.__setitem__(key, generated), concurrency)
    waiting, t0, cpu0 = list(range(len(prompts))), time.perf_counter(), time.process_time()
    while waiting or dec.rows:
        room = concurrency - len(dec.rows)
        if waiting and room:
            dec.add([(i, ids[i], None) for i in waiting[:room]])
            waiting = waiting[room:]
        dec.step()
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    generated = sum(len(g) for g in out.values())  # up to and with the EOS, as plain_level counts
    return {"requests": len(prompts), "wall_s": wall, "p50_ms": float("nan"), "p95_ms": float("nan"),
            "tokens_per_s": generated / wall, "total_per_s": generated / wall, "stopped_early": 0,
            "reasoning_tokens": generated, "mean_batch": dec.step_rows / max(dec.steps, 1), "in_generate": 1.0,
            "cpu_s": cpu, "tokens_per_cpu_s": generated / cpu}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model folder (default: the tiny local model, built here)")
    p.add_argument("--artifact", default=None, help="adapted artifact of that model (needed with --model)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--requests", type=int, default=32, help="requests per concurrency level and service")
    p.add_argument("--modes", nargs="+", default=["idle", "never", "stop"],
                   choices=["idle", "never", "stop", "decoder"])
    p.add_argument("--engines", nargs="+", default=["continuous", "generate"], choices=["continuous", "generate"],
                   help="the service's batch.engine, one service each")
    p.add_argument("--window_ms", type=float, default=10.0, help="the service's batching gap (batch.window_ms)")
    p.add_argument("--max_wait_ms", type=float, default=50.0, help="the service's batch.max_wait_ms")
    p.add_argument("--out", default=None, help="also write the figures as JSON here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if (args.model is None) != (args.artifact is None):
        p.error("give both --model and --artifact, or neither (the tiny local model)")
    if any(c < 1 for c in args.concurrency) or args.requests < 1:
        p.error("--concurrency and --requests must be >= 1")
    import torch

    torch.set_num_threads(1)
    from maml_stop.harvest.model import load_model
    from maml_stop.live.artifact import load_adapted
    from tasks import get_family

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir, artifact = (args.model, args.artifact) if args.model else tiny_setup(root)
        model, tok = load_model(model_dir, dtype="float32")
        fam = get_family(load_adapted(artifact).recipe["extraction"]["family"])
        cap = int(load_adapted(artifact).recipe["max_new_tokens"])
        artifacts = {"idle": variant(artifact, root, None), "never": variant(artifact, root, 1.0), "stop": artifact}
        fmt = load_adapted(artifact).recipe.get("reasoning_format") or "plain"
        levels = {c: fam.questions("test", args.requests, seed=c) for c in args.concurrency}
        rows = []
        for mode in args.modes:  # one service per mode and engine, max_batch = the highest concurrency
            if mode == "decoder":
                for c, qs in levels.items():
                    prompts = [fam.render_prompt(q, tok, fmt) for q in qs]
                    base = plain_level(model, tok, prompts, c, cap)
                    r = decoder_level(model, tok, prompts, c, cap)
                    rows.append({"concurrency": c, "service": mode, "engine": "in-process", **r,
                                 "plain_tokens_per_s": base["tokens_per_s"], "plain_wall_s": base["wall_s"],
                                 "vs_plain": r["tokens_per_s"] / base["tokens_per_s"],
                                 "vs_plain_cpu": r["tokens_per_cpu_s"] / base["tokens_per_cpu_s"]})
                continue
            for engine in args.engines:
                extra = ["--online.sample_rate", "0", "--batch.max_batch", str(max(args.concurrency)),
                         "--batch.window_ms", str(args.window_ms), "--batch.max_wait_ms", str(args.max_wait_ms),
                         "--batch.engine", engine]
                with server_process(model_dir, artifacts[mode], root / f"{mode}-{engine}.sqlite", extra) as (port, pid):
                    for c, qs in levels.items():  # the baseline right before: the machine's load changes
                        base = plain_level(model, tok, [fam.render_prompt(q, tok, fmt) for q in qs], c, cap)
                        r = serve_level(port, [q.question for q in qs], c, pid)
                        rows.append({"concurrency": c, "service": mode, "engine": engine, **r,
                                     "plain_tokens_per_s": base["tokens_per_s"], "plain_wall_s": base["wall_s"],
                                     "vs_plain": r["tokens_per_s"] / base["tokens_per_s"],
                                     "vs_plain_cpu": r["tokens_per_cpu_s"] / base["tokens_per_cpu_s"]})
        order = args.engines + ["in-process"]
        rows.sort(key=lambda r: (r["concurrency"], args.modes.index(r["service"]), order.index(r["engine"])))
    what = "tiny random Llama (tests/tiny_lm.py; overhead only, not a real model)" if args.model is None else args.model
    print(f"maml-stop serve loopback benchmark: {what}; {args.requests} requests per level; token cap {cap}")
    print(f"{'c':>3} {'service':<7} {'engine':<10} {'p50 ms':>8} {'p95 ms':>8} {'tok/s':>8} {'total/s':>8} {'plain/s':>8} "
          f"{'x plain':>8} {'x cpu':>6} {'stopped':>8} {'wall s':>7} {'plain s':>7} {'batch':>6} {'in gen':>6}")
    for r in rows:
        print(f"{r['concurrency']:>3} {r['service']:<7} {r['engine']:<10} {r['p50_ms']:>8.1f} {r['p95_ms']:>8.1f} {r['tokens_per_s']:>8.1f} "
              f"{r['total_per_s']:>8.1f} {r['plain_tokens_per_s']:>8.1f} {r['vs_plain']:>8.2f} {r['vs_plain_cpu']:>6.2f} {r['stopped_early']:>8} "
              f"{r['wall_s']:>7.2f} {r['plain_wall_s']:>7.2f} {r['mean_batch']:>6.1f} {r['in_generate']:>6.2f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"model": what, "requests": args.requests, "cap": cap, "rows": rows},
                                             indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
