"""Benchmark: ``generate()`` with :class:`~maml_stop.live.stopping.LiveStopping` in each live mode against
plain ``generate()``, on the same model, prompts and batch (issue 10).

    python experiments/benchmark_live.py --model "$(bash scripts/fetch_models.sh qwen05)" --dtype float32

For each mode (every, free, gated) two runs: a threshold that never fires (the overhead of watching:
every mode probes on its schedule, and ``every``/``gated`` force answers) and a rule that fires (every
row stops at its ``--stop_at``-th probe point, the saving). The stand-in predictors read ``probe_index``
only (a free feature), so that the runs are comparable across modes; the gate of ``gated`` forces an
answer at every other probe point. Prints the wall and CPU time, the tokens generated and forced answers
per run, and the ratio to plain ``generate()``. The runs are interleaved over ``rounds`` (plain, then every
mode, again and again) and each ratio is the median over rounds of the run's time over that round's plain
run: drift in the machine's load hits both sides of a ratio. The CPU-time ratio (``time.process_time`` of
this one-thread process) is the figure to quote on a shared machine: other processes slow the wall clock,
not the CPU time this process needs.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from typing import Any

from torch import nn
from transformers import StoppingCriteriaList

from maml_stop.harvest.model import load_model
from maml_stop.live.stopping import MODES, LiveStopping
from maml_stop.probe.features import ProbeFeaturizer, feature_cost
from maml_stop.probe.schedule import ProbeSchedule
from tasks import get_family


class ProbeIndexRule(nn.Module):
    """Logit +10 where ``probe_index`` (column ``column``) satisfies the rule, else -10."""

    def __init__(self, column: int, at_least: int | None = None, odd: bool = False) -> None:
        super().__init__()
        self.column, self.at_least, self.odd = column, at_least, odd

    def forward(self, batch):
        index = batch.features[:, self.column]
        fire = (index % 2 == 1) if self.odd else (index >= self.at_least)
        return torch.where(fire, 10.0, -10.0)


def measure(model, tok, family, n: int = 8, max_new_tokens: int = 128, every_n: int = 32, stop_at: int = 2,
            modes: tuple[str, ...] = MODES, rounds: int = 1) -> list[dict]:
    """One row per run (plain ``generate()`` first, then each mode never firing and firing), from one call
    on the model's device: ``run``, ``mode``, ``fires``, ``seconds`` and ``cpu_seconds`` (medians over
    ``rounds``), ``ratio`` and ``cpu_ratio`` (medians over rounds of the ratio to that round's plain run),
    ``tokens``, ``forced`` (answers forced), ``stopped`` (rows stopped), ``rounds``. Raises when a
    never-firing run changes the generation."""
    device = next(model.parameters()).device
    prompts = [family.render_prompt(q, tok) for q in family.questions("test", n=n, seed=0)]
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    schedule = ProbeSchedule(every_n=every_n, max_probes=16)
    featurizer = ProbeFeaturizer(model.config.hidden_size, proj_dim=32)
    names = featurizer.feature_names
    free = [name for name in names if feature_cost(name) == "free"]

    if rounds < 1:
        raise ValueError(f"rounds must be >= 1; got {rounds}")

    def generate(criteria=None, tokens_cap: int = max_new_tokens):
        start, cpu = time.perf_counter(), time.process_time()
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=tokens_cap, do_sample=False, pad_token_id=pad,
                                 stopping_criteria=StoppingCriteriaList([criteria]) if criteria else None)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
        tokens = int((out[:, enc["input_ids"].shape[1]:] != pad).sum())
        return seconds, cpu_seconds, tokens, out

    def live_run(mode: str, fires: bool) -> tuple[float, float, int, Any, LiveStopping]:
        predictor_names = free if mode == "free" else names
        column = predictor_names.index("probe_index")
        gate = ProbeIndexRule(free.index("probe_index"), odd=True) if mode == "gated" else None
        crit = LiveStopping(model, tok, ProbeIndexRule(column, at_least=stop_at - 1),
                            0.5 if fires else math.inf, None, predictor_names, featurizer, schedule,
                            family=family, mode=mode, gate=gate, gate_feature_names=free if gate else None)
        try:
            return (*generate(crit), crit)
        finally:
            crit.remove_hooks()

    generate(tokens_cap=8)  # warm-up (allocations, kernels): a few tokens, not timed
    runs = [("plain generate()", None, None)] + [(f"{m}, {'fires' if f else 'never fires'}", m, f)
                                                  for m in modes for f in (False, True)]
    timed: dict[str, list[tuple[float, float]]] = {name: [] for name, _, _ in runs}
    last: dict[str, dict] = {}
    for _ in range(rounds):  # interleaved: plain, every mode, plain, every mode, ...
        for name, mode, fires in runs:
            if mode is None:
                seconds, cpu_seconds, tokens, out = generate()
                plain_out, info = out, {"tokens": tokens, "forced": 0, "stopped": None}
            else:
                seconds, cpu_seconds, tokens, out, crit = live_run(mode, fires)
                if not fires and not torch.equal(out, plain_out):
                    raise RuntimeError(f"mode={mode}: a run that never stops changed the generation")
                info = {"tokens": tokens, "forced": sum(sum(f) for f in crit.forced),
                        "stopped": sum(s is not None for s in crit.stopped_at)}
            timed[name].append((seconds, cpu_seconds))
            last[name] = info
    plain = timed["plain generate()"]
    rows = []
    for name, mode, fires in runs:
        t = timed[name]
        rows.append({"run": name, "mode": mode, "fires": fires,
                     "seconds": statistics.median(s for s, _ in t), "cpu_seconds": statistics.median(c for _, c in t),
                     "ratio": statistics.median(s / p for (s, _), (p, _) in zip(t, plain)),
                     "cpu_ratio": statistics.median(c / p for (_, c), (_, p) in zip(t, plain)),
                     "rounds": rounds, **last[name]})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a local model folder")
    p.add_argument("--family", default="gsm_symbolic")
    p.add_argument("--n", type=int, default=8, help="prompts (one batch)")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--every_n", type=int, default=32)
    p.add_argument("--stop_at", type=int, default=2, help="the firing runs stop at this probe point (1 = first)")
    p.add_argument("--dtype", default="float32", help="float32 on these CPUs (bfloat16 is about 4x slower)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--rounds", type=int, default=1, help="interleaved rounds; ratios are medians over them")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    model, tok = load_model(args.model, dtype=args.dtype)
    rows = measure(model, tok, get_family(args.family), args.n, args.max_new_tokens, args.every_n, args.stop_at,
                   tuple(args.modes.split(",")), args.rounds)
    print(f"model {args.model} ({args.dtype}), {args.n} {args.family} prompts in one batch, "
          f"{args.max_new_tokens} new tokens, probes every {args.every_n} tokens, {args.threads} thread(s)")
    print(f"{'run':<22}{'seconds':>9}{'ratio':>8}{'cpu s':>8}{'cpu ratio':>10}{'tokens':>8}{'forced':>8}{'stopped':>9}")
    for r in rows:
        stopped = "-" if r["stopped"] is None else str(r["stopped"])
        print(f"{r['run']:<22}{r['seconds']:9.2f}{r['ratio']:8.2f}{r['cpu_seconds']:8.2f}{r['cpu_ratio']:10.2f}"
              f"{r['tokens']:8d}{r['forced']:8d}{stopped:>9}")


if __name__ == "__main__":
    main()
