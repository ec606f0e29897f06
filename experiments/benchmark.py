"""The one benchmark suite (issue 15): every speed figure of the README from one command, one run.

    python experiments/benchmark.py [--model MODEL_DIR_OR_HUB_ID] [--quick] [--out experiments/results/benchmark]
    python experiments/benchmark.py --model MODEL_DIR --device cuda --dtype bfloat16 --sections generation

Writes ``benchmark.json`` (every figure and the settings) and ``benchmark.md`` (the tables) under
``--out``. Sections (settings in ``experiments/benchmark.yaml``; ``--quick`` applies its ``quick:`` block):

* ``generation``: probing overhead against plain ``model.generate()`` as ratios measured in the same run:
  the harvester (``benchmark_harvest.measure``: our loop, cached probes, optionally naive probes) and
  ``LiveStopping`` in every live mode (every/free/gated), never firing and firing
  (``benchmark_live.measure``). Without ``--model`` these run on the tiny random Llama of
  ``tests/tiny_lm.py`` (the output says so: its ratios say nothing about a real model).
* ``meta``: meta-steps/s per algorithm (MAML first/second order, ANIL, Meta-SGD) and per adaptation
  backend (learn2learn; torch_func too when ``AdapterConfig`` has a ``backend`` field), on the corpus.
* ``adaptation``: median and p90 ms of ``InnerLoopAdapter.fit_support`` on K real support questions
  of the corpus (the main checkpoint's predictor when it exists and reads the corpus's features, else
  a fresh one), under ``torch.no_grad()`` as evaluation runs it; CPU time of this process, one thread.
* ``decision``: ms per probe of the live rule's decision on one core: the probe's feature vector
  (``ProbeFeaturizer.probe_features``), the predictor on the row's probes so far and the threshold
  (``StopRule`` in mode ``every``), over the probes of stored traces.
* ``corpus``: load time and the Python peak (tracemalloc) of ``TraceCorpus.load``.
* ``evaluate``: wall seconds per evaluation episode (``bench_evaluate.measure``, synthetic corpus).
* ``evalspeed``: episodes per second per method of the evaluation's reference path and fast path side by
  side on the corpus, their results compared, and the projected time of committed reports
  (``bench_evalspeed.measure``, issue 26).
* peak resident memory (``resource.getrusage``) after every section; CUDA peak when on a GPU.

Targets (issue 5), printed PASS/FAIL: adaptation <= 50 ms for K=16; decision <= 1 ms per probe.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import os
import platform
import re
import resource
import sys
import time
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "experiments"), str(ROOT / "tests")]  # sibling scripts; tests/tiny_lm.py
# the sibling scripts (benchmark_harvest, benchmark_live, benchmark_meta, bench_evaluate) are imported in
# the sections that use them: reading the settings imports neither transformers nor Lightning

from bench_evalspeed import EvalSpeedSettings  # noqa: E402  (settings only: imports torch, nothing heavier)

log = logging.getLogger(__name__)

SECTIONS = ("generation", "meta", "adaptation", "decision", "corpus", "evaluate", "evalspeed")
DEFAULT_CONFIG = ROOT / "experiments" / "benchmark.yaml"


# -- settings ----------------------------------------------------------------------------------------
@dataclass
class GenerationSettings:
    family: str = "gsm_symbolic"  # the prompts' task family
    n: int = 8  # prompts (harvest: batches of batch_size; live: one batch)
    batch_size: int = 8  # harvest batch
    max_new_tokens: int = 128
    every_n: int = 32  # a probe every N generated tokens
    stop_at: int = 2  # the firing live runs stop at this probe point (1 = first)
    naive: bool = False  # also time naive probes that re-encode the prefix (about 3x plain: slow)
    live_rounds: int = 1  # live: interleaved rounds of every run (ratios: medians over rounds)


@dataclass
class MetaSettings:
    meta_batch: int = 8
    k: int = 16  # support questions per episode
    q: int = 64  # query questions per episode
    inner_steps: int = 5
    hidden: int = 64
    depth: int = 2
    kinds: list[str] = field(default_factory=lambda: ["mlp"])  # predictor kinds (mlp, delta, gru)
    repeats: int = 5  # calls per timing round
    rounds: int = 3  # timing rounds (the best one counts)


@dataclass
class AdaptationSettings:
    k: int = 16  # support questions
    draws: int = 30  # support sets drawn (one timing each, after 3 warm-up calls)


@dataclass
class DecisionSettings:
    traces: int = 50  # stored traces whose probes are decided, one row each


@dataclass
class EvaluateSettings:
    traces: int = 400  # synthetic traces per family
    probes: int = 16  # at most, per trace
    episodes: int = 5  # per K
    k: list[int] = field(default_factory=lambda: [16])
    methods: list[str] | None = None  # default: EvaluateConfig's (maml_stop.evaluate.methods.DEFAULT_METHODS)


@dataclass
class Targets:
    adapt_ms: float = 50.0  # median fit_support latency for K = adaptation.k (issue 5)
    decision_ms: float = 1.0  # per probe, one core
    live_free_ratio: float = 1.05  # live free mode that never fires, CPU time over plain generate() (issue 10)


@dataclass
class BenchmarkConfig:
    corpus: str = "experiments/corpus/qwen05"  # real traces for meta, adaptation and decision
    checkpoint: str = "runs/main/checkpoints/best.ckpt"  # used when present, else a fresh predictor
    dtype: str = "float32"  # of the real model (bf16 is emulated, about 4x slower, on these CPUs)
    threads: int = 1
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    meta: MetaSettings = field(default_factory=MetaSettings)
    adaptation: AdaptationSettings = field(default_factory=AdaptationSettings)
    decision: DecisionSettings = field(default_factory=DecisionSettings)
    evaluate: EvaluateSettings = field(default_factory=EvaluateSettings)
    evalspeed: EvalSpeedSettings = field(default_factory=EvalSpeedSettings)
    targets: Targets = field(default_factory=Targets)

    @classmethod
    def from_dict(cls, data: dict) -> "BenchmarkConfig":
        return _build(cls, data, "benchmark")

    @classmethod
    def load(cls, path: str | Path, quick: bool = False) -> "BenchmarkConfig":
        """The settings of ``path``; with ``quick`` its ``quick:`` block merged over them."""
        data = yaml.safe_load(Path(path).read_text()) or {}
        quick_block = data.pop("quick", {}) or {}
        if quick:
            data = _merge(data, quick_block)
        return cls.from_dict(data)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out.get(key) or {}, value) if isinstance(value, dict) else value
    return out


def _build(cls, data: dict, where: str):
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ValueError(f"{where}: unknown settings {unknown}; valid: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        default = names[key].default_factory() if names[key].default_factory is not dataclasses.MISSING else None
        kwargs[key] = _build(type(default), value or {}, f"{where}.{key}") if dataclasses.is_dataclass(default) else value
    return cls(**kwargs)


# -- helpers -------------------------------------------------------------------------------------------
def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux: ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def load_generation_model(model_dir: str | None, dtype: str, device: str) -> tuple[Any, Any, str]:
    """(model, tokenizer, description) on ``device``: the local model folder, or the tiny random Llama."""
    if model_dir is None:
        from tiny_lm import build_model, build_tokenizer

        tok = build_tokenizer()
        model = build_model(tok).to(device=device, dtype=benchmark_harvest_dtype(dtype))
        return model, tok, "tiny random Llama of tests/tiny_lm.py (no --model given: not a real model)"
    from maml_stop.harvest.model import load_model

    model, tok = load_model(model_dir, dtype=dtype)
    return model.to(device), tok, model_dir


def benchmark_harvest_dtype(name: str) -> torch.dtype:
    from maml_stop.harvest.model import DTYPES

    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; valid: {', '.join(DTYPES)}")
    return DTYPES[name]


def load_adapter(checkpoint: str, corpus) -> tuple[Any, str]:
    """The main checkpoint's adapter when it exists and reads the corpus's features, else a fresh one;
    and a description of which."""
    from maml_stop.learn.module import MetaStoppingModule, load_predictor

    names = list(corpus.feature_names)
    why = f"no checkpoint at {checkpoint or '(none given)'}"
    if checkpoint and Path(checkpoint).is_file():
        _, adapter, meta = load_predictor(checkpoint)
        if meta.get("feature_names") in (None, names):
            return adapter, f"checkpoint {checkpoint}"
        why = f"checkpoint {checkpoint} reads other features than the corpus"
        log.warning("%s: using a fresh predictor", why)
    module = MetaStoppingModule(len(names), feature_names=names, compare_random_init=False)
    return module.adapter.eval(), f"fresh predictor ({why})"


# -- sections ------------------------------------------------------------------------------------------
def run_generation(cfg: BenchmarkConfig, model, tok) -> dict:
    import benchmark_harvest
    import benchmark_live
    from tasks import get_family

    g = cfg.generation
    family = get_family(g.family)
    harvest = benchmark_harvest.measure(model, tok, family, g.n, g.batch_size, g.max_new_tokens, g.every_n,
                                        skip_naive=not g.naive)
    base = harvest["plain generate()"][0]
    harvest_rows = [{"run": name, "seconds": s, "tokens": n, "ratio": s / base, "tokens_per_s": n / s,
                     "traces_per_s": g.n / s} for name, (s, n) in harvest.items()]
    live_rows = benchmark_live.measure(model, tok, family, g.n, g.max_new_tokens, g.every_n, g.stop_at,
                                       rounds=g.live_rounds)
    return {"harvest": harvest_rows, "live": live_rows}


def run_meta(cfg: BenchmarkConfig, by_family: dict) -> dict:
    import benchmark_meta

    m = cfg.meta
    backends = benchmark_meta.adapter_backends()
    out = benchmark_meta.measure(by_family, m.meta_batch, m.k, m.q, m.inner_steps, m.hidden, m.depth,
                                 tuple(m.kinds), m.repeats, m.rounds, backends=backends)
    out["backend_field"] = backends != (None,)
    return out


def run_adaptation(cfg: BenchmarkConfig, adapter, by_family: dict) -> dict:
    import benchmark_meta
    from maml_stop.data.episodes import split_support_query

    a = cfg.adaptation
    rng = np.random.default_rng(0)
    families = sorted(by_family)
    supports = [split_support_query(by_family[families[i % len(families)]], a.k, 1, rng)[0] for i in range(a.draws)]
    rows = []
    for backend in benchmark_meta.adapter_backends():
        adapted_by = benchmark_meta.with_backend(adapter, backend)
        cpu, wall = [], []
        with torch.no_grad():
            for support in supports[:3]:  # warm-up
                adapted_by.fit_support(support)
            for support in supports:
                t_cpu, t_wall = time.process_time(), time.perf_counter()
                adapted_by.fit_support(support)
                cpu.append((time.process_time() - t_cpu) * 1e3)
                wall.append((time.perf_counter() - t_wall) * 1e3)
        rows.append({"backend": backend or "learn2learn", "median_ms": float(np.median(cpu)),
                     "p90_ms": _percentile(cpu, 90), "wall_median_ms": float(np.median(wall)),
                     "wall_p90_ms": _percentile(wall, 90)})
    traces = [len(s) for s in supports]
    return {"k": a.k, "draws": a.draws, "support_traces": float(np.mean(traces)),
            "support_probes": float(np.mean([sum(t.n_probes for t in s) for s in supports])),
            "inner_steps": adapter.inner_steps, "algorithm": adapter.algorithm, "rows": rows}


def run_decision(cfg: BenchmarkConfig, adapter, corpus, hidden_size: int) -> dict:
    """ms per probe: featurize (from a window of generation states) + StopRule(every) on the row so far."""
    from maml_stop.live.rule import StopRule
    from maml_stop.probe.features import ProbeFeaturizer

    names = list(corpus.feature_names)
    per_family = -(-cfg.decision.traces // len(corpus.families))  # ceil: the traces spread over the families
    traces = [t for f in corpus.families for t in corpus.traces(f)[:per_family]][: cfg.decision.traces]
    featurizer = ProbeFeaturizer(hidden_size, proj_dim=32)
    rule = StopRule(names, adapter.predictor, tau=float("inf"), mode="every")  # never stops: every probe decided
    g = torch.Generator().manual_seed(0)
    state = featurizer.new_state(1)
    window = torch.randn(8, hidden_size, generator=g)  # (steps, H) stand-in hidden states of one window
    rows0 = torch.zeros(1, dtype=torch.long)

    def decide_trace(trace) -> int:
        row = rule.new_row()
        for i, stored in enumerate(trace.features):
            featurizer.observe(state, rows0, window[i % 8 : i % 8 + 1], torch.ones(1))  # one token of the window
            featurizer.probe_features(state, 0, "42", [-0.1, -0.2], 32 * (i + 1))  # (F,) the features
            vec = np.asarray(stored, dtype=np.float32)
            rule.before_answer(row, vec)
            rule.after_answer(row, vec)  # predictor on the row's probes so far, then the threshold
        return len(trace.features)

    for t in traces[:3]:
        decide_trace(t)  # warm-up
    start = time.process_time()
    probes = sum(decide_trace(t) for t in traces)
    seconds = time.process_time() - start
    return {"traces": len(traces), "probes": probes, "ms_per_probe": seconds * 1e3 / max(probes, 1),
            "probes_per_trace": probes / max(len(traces), 1), "hidden_size": hidden_size}


def run_corpus_load(path: str):
    from maml_stop.data.corpus import TraceCorpus

    # timed without tracemalloc (tracing every allocation slowed the load several-fold), then loaded again
    # under tracemalloc for the peak of Python allocations
    start, cpu = time.perf_counter(), time.process_time()
    corpus = TraceCorpus.load(path)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    tracemalloc.start()
    TraceCorpus.load(path)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    info = {"path": path, "seconds": seconds, "cpu_seconds": cpu_seconds, "traces": len(corpus),
            "families": len(corpus.families), "python_peak_mib": peak / 2**20}
    return corpus, info


def run_evaluate(cfg: BenchmarkConfig) -> dict:
    import bench_evaluate

    e = cfg.evaluate
    return bench_evaluate.measure(e.traces, e.probes, e.episodes, k=list(e.k), methods=e.methods)


# -- report ----------------------------------------------------------------------------------------------
def target_lines(results: dict, targets: Targets) -> list[str]:
    lines = []
    adapt = results.get("adaptation")
    if adapt:
        for r in adapt["rows"]:
            ok = r["median_ms"] <= targets.adapt_ms
            lines.append(f"{'PASS' if ok else 'FAIL'} adaptation ({r['backend']}): median {r['median_ms']:.2f} ms "
                         f"(p90 {r['p90_ms']:.2f}) for K={adapt['k']} <= {targets.adapt_ms:g} ms")
    dec = results.get("decision")
    if dec:
        ok = dec["ms_per_probe"] <= targets.decision_ms
        lines.append(f"{'PASS' if ok else 'FAIL'} decision: {dec['ms_per_probe']:.3f} ms per probe on one core "
                     f"<= {targets.decision_ms:g} ms")
    live = {(r["mode"], r["fires"]): r for r in (results.get("generation") or {}).get("live", [])}
    free = live.get(("free", False))
    if free and "cpu_ratio" in free:
        ok = free["cpu_ratio"] <= targets.live_free_ratio
        lines.append(f"{'PASS' if ok else 'FAIL'} live free mode, never firing: {free['cpu_ratio']:.3f}x the CPU time "
                     f"of plain generate() (median of {free['rounds']} rounds; wall {free['ratio']:.3f}x) "
                     f"<= {targets.live_free_ratio:g}x")
    return lines


_LOCAL_PATH = re.compile(r"(?<![\w.~-])/(?:[^\s/`'\"]+/)+([^\s/`'\"]+)")


def no_machine_paths(text: str) -> str:
    """``text`` with each absolute path shown as its last part (``/x/models/qwen05`` -> ``<qwen05>``): a
    committed report names no folder of the machine it ran on (issue 31); results.json keeps the path."""
    return _LOCAL_PATH.sub(lambda m: f"<{m.group(1)}>", text)


def migrate_results(results: dict) -> dict:
    """``results`` (a benchmark.json) in today's keys: a file written before issue 31 names K ``shots``
    (``settings.evaluate`` and ``evaluate``); a copy with ``k`` in its place, so every committed file renders."""
    results = copy.deepcopy(results)
    for block in (results.get("settings", {}).get("evaluate"), results.get("evaluate")):
        if isinstance(block, dict) and "shots" in block and "k" not in block:
            block["k"] = block.pop("shots")
    return results


def render_markdown(results: dict) -> str:
    results = migrate_results(results)
    env = results["environment"]
    out = ["# Benchmark (experiments/benchmark.py)", "",
           f"Command: `{no_machine_paths(env['command'])}`  ", f"Machine: {env['machine']}; torch {env['torch']}, "
           f"{env['threads']} thread(s), device {env['device']}, load average at start {env['load_average']}  ",
           f"Generation model: {no_machine_paths(str(env['model']))} ({env['dtype']})  "]
    if env.get("note"):
        out.append(f"Note: {env['note']}  ")
    out += ["", "## Targets", ""] + [f"- {line}" for line in results["targets"]] + [""]
    gen = results.get("generation")
    if gen:
        g = results["settings"]["generation"]
        out += ["## Probing overhead against plain `model.generate()` (wall time, same run)", "",
                f"{g['n']} {g['family']} prompts, {g['max_new_tokens']} new tokens, a probe every {g['every_n']} "
                f"tokens; live: one batch, firing runs stop at probe point {g['stop_at']}.", "",
                "| run | seconds | ratio | tokens | tokens/s | traces/s | forced answers | rows stopped |",
                "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in gen["harvest"]:
            out.append(f"| harvest: {r['run']} | {r['seconds']:.2f} | {r['ratio']:.2f}x | {r['tokens']} "
                       f"| {r['tokens_per_s']:.1f} | {r['traces_per_s']:.3f} | | |")
        live = gen["live"]
        if live and "cpu_ratio" not in live[0]:  # a file written before the CPU-time columns
            for r in live:
                stopped = "" if r["stopped"] is None else r["stopped"]
                out.append(f"| live: {r['run']} | {r['seconds']:.2f} | {r['ratio']:.2f}x | {r['tokens']} "
                           f"| {r['tokens'] / r['seconds']:.1f} | | {r['forced']} | {stopped} |")
        out.append("")
        if live and "cpu_ratio" in live[0]:
            out += [f"Live stopping: one batch, {live[0]['rounds']} interleaved round(s) of every run; the ratios are "
                    "medians over rounds of each run's time over that round's plain `generate()`. CPU time "
                    "(`time.process_time`, one thread) is what this process needed; wall time also counts what "
                    "other processes on the machine took.", "",
                    "| live run | wall s | wall ratio | CPU s | CPU ratio | tokens | forced answers | rows stopped |",
                    "|---|---:|---:|---:|---:|---:|---:|---:|"]
            for r in live:
                stopped = "" if r["stopped"] is None else r["stopped"]
                out.append(f"| {r['run']} | {r['seconds']:.2f} | {r['ratio']:.2f}x | {r['cpu_seconds']:.2f} "
                           f"| {r['cpu_ratio']:.3f}x | {r['tokens']} | {r['forced']} | {stopped} |")
            out.append("")
    meta = results.get("meta")
    if meta:
        m = results["settings"]["meta"]
        out += ["## Meta-training speed (CPU time, best round)", "",
                f"{len(meta['families'])} families, {meta['n_features']} features, {meta['probes_per_trace']:.1f} "
                f"probes/trace; meta-batch {m['meta_batch']}, K={m['k']}, Q={m['q']}, {m['inner_steps']} inner steps, "
                f"MLP {m['depth']}x{m['hidden']}; episode sampling + collation {meta['sampling_ms']:.2f} ms per "
                f"meta-batch; backend field in AdapterConfig: {'yes' if meta['backend_field'] else 'no (learn2learn only)'}.",
                "", "| kind | algorithm | order | backend | meta-steps/s | step only | loop | adapt ms |",
                "|---|---|---|---|---:|---:|---:|---:|"]
        for r in meta["rows"]:
            out.append(f"| {r['kind']} | {r['algorithm']} | {r['order']} | {r['backend']} | {r['meta_steps_per_s']:.1f} "
                       f"| {r['step_only_per_s']:.1f} | {r['loop_per_s']:.1f} | {r['adapt_ms']:.2f} |")
        out.append("")
    adapt = results.get("adaptation")
    if adapt:
        out += ["## Adaptation latency (`InnerLoopAdapter.fit_support`, no_grad, one thread)", "",
                f"{adapt['draws']} support sets of K={adapt['k']} questions ({adapt['support_traces']:.1f} traces, "
                f"{adapt['support_probes']:.0f} probes on average) of {results['environment']['corpus']}; "
                f"{adapt['predictor']}; {adapt['algorithm']}, {adapt['inner_steps']} inner steps.", "",
                "| backend | median ms (CPU) | p90 ms (CPU) | median ms (wall) | p90 ms (wall) |", "|---|---:|---:|---:|---:|"]
        for r in adapt["rows"]:
            out.append(f"| {r['backend']} | {r['median_ms']:.2f} | {r['p90_ms']:.2f} | {r['wall_median_ms']:.2f} "
                       f"| {r['wall_p90_ms']:.2f} |")
        out.append("")
    other = []
    dec = results.get("decision")
    if dec:
        other.append(f"| live decision per probe (features -> predictor -> threshold, one core; {dec['probes']} probes "
                     f"of {dec['traces']} traces, hidden size {dec['hidden_size']}) | {dec['ms_per_probe']:.3f} ms |")
    corpus = results.get("corpus")
    if corpus:
        cpu = f", CPU {corpus['cpu_seconds']:.2f} s" if "cpu_seconds" in corpus else ""
        other.append(f"| corpus load ({corpus['traces']} traces, {corpus['families']} families) | {corpus['seconds']:.2f} s"
                     f"{cpu} (Python peak {corpus['python_peak_mib']:.0f} MiB, measured in a second load) |")
    ev = results.get("evaluate")
    if ev:
        other.append(f"| evaluation per episode ({len(ev['methods'])} methods, K in {ev['k']}, cross-fitting, "
                     f"synthetic corpus, report included) | {ev['seconds_per_episode']:.2f} s |")
    mem = results["memory"]
    other.append(f"| peak resident memory (after each section: "
                 f"{', '.join(f'{k} {v:.0f}' for k, v in mem['peak_rss_mib_after'].items())} MiB) | "
                 f"{max(mem['peak_rss_mib_after'].values(), default=0):.0f} MiB |")
    if mem.get("cuda_peak_mib") is not None:
        other.append(f"| CUDA peak allocated | {mem['cuda_peak_mib']:.0f} MiB |")
    if results.get("evalspeed"):
        import bench_evalspeed

        out += bench_evalspeed.markdown(results["evalspeed"])
    out += ["## Other figures", "", "| what | value |", "|---|---:|"] + other + [""]
    return "\n".join(out)


# -- main ------------------------------------------------------------------------------------------------
def run(cfg: BenchmarkConfig, model_dir: str | None, device: str, sections: tuple[str, ...], note: str = "",
        command: str = "", on_section=None) -> dict:
    """Every section of ``sections``; ``on_section(results, name)`` is called after each (partial results)."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(0)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: no CUDA device is available to torch {torch.__version__}")
    results: dict[str, Any] = {
        "environment": {"command": command, "model": model_dir, "dtype": cfg.dtype, "device": device,
                        "threads": torch.get_num_threads(), "torch": torch.__version__,
                        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                        "load_average": round(os.getloadavg()[0], 2), "corpus": cfg.corpus, "note": note},
        "settings": dataclasses.asdict(cfg), "memory": {"peak_rss_mib_after": {}}}
    mem = results["memory"]["peak_rss_mib_after"]
    started = time.perf_counter()
    # import every section's code first: a broken import fails now, not after the long generation part
    import bench_evaluate  # noqa: F401
    import benchmark_harvest  # noqa: F401
    import benchmark_live  # noqa: F401
    import benchmark_meta  # noqa: F401
    from maml_stop.evaluate import protocol  # noqa: F401
    from maml_stop.live import rule  # noqa: F401

    def done(section: str) -> None:  # keep what is measured so far (a later failure loses nothing)
        results["seconds"] = time.perf_counter() - started
        results["targets"] = target_lines(results, cfg.targets)
        if on_section is not None:
            on_section(results, section)
    hidden_size = 896
    if "generation" in sections:
        model, tok, described = load_generation_model(model_dir, cfg.dtype, device)
        results["environment"]["model"] = described
        hidden_size = model.config.hidden_size
        log.info("generation on %s", described)
        results["generation"] = run_generation(cfg, model, tok)
        del model
        mem["generation"] = peak_rss_mib()
        done("generation")
    corpus = None
    if {"corpus", "meta", "adaptation", "decision", "evalspeed"} & set(sections):
        corpus, info = run_corpus_load(cfg.corpus)
        if "corpus" in sections:
            results["corpus"] = info
        mem["corpus"] = peak_rss_mib()
        done("corpus")
        hidden_size = int(corpus.meta.get("features", {}).get("hidden_size", hidden_size))
        by_family = {f: corpus.traces(f) for f in corpus.families}
    if "meta" in sections:
        results["meta"] = run_meta(cfg, by_family)
        mem["meta"] = peak_rss_mib()
        done("meta")
    if {"adaptation", "decision", "evalspeed"} & set(sections):
        adapter, described = load_adapter(cfg.checkpoint, corpus)
        if "adaptation" in sections:
            results["adaptation"] = {**run_adaptation(cfg, adapter, by_family), "predictor": described}
            mem["adaptation"] = peak_rss_mib()
            done("adaptation")
        if "decision" in sections:
            results["decision"] = {**run_decision(cfg, adapter, corpus, hidden_size), "predictor": described}
            mem["decision"] = peak_rss_mib()
            done("decision")
    if "evalspeed" in sections:
        import bench_evalspeed

        results["evalspeed"] = bench_evalspeed.measure(cfg.evalspeed, corpus, adapter, described)
        mem["evalspeed"] = peak_rss_mib()
        done("evalspeed")
    if "evaluate" in sections:
        results["evaluate"] = run_evaluate(cfg)
        mem["evaluate"] = peak_rss_mib()
        done("evaluate")
    results["memory"]["cuda_peak_mib"] = (torch.cuda.max_memory_allocated() / 2**20
                                          if device.startswith("cuda") else None)
    results["targets"] = target_lines(results, cfg.targets)
    results["seconds"] = time.perf_counter() - started
    return results


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="settings (default experiments/benchmark.yaml)")
    p.add_argument("--model", default=None, help="a local model folder (default: the tiny local model)")
    p.add_argument("--quick", action="store_true", help="the YAML's quick: sizes (seconds, for tests)")
    p.add_argument("--out", default="experiments/results/benchmark")
    p.add_argument("--device", default="cpu", help="where the generation model and its tensors live (cpu, cuda)")
    p.add_argument("--dtype", default=None, help="of the generation model (default: the YAML's)")
    p.add_argument("--corpus", default=None, help="overrides the YAML's corpus")
    p.add_argument("--checkpoint", default=None, help="overrides the YAML's checkpoint ('' or none: fresh predictor)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {', '.join(SECTIONS)}")
    p.add_argument("--note", default="", help="recorded in the output (e.g. what else ran on the machine)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sections = tuple(s for s in args.sections.split(",") if s)
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        raise SystemExit(f"unknown sections {bad}; valid: {', '.join(SECTIONS)}")
    cfg = BenchmarkConfig.load(args.config, quick=args.quick)
    if args.dtype:
        cfg.dtype = args.dtype
    if args.corpus:
        cfg.corpus = args.corpus
    if args.checkpoint is not None:
        cfg.checkpoint = "" if args.checkpoint.lower() == "none" else args.checkpoint
    command = "python experiments/benchmark.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def write(results: dict, section: str | None) -> None:
        results["complete"] = section is None
        (out / "benchmark.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
        (out / "benchmark.md").write_text(render_markdown(results) + "\n")
        if section is not None:
            log.info("%s done (%.0f s so far); partial results in %s", section, results["seconds"], out)

    results = run(cfg, args.model, args.device, sections, args.note, command.strip(), on_section=write)
    write(results, None)
    print(render_markdown(results))
    return results


if __name__ == "__main__":
    main()
