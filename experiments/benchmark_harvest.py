"""Benchmark: harvest-with-probes wall time against plain ``generate()`` on the same model and questions.

    python experiments/benchmark_harvest.py --model /path/to/qwen05 --n 16 --batch_size 16

Prints, from one run (the machine is shared and noisy: compare the ratios, not the seconds):
plain ``model.generate()``; our generation loop without probes; cached probes every N tokens (the
harvester); naive probes that re-encode the prefix (the reference). Target: cached probes every 32
tokens cost at most 1.3x plain generation.
"""

from __future__ import annotations

import argparse
import time

import torch

from maml_stop.probe.features import ProbeFeaturizer
from maml_stop.probe.engine import ProbingGenerator
from maml_stop.harvest.model import load_model
from maml_stop.probe.schedule import ProbeSchedule
from tasks import get_family


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--family", default="gsm_symbolic")
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--max_new_tokens", type=int, default=192)
    p.add_argument("--every_n", type=int, default=32)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip_naive", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    model, tok = load_model(args.model, dtype=args.dtype)
    fam = get_family(args.family)
    qs = fam.questions("train", args.n, seed=0)
    prompts = [fam.render_prompt(q, tok) for q in qs]
    batches = [prompts[i : i + args.batch_size] for i in range(0, len(prompts), args.batch_size)]
    sched = ProbeSchedule(every_n=args.every_n, max_probes=64)
    feat = ProbeFeaturizer(model.config.hidden_size, proj_dim=32)

    def plain_generate() -> int:
        tok.padding_side = "left"
        n = 0
        for b in batches:
            enc = tok(b, return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.inference_mode():
                out = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False,
                                     pad_token_id=tok.pad_token_id or tok.eos_token_id)
            n += int((out[:, enc["input_ids"].shape[1]:] != (tok.pad_token_id or tok.eos_token_id)).sum())
        return n

    def ours(mode: str) -> int:
        g = ProbingGenerator(model, tok, sched, featurizer=feat, max_new_tokens=args.max_new_tokens, probe_mode=mode)
        n = 0
        for b in batches:
            for r in g.run(b, fam.extract_probe_answer):
                n += len(r.generated_ids)
        return n

    runs = [("plain generate()", plain_generate), ("loop, no probes", lambda: ours("none")),
            (f"cached probes every {args.every_n}", lambda: ours("cache"))]
    if not args.skip_naive:
        runs.append((f"naive probes every {args.every_n}", lambda: ours("naive")))
    ours("none")  # warm-up (first calls allocate and pick kernels)
    times = {}
    for name, fn in runs:
        t = time.perf_counter()
        n = fn()
        times[name] = time.perf_counter() - t
        print(f"{name:<28} {times[name]:8.1f} s  {n:6d} generated tokens  {n / times[name]:7.1f} tok/s", flush=True)
    base = times["plain generate()"]
    print(f"\nratios to plain generate() (model {args.model}, {args.n} questions of {args.family}, batch "
          f"{args.batch_size}, {args.dtype}, {args.threads} thread(s)):")
    for name, t in times.items():
        print(f"  {name:<28} {t / base:5.2f}x")


if __name__ == "__main__":
    main()
