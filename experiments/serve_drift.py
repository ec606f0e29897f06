"""Live drift through ``maml-stop serve`` (issue 27, "Done when"): a stream of questions from three
families with family switches, served with live stopping and gold feedback on the service's feedback runs
(``online.sample_rate``: 20%); does the served EM come back to the full runs' EM within the window?

    .venv/bin/python experiments/serve_drift.py --config experiments/serve_drift.yaml     # the real model
    .venv/bin/python experiments/serve_drift.py --tiny --segment 8                        # a smoke run

It adapts the artifact on the first family when ``artifact`` does not exist (``maml-stop adapt``'s
road: ``checkpoint``, ``corpus``, K, ``em_target`` at delta), starts ``maml-stop serve --config
<serve_config>`` on a loopback port, streams ``segment`` questions of each family (the families' own
generators, test split, seeded) from ``concurrency`` clients, and sends the gold answer of every
request the service asks feedback for. Each answer is scored by its own family's checker. Written to
``out``: ``results.json`` (every request: family, plan, EM, tokens, tau, fallback), ``report.md`` (per
segment: served EM, the feedback runs' full-generation EM, tokens per request, share stopped early and in
fallback; per switch: the first request after which the rolling served EM is within delta of the rolling
full EM), ``recovery.png`` (the rolling served EM against the feedback runs' full EM over the stream, the
switches marked, tau and fallback under it) and ``dashboard.png`` (headless Chromium, when installed).
``--report_only out/results.json`` rebuilds report.md and recovery.png from a finished run's file. ``--tiny``
runs the tiny local model of tests/tiny_lm.py on a corpus harvested here: it checks the road, its figures mean
nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "experiments"), str(ROOT / "tests")]

from benchmark_serve import server, tiny_setup  # noqa: E402


@dataclass(frozen=True)
class StreamConfig:
    families: tuple[str, ...] = ("gcd", "gsm_symbolic", "letter_counting")  # one segment each, in order
    segment: int = 200  # questions per family
    seed: int = 0
    concurrency: int = 8  # closed-loop clients
    window: int = 50  # requests of the rolling EM in the recovery figure


@dataclass(frozen=True)
class ServeDriftConfig:
    """experiments/serve_drift.yaml."""

    serve_config: str = "experiments/serve.yaml"  # the service's own YAML (model, corpus, online, batch)
    model: str | None = None  # overrides the serve YAML's (offline: the folder of scripts/fetch_models.sh)
    artifact: str = "runs/serve_drift/artifact.pt"  # adapted on the first family when absent
    checkpoint: str = "runs/main/checkpoints/best.ckpt"
    corpus: str = "experiments/corpus/qwen05"
    k: int = 16
    delta: float = 0.05  # EM-drop target of the adaptation and of the recovery figure
    out: str = "experiments/results/serve_drift"
    stream: StreamConfig = field(default_factory=StreamConfig)

    @classmethod
    def load(cls, path: str | Path | None, **overrides) -> "ServeDriftConfig":
        raw = (yaml.safe_load(Path(path).read_text()) or {}) if path else {}
        stream = raw.pop("stream", {}) or {}
        for key in list(overrides):
            if key in {f.name for f in fields(StreamConfig)} and overrides[key] is not None:
                stream[key] = overrides.pop(key)
        raw.update({k: v for k, v in overrides.items() if v is not None})
        for kind, got in ((cls, raw), (StreamConfig, stream)):
            unknown = sorted(set(got) - {f.name for f in fields(kind)} - ({"stream"} if kind is cls else set()))
            if unknown:
                raise ValueError(f"{path}: unknown keys {unknown} for {kind.__name__}; valid: "
                                 f"{sorted(f.name for f in fields(kind))}")
        if "families" in stream:
            stream["families"] = tuple(stream["families"])
        return cls(**raw, stream=StreamConfig(**stream))


def make_artifact(cfg: ServeDriftConfig) -> str:
    from maml_stop.live.adapt import adapt, save_adapted

    if not Path(cfg.artifact).is_file():
        adapted = adapt(cfg.checkpoint, cfg.stream.families[0], cfg.k, corpus=cfg.corpus, delta=cfg.delta)
        save_adapted(adapted, cfg.artifact)
    return cfg.artifact


async def stream(port: int, questions: list, concurrency: int) -> list[dict]:
    import httpx

    from tasks import get_family

    rows: list[dict | None] = [None] * len(questions)
    order = list(range(len(questions)))[::-1]

    async def client(c: httpx.AsyncClient) -> None:
        while order:
            i = order.pop()
            q = questions[i]
            body = (await c.post("/v1/completions", json={"prompt": q.question})).raise_for_status().json()
            m = body["maml_stop"]
            em = bool(get_family(q.family).score(body["choices"][0]["text"], q))
            if m["feedback_requested"]:
                (await c.post("/feedback", json={"request_id": body["id"], "gold": q.gold})).raise_for_status()
            rows[i] = {"i": i, "family": q.family, "plan": m["served_by"], "em": em, "tokens": body["usage"]["completion_tokens"],
                       "stopped_early": m["stopped_early"], "fallback": m["fallback"], "tau": m["tau"]}

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=3600) as c:
        await asyncio.gather(*(client(c) for _ in range(concurrency)))
    return rows


def corpus_reference(cfg: ServeDriftConfig) -> dict[str, dict]:
    """Per family of the stream, the model's full-generation EM on the corpus's traces of it (``cfg.corpus``,
    every split; the harvest's token cap): a reference of hundreds of runs beside the stream's few feedback
    runs per window. Empty where the corpus lacks a family."""
    from maml_stop.data.corpus import TraceCorpus

    corpus = TraceCorpus.load(cfg.corpus, families=list(cfg.stream.families), min_probes=0)
    return {f: {"full_em": float(np.mean([t.final_em for t in corpus.traces(f)])), "traces": len(corpus.traces(f))}
            for f in cfg.stream.families if f in corpus.families}


def _within(served: np.ndarray, ref: np.ndarray, delta: float) -> dict:
    ok = ~np.isnan(ref)
    gap = served[ok] - ref[ok]
    return {"windows": int(ok.sum()), "share_within": float(np.mean(gap >= -delta)) if ok.any() else None,
            "worst_gap": float(gap.min()) if ok.any() else None}


def report(rows: list[dict], cfg: ServeDriftConfig, reference: dict[str, dict] | None = None) -> dict:
    """Per segment and per switch the figures of report.md; with ``reference`` (:func:`corpus_reference`)
    each window is also compared with the corpus's full-generation EM of its requests' families."""
    reference = reference or {}
    s = cfg.stream
    seg = []
    for j, fam in enumerate(s.families):
        part = rows[j * s.segment:(j + 1) * s.segment]
        full = [r["em"] for r in part if r["plan"] == "feedback"]
        taus = [r["tau"] for r in part if r["tau"] is not None]
        seg.append({"family": fam, "served_em": float(np.mean([r["em"] for r in part])),
                    "full_em_feedback_runs": float(np.mean(full)) if full else None, "n_feedback_runs": len(full),
                    "tokens_per_request": float(np.mean([r["tokens"] for r in part])),
                    "stopped_early": float(np.mean([r["stopped_early"] for r in part])),
                    "fallback": float(np.mean([r["fallback"] for r in part])),
                    "corpus_full_em": reference.get(fam, {}).get("full_em"),
                    "tau_range": [min(taus), max(taus)] if taus else None})
    served, full, _ = rolling(rows, s.window)
    ref = rolling_reference(rows, s.window, reference)
    windows = {"feedback_runs": _within(served, full, cfg.delta), "corpus": _within(served, ref, cfg.delta)}

    def first_within(start: int, target: np.ndarray) -> int | None:
        """The first n in window..segment whose window rows[start + n - window:start + n] is within delta."""
        ns = np.arange(s.window, s.segment + 1)
        at = start + ns - s.window  # the index of that window in the rolling arrays
        ok = served[at] >= target[at] - cfg.delta  # nan (no feedback run in the window) is never within
        return int(ns[ok.argmax()]) if ok.any() else None

    switches = []
    for j in range(1, len(s.families)):
        start = j * s.segment
        switches.append({"to": s.families[j], "recovered_after": first_within(start, full),
                         "recovered_after_corpus": first_within(start, ref) if s.families[j] in reference else None})
    return {"segments": seg, "switches": switches, "windows": windows, "reference": reference}


def rolling(rows: list[dict], window: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per request n >= window: the served EM of the last ``window`` requests, the EM of the feedback runs
    (full generations) among them (nan where there is none) and their count."""
    em = np.array([r["em"] for r in rows], float)
    fb = np.array([r["plan"] == "feedback" for r in rows], bool)
    served, full, n_fb = [], [], []
    for n in range(window, len(rows) + 1):
        part, f = em[n - window:n], fb[n - window:n]
        served.append(part.mean())
        full.append(part[f].mean() if f.any() else np.nan)
        n_fb.append(int(f.sum()))
    return np.array(served), np.array(full), np.array(n_fb)


def rolling_reference(rows: list[dict], window: int, reference: dict[str, dict]) -> np.ndarray:
    """Per request n >= window (as :func:`rolling`): the corpus's full EM of the last ``window`` requests'
    families (nan where the reference lacks one of them)."""
    ref = np.array([reference.get(r["family"], {}).get("full_em", np.nan) for r in rows], float)
    return np.array([ref[n - window:n].mean() for n in range(window, len(rows) + 1)])


def plot_recovery(rows: list[dict], cfg: ServeDriftConfig, path: Path, reference: dict[str, dict] | None = None) -> None:
    """recovery.png: the rolling served EM against the rolling EM of the feedback runs (the full
    generations) over the stream, the family switches marked; under it tau and the fallback state."""
    from maml_stop.evaluate.report.plots import pyplot

    plt = pyplot()
    s = cfg.stream
    served, full, _ = rolling(rows, s.window)
    x = np.arange(s.window, len(rows) + 1)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 5.5), sharex=True, height_ratios=[3, 1.4])
    top.plot(x, served, label=f"served EM (rolling {s.window})", color="tab:blue")
    top.plot(x, full, label="full generation EM (feedback runs in the window)", color="tab:gray")
    top.fill_between(x, full - cfg.delta, full, color="tab:gray", alpha=0.15, label=f"within delta = {cfg.delta:g}")
    if reference:
        top.plot(x, rolling_reference(rows, s.window, reference), color="tab:green", ls="--",
                 label="full generation EM of the corpus's traces (the window's families)")
    for j, fam in enumerate(s.families):
        top.axvline(j * s.segment, color="k", lw=0.6, ls=":")
        top.text(j * s.segment + 3, 0.98, fam, va="top", fontsize=8, transform=top.get_xaxis_transform())
        bottom.axvline(j * s.segment, color="k", lw=0.6, ls=":")
    top.set_ylabel("EM")
    top.legend(fontsize=7, loc="lower right")
    i = np.arange(1, len(rows) + 1)
    bottom.plot(i, [r["tau"] if r["tau"] is not None else np.nan for r in rows], color="tab:orange", lw=0.9, label="tau")
    bottom.fill_between(i, 0, [1.0 if r["fallback"] else 0.0 for r in rows], color="tab:red", alpha=0.2,
                        step="mid", label="fallback (full generation)")
    bottom.set_ylim(0, 1)
    bottom.set_xlabel("request (stream order)")
    bottom.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out: Path, cfg: ServeDriftConfig, results: Path | None = None, model: str | None = None) -> None:
    """report.md and recovery.png in ``out`` from ``results`` (default: out/results.json); the heading names
    a local model folder by its last part (no machine path in a committed report)."""
    data = json.loads((results or out / "results.json").read_text())
    rows = data["requests"]
    reference = data.get("reference")
    if reference is None and not data.get("tiny") and Path(cfg.corpus).is_dir():
        reference = corpus_reference(cfg)  # a results.json of before the reference was stored
    figures = report(rows, cfg, reference)
    name = model or data.get("model") or cfg.serve_config
    name = Path(name).name if Path(name).is_absolute() else name
    s = cfg.stream
    plot_recovery(rows, cfg, out / "recovery.png", figures["reference"])
    lines = [f"# Live drift through maml-stop serve ({'tiny local model: checks the road only' if data.get('tiny') else name})",
             "", f"{len(rows)} requests: {s.segment} of each of {', '.join(s.families)} in that order, {s.concurrency} "
             f"clients, gold sent for every feedback run; rolling window {s.window}, delta {cfg.delta:g}.",
             "", "| family | served EM | full EM (feedback runs) | full EM (corpus traces) | tokens/request | stopped early | "
             "tau (min-max) | fallback |", "|---|---|---|---|---|---|---|---|"]
    ref = figures["reference"]
    for r in figures["segments"]:
        full = "n/a" if r["full_em_feedback_runs"] is None else f"{r['full_em_feedback_runs']:.3f} ({r['n_feedback_runs']})"
        corp = f"{ref[r['family']]['full_em']:.3f} ({ref[r['family']]['traces']})" if r["family"] in ref else "n/a"
        tau = "n/a" if r["tau_range"] is None else "{:.2f}-{:.2f}".format(*r["tau_range"])
        lines.append(f"| {r['family']} | {r['served_em']:.3f} | {full} | {corp} | {r['tokens_per_request']:.1f} | "
                     f"{r['stopped_early']:.2f} | {tau} | {r['fallback']:.2f} |")
    never = "never (within the segment)"
    lines += [""]
    for w in figures["switches"]:
        lines.append(f"- switch to {w['to']}: rolling served EM within {cfg.delta} of the feedback runs' full EM after "
                     f"{w['recovered_after'] if w['recovered_after'] is not None else never} requests, of the corpus's "
                     f"full EM after {w['recovered_after_corpus'] if w['recovered_after_corpus'] is not None else never}"
                     f" (window {s.window}; {s.window} is the first full window)")
    for key, what in (("feedback_runs", "the feedback runs' full EM in the same window"),
                      ("corpus", "the corpus's full EM of the window's families")):
        w = figures["windows"][key]
        if w["share_within"] is not None:
            lines.append(f"- every window of {s.window} requests against {what}: {100 * w['share_within']:.0f}% of "
                         f"{w['windows']} within {cfg.delta}, the worst {w['worst_gap']:+.3f}")
    lines += ["", "![rolling served EM against the feedback runs' full EM](recovery.png)"]
    if (out / "dashboard.png").is_file():
        lines += ["", "![the dashboard at the end of the stream](dashboard.png)"]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"written: {out}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None)
    p.add_argument("--tiny", action="store_true", help="the tiny local model (a smoke run of the road)")
    p.add_argument("--segment", type=int, default=None)
    p.add_argument("--model", default=None, help="the model (default: the serve YAML's)")
    p.add_argument("--out", default=None)
    p.add_argument("--report_only", default=None, metavar="RESULTS_JSON",
                   help="rebuild report.md and recovery.png from this results.json (with the --config it ran under)")
    args = p.parse_args(argv)
    cfg = ServeDriftConfig.load(args.config, segment=args.segment, out=args.out, model=args.model)
    if args.report_only:
        write_report(Path(args.report_only).parent, cfg, Path(args.report_only), model=args.model)
        return 0
    from tasks import get_family

    out = Path(cfg.out if not args.tiny or args.out else tempfile.mkdtemp(prefix="serve_drift_"))
    out.mkdir(parents=True, exist_ok=True)
    extra = ["--config", cfg.serve_config] if not args.tiny else []
    tmp = tempfile.TemporaryDirectory()
    if args.tiny:
        model_dir, artifact = tiny_setup(Path(tmp.name))
        extra += ["--corpus", str(Path(tmp.name) / "corpus"), "--online.sample_rate", "0.2"]
    else:
        model_dir, artifact = cfg.model, make_artifact(cfg)  # None: the serve YAML's model
    s = cfg.stream
    qs = [q for j, fam in enumerate(s.families) for q in get_family(fam).questions("test", s.segment, seed=s.seed + j)]
    db = out / "serve.sqlite"
    if db.exists():
        db.unlink()
    with server(model_dir, artifact, db, extra) as port:
        rows = asyncio.run(stream(port, qs, s.concurrency))
        shot = shutil.which("chromium-headless-shell") or shutil.which("chromium")
        if shot:
            subprocess.run([shot, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1100,760",
                            "--virtual-time-budget=4000", f"--screenshot={out / 'dashboard.png'}",
                            f"http://127.0.0.1:{port}/"], capture_output=True, timeout=120)
    reference = {} if args.tiny else corpus_reference(cfg)
    (out / "results.json").write_text(json.dumps({"config": str(args.config), "tiny": args.tiny,
                                                  "model": str(model_dir or cfg.serve_config),
                                                  **report(rows, cfg, reference), "requests": rows}, indent=1))
    write_report(out, cfg)
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
