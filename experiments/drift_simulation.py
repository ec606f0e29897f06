"""Online stopping under domain drift (issue 12): a request stream whose family switches several times.

    .venv/bin/python experiments/drift_simulation.py --config experiments/drift.yaml \
        [--checkpoint runs/main/checkpoints/best.ckpt] [--out experiments/results/drift]

The checkpoint is the main job's (``bash scripts/main.sh``, or ``maml-stop fit --config
experiments/quickstart.yaml --config experiments/main.yaml``, which writes runs/main/checkpoints/best.ckpt).
The stream draws requests (with replacement) from the held-out families of the bundled corpus, one
family per segment; the first family's K support traces (gold-labelled, as ``maml-stop adapt``) are
kept out of the stream. Four servers see the same stream:

* ``full``: plain full generation;
* ``frozen``: the predictor adapted on the K support traces, tau by ``em_target`` at delta, never updated;
* ``online_gold`` / ``online_agreement``: :class:`maml_stop.online.OnlineStopper` with gold or label-free
  feedback on a sampled share of requests (both start as ``frozen``).

For every request the script records what was served (EM, tokens) and the **true EM drop of the rule in
force** on the current family's whole pool (the population the stream draws from): the policy's drop
against full generation on every trace of the pool, times the share of requests it decides (0 in
fallback). Per switch: requests until that drop is back within delta (and until it is within delta
while stopping early). Then an online A/B test (:func:`maml_stop.online.run_ab`) of two servers on a
fresh stream with the same schedule. Writes ``report.md``, ``results.json`` and ``drift.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from maml_stop.data import store  # noqa: E402
from maml_stop.data.accounting import full_cost, savings, stop_cost  # noqa: E402
from maml_stop.data.corpus import Trace, TraceCorpus  # noqa: E402
from maml_stop.data.datamodule import select_features  # noqa: E402
from maml_stop.data.episodes import split_support_query  # noqa: E402
from maml_stop.decide.policies import ProbePolicy, evaluate_policy  # noqa: E402
from maml_stop.decide.registry import make_selector  # noqa: E402
from maml_stop.online import ABConfig, OnlineConfig, OnlineStopper, refuse_moved_keys, run_ab  # noqa: E402

log = logging.getLogger("drift_simulation")

SERVERS = ("full", "frozen", "online_gold", "online_agreement")
MAKE_IT = ("bash scripts/main.sh  (or: .venv/bin/maml-stop fit --config experiments/quickstart.yaml "
           "--config experiments/main.yaml)")


@dataclass(frozen=True)
class StreamConfig:
    """The request stream."""

    families: tuple[str, ...] = ("gcd", "gsm_symbolic", "letter_counting", "gsm_symbolic", "gcd")  # one per segment
    segment: int = 300  # requests per segment
    k: int = 16  # support questions of the first family (the initial K-shot adaptation)
    seed: int = 0


@dataclass(frozen=True)
class DriftConfig:
    """experiments/drift.yaml."""

    corpus: str = "experiments/corpus/qwen05"
    checkpoint: str = "runs/main/checkpoints/best.ckpt"
    out: str = "experiments/results/drift"
    stream: StreamConfig = field(default_factory=StreamConfig)
    online: OnlineConfig = field(default_factory=OnlineConfig)  # its feedback is set per server
    ab: ABConfig = field(default_factory=ABConfig)
    ab_pairs: tuple[tuple[str, str], ...] = (("online_gold", "frozen"),)  # (A, B) servers of each A/B test
    plot_window: int = 50  # requests of the rolling means in the plot

    @classmethod
    def load(cls, path: str | Path | None, **overrides: Any) -> "DriftConfig":
        raw = (yaml.safe_load(Path(path).read_text()) or {}) if path else {}
        raw.update({k: v for k, v in overrides.items() if v is not None})
        try:
            refuse_moved_keys(raw.get("online"))
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
        return _build(cls, raw, str(path))


def _build(kind, raw: dict, where: str):
    """A (nested) frozen dataclass from a YAML mapping; unknown keys are an error naming the valid ones."""
    names = {f.name: f for f in fields(kind)}
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown} for {kind.__name__}; valid: {sorted(names)}")
    args = {}
    for key, value in raw.items():
        default = names[key].default_factory() if names[key].default_factory is not dataclasses.MISSING else names[key].default
        if dataclasses.is_dataclass(default):
            value = _build(type(default), value or {}, f"{where}: {key}")
        elif isinstance(default, tuple):
            value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        args[key] = value
    return kind(**args)


# -- data ---------------------------------------------------------------------------------------------

def load_pools(cfg: DriftConfig, feature_names: list[str] | None) -> tuple[dict[str, list[Trace]], dict[str, str]]:
    families = sorted(set(cfg.stream.families))
    corpus = select_features(TraceCorpus.load(cfg.corpus, families), feature_names)
    table = store.read_table(cfg.corpus, families)
    finals = {tid: (ans or "") for tid, ans in zip(table.column("trace_id").to_pylist(),
                                                    table.column("final_answer").to_pylist())}
    return {f: list(corpus.traces(f)) for f in families}, finals


def make_stream(pools: dict[str, list[Trace]], cfg: StreamConfig, seed: int) -> list[Trace]:
    rng = np.random.default_rng(seed)
    out: list[Trace] = []
    for fam in cfg.families:
        pool = pools[fam]
        out += [pool[i] for i in rng.integers(0, len(pool), cfg.segment)]
    return out


# -- servers -----------------------------------------------------------------------------------------

class Frozen:
    """The K-shot adapted policy, never updated."""

    def __init__(self, policy: ProbePolicy) -> None:
        self.policy = policy

    def __call__(self, trace: Trace, final_answer: str | None = None) -> tuple[bool, int]:
        i = self.policy.stop_index(trace)
        return trace.stop_em(i), stop_cost(trace, i)[0]


def full_server(trace: Trace, final_answer: str | None = None) -> tuple[bool, int]:
    return bool(trace.final_em), full_cost(trace)


def online_server(stopper: OnlineStopper):
    def serve(trace: Trace, final_answer: str | None = None) -> tuple[bool, int]:
        s = stopper.serve(trace, final_answer)
        return s.em, s.total_tokens
    return serve


class PoolDrop:
    """True EM drop and savings of a (policy, tau) on a family's pool, cached."""

    def __init__(self, pools: dict[str, list[Trace]]) -> None:
        self.pools = pools
        self._cache: dict[tuple, tuple[float, float]] = {}

    def __call__(self, policy: ProbePolicy, tau: float | None, family: str) -> tuple[float, float]:
        key = (id(policy), tau, family)
        if key not in self._cache:
            if len(self._cache) > 4096:
                self._cache.clear()
            out = evaluate_policy(policy, self.pools[family], param=tau)
            self._cache[key] = (float(out.full_em.mean() - out.em.mean()),
                                float(savings(out.total_tokens.sum(), out.full_tokens.sum())))
        return self._cache[key]


