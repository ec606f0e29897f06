"""Real-model check that probing does not change what the model generates.

Re-generates the traces of one stored shard per family *without probes* (same model, same batch, same
order as the harvest) and compares tokens, final answers and final EM with the stored, probed traces.

    python experiments/check_probe_invariance.py --corpus experiments/corpus/qwen05 \
        --families basic_arithmetic gcd
"""

from __future__ import annotations

import argparse

import pyarrow.parquet as pq
import torch

from maml_stop.harvest import store
from maml_stop.harvest.generate import ProbingGenerator
from maml_stop.harvest.model import load_model
from maml_stop.harvest.schedule import ProbeSchedule
from tasks import get_family
from tasks.base import Question


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default="experiments/corpus/qwen05")
    p.add_argument("--families", nargs="+", required=True)
    p.add_argument("--model", default=None, help="default: the model recorded in the corpus metadata")
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
        shard = store.shard_paths(args.corpus, name)[0]
        rows = pq.read_table(shard).to_pylist()
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
