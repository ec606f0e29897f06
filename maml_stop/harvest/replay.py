"""Teacher-forced replay of a stored trace: hidden-state representations at its probe points, without
generating again (issue 30).

A corpus stores each trace's generated text, probe positions and forced continuations. A causal model's
hidden state at a position depends only on the tokens up to it, so feeding prompt + generated tokens in one
forward pass gives, at every probe point, exactly the states the harvest saw (up to float rounding), at
prompt-processing speed instead of generation speed. The forced answers are replayed the same way: every
probe's trigger + stored answer text is run in one batched forward on the trace's KV cache, each row masked
to its own prefix.

Representations (:data:`REPRESENTATIONS`), each a (n_layers, hidden) array per probe point:

* ``last`` (free): the state of the last token before the probe point (the prompt's last token at
  position 0);
* ``mean`` (free): the mean state over the window since the previous probe (what corpora v1/v2 store,
  projected to 32 dimensions);
* ``trigger`` (paid: the trigger's few tokens): the state at the answer trigger's last token, the moment
  the model is asked for its answer;
* ``answer`` (paid: a forced answer): the state at the forced answer's last token, what "Reasoning models
  know when they're right" (Zhang et al., 2025) probes.

A retokenised text can differ from the generated tokens; :func:`replay_trace` then returns ``None`` for the
trace (``check`` says why) rather than states of a different sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from transformers.cache_utils import DynamicCache

from maml_stop.data import store
from maml_stop.harvest.model import DTYPES
from tasks import get_family
from tasks.base import Question

REPRESENTATIONS = ("last", "mean", "trigger", "answer")
FREE_REPRESENTATIONS = ("last", "mean")


@dataclass
class ReplayedTrace:
    """States of one trace: ``states[rep]`` is (n_probes, n_layers, hidden) float32; ``answer_match`` is
    the share of probes whose first stored answer token is the one greedy decoding gives on the replay
    (1.0 = the replay reproduces the harvest's forced answers)."""

    states: dict[str, np.ndarray]
    answer_match: float


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def check_tokens(gen_ids: Sequence[int], reasoning_tokens: int, ended_by_eos: bool) -> str | None:
    """Why the retokenised generation cannot stand for the generated tokens, or None when it can: it must
    have the generated length (less the EOS token, which the decoded text drops)."""
    expected = reasoning_tokens - (1 if ended_by_eos else 0)
    if len(gen_ids) != expected:
        return f"retokenised generation has {len(gen_ids)} tokens, the harvest generated {expected}"
    return None


@torch.no_grad()
def replay_trace(model, tokenizer, prompt: str, generated_text: str, reasoning_tokens: int, hit_cap: bool,
                 positions: Sequence[int], probe_texts: Sequence[str], trigger: str,
                 layers: Sequence[int]) -> ReplayedTrace | None:
    """Replay one stored trace (see the module docstring). ``layers`` index ``output_hidden_states``
    (0 = embeddings, ``num_hidden_layers`` = the last layer after the final norm)."""
    p_ids = _ids(tokenizer, prompt)
    g_ids = _ids(tokenizer, generated_text)
    if check_tokens(g_ids, reasoning_tokens, ended_by_eos=not hit_cap) is not None:
        return None
    P = len(p_ids)
    seq = torch.tensor([p_ids + g_ids])  # (1, S)
    cache = DynamicCache()
    body = model.get_decoder()  # the transformer without its LM head: no logits over the vocabulary needed here
    out = body(input_ids=seq, use_cache=True, past_key_values=cache, output_hidden_states=True)
    hs = torch.stack([out.hidden_states[l][0] for l in layers])  # (L, S, H)
    S = seq.shape[1]
    last, mean = [], []
    prev = None
    for t in positions:
        end = P + int(t) - 1  # index of the last token before the probe point
        last.append(hs[:, end])
        start = end if prev is None or int(t) == 0 else P + prev
        mean.append(hs[:, start : end + 1].mean(dim=1))
        prev = int(t)
    t_ids = _ids(tokenizer, trigger)
    rows = [t_ids + _ids(tokenizer, text.rstrip("\n")) for text in probe_texts]
    n, A = len(rows), max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((n, A), pad, dtype=torch.long)
    mask = torch.zeros((n, S + A), dtype=torch.long)
    pos = torch.zeros((n, A), dtype=torch.long)
    for i, (t, r) in enumerate(zip(positions, rows)):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : P + int(t)] = 1  # the row's own prefix; later tokens of the trace are masked out
        mask[i, S : S + len(r)] = 1
        pos[i] = P + int(t) + torch.arange(A)
    cache.batch_repeat_interleave(n)
    forced = body(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                  use_cache=True, output_hidden_states=True)
    fs = torch.stack([forced.hidden_states[l] for l in layers], dim=1)  # (n, L, A, H)
    k = len(t_ids)
    trig = fs[:, :, k - 1]
    ends = torch.tensor([len(r) - 1 for r in rows])
    answer = fs[torch.arange(n), :, ends]
    # greedy decoding's first answer token after the trigger, against the stored one (the LM head on n
    # positions only): 1.0 when the replay reproduces the harvest's forced answers
    has = [i for i, r in enumerate(rows) if len(r) > k]
    first = model.get_output_embeddings()(forced.last_hidden_state[has, k - 1]).argmax(-1)
    hits, total = int((first == ids[has, k]).sum()), len(has)
    states = {"last": torch.stack(last), "mean": torch.stack(mean), "trigger": trig, "answer": answer}
    return ReplayedTrace({k_: v.float().numpy() for k_, v in states.items()}, hits / total if total else 1.0)


