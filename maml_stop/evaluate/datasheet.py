"""``maml-stop datasheet``: per-family figures of a trace corpus, computed from the stored traces.

    maml-stop datasheet experiments/corpus/qwen05

writes ``<corpus>/datasheet.json``, ``<corpus>/README.md`` and ``<corpus>/probe_accuracy.png`` (per
family, the share of forced answers already correct against reasoning tokens so far). Per family: traces, final EM, the
EM of the answer forced at the first probe, mean and
median reasoning tokens, probes per trace, the fraction of probe points whose forced answer is already
correct, the oracle's EM and token savings against full generation (DESIGN.md's oracle and accounting,
via :class:`maml_stop.decide.policies.OraclePolicy`), the savings of the oracle at equal EM
(:func:`maml_stop.decide.policies.oracle_at_equal_em`: as many correct answers as full generation, fewest
tokens), and how many traces hit the token cap.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from maml_stop.data.corpus import Trace, TraceCorpus
from maml_stop.data import accounting, store
from maml_stop.decide.policies import FirstProbe, OraclePolicy, evaluate_policy, oracle_at_equal_em
from maml_stop.evaluate.report.plots import plot_probe_accuracy


def family_stats(traces: list[Trace]) -> dict[str, Any]:
    oracle = evaluate_policy(OraclePolicy(), traces)
    first = evaluate_policy(FirstProbe(), traces)
    equal_em_tokens = float(sum(o.total_tokens for o in oracle_at_equal_em(traces)))
    tokens = np.array([t.reasoning_tokens for t in traces])
    probes = np.array([t.n_probes for t in traces])
    labels = np.concatenate([t.labels for t in traces]) if probes.sum() else np.zeros(0)
    full_tokens = float(oracle.full_tokens.sum())
    return {
        "traces": len(traces),
        "traces_with_probes": int((probes > 0).sum()),
        "final_em": float(np.mean([t.final_em for t in traces])),
        "first_probe_em": float(first.em.mean()),
        "reasoning_tokens_mean": float(tokens.mean()),
        "reasoning_tokens_median": float(np.median(tokens)),
        "probes_per_trace": float(probes.mean()),
        "probe_correct_fraction": float(labels.mean()) if labels.size else 0.0,
        "any_probe_correct": float(np.mean([t.labels.max() > 0.5 if t.n_probes else False for t in traces])),
        "oracle_em": float(oracle.em.mean()),
        "oracle_savings": accounting.savings(float(oracle.total_tokens.sum()), full_tokens),
        "oracle_equal_em_savings": accounting.savings(equal_em_tokens, full_tokens),
        "hit_cap": int(sum(t.hit_cap for t in traces)),
    }


def corpus_stats(root: str | Path, corpus: TraceCorpus | None = None) -> dict[str, Any]:
    """Every figure of the datasheet, recomputed from the stored traces (``corpus``: already loaded)."""
    corpus = corpus if corpus is not None else TraceCorpus.load(root, min_probes=0)
    fams = {f: family_stats(corpus.traces(f)) for f in corpus.families}
    every = [t for f in corpus.families for t in corpus.traces(f)]
    return {"families": fams, "all": family_stats(every)}


def _recipe_of(root: str | Path, meta: dict[str, Any]) -> str:
    """How to regenerate or resume ``root``: ``maml-stop harvest --config`` the ``corpus*.yaml`` beside the
    corpus folder's parent (``experiments/`` for ``experiments/corpus/<name>``) whose ``out`` is this folder,
    named where it is; else the command that ``meta.json`` records (``harvest_args``: the arguments that
    differ from the defaults); else how to write a recipe. Never a file that does not exist (issue 29 item 12)."""
    import json
    import shlex

    import yaml

    name = Path(root).name
    experiments = Path(root).resolve().parent.parent
    for path in sorted(experiments.glob("corpus*.yaml")):
        out = (yaml.safe_load(path.read_text()) or {}).get("out")
        if isinstance(out, str) and Path(out).parts[-2:] == ("corpus", name):
            shown = f"experiments/{path.name}" if experiments.name == "experiments" else str(path)
            return f"`maml-stop harvest --config {shown}` (model set-up in that file's header)"
    args = meta.get("harvest_args")
    if not isinstance(args, dict):
        return ("not recorded (no corpus*.yaml beside this corpus writes it and meta.json has no harvest_args): "
                f"write a harvest recipe with the settings listed above and `out: {root}` (the repository's "
                "experiments/corpus_qwen05.yaml is one), then `maml-stop harvest --config <that file>`")
    shown = [f"--{k} {shlex.quote(v if isinstance(v, str) else json.dumps(v))}" for k, v in args.items()]
    return f"`maml-stop harvest {' '.join(shown)}` (the arguments meta.json records)"


def _model_name(spec: str | None) -> str:
    """A hub id as it is; a local folder by its name only (the sha256 lines below identify the weights), so that
    a datasheet names no path of the machine it was harvested on (issue 31)."""
    if spec and Path(spec).is_absolute():
        return f"local folder `{Path(spec).name}`"
    return f"`{spec}`"


def render(root: str | Path, stats: dict[str, Any]) -> str:
    meta = store.read_meta(root)
    recipe = _recipe_of(root, meta)
    weights = meta.get("model_weights", {})
    prov = weights.get("provenance", {})
    lines = [
        f"# Datasheet: trace corpus `{Path(root).name}`",
        "",
        "Generated by `maml-stop datasheet` from the stored traces; `tests/test_datasheet.py` recomputes it.",
        "",
        f"- model: {_model_name(meta.get('model', {}).get('spec'))} ({meta.get('model', {}).get('dtype')}), chat template: "
        f"{meta.get('model', {}).get('chat_template')}",
    ]
    if prov:
        lines.append(f"- weights: dequantised from `{prov.get('converted_from')}`, sha256 `{prov.get('gguf_sha256')}`")
    for name, digest in sorted(weights.get("weights", {}).items()):
        lines.append(f"- weight file `{name}`: sha256 `{digest}`")
    sched = meta.get("schedule", {})
    lines += [
        f"- probe schedule: every {sched.get('every_n')} tokens, step boundaries: {sched.get('boundary')} "
        f"(aligned to {sched.get('align', 1)} tokens), cues: {sched.get('cues')}, min gap {sched.get('min_gap')}, "
        f"at most {sched.get('max_probes')} probes",
        f"- answer trigger: {meta.get('prompt', {}).get('answer_trigger')!r}; generation: {meta.get('generation')}",
        f"- features ({len(meta['feature_names'])}): {meta.get('features')}",
        f"- schema version {meta['schema_version']}, code version {meta.get('code_version')}",
        f"- regenerate or resume: {recipe}, then `maml-stop datasheet {root}`",
        "",
        "| family | traces (with probes) | final EM | first-probe EM | reasoning tokens mean / median | probes per trace | "
        "probe answers correct | any probe correct | oracle EM | oracle savings | oracle savings at equal EM | hit cap |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = list(stats["families"].items()) + [("**all**", stats["all"])]
    for name, s in rows:
        lines.append(
            f"| {name} | {s['traces']} ({s['traces_with_probes']}) | {s['final_em']:.3f} | {s['first_probe_em']:.3f} | "
            f"{s['reasoning_tokens_mean']:.1f} / "
            f"{s['reasoning_tokens_median']:.0f} | {s['probes_per_trace']:.2f} | {s['probe_correct_fraction']:.3f} | "
            f"{s['any_probe_correct']:.3f} | {s['oracle_em']:.3f} | {100 * s['oracle_savings']:.1f}% | "
            f"{100 * s['oracle_equal_em_savings']:.1f}% | {s['hit_cap']} |"
        )
    lines += [
        "",
        "First-probe EM: the answer forced at the first probe (a trace without probes: its final answer), i.e. "
        "with almost no reasoning; where it is at least the final EM, this model's reasoning does not help. "
        "Oracle: stop at the earliest probe whose answer is correct; when none is, run to the end if the final "
        "answer is correct, else stop at the first probe. It also fixes answers that full generation gets wrong. "
        "The oracle at equal EM gets exactly as many answers right as full generation with the fewest tokens "
        "(every trace at its cheapest point, then the cheapest fixes until the full run's EM): no policy that "
        "keeps the full run's EM saves more. Savings are against full generation of the same traces, "
        "probe tokens included (DESIGN.md, honest accounting).",
        "",
        "![forced answer correct vs. position](probe_accuracy.png)",
    ]
    return "\n".join(lines) + "\n"


def write_datasheet(root: str | Path) -> dict[str, Any]:
    corpus = TraceCorpus.load(root, min_probes=0)
    stats = corpus_stats(root, corpus)
    plot_probe_accuracy({f: corpus.traces(f) for f in corpus.families}, Path(root, "probe_accuracy.png"))
    Path(root, "datasheet.json").write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n")
    Path(root, "README.md").write_text(render(root, stats))
    return stats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="maml-stop datasheet", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("corpus", nargs="?", default="experiments/corpus/qwen05")
    args = p.parse_args(argv)
    stats = write_datasheet(args.corpus)
    print(Path(args.corpus, "README.md").read_text())
    return 0 if stats else 1
