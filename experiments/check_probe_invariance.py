"""Real-model check that probing does not change what the model generates.

Re-generates the first ``--n`` stored traces of each family *without probes* (same model, same prompts,
one batch sorted by prompt length as the harvest does) and compares generated text and final EM with
the stored, probed traces. When those traces were one harvest batch (the first shard of a family
harvested before splits were interleaved, e.g. basic_arithmetic's train-00000) the batch is identical
and so must be every token; otherwise padding differs and bf16 rounding may flip a few greedy choices.

    python experiments/check_probe_invariance.py --corpus experiments/corpus/qwen05 \
        --families basic_arithmetic gcd
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default="experiments/corpus/qwen05")
    p.add_argument("--families", nargs="+", required=True)
    p.add_argument("--model", default=None, help="default: the model recorded in the corpus metadata")
    p.add_argument("--n", type=int, default=32)
    args = p.parse_args()
    torch.set_num_threads(1)
    meta = store.read_meta(args.corpus)
    model, tok = load_model(args.model or meta["model"]["spec"], dtype=meta["model"]["dtype"])
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


if __name__ == "__main__":
    main()