def run_stream(cfg: DriftConfig, stream: list[Trace], finals: dict[str, str], frozen: ProbePolicy,
               stoppers: dict[str, OnlineStopper], pool_drop: PoolDrop) -> dict[str, dict[str, np.ndarray]]:
    """Serve the stream with every server; per request: em, tokens, true drop and savings of the rule in force."""
    rec = {name: {k: [] for k in ("em", "tokens", "drop", "policy_savings", "fallback", "feedback", "tau")}
           for name in SERVERS}
    for t in stream:
        fam = t.family
        em, tok = full_server(t)
        _append(rec["full"], em, tok, 0.0, 0.0, False, False, None)
        d, s = pool_drop(frozen, frozen.param, fam)
        em, tok = Frozen(frozen)(t)
        _append(rec["frozen"], em, tok, d, s, False, False, frozen.param)
        for name, st in stoppers.items():
            # the rule in force when this request arrives (decided before its feedback)
            d, s = pool_drop(st.policy, st.tau, fam)
            active = not (st.fallback or st.idle)
            share = 1.0 - st.config.sample_rate if active else 0.0
            served = st.serve(t, finals[t.trace_id])
            _append(rec[name], served.em, served.total_tokens, share * d, s if active else 0.0,
                    served.fallback or served.idle, served.feedback, served.tau)
    return {n: {k: np.asarray([np.nan if v is None else v for v in vals], dtype=np.float64) for k, vals in r.items()}
            for n, r in rec.items()}


def _append(r, em, tok, drop, sav, fallback, feedback, tau) -> None:
    for k, v in zip(("em", "tokens", "drop", "policy_savings", "fallback", "feedback", "tau"),
                    (float(em), float(tok), drop, sav, float(fallback), float(feedback), tau)):
        r[k].append(v)


