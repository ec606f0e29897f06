"""Choose the families of corpus v2 from its pilot (issue 11): one 32-trace shard per candidate family.

    python experiments/studies/corpus_v2_pilot.py [--config experiments/studies/corpus_v2_pilot.yaml]

Per candidate, from the stored pilot traces: final EM (a capped run's answer is the one forced at the
cap), EM of the answer forced at once (the start probe, before any reasoning), EM at the first scheduled
probe, share of traces hitting the cap, share that end before the first scheduled probe (the model
answers at once: nothing to cut), share of forced answers that ran out of answer tokens, share of traces
with any correct probe. Then the rules of the YAML, in order: drop families whose answers do not fit,
that have no reasoning to cut, or carry no signal; keep families with final EM in the band, then those
outside it, and drop the families with the highest cap share until at most ``max_cap_share`` of all
traces hit the cap. Writes a Markdown table with the decision and its reason for every candidate.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from maml_stop.data import store  # noqa: E402


@dataclass(frozen=True)
class PilotConfig:
    """The rules of the family choice (tuned values in experiments/studies/corpus_v2_pilot.yaml)."""

    corpus: str  # the v2 corpus folder holding the pilot shards
    out: str  # the Markdown file written
    families_out: str  # the JSON file of the kept families (read by experiments/meta_study.py)
    pilot_traces: int = 32  # the first this many traces of each family's harvest order
    max_truncated: float = 0.2  # drop: share of forced answers that ran out of answer tokens
    max_no_reasoning: float = 0.5  # drop: share of traces that end before the first scheduled probe
    em_band: tuple[float, float] = (0.1, 0.9)  # final EM wanted in this band on most families
    min_signal: float = 0.1  # drop: final EM and any-probe-correct share both below this
    reasoning_helps_gap: float = 0.1  # "reasoning helps": EM at once this far below final EM
    max_cap_share: float = 0.2  # at most this share of the kept families' traces hit the cap
    min_families: int = 30
    next_candidates: tuple[str, ...] = ()  # families still to pilot (listed in the output)
    resume: tuple[str, ...] = ()  # the commands that continue the pilot (listed in the output)

    @classmethod
    def load(cls, path: str | Path) -> "PilotConfig":
        raw = yaml.safe_load(Path(path).read_text()) or {}
        unknown = sorted(set(raw) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"{path}: unknown keys {unknown}; valid: {[f.name for f in fields(cls)]}")
        for key in ("em_band", "next_candidates", "resume"):
            if key in raw:
                raw[key] = tuple(raw[key])
        return cls(**raw)


def family_figures(rows: list[dict], answer_budget: int) -> dict[str, float]:
    n = len(rows)
    start_em, first_em, no_reasoning, truncated, probes, any_ok = [], [], [], [], [], []
    for r in rows:
        reasons = r["probe_reasons"]
        start = [i for i, x in enumerate(reasons) if x == "start"]
        sched = [i for i, x in enumerate(reasons) if x not in ("start", "cap")]
        start_em.append(bool(r["probe_em"][start[0]]) if start else False)
        first_em.append(bool(r["probe_em"][sched[0]]) if sched else bool(r["final_em"]))
        no_reasoning.append(not sched)
        truncated += [t >= answer_budget for t in r["probe_answer_tokens"]]
        probes.append(len(reasons))
        any_ok.append(any(r["probe_em"]) or bool(r["final_em"]))
    return {
        "traces": n,
        "final_em": float(np.mean([r["final_em"] for r in rows])),
        "start_em": float(np.mean(start_em)),
        "first_scheduled_em": float(np.mean(first_em)),
        "hit_cap": float(np.mean([r["hit_cap"] for r in rows])),
        "no_reasoning": float(np.mean(no_reasoning)),
        "truncated": float(np.mean(truncated)) if truncated else 0.0,
        "any_correct": float(np.mean(any_ok)),
        "reasoning_tokens": float(np.mean([r["reasoning_tokens"] for r in rows])),
        "probes": float(np.mean(probes)),
    }


def choose(figs: dict[str, dict], cfg: dict) -> dict[str, str]:
    """family -> decision ("keep" or "drop: <reason>")."""
    lo, hi = cfg["em_band"]
    out: dict[str, str] = {}
    for fam, f in figs.items():
        if f["truncated"] > cfg["max_truncated"]:
            out[fam] = f"drop: {100 * f['truncated']:.0f}% of forced answers ran out of answer tokens"
        elif f["no_reasoning"] > cfg["max_no_reasoning"]:
            out[fam] = f"drop: {100 * f['no_reasoning']:.0f}% of traces end before the first scheduled probe"
        elif f["final_em"] < cfg["min_signal"] and f["any_correct"] < cfg["min_signal"]:
            out[fam] = "drop: no signal (final EM and any-probe-correct below the floor)"
        else:
            out[fam] = "keep"
    kept = [f for f, d in out.items() if d == "keep"]
    # cap rule: drop the highest-cap families (those outside the EM band first) until within the share
    total = lambda fams: sum(figs[f]["traces"] for f in fams)  # noqa: E731
    capped = lambda fams: sum(figs[f]["hit_cap"] * figs[f]["traces"] for f in fams)  # noqa: E731
    order = sorted(kept, key=lambda f: (lo <= figs[f]["final_em"] <= hi, -figs[f]["hit_cap"]))
    while kept and capped(kept) > cfg["max_cap_share"] * total(kept):
        victim = order.pop(0)
        kept.remove(victim)
        out[victim] = f"drop: cap share ({100 * figs[victim]['hit_cap']:.0f}% of its traces hit the cap)"
    return out


def harvest_lists(kept: list[str], figs: dict[str, dict], n: int = 2) -> list[list[str]]:
    """The kept families in ``n`` lists of about equal work (pilot reasoning tokens per trace; greedy,
    longest first, each to the list with the least work so far): one list per single-thread harvest."""
    lists: list[list[str]] = [[] for _ in range(n)]
    work = [0.0] * n
    for fam in sorted(kept, key=lambda f: (-figs[f]["reasoning_tokens"], f)):
        i = int(np.argmin(work))
        lists[i].append(fam)
        work[i] += figs[fam]["reasoning_tokens"]
    return [sorted(x) for x in lists if x]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "experiments" / "studies" / "corpus_v2_pilot.yaml"))
    args = ap.parse_args(argv)
    cfg = vars(PilotConfig.load(args.config))
    root = ROOT / cfg["corpus"]
    meta = store.read_meta(root)
    budget = meta["generation"]["answer_max_tokens"]
    table = store.read_table(root).to_pylist()
    by_family: dict[str, list[dict]] = {}
    for r in table:
        by_family.setdefault(r["family"], []).append(r)
    # the pilot is the first pilot_traces questions of each family's harvest order (its first shard)
    from maml_stop.harvest.cli import harvest_order
    from tasks import get_family

    order = meta["order"]
    figs = {}
    for fam, rows in sorted(by_family.items()):
        first = {store.make_trace_id(q.id) for q in
                 harvest_order(get_family(fam), fam, order["n_per_family"], order["seed"])[: cfg["pilot_traces"]]}
        pilot = [r for r in rows if r["trace_id"] in first]
        if len(pilot) == cfg["pilot_traces"]:  # a candidate whose pilot shard is complete
            figs[fam] = family_figures(pilot, budget)
    decision = choose(figs, cfg)
    kept = [f for f, d in decision.items() if d == "keep"]
    helps = [f for f in kept if figs[f]["final_em"] - figs[f]["start_em"] >= cfg["reasoning_helps_gap"]]
    lo, hi = cfg["em_band"]
    band = [f for f in kept if lo <= figs[f]["final_em"] <= hi]
    cap = sum(figs[f]["hit_cap"] * figs[f]["traces"] for f in kept) / max(sum(figs[f]["traces"] for f in kept), 1)
    lines = [
        "# Corpus v2: the pilot and the family choice",
        "",
        f"Generated by `python experiments/studies/corpus_v2_pilot.py` from the first {cfg['pilot_traces']} traces of each "
        f"candidate in `{cfg['corpus']}` (rules: `experiments/studies/corpus_v2_pilot.yaml`).",
        "",
        f"Kept {len(kept)} of {len(figs)} candidates; reasoning helps (EM of the answer at once at least "
        f"{100 * cfg['reasoning_helps_gap']:.0f} points below final EM) on {len(helps)}; final EM in "
        f"{100 * lo:.0f}-{100 * hi:.0f}% on {len(band)}; {100 * cap:.1f}% of the kept families' pilot traces hit the cap.",
        "",
        "| family | traces | final EM | EM at once (start probe) | EM at first scheduled probe | reasoning helps | hit cap | "
        "no probe before the answer | answers truncated | any probe correct | reasoning tokens | probes/trace | decision |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for fam, f in figs.items():
        lines.append(
            f"| {fam} | {f['traces']} | {f['final_em']:.3f} | {f['start_em']:.3f} | {f['first_scheduled_em']:.3f} | "
            f"{'yes' if fam in helps or f['final_em'] - f['start_em'] >= cfg['reasoning_helps_gap'] else 'no'} | "
            f"{100 * f['hit_cap']:.0f}% | {100 * f['no_reasoning']:.0f}% | {100 * f['truncated']:.0f}% | "
            f"{f['any_correct']:.3f} | {f['reasoning_tokens']:.0f} | {f['probes']:.1f} | {decision[fam]} |"
        )
    if len(kept) < cfg["min_families"]:
        lines += ["", f"**Fewer than {cfg['min_families']} families pass.**"]
    todo = [f for f in cfg["next_candidates"] if f not in figs]
    if todo:
        lines += ["", f"Still to pilot ({len(todo)}): " + ", ".join(todo) + ". The cap rule is applied to the "
                  "candidates piloted so far, so its decisions can change once these (mostly low-cap) families are in."]
    if cfg["resume"] and todo:  # the pilot commands, while candidates are left
        lines += ["", "Continue the pilot (two single-thread harvests side by side):", "", "```bash",
                  *cfg["resume"], "```"]
    lines += ["", "Kept: " + ", ".join(kept)]
    if kept:
        lines += ["", f"Harvest the kept families to {order['n_per_family']} questions each (two single-thread "
                  "harvests of about equal work; the pilot shards are their first shards"
                  + (", once the pilot is complete" if todo else "") + "):", "", "```bash",
                  *[f".venv/bin/maml-stop harvest --config experiments/corpus_v2.yaml --families '[{', '.join(x)}]' &"
                    for x in harvest_lists(kept, figs)],
                  f"bash experiments/studies/commit_corpus.sh {cfg['corpus']} 600 &", "```"]
    (ROOT / cfg["out"]).write_text("\n".join(lines) + "\n")
    # the machine-readable choice: the meta-learning study reads its families from here (meta_study.yaml)
    (ROOT / cfg["families_out"]).write_text(json.dumps({
        "corpus": cfg["corpus"], "kept": kept, "reasoning_helps": helps, "pilot_complete": not todo,
        "decisions": decision}, indent=1) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
