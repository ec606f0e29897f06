"""What a token of each cascade model costs on this machine (issue 28 item 2): the cost file of the paired corpus.

    python experiments/benchmark_cascade.py --small "$(bash scripts/fetch_models.sh qwen05)" \
        --large "$(bash scripts/fetch_models.sh qwen15)" --out experiments/results/cascade/cascade_cost.json

Times ``model.generate()`` (greedy, batch 1, exactly ``--tokens`` new tokens after one corpus question as the
prompt) of both models in one run, interleaved (small, large, small, large, ...) so that both see the same
load on a shared machine, ``--repeats`` times each after one untimed warm-up; per token: the median wall time
(``time.perf_counter``) and the median CPU time of this process (``time.process_time``). The FLOPs ratio is
counted from the models themselves: ``2 x`` (parameters outside the input embedding, plus the output
projection, which a tied embedding shares) per token, attention over the context left out. Writes the JSON
that :class:`maml_stop.data.pairs.CostModel` reads: ``ratios`` (large over small: ``wall``, ``cpu``,
``flops``) and each model's figures and the settings.

Kept short on purpose (a few dozen tokens per model, the CPU is shared with other jobs): the wall ratio is
the noisiest figure; the CPU ratio is the one to trust on a busy machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def flops_per_token(model) -> float:
    """``2 x`` the multiply-adds of one token's forward pass through the weights (attention scores left out)."""
    emb = model.get_input_embeddings().weight
    params = sum(p.numel() for p in model.parameters())
    out = model.get_output_embeddings()
    tied = out is not None and out.weight.data_ptr() == emb.data_ptr()
    return 2.0 * (params - emb.numel() + (emb.numel() if tied else 0))


def prompt_ids(tok, question: str) -> torch.Tensor:
    if getattr(tok, "chat_template", None):
        text = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
    else:
        text = question
    return tok(text, return_tensors="pt").input_ids  # (1, L)


def time_generate(model, ids: torch.Tensor, tokens: int) -> tuple[float, float]:
    """(wall s, CPU s) of one greedy generate() of exactly ``tokens`` new tokens."""
    wall, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, min_new_tokens=tokens,
                             do_sample=False, pad_token_id=model.config.eos_token_id)
    assert out.shape[1] - ids.shape[1] == tokens
    return time.perf_counter() - wall, time.process_time() - cpu


def first_question(corpus: str) -> str:
    import pyarrow.parquet as pq

    from maml_stop.data import store

    paths = store.shard_paths(corpus)
    if not paths:
        raise FileNotFoundError(f"no shards under {corpus}")
    return pq.read_table(paths[0], columns=["question"]).column(0)[0].as_py()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", required=True, help="the small model (folder or hub id)")
    p.add_argument("--large", required=True, help="the large model (folder or hub id)")
    p.add_argument("--corpus", default="experiments/corpus/qwen15", help="the prompt: this corpus's first question")
    p.add_argument("--tokens", type=int, default=32, help="new tokens per timed generate()")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="float32", help="float32 (this CPU has no AMX: bfloat16 runs slower here)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="experiments/results/cascade/cascade_cost.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from maml_stop.harvest.model import load_model

    question = first_question(args.corpus)
    models = {}
    for which in ("small", "large"):
        model, tok = load_model(getattr(args, which), dtype=args.dtype)
        ids = prompt_ids(tok, question)
        time_generate(model, ids, 4)  # warm-up, not timed
        models[which] = (model, ids)
    times: dict[str, list[tuple[float, float]]] = {"small": [], "large": []}
    for _ in range(args.repeats):
        for which, (model, ids) in models.items():
            times[which].append(time_generate(model, ids, args.tokens))
    figures = {}
    for which, (model, ids) in models.items():
        figures[which] = {
            "model": Path(getattr(args, which)).name,  # the folder's name (no machine path) or the hub id
            "parameters": sum(q.numel() for q in model.parameters()),
            "flops_per_token": flops_per_token(model),
            "wall_s_per_token": statistics.median(w for w, _ in times[which]) / args.tokens,
            "cpu_s_per_token": statistics.median(c for _, c in times[which]) / args.tokens,
            "prompt_tokens": int(ids.shape[1]),
            "runs": [[round(w, 4), round(c, 4)] for w, c in times[which]],
        }
    s, l = figures["small"], figures["large"]
    result = {
        "ratios": {"wall": l["wall_s_per_token"] / s["wall_s_per_token"],
                   "cpu": l["cpu_s_per_token"] / s["cpu_s_per_token"],
                   "flops": l["flops_per_token"] / s["flops_per_token"]},
        "small": s, "large": l,
        "settings": {"tokens": args.tokens, "repeats": args.repeats, "dtype": args.dtype, "threads": args.threads,
                     "batch": 1, "prompt": f"the first question of {args.corpus}"},
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "torch": torch.__version__},
        "command": "python experiments/benchmark_cascade.py --small <qwen05> --large <qwen15> (scripts/fetch_models.sh) "
                   f"--tokens {args.tokens} --repeats {args.repeats} --dtype {args.dtype} --threads {args.threads}",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["ratios"], indent=1))
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