def recovery(rec: dict[str, np.ndarray], cfg: DriftConfig) -> list[dict[str, Any]]:
    """Per switch: requests until the true drop of the rule in force is within delta (``within``), and
    until it is within delta while the policy decides and saves tokens (``within_saving``); None: not
    within the segment."""
    delta, seg = cfg.online.delta, cfg.stream.segment
    out = []
    for j in range(1, len(cfg.stream.families)):
        lo, hi = j * seg, (j + 1) * seg
        drop = rec["drop"][lo:hi]
        saving = (rec["fallback"][lo:hi] < 0.5) & (rec["policy_savings"][lo:hi] > 0.0)
        ok = drop <= delta + 1e-12
        first = np.flatnonzero(ok)
        first_saving = np.flatnonzero(ok & saving)
        out.append({"switch": j, "to": cfg.stream.families[j], "from": cfg.stream.families[j - 1],
                    "drop_at_switch": float(drop[0]),
                    "within": int(first[0]) if first.size else None,
                    "within_saving": int(first_saving[0]) if first_saving.size else None,
                    "share_within": float(ok.mean())})
    return out


def summary(recs: dict[str, dict[str, np.ndarray]], cfg: DriftConfig) -> dict[str, Any]:
    full = recs["full"]
    seg = cfg.stream.segment
    out: dict[str, Any] = {}
    for name, r in recs.items():
        per_segment = []
        for j, fam in enumerate(cfg.stream.families):
            sl = slice(j * seg, (j + 1) * seg)
            per_segment.append({"family": fam, "em": float(r["em"][sl].mean()),
                                "em_drop": float(full["em"][sl].mean() - r["em"][sl].mean()),
                                "savings": float(savings(r["tokens"][sl].sum(), full["tokens"][sl].sum())),
                                "mean_true_drop": float(r["drop"][sl].mean()),
                                "fallback_share": float(r["fallback"][sl].mean())})
        out[name] = {"em": float(r["em"].mean()), "em_drop": float(full["em"].mean() - r["em"].mean()),
                     "tokens": float(r["tokens"].sum()),
                     "savings": float(savings(r["tokens"].sum(), full["tokens"].sum())),
                     "share_within_delta": float((r["drop"] <= cfg.online.delta + 1e-12).mean()),
                     "feedback_share": float(r["feedback"].mean()), "fallback_share": float(r["fallback"].mean()),
                     "segments": per_segment}
        if name != "full":
            out[name]["recovery"] = recovery(r, cfg)
    return out


# -- outputs -----------------------------------------------------------------------------------------

