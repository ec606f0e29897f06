"""Real-model checks that probing does not change what the model generates.

Stored traces (default): re-generates the first ``--n`` stored traces of each family *without probes*
(same model, same prompts, one batch sorted by prompt length as the harvest does) and compares generated
text and final EM with the stored, probed traces. When those traces were one harvest batch (the first
shard of a family harvested before splits were interleaved, e.g. basic_arithmetic's train-00000) the
batch is identical and so must be every token; otherwise padding differs and bf16 rounding may flip a
few greedy choices.

    python experiments/check_probe_invariance.py --corpus experiments/corpus/qwen05 \
        --families basic_arithmetic gcd

Cached against naive probes (``--cached-vs-naive``, no corpus needed): generates ``--n`` prompts of each
family twice on ``--device``, with cached forced-answer probes (the harvester's, on a copy of the KV
cache) and with naive probes (re-encoding prefix + trigger from scratch), and compares the generations,
the probe answers and their log-probs.

    python experiments/check_probe_invariance.py --cached-vs-naive --model MODEL_DIR --device cuda \
        --dtype bfloat16 --families gsm_symbolic
"""

from __future__ import annotations

import argparse

import pyarrow.parquet as pq
import torch

from maml_stop.data import store
from maml_stop.probe.engine import ProbingGenerator
from maml_stop.harvest.model import load_model
from maml_stop.probe.schedule import ProbeSchedule
from tasks import get_family
from tasks.base import Question


def cached_vs_naive(model, tok, family, n: int = 8, max_new_tokens: int = 128, every_n: int = 32,
                    batch_size: int = 8) -> dict:
    """Generate ``n`` test prompts of ``family`` with cached and with naive probes (the model's device);
    counts of identical generations and probe answers, and the largest log-prob difference."""
    prompts = [family.render_prompt(q, tok) for q in family.questions("test", n, seed=0)]
    schedule = ProbeSchedule(every_n=every_n, max_probes=64)
    runs = {}
    for mode in ("cache", "naive"):
        gen = ProbingGenerator(model, tok, schedule, max_new_tokens=max_new_tokens, probe_mode=mode)
        runs[mode] = [r for b in range(0, n, batch_size)
                      for r in gen.run(prompts[b : b + batch_size], family.extract_probe_answer)]
    same_gen = same_answers = probes = 0
    max_lp = 0.0
    for c, v in zip(runs["cache"], runs["naive"]):
        same_gen += c.generated_ids == v.generated_ids
        for pc, pv in zip(c.probes, v.probes):
            probes += 1
            same_answers += pc.answer_ids == pv.answer_ids
            if pc.answer_ids == pv.answer_ids and pc.logprobs:
                max_lp = max(max_lp, max(abs(a - b) for a, b in zip(pc.logprobs, pv.logprobs)))
        probes += abs(len(c.probes) - len(v.probes))  # probes only one side ran count as different
    return {"traces": n, "identical_generations": same_gen, "probes": probes, "identical_probe_answers": same_answers,
            "max_logprob_diff": max_lp}


def check_stored(args) -> None:
    meta = store.read_meta(args.corpus)
    model, tok = load_model(args.model or meta["model"]["spec"], dtype=args.dtype or meta["model"]["dtype"])
    model.to(args.device)
    gen_cfg = meta["generation"]
    gen = ProbingGenerator(model, tok, ProbeSchedule(**{**meta["schedule"], "cues": tuple(meta["schedule"]["cues"])}),
                           answer_trigger=meta["prompt"]["answer_trigger"], max_new_tokens=gen_cfg["max_new_tokens"],
                           probe_mode="none")
    for name in args.families:
        fam = get_family(name)
        shards = store.shard_paths(args.corpus, name)
        shards = sorted(shards, key=lambda p: (not p.name.startswith("train-00000"), p.name))
        rows = [r for shard in shards for r in pq.read_table(shard).to_pylist()][: args.n]
        qs = [Question(r["question_id"], name, r["split"], r["question"], r["gold"]) for r in rows]
        prompts = [fam.render_prompt(q, tok) for q in qs]
        # the harvest batches a shard sorted by prompt length (stable sort over the question order)
        order = sorted(range(len(qs)), key=lambda i: len(tok(prompts[i], add_special_tokens=False)["input_ids"]))
        same_tokens = same_em = 0
        em_probed = em_plain = 0
        for b in range(0, len(order), 32):
            idx = order[b : b + 32]
            for i, res in zip(idx, gen.run([prompts[i] for i in idx])):
                text = tok.decode(res.generated_ids, skip_special_tokens=True)
                em = fam.score(fam.extract_answer(text), qs[i])
                stored = rows[i]
                same_tokens += text == stored["generated_text"]
                em_plain += em
                em_probed += stored["final_em"]
                same_em += em == stored["final_em"]
        n = len(rows)
        print(f"{name}: {n} traces; identical text {same_tokens}/{n}; same final EM {same_em}/{n}; "
              f"final EM probed {em_probed / n:.3f} vs without probes {em_plain / n:.3f}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default="experiments/corpus/qwen05")
    p.add_argument("--families", nargs="+", required=True)
    p.add_argument("--model", default=None, help="default: the model recorded in the corpus metadata")
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="default: the corpus's (stored check), float32 (--cached-vs-naive)")
    p.add_argument("--cached-vs-naive", action="store_true", help="compare cached with naive probes (no corpus)")
    p.add_argument("--max_new_tokens", type=int, default=128, help="--cached-vs-naive only")
    p.add_argument("--every_n", type=int, default=32, help="--cached-vs-naive only")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: no CUDA device is available to torch {torch.__version__}")
    if not args.cached_vs_naive:
        check_stored(args)
        return
    if args.model is None:
        raise SystemExit("--cached-vs-naive needs --model (a local model folder)")
    model, tok = load_model(args.model, dtype=args.dtype or "float32")
    model.to(args.device)
    failed = False
    for name in args.families:
        r = cached_vs_naive(model, tok, get_family(name), args.n, args.max_new_tokens, args.every_n)
        failed |= r["identical_generations"] < r["traces"]
        print(f"{name} ({args.device}, {args.dtype or 'float32'}): cached vs naive probes: identical generations "
              f"{r['identical_generations']}/{r['traces']}; identical probe answers "
              f"{r['identical_probe_answers']}/{r['probes']}; largest log-prob difference {r['max_logprob_diff']:.2e}",
              flush=True)
    if failed:
        raise SystemExit("cached and naive probes changed a generation: probing is not invisible to the model")


if __name__ == "__main__":
    main()
