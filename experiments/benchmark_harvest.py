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


def measure(model, tok, family, n: int = 16, batch_size: int = 16, max_new_tokens: int = 192, every_n: int = 32,
            skip_naive: bool = False) -> dict[str, tuple[float, int]]:
    """Wall seconds and generated tokens of each run, from one call (on the model's device): plain
    ``model.generate()``, our loop without probes, cached probes, naive probes (unless ``skip_naive``).
    Keys: ``plain generate()``, ``loop, no probes``, ``cached probes every N``, ``naive probes every N``."""
    device = next(model.parameters()).device
    qs = family.questions("train", n, seed=0)
    prompts = [family.render_prompt(q, tok) for q in qs]
    batches = [prompts[i : i + batch_size] for i in range(0, len(prompts), batch_size)]
    sched = ProbeSchedule(every_n=every_n, max_probes=64)
    feat = ProbeFeaturizer(model.config.hidden_size, proj_dim=32)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def plain_generate() -> int:
        tok.padding_side = "left"
        count = 0
        for b in batches:
            enc = tok(b, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            with torch.inference_mode():
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
            count += int((out[:, enc["input_ids"].shape[1]:] != pad).sum())
        return count

    def ours(mode: str) -> int:
        g = ProbingGenerator(model, tok, sched, featurizer=feat, max_new_tokens=max_new_tokens, probe_mode=mode)
        count = 0
        for b in batches:
            for r in g.run(b, family.extract_probe_answer):
                count += len(r.generated_ids)
        return count

    runs = [("plain generate()", plain_generate), ("loop, no probes", lambda: ours("none")),
            (f"cached probes every {every_n}", lambda: ours("cache"))]
    if not skip_naive:
        runs.append((f"naive probes every {every_n}", lambda: ours("naive")))
    # warm-up (first calls allocate and pick kernels): a few tokens of the first batch, not timed
    ProbingGenerator(model, tok, sched, featurizer=feat, max_new_tokens=8, probe_mode="none").run(batches[0])
    results = {}
    for name, fn in runs:
        t = time.perf_counter()
        count = fn()
        results[name] = (time.perf_counter() - t, count)
    return results


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
    results = measure(model, tok, get_family(args.family), args.n, args.batch_size, args.max_new_tokens,
                      args.every_n, args.skip_naive)
    for name, (seconds, n) in results.items():
        print(f"{name:<28} {seconds:8.1f} s  {n:6d} generated tokens  {n / seconds:7.1f} tok/s", flush=True)
    base = results["plain generate()"][0]
    print(f"\nratios to plain generate() (model {args.model}, {args.n} questions of {args.family}, batch "
          f"{args.batch_size}, {args.dtype}, {args.threads} thread(s)):")
    for name, (seconds, _) in results.items():
        print(f"  {name:<28} {seconds / base:5.2f}x")


if __name__ == "__main__":
    main()
