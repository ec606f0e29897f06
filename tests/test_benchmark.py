"""experiments/benchmark.py --quick on the tiny local model and the tiny corpus writes benchmark.json and
benchmark.md with every section, the measured ratios and the PASS/FAIL target lines (issue 15)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _benchmark_module():
    from experiment_scripts import load_script

    return load_script("benchmark")


def test_settings_merge_the_quick_block_and_refuse_unknown_keys(tmp_path):
    bench = _benchmark_module()
    full = bench.BenchmarkConfig.load(ROOT / "experiments" / "benchmark.yaml")
    quick = bench.BenchmarkConfig.load(ROOT / "experiments" / "benchmark.yaml", quick=True)
    assert full.adaptation.k == quick.adaptation.k == 16  # the target's K, also in the quick run
    assert quick.generation.max_new_tokens < full.generation.max_new_tokens
    assert quick.generation.family == full.generation.family  # untouched keys kept under a merged block
    bad = tmp_path / "bad.yaml"
    bad.write_text("meta: {k: 4, inner_stps: 2}\n")
    with pytest.raises(ValueError, match=r"benchmark.meta: unknown settings \['inner_stps'\]; valid: .*inner_steps"):
        bench.BenchmarkConfig.load(bad)


def test_target_lines_pass_and_fail_on_the_thresholds():
    bench = _benchmark_module()
    targets = bench.Targets(adapt_ms=50.0, decision_ms=1.0)
    results = {"adaptation": {"k": 16, "rows": [{"backend": "learn2learn", "median_ms": 50.0, "p90_ms": 70.0},
                                                {"backend": "torch_func", "median_ms": 50.5, "p90_ms": 51.0}]},
               "decision": {"ms_per_probe": 1.2}}
    lines = bench.target_lines(results, targets)
    assert [line.split()[0] for line in lines] == ["PASS", "FAIL", "FAIL"]
    assert "learn2learn" in lines[0] and "K=16" in lines[0] and "1.200 ms per probe" in lines[2]



@pytest.mark.slow  # about 15-30 s: torch, transformers and reasoning-gym imports in a subprocess
def test_quick_benchmark_writes_every_section_and_the_targets(tiny_corpus, tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "benchmark.py"), "--quick", "--out", str(out),
         "--corpus", tiny_corpus, "--checkpoint", "none"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "benchmark.json").read_text())
    md = (out / "benchmark.md").read_text()
    for section in ("generation", "meta", "adaptation", "decision", "corpus", "evaluate", "memory", "targets"):
        assert section in res, section
    assert "tests/tiny_lm.py" in res["environment"]["model"] and "not a real model" in md
    # probing overhead: plain generate() is the base of each ratio, every live mode never firing and firing
    live = res["generation"]["live"]
    assert live[0]["run"] == "plain generate()" and live[0]["ratio"] == 1.0
    assert {(r["mode"], r["fires"]) for r in live[1:]} == {(m, f) for m in ("every", "free", "gated") for f in (False, True)}
    assert all(r["stopped"] == 2 for r in live[1:] if r["fires"])  # the firing runs stop both rows
    assert all(r["tokens"] < live[0]["tokens"] for r in live[1:] if r["fires"])
    harvest = {r["run"]: r for r in res["generation"]["harvest"]}
    assert harvest["plain generate()"]["ratio"] == 1.0 and any(k.startswith("cached probes") for k in harvest)
    rows = res["generation"]["harvest"]  # ratios to the plain run of the same section
    assert all(abs(r["ratio"] - r["seconds"] / rows[0]["seconds"]) < 1e-9 for r in rows)
    # live: interleaved rounds, ratios (wall and CPU) are medians of per-round ratios; plain is 1.0 in both
    assert all(r["rounds"] == 2 and r["cpu_seconds"] > 0 and r["cpu_ratio"] > 0 for r in live)
    assert live[0]["cpu_ratio"] == 1.0
    assert any(line.startswith(("PASS live free mode", "FAIL live free mode")) for line in res["targets"])
    assert "| live run | wall s | wall ratio | CPU s | CPU ratio |" in md
    # meta-steps/s per algorithm and backend
    got = {(r["algorithm"], r["order"]) for r in res["meta"]["rows"]}
    assert got == {("maml", "first"), ("maml", "second"), ("anil", "second"), ("metasgd", "second")}
    assert all(r["meta_steps_per_s"] > 0 for r in res["meta"]["rows"])
    backends = {r["backend"] for r in res["meta"]["rows"]}
    assert "learn2learn" in backends and (len(backends) == 2) == res["meta"]["backend_field"]
    # adaptation latency, decision overhead, corpus load, evaluation, memory
    adapt = res["adaptation"]
    assert adapt["k"] == 16 and all(0 < r["median_ms"] <= r["p90_ms"] for r in adapt["rows"])
    assert "fresh predictor" in adapt["predictor"]
    assert res["decision"]["probes"] > 0 and res["decision"]["ms_per_probe"] > 0
    assert res["corpus"]["traces"] == 180 and res["corpus"]["seconds"] > 0
    assert res["evaluate"]["seconds_per_episode"] > 0 and res["evaluate"]["k"] == [4]
    assert max(res["memory"]["peak_rss_mib_after"].values()) > 0
    # targets: one adaptation line per backend, the decision line and the live free mode's line, PASS or
    # FAIL against the numbers
    lines = res["targets"]
    assert len(lines) == len(adapt["rows"]) + 2
    for r, line in zip(adapt["rows"], lines):
        assert line.startswith("PASS" if r["median_ms"] <= 50 else "FAIL") and "<= 50 ms" in line
    assert lines[-2].startswith("PASS" if res["decision"]["ms_per_probe"] <= 1 else "FAIL") and "<= 1 ms" in lines[-2]
    free = next(r for r in live if r["mode"] == "free" and not r["fires"])
    assert lines[-1].startswith("PASS" if free["cpu_ratio"] <= 1.05 else "FAIL") and "<= 1.05x" in lines[-1]
    for line in lines:
        assert line in md
    for heading in ("## Targets", "## Probing overhead", "## Meta-training speed", "## Adaptation latency",
                    "## Other figures"):
        assert heading in md


@pytest.mark.parametrize("path", sorted((ROOT / "experiments" / "results").glob("benchmark*/benchmark.json")),
                         ids=lambda p: p.parent.name)
def test_every_committed_benchmark_json_renders(path):
    """A benchmark.json of before issue 31 (K named ``shots``) renders in today's keys, its K column kept."""
    bench = _benchmark_module()
    results = json.loads(path.read_text())
    md = bench.render_markdown(results)
    assert md.startswith("# Benchmark (experiments/benchmark.py)")
    ev = results.get("evaluate")
    if ev:
        assert f"K in {ev.get('k', ev.get('shots'))}" in md
    assert results == json.loads(path.read_text())  # the reader changes a copy, not the caller's dict
