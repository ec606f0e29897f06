"""Think mode (reasoning models that think inside ``<think> ... </think>``, maml_stop.probe.think): the
prompt opens the think block, the forced answer closes it, ``\\boxed{}`` answers are read, think and
answer tokens add up to the generated tokens (harvest and ``maml-stop generate``), probes stop once the
model closed its block, and the live stop equals the offline replay on the same harvested trace."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn
from transformers import StoppingCriteriaList

import tiny_lm
from maml_stop.data import store
from maml_stop.data.corpus import TraceCorpus
from maml_stop.harvest.cli import harvest
from maml_stop.live.generate import InputQuestion, generate_answers
from maml_stop.live.stopping import LiveStopping, replay
from maml_stop.probe.engine import ProbingGenerator
from maml_stop.probe.features import ProbeFeaturizer
from maml_stop.probe.schedule import ProbeSchedule
from maml_stop.probe.think import count_think_tokens, think_schedule
from tasks import get_family
from tasks.answers import extract_final, extract_probe
from tasks.base import think_trigger

TRIGGER = think_trigger()  # "\n</think>\n\nFinal answer:"
MAX_NEW = 24
CLOSE_BIAS = 7.0  # some traces close their think block mid-trace, one ends by EOS inside it (checked below)


class Linear(nn.Module):
    def __init__(self, n_features: int, seed: int) -> None:
        super().__init__()
        self.w = torch.randn(n_features, generator=torch.Generator().manual_seed(seed)) / math.sqrt(n_features)

    def forward(self, batch):
        return batch.features @ self.w


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    tok = tiny_lm.build_think_tokenizer()
    model = tiny_lm.build_think_model(tok, close_bias=CLOSE_BIAS)
    family = get_family("gsm_symbolic")
    questions = family.questions("test", 6, seed=0)
    prompts = [family.render_prompt(q, tok, "think") for q in questions]
    feat = ProbeFeaturizer(model.config.hidden_size, proj_dim=4)
    sched = think_schedule(ProbeSchedule(every_n=4, max_probes=10, at_start=True, at_cap=True), "think")
    harvested = ProbingGenerator(model, tok, sched, answer_trigger=TRIGGER, featurizer=feat,
                                 max_new_tokens=MAX_NEW).run(prompts, family.extract_probe_answer)
    return tok, model, family, questions, prompts, feat, sched, harvested


@pytest.mark.parametrize("opens_think", [True, False])
def test_the_prompt_opens_the_think_block_once(opens_think):
    tok = tiny_lm.build_think_tokenizer(opens_think=opens_think)
    family = get_family("gsm_symbolic")
    q = family.questions("test", 1, seed=0)[0]
    prompt = family.render_prompt(q, tok, "think")
    assert prompt.endswith("<|assistant|><think>\n") and prompt.count("<think>") == 1
    plain = family.render_prompt(q, tok)  # plain mode: the template's prompt, unchanged
    assert plain == prompt if opens_think else "<think>" not in plain
    with pytest.raises(ValueError, match=r"unknown reasoning_format 'r1'.*plain, think"):
        family.render_prompt(q, tok, "r1")


def test_the_forced_answer_closes_the_think_block(setup):
    tok, model, feat, sched = setup[0], setup[1], setup[5], setup[6]
    gen = ProbingGenerator(model, tok, sched, answer_trigger=TRIGGER, featurizer=feat, max_new_tokens=MAX_NEW)
    assert "</think>" in tok.decode(gen.trigger_ids) and gen.trigger_roundtrip
    assert tok.convert_tokens_to_ids("</think>") in gen.trigger_ids  # one added token, as in Qwen3
    with pytest.raises(ValueError, match=r"closes the think block.*got '\\nFinal answer:'"):
        LiveStopping(model, tok, Linear(len(feat.feature_names), 0), 0.5, None, feat.feature_names, feat, sched,
                     answer_trigger="\nFinal answer:", family=setup[2], reasoning_format="think")


def test_boxed_answers_and_the_answer_after_the_think_block():
    assert extract_probe(" \\boxed{42}\n", kind="number") == "42"
    assert extract_probe(" $\\boxed{-3.5}$", kind="number") == "-3.5"
    assert extract_probe(" \\boxed{B}", kind="choice") == "B"
    text = "<think>\nFinal answer: 3? Wait, 12 + 30.\n</think>\n\n**Final Answer**\n\\[\n\\boxed{42}\n\\]"
    assert extract_final(text, kind="number") == "42"  # not the tentative answer inside the thinking
    assert extract_final("<think>\nso it is 7, never closed", kind="number") == "7"


def test_probes_stop_when_the_model_closes_its_think_block(setup):
    tok, harvested = setup[0], setup[7]
    counts = [count_think_tokens(tok, h.generated_ids) for h in harvested]
    assert any(c.closed and c.after_think_tokens > 0 for c in counts)  # closed mid-trace
    assert any(not c.closed for c in counts)
    for h, c in zip(harvested, counts):
        assert c.think_tokens + c.after_think_tokens == len(h.generated_ids)
        scheduled = [p.position for p in h.probes if p.reason not in ("start", "cap")]
        assert all(pos < c.think_tokens for pos in scheduled) if c.closed else scheduled
        if c.closed:
            assert tok.decode(h.generated_ids[:c.think_tokens]).endswith("</think>")
            assert "</think>" not in tok.decode(h.generated_ids[:c.think_tokens - 1])


def test_count_by_bisection_equals_count_by_id(setup):
    """A close marker of several tokens is found by bisection on decoded prefixes; brute force agrees."""
    tok, harvested = setup[0], setup[7]
    for h in harvested:
        ids = h.generated_ids
        for close in ("</think>", "Wait", "4"):
            c = count_think_tokens(tok, ids, close=close)
            brute = next((k for k in range(1, len(ids) + 1) if close in tok.decode(ids[:k])), None)
            assert (c.think_tokens if c.closed else None) == brute
            assert c.think_tokens + c.after_think_tokens == len(ids)


def test_harvest_records_think_tokens_and_old_corpora_still_load(tmp_path, setup):
    model_dir = tiny_lm.save_tiny_think(tmp_path / "m", close_bias=CLOSE_BIAS)
    common = dict(model=model_dir, n_per_family=10, dtype="float32", batch_size=4, shard_size=10,
                  max_new_tokens=MAX_NEW, every_n=4, probe_at_cap=True)
    with pytest.raises(ValueError, match="closes the think block"):
        harvest(out=str(tmp_path / "bad"), families=["gsm_symbolic"], reasoning_format="think", **common)
    out = tmp_path / "c"
    harvest(out=str(out), families=["gsm_symbolic"], reasoning_format="think", answer_trigger=TRIGGER, **common)
    meta = store.read_meta(out)
    assert meta["prompt"]["reasoning_format"] == "think" and meta["schedule"]["until"] == "</think>"
    table = store.read_table(out)
    rows = table.to_pylist()
    assert all(r["think_tokens"] + r["after_think_tokens"] == r["reasoning_tokens"] for r in rows)
    assert any(r["after_think_tokens"] > 0 for r in rows)
    assert "</think>" in meta["prompt"]["answer_trigger"]
    # a plain corpus has no think columns; a shard of it beside a think shard reads with nulls
    plain = tmp_path / "p"
    harvest(out=str(plain), families=["gsm_symbolic"], **{**common, "n_per_family": 5, "every_n": 8})
    shard = store.shard_paths(plain)[0]
    assert pq.read_table(shard).schema.names == store.TRACE_COLUMNS
    assert store.read_table(plain).schema.names == store.TRACE_COLUMNS
    mixed = store.shard_paths(out)[0].with_name("validation-00077.parquet")
    copied = pq.read_table(shard)  # other trace ids: the same ids twice would be refused (issue 29)
    ids = copied.column("trace_id").to_pylist()
    pq.write_table(copied.set_column(0, "trace_id", pa.array([f"plain-{i}" for i in ids])), mixed)
    both = store.read_table(out)
    assert both.num_rows == table.num_rows + pq.read_table(shard).num_rows
    assert both.column("think_tokens").null_count == pq.read_table(shard).num_rows
    assert len(TraceCorpus.load(out)) > 0  # the corpus loads as any other


def test_live_stop_equals_the_offline_replay_in_think_mode(setup):
    tok, model, family, questions, prompts, feat, sched, harvested = setup
    names = feat.feature_names
    pred = Linear(len(names), seed=2)  # logits 0.7..6.4 on these traces: the first crossing of 4.5 varies by row
    threshold = 1 / (1 + math.exp(-4.5))
    replays = [replay(np.stack(h.features), names, [p.answer for p in h.probes], pred, threshold, "every")
               for h in harvested]
    crit = LiveStopping(model, tok, pred, threshold, None, names, feat, sched, answer_trigger=TRIGGER, family=family,
                        max_new_tokens=MAX_NEW, reasoning_format="think")
    try:
        results = generate_answers(crit, model, tok, family, [InputQuestion(q.question, q.gold) for q in questions],
                                   batch_size=len(questions))
    finally:
        crit.remove_hooks()
    assert 0 < sum(s is not None for s in crit.stopped_at) < len(questions)  # some rows stop, others run on
    assert any(s for s in crit.stopped_at if s)  # a stop inside a trace, not only at the start probe
    for r, (h, rep, res) in enumerate(zip(harvested, replays, results)):
        expected = None if rep.stop is None else h.probes[rep.stop].position
        assert crit.stopped_at[r] == expected, r
        assert crit.reasons[r] == [p.reason for p in h.probes][:len(crit.reasons[r])]
        assert res["think_tokens"] + res["after_think_tokens"] == res["reasoning_tokens"]
        c = count_think_tokens(tok, h.generated_ids[:res["reasoning_tokens"]])
        assert (res["think_tokens"], res["think_closed"]) == (c.think_tokens, c.closed)
        if expected is not None:
            assert res["answer"] == h.probes[rep.stop].answer
