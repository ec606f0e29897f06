"""Benchmark: ``generate()`` with :class:`~maml_stop.live.stopping.LiveStopping` in each live mode against
plain ``generate()``, on the same model, prompts and batch (issue 10).

    python experiments/benchmark_live.py --model /work/models/qwen05 --dtype float32

For each mode (every, free, gated) two runs: a threshold that never fires (the overhead of watching:
every mode probes on its schedule, and ``every``/``gated`` force answers) and a rule that fires (every
row stops at its ``--stop_at``-th probe point, the saving). The stand-in predictors read ``probe_index``
only (a free feature), so that the runs are comparable across modes; the gate of ``gated`` forces an
answer at every other probe point. Prints, from one run (the machine is shared and noisy: compare the
ratios, not the seconds), the wall time, the tokens generated and forced answers per run, and the ratio
to plain ``generate()``.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
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
            modes: tuple[str, ...] = MODES) -> list[dict]:
    """One row per run (plain ``generate()`` first, then each mode never firing and firing), from one call
    on the model's device: ``run``, ``mode``, ``fires``, ``seconds``, ``ratio`` (to plain), ``tokens``,
    ``forced`` (answers forced), ``stopped`` (rows stopped). Raises when a never-firing run changes the
    generation."""
    device = next(model.parameters()).device
    prompts = [family.render_prompt(q, tok) for q in family.questions("test", n=n, seed=0)]
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    schedule = ProbeSchedule(every_n=every_n, max_probes=16)
    featurizer = ProbeFeaturizer(model.config.hidden_size, proj_dim=32)
    names = featurizer.feature_names
    free = [name for name in names if feature_cost(name) == "free"]

    def generate(criteria=None, tokens_cap: int = max_new_tokens):
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=tokens_cap, do_sample=False, pad_token_id=pad,
                                 stopping_criteria=StoppingCriteriaList([criteria]) if criteria else None)
        seconds = time.perf_counter() - start
        tokens = int((out[:, enc["input_ids"].shape[1]:] != pad).sum())
        return seconds, tokens, out

    generate(tokens_cap=8)  # warm-up (allocations, kernels): a few tokens, not timed
    plain_s, plain_tokens, plain_out = generate()
    rows = [{"run": "plain generate()", "mode": None, "fires": None, "seconds": plain_s, "ratio": 1.0,
             "tokens": plain_tokens, "forced": 0, "stopped": None}]
    for mode in modes:
        predictor_names = free if mode == "free" else names
        column = predictor_names.index("probe_index")
        gate = ProbeIndexRule(free.index("probe_index"), odd=True) if mode == "gated" else None
        for fires in (False, True):
            crit = LiveStopping(model, tok, ProbeIndexRule(column, at_least=stop_at - 1),
                                0.5 if fires else math.inf, None, predictor_names, featurizer, schedule,
                                family=family, mode=mode, gate=gate, gate_feature_names=free if gate else None)
            try:
                seconds, tokens, out = generate(crit)
            finally:
                crit.remove_hooks()
            if not fires and not torch.equal(out, plain_out):
                raise RuntimeError(f"mode={mode}: a run that never stops changed the generation")
            rows.append({"run": f"{mode}, {'fires' if fires else 'never fires'}", "mode": mode, "fires": fires,
                         "seconds": seconds, "ratio": seconds / plain_s, "tokens": tokens,
                         "forced": sum(sum(f) for f in crit.forced),
                         "stopped": sum(s is not None for s in crit.stopped_at)})
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
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    model, tok = load_model(args.model, dtype=args.dtype)
    rows = measure(model, tok, get_family(args.family), args.n, args.max_new_tokens, args.every_n, args.stop_at,
                   tuple(args.modes.split(",")))
    print(f"model {args.model} ({args.dtype}), {args.n} {args.family} prompts in one batch, "
          f"{args.max_new_tokens} new tokens, probes every {args.every_n} tokens, {args.threads} thread(s)")
    print(f"{'run':<22}{'seconds':>9}{'ratio':>8}{'tokens':>8}{'forced':>8}{'stopped':>9}")
    for r in rows:
        stopped = "-" if r["stopped"] is None else str(r["stopped"])
        print(f"{r['run']:<22}{r['seconds']:9.2f}{r['ratio']:8.2f}{r['tokens']:8d}{r['forced']:8d}{stopped:>9}")


if __name__ == "__main__":
    main()