def plot(recs: dict[str, dict[str, np.ndarray]], cfg: DriftConfig, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w = cfg.plot_window
    kernel = np.ones(w) / w
    fig, axes = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    for name, r in recs.items():
        x = np.arange(w - 1, len(r["em"]))
        axes[0].plot(x, np.convolve(r["em"], kernel, mode="valid"), label=name)
        axes[1].plot(x, np.convolve(r["tokens"], kernel, mode="valid"), label=name)
        axes[2].plot(np.arange(len(r["drop"])), 100 * r["drop"], label=name)
    axes[2].axhline(100 * cfg.online.delta, color="k", ls=":", label="delta")
    for ax in axes:
        for j in range(1, len(cfg.stream.families)):
            ax.axvline(j * cfg.stream.segment, color="grey", lw=0.8)
    seg = cfg.stream.segment
    for j, fam in enumerate(cfg.stream.families):
        axes[0].text(j * seg + 5, 1.02, fam, transform=axes[0].get_xaxis_transform(), fontsize=8)
    axes[0].set_ylabel(f"EM (rolling {w})")
    axes[1].set_ylabel(f"tokens / request (rolling {w})")
    axes[2].set_ylabel("true EM drop of the rule\nin force (points)")
    axes[2].set_xlabel("request")
    axes[0].legend(fontsize=8, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pct(x: float | None) -> str:
    return "n/a" if x is None or x != x else f"{100 * x:.1f}"


def report(results: dict[str, Any], cfg: DriftConfig) -> str:
    s, lines = results["servers"], []
    lines += ["# Online stopping under domain drift", "",
              f"Generated by `{results['command']}` ({results['wall_s']:.0f} s). Corpus `{cfg.corpus}`, checkpoint "
              f"`{results['checkpoint']}` (sha256 {results['checkpoint_sha256'][:12]}); stream: {' -> '.join(cfg.stream.families)}, {cfg.stream.segment} requests "
              f"each, K={cfg.stream.k} support traces of {cfg.stream.families[0]}; delta = {100 * cfg.online.delta:g} "
              f"points; feedback on {100 * cfg.online.sample_rate:g}% of requests; threshold `{cfg.online.rule}`; "
              f"monitor bound `{cfg.online.monitor.bound}` (alpha {cfg.online.monitor.alpha}, window "
              f"{cfg.online.monitor.window}).", "",
              "## Overall", "",
              "| server | EM | EM drop (points) | tokens saved % | requests with true drop <= delta % | feedback % | full generation served (fallback or idle) % |",
              "|---|---|---|---|---|---|---|"]
    for name in SERVERS:
        r = s[name]
        lines.append(f"| {name} | {r['em']:.3f} | {_pct(r['em_drop'])} | {_pct(r['savings'])} | "
                     f"{_pct(r['share_within_delta'])} | {_pct(r['feedback_share'])} | {_pct(r['fallback_share'])} |")
    st = results["stoppers"]
    lines += ["", "Tokens saved count every token, forced answers included, against full generation of the same "
              "requests; feedback requests run to their end with every probe. Monitor alarms: "
              + ", ".join(f"{n} {v['alarms']} ({v['refits']} re-adaptations, {v['feedback']} feedbacks)" for n, v in st.items())
              + ".", "",
              "## Per switch: requests until the true EM drop of the rule in force is within delta", "",
              "`within`: counting from the switch (0 = already within at the first request of the new family); "
              "`within, saving`: also deciding (not in fallback) with positive savings on the pool; "
              "`-`: not within this segment.", "",
              "| switch | server | drop at switch (points) | within | within, saving | share of segment within % |",
              "|---|---|---|---|---|---|"]
    for name in SERVERS[1:]:
        for rc in s[name]["recovery"]:
            lines.append(f"| {rc['from']} -> {rc['to']} | {name} | {_pct(rc['drop_at_switch'])} | "
                         f"{'-' if rc['within'] is None else rc['within']} | "
                         f"{'-' if rc['within_saving'] is None else rc['within_saving']} | {_pct(rc['share_within'])} |")
    lines += ["", "## Per segment", "", "| segment | server | EM | EM drop (points) | saved % | full generation served % |", "|---|---|---|---|---|---|"]
    for j, fam in enumerate(cfg.stream.families):
        for name in SERVERS:
            g = s[name]["segments"][j]
            lines.append(f"| {j + 1} {fam} | {name} | {g['em']:.3f} | {_pct(g['em_drop'])} | {_pct(g['savings'])} | "
                         f"{_pct(g['fallback_share'])} |")
    lines += ["", "## Online A/B", "",
              f"Each test on a fresh stream (same schedule, seed {cfg.stream.seed + 1}; at most "
              f"{cfg.ab.max_requests} requests), randomised blocks of two, reward = -({cfg.ab.token_price:g} x tokens + "
              f"{cfg.ab.wrong_answer_cost:g} x wrong answer), asymptotic confidence sequence (alpha {cfg.ab.alpha}, "
              f"t* = {cfg.ab.t_star} pairs) on the per-pair difference A - B.", "",
              "| A | B | verdict | requests at decision | mean reward A - B | sequence at stop | reward A | reward B |",
              "|---|---|---|---|---|---|---|---|"]
    for ab in results["ab"]:
        lines.append(f"| {ab['a']} | {ab['b']} | **{ab['verdict']}** | {ab['n_requests']} | {ab['mean_difference']:.4f} | "
                     f"[{ab['lower']:.4f}, {ab['upper']:.4f}] | {ab['reward_a']:.4f} | {ab['reward_b']:.4f} |")
    lines += ["", "A sequential test assumes a stationary stream: on this drifting one a verdict reached within "
              "the first segment speaks for the first family only.", "",
              "![EM, tokens and true EM drop over the stream](drift.png)", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="experiments/drift.yaml")
    p.add_argument("--checkpoint", default=None, help="meta-trained checkpoint (default: the config's)")
    p.add_argument("--out", default=None, help="output folder (default: the config's)")
    args = p.parse_args(argv)
    cfg = DriftConfig.load(args.config, checkpoint=args.checkpoint, out=args.out)
    bad = [n for pair in cfg.ab_pairs for n in pair if n not in SERVERS] + [p for p in cfg.ab_pairs if len(p) != 2]
    if bad:
        print(f"drift_simulation: ab_pairs must be pairs of {', '.join(SERVERS)}; got {bad}", file=sys.stderr)
        return 2
    if not Path(cfg.checkpoint).is_file():
        print(f"drift_simulation: no checkpoint at {cfg.checkpoint}; make the main job's with\n  {MAKE_IT}\n"
              "or pass --checkpoint PATH", file=sys.stderr)
        return 2
    from maml_stop.learn.module import load_predictor

    start = time.time()
    _, adapter, meta = load_predictor(cfg.checkpoint)
    steps = cfg.online.adapt_steps if cfg.online.adapt_steps is not None else (meta.get("hyper_parameters") or {}).get("eval_inner_steps")
    online = dataclasses.replace(cfg.online, adapt_steps=steps)
    pools, finals = load_pools(cfg, meta.get("feature_names"))
    first = cfg.stream.families[0]
    support, rest = split_support_query(pools[first], cfg.stream.k, None, np.random.default_rng(cfg.stream.seed), family=first)
    pools[first] = rest  # the support questions never come back in the stream

    def fresh_frozen() -> ProbePolicy:
        return ProbePolicy(adapter=adapter, selector=make_selector("em_target", delta=online.delta), taus=online.taus,
                           adapt_steps=steps, name="frozen").fit(support)

    def fresh_online(feedback: str, seed: int) -> OnlineStopper:
        return OnlineStopper(adapter, support, dataclasses.replace(online, feedback=feedback, seed=seed))

    frozen = fresh_frozen()
    log.info("frozen: tau %s on K=%d %s traces", frozen.param, cfg.stream.k, first)
    stream = make_stream(pools, cfg.stream, cfg.stream.seed)
    stoppers = {"online_gold": fresh_online("gold", online.seed), "online_agreement": fresh_online("agreement", online.seed)}
    recs = run_stream(cfg, stream, finals, frozen, stoppers, PoolDrop(pools))
    servers = summary(recs, cfg)
    log.info("stream done in %.0f s", time.time() - start)

    def server(name: str, seed: int):
        if name == "full":
            return full_server
        if name == "frozen":
            return Frozen(fresh_frozen())
        if name in ("online_gold", "online_agreement"):
            return online_server(fresh_online(name.split("_")[1], seed))
        raise ValueError(f"unknown A/B server {name!r}; valid: {', '.join(SERVERS)}")

    ab_stream = [(t, finals[t.trace_id]) for t in make_stream(pools, cfg.stream, cfg.stream.seed + 1)]
    ab_cfg = dataclasses.replace(cfg.ab, max_requests=min(cfg.ab.max_requests, len(ab_stream)))
    abs_ = []
    for a, b in cfg.ab_pairs:
        ab = run_ab(server(a, online.seed + 1), server(b, online.seed + 2), ab_stream, ab_cfg)
        abs_.append({"a": a, "b": b, **ab.to_dict()})
        log.info("A/B %s vs %s: %s after %d requests", a, b, ab.verdict, ab.n_requests)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    argv_text = " ".join(["python experiments/drift_simulation.py"] + list(sys.argv[1:] if argv is None else argv))
    results = {"command": argv_text, "wall_s": time.time() - start, "checkpoint": cfg.checkpoint,
               "checkpoint_sha256": hashlib.sha256(Path(cfg.checkpoint).read_bytes()).hexdigest(),
               "config": dataclasses.asdict(cfg), "frozen_tau": frozen.param, "servers": servers,
               "ab": abs_, "stoppers": {n: {"refits": st.n_refits, "feedback": st.n_feedback,
                                                    "alarms": st.monitor.alarms} for n, st in stoppers.items()}}
    plot(recs, cfg, out / "drift.png")
    (out / "results.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
    (out / "report.md").write_text(report(results, cfg) + "\n")
    for name in SERVERS:
        r = servers[name]
        print(f"{name:17s} EM {r['em']:.3f}  drop {100 * r['em_drop']:+.1f}  saved {100 * r['savings']:.1f}%  "
              f"within delta {100 * r['share_within_delta']:.0f}%  "
              + (" ".join(f"[{x['to']}: {x['within']}/{x['within_saving']}]" for x in r.get("recovery", []))))
    for ab in abs_:
        print(f"A/B {ab['a']} vs {ab['b']}: {ab['verdict']} after {ab['n_requests']} requests")
    print(f"wrote {out}/report.md, results.json, drift.png in {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