def replay_corpus(corpus: str, out: str, families: Sequence[str], layers: Sequence[int], model: str,
                  max_per_family: int | None = None, chunk: int = 16, dtype: str = "float32",
                  num_threads: int = 1) -> dict[str, int]:
    """Replay the traces of ``families`` in ``corpus`` and store their states in ``out`` as
    ``<family>/<first>-<last>.npz`` chunks of ``chunk`` traces (resumable: a chunk on disk is skipped).

    Each chunk holds ``trace_id`` (n_probes,) naming the trace of each probe row, ``probe`` (its index in
    the trace), ``answer_match`` (per trace), and ``<rep>`` (n_probes, n_layers, hidden) float16 for every
    representation. The states are for a local study (hundreds of MB), not for git."""
    import io
    import json
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from tqdm import tqdm

    torch.set_num_threads(num_threads)
    meta = store.read_meta(corpus)
    unknown = sorted(set(families) - set(meta["families"]))
    if unknown:
        raise ValueError(f"families {unknown} are not in {corpus}; it has: {', '.join(meta['families'])}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    tok = AutoTokenizer.from_pretrained(model)
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=DTYPES[dtype]).eval()
    n_layers = lm.config.num_hidden_layers
    bad = [l for l in layers if not 0 <= l <= n_layers]
    if bad:
        raise ValueError(f"layers {bad} out of range; valid: 0..{n_layers} (0 = embeddings)")
    trigger = meta["prompt"]["answer_trigger"]
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    (root / "replay.json").write_text(json.dumps({"corpus": str(corpus), "model": model, "layers": list(layers),
                                                   "dtype": dtype, "representations": list(REPRESENTATIONS)}, indent=1))
    counts = {"traces": 0, "skipped": 0}
    for name in families:
        fam = get_family(name)  # corpora store registry names (a variant is its own registered family)
        rows = _rows(corpus, name)
        rows = rows[:max_per_family] if max_per_family else rows
        for first in tqdm(range(0, len(rows), chunk), desc=f"replay {name}", unit="chunk"):
            part = rows[first : first + chunk]
            path = root / name / f"{first:05d}-{first + len(part) - 1:05d}.npz"
            if path.exists():
                continue
            cols: dict[str, list] = {"trace_id": [], "probe": [], **{r: [] for r in REPRESENTATIONS}}
            match = []
            for r in part:
                q = Question(r["question_id"], r["family"], r["split"], r["question"], r["gold"])
                rep = replay_trace(lm, tok, fam.render_prompt(q, tok, "plain"), r["generated_text"],
                                   r["reasoning_tokens"], r["hit_cap"], r["probe_positions"], r["probe_texts"],
                                   trigger, layers)
                if rep is None:
                    counts["skipped"] += 1
                    continue
                counts["traces"] += 1
                match.append(rep.answer_match)
                n = len(r["probe_positions"])
                cols["trace_id"] += [r["trace_id"]] * n
                cols["probe"] += list(range(n))
                for k_ in REPRESENTATIONS:
                    cols[k_].append(rep.states[k_].astype(np.float16))
            buf = io.BytesIO()
            np.savez(buf, trace_id=np.array(cols["trace_id"]), probe=np.array(cols["probe"], dtype=np.int32),
                     answer_match=np.array(match, dtype=np.float32),
                     **{k_: np.concatenate(cols[k_]) if cols[k_] else np.zeros((0, len(layers), lm.config.hidden_size),
                                                                                 np.float16) for k_ in REPRESENTATIONS})
            path.parent.mkdir(parents=True, exist_ok=True)
            store.atomic_write_bytes(path, buf.getvalue())
    return counts


def _rows(corpus: str, family: str) -> list[dict]:
    """Every stored trace of ``family``, in shard order."""
    import pyarrow.parquet as pq

    rows: list[dict] = []
    for path in store.shard_paths(corpus, family):
        rows += pq.read_table(path).to_pylist()
    return rows


if __name__ == "__main__":  # python -m maml_stop.harvest.replay CORPUS OUT MODEL FAMILY[,FAMILY] [MAX] [LAYERS]
    import sys

    args = sys.argv[1:]
    print(replay_corpus(args[0], args[1], args[3].split(","), [int(x) for x in (args[5] if len(args) > 5 else "6,12,18,24").split(",")],
                        args[2], int(args[4]) if len(args) > 4 else None))
