"""Seconds per decode step of a local model in float32 and bfloat16 at one batch size (prints figures;
not a test). On CPUs without AMX / AVX512-BF16, bf16 matmuls are emulated and much slower.

    python experiments/studies/bench_dtype.py --model "$(bash scripts/fetch_models.sh qwen05)" --batch 32
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM


def step_seconds(model_dir: str, dtype: torch.dtype, batch: int, prompt: int, steps: int) -> float:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(100, 1000, (batch, prompt), generator=g)
    with torch.inference_mode():
        cache = model(x, use_cache=True).past_key_values
        t = time.perf_counter()
        for _ in range(steps):
            cache = model(torch.randint(100, 1000, (batch, 1), generator=g), past_key_values=cache,
                          use_cache=True).past_key_values
        return (time.perf_counter() - t) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=60)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    times = {name: step_seconds(args.model, getattr(torch, name), args.batch, args.prompt, args.steps)
             for name in ("float32", "bfloat16")}
    for name, t in times.items():
        print(f"{name:<9} {t:.3f} s per decode step at batch {args.batch}")
    print(f"bfloat16 / float32: {times['bfloat16'] / times['float32']:.2f}x")


if __name__ == "__main__":
    main()
