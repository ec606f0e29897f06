"""The cost-aware policies (maml_stop.decide.policies.cost_aware) on hand-made traces whose right
stop and bill are known: what each pays with the probes it ran, agreement with the live rule's replay,
and one evaluate run on a tiny synthetic corpus with the new methods listed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from maml_stop.data.accounting import full_cost, stop_cost
from maml_stop.decide import policies as P
from maml_stop.decide.thresholds import FixedThreshold
from maml_stop.learn.adapter import InnerLoopAdapter
from maml_stop.learn.predictor import StoppingPredictor
from maml_stop.live.rule import replay
from maml_stop.probe.features import answer_key, answer_stability
from trace_helpers import make_trace

NAMES = ["h0", "h1", "logprob_mean", "same_as_prev", "run_length", "n_distinct", "answer_empty"]
FREE = ["h0", "h1"]
COL = {n: i for i, n in enumerate(NAMES)}


class Column(nn.Module):
    """A fixed 'predictor': P = sigmoid(20 * (x[:, col] - at)), so the column decides (> at: fires)."""

    def __init__(self, col: int, at: float = 0.5) -> None:
        super().__init__()
        self.col, self.at = col, at

    def forward(self, batch) -> torch.Tensor:  # (N,)
        return 20.0 * (batch.features[:, self.col] - self.at)


def trace(h0=None, h1=None, stop=None, answers=None, labels=None, final_em=True, trace_id="t", **kw):
    """A trace with NAMES features: h0, h1 free, ``stop`` in logprob_mean (paid), and the stability
    features of the dense schedule computed from ``answers`` (what the harvester stores)."""
    p = len(labels if labels is not None else h0)
    labels = labels if labels is not None else [0] * p
    answers = answers if answers is not None else ["1"] * p
    feats = np.zeros((p, len(NAMES)), np.float32)
    for name, col in (("h0", h0), ("h1", h1), ("logprob_mean", stop)):
        if col is not None:
            feats[:, COL[name]] = col
    keys: list[str] = []
    for i, a in enumerate(answers):
        for k, v in answer_stability(keys, answer_key(a)).items():
            feats[i, COL[k]] = v
        keys.append(answer_key(a))
    return make_trace(labels, answers=answers, features=feats, final_em=final_em, trace_id=trace_id, **kw)


def fixed_probe(col: int, tau: float = 0.5, at: float = 0.5) -> P.ProbePolicy:
    return P.ProbePolicy(predictor=Column(col, at), selector=FixedThreshold(tau))


def free_view(target: str = "probe") -> P.FeatureView:
    return P.FeatureView.of(NAMES, FREE, target=target)


def test_feature_columns_and_views():
    assert P.feature_columns(NAMES, ["run_length", "h0"]).tolist() == [4, 0]
    with pytest.raises(ValueError, match="not among"):
        P.feature_columns(NAMES, ["h7"])
    assert P.free_features(NAMES) == FREE
    t = trace(h0=[1, 2], h1=[3, 4], final_em=False, labels=[0, 1])
    sel = free_view("final")(t)
    assert sel.features.tolist() == [[1, 3], [2, 4]] and sel.labels.tolist() == [0, 0]  # final EM labels
    fill = np.full(len(NAMES), -9.0)
    masked = P.FeatureView.of(NAMES, FREE, width=len(NAMES), fill=fill)(t)
    assert masked.features[:, :2].tolist() == [[1, 3], [2, 4]] and (masked.features[:, 2:] == -9).all()


def test_subtrace_recomputes_stability_over_kept_answers():
    t = trace(h0=[0] * 4, answers=["7", "8", "7", "7"])
    assert t.features[2, COL["run_length"]] == 1  # dense: 8 came in between
    sub = P.subtrace(t, [0, 2, 3], NAMES)
    assert sub.features[:, COL["run_length"]].tolist() == [1, 2, 3]
    assert sub.features[:, COL["n_distinct"]].tolist() == [1, 1, 1]
    assert sub.positions.tolist() == [10, 30, 40] and sub.probe_answers == ["7", "7", "7"]
    assert stop_cost(sub, 1) == stop_cost(t, 2, ran=[0, 2])  # the sub-trace's bill is the trace's


def test_free_probe_pays_one_forced_answer_at_its_stop():
    t = trace(h0=[0, 0, 1, 1], labels=[0, 1, 1, 1], reasoning_tokens=50)  # positions 10..40, probes cost 5
    policy = P.ViewProbe(fixed_probe(0), free_view(), pays="stop", feature_names=NAMES).fit([t])
    out = policy.outcome(t)
    assert out.index == 2 and out.ran == (2,) and out.em
    assert (out.total_tokens, out.reasoning_tokens) == (30 + 5, 30) == stop_cost(t, 2, ran=[2])
    never = trace(h0=[0, 0, 0], final_em=True, reasoning_tokens=45, trace_id="never")  # ids are unique (caches)
    out = policy.outcome(never)  # never stops: plain full generation, no probe paid
    assert out.index is None and out.ran == () and out.total_tokens == out.reasoning_tokens == full_cost(never) == 45
    plain = P.ViewProbe(fixed_probe(0), free_view(), pays="every").fit([t])
    assert plain.outcome(t).total_tokens == 30 + 3 * 5  # the plain probe on the same view pays every probe
    with pytest.raises(ValueError, match="free features"):
        P.ViewProbe(fixed_probe(2), P.FeatureView.of(NAMES), pays="stop", feature_names=NAMES)


def gated_policy() -> P.GatedProbe:
    gate = fixed_probe(1)  # column 1 of the free view: h1
    stop = fixed_probe(COL["run_length"], at=1.5)  # stop once 2 forced answers agree
    return P.GatedProbe(gate, free_view(), stop, P.FeatureView.of(NAMES), NAMES, gate_threshold=0.5)


def test_gated_probe_pays_the_gated_probes_and_agrees_with_the_live_replay():
    # gate opens at probes 1, 3, 4; the forced answers 7, 7 agree at probe 3 (the dense run length
    # there is 1: an 8 came in between, unforced)
    t = trace(h0=[0] * 5, h1=[0, 1, 0, 1, 1], answers=["7", "7", "8", "7", "7"], labels=[0, 1, 0, 1, 1],
              reasoning_tokens=60)
    policy = gated_policy().fit([t])
    assert policy.gated(t).tolist() == [1, 3, 4]
    out = policy.outcome(t)
    assert out.index == 3 and out.ran == (1, 3) and out.em
    assert (out.total_tokens, out.reasoning_tokens) == (40 + 2 * 5, 40)
    live = replay(t.features, NAMES, t.probe_answers, Column(COL["run_length"], 1.5), 0.5, "gated",
                  gate=Column(1), gate_threshold=0.5, gate_features=FREE)
    assert (live.stop, live.forced) == (out.index, list(out.ran))
    # no agreement among the forced answers: runs to the end paying every gated probe
    t2 = trace(h0=[0] * 4, h1=[1, 0, 1, 0], answers=["1", "2", "3", "4"], reasoning_tokens=50, trace_id="t2")
    out = policy.outcome(t2)
    assert out.index is None and out.ran == (0, 2) and out.total_tokens == 50 + 2 * 5
    assert replay(t2.features, NAMES, t2.probe_answers, Column(COL["run_length"], 1.5), 0.5, "gated",
                  gate=Column(1), gate_features=FREE).forced == [0, 2]
    with pytest.raises(ValueError, match="free features only"):
        P.GatedProbe(fixed_probe(0), P.FeatureView.of(NAMES, ["logprob_mean"]), fixed_probe(0),
                     P.FeatureView.of(NAMES), NAMES)


def test_sparse_schedule_pays_every_other_probe():
    never = trace(h0=[0] * 6, reasoning_tokens=70)
    dense = fixed_probe(COL["h0"]).fit([never])
    sparse = P.SparseSchedule(fixed_probe(COL["h0"]), every=2, feature_names=NAMES).fit([never])
    assert dense.outcome(never).total_tokens == 70 + 6 * 5
    out = sparse.outcome(never)
    assert out.index is None and out.ran == (0, 2, 4) and out.total_tokens == 70 + 3 * 5  # half the probes
    late = trace(h0=[0, 0, 0, 1, 1, 1], labels=[0, 0, 0, 1, 1, 1], trace_id="late")
    assert dense.outcome(late).total_tokens == 40 + 4 * 5
    out = sparse.outcome(late)  # probe 3 is hidden: stops at 4, having run 0, 2, 4
    assert out.index == 4 and out.ran == (0, 2, 4) and out.em and out.total_tokens == 50 + 3 * 5
    assert sparse.outcome_at(late, None) == P.full_generation_outcome(late)
    # the wrapper keeps the inner policy's grid and selection
    assert sparse.candidates == dense.candidates and sparse.param == 0.5
    with pytest.raises(ValueError, match="every"):
        P.SparseSchedule(fixed_probe(0), every=0, feature_names=NAMES)


def test_a_capped_run_pays_its_forced_cap_answer_under_every_schedule():
    """A capped run's answer is the answer forced at the cap (trace.cap_probe): full generation pays it,
    a policy running to the end pays it once, and a sparse schedule always runs it."""
    from dataclasses import replace

    capped = replace(trace(h0=[0] * 5, reasoning_tokens=50), hit_cap=True, cap_probe=4)  # probe 4 at 50 = the cap
    assert full_cost(capped) == 50 + 5
    assert stop_cost(capped, None, ran=[])[0] == 50 + 5 and stop_cost(capped, None, ran=[4])[0] == 50 + 5
    sparse = P.SparseSchedule(fixed_probe(COL["h0"]), every=2, feature_names=NAMES).fit([capped])
    out = sparse.outcome(capped)  # keeps 0, 2, 4 (the cap): never stops, pays those three
    assert out.index is None and out.ran == (0, 2, 4) and out.total_tokens == 50 + 3 * 5
    sparse3 = P.SparseSchedule(fixed_probe(COL["h0"]), every=3, feature_names=NAMES).fit([capped])
    out = sparse3.outcome(capped)  # keeps 0, 3 and the cap probe 4
    assert out.ran == (0, 3, 4) and out.total_tokens == 50 + 3 * 5
    keep, sub = sparse3.kept(capped)
    assert keep.tolist() == [0, 3, 4] and sub.cap_probe == 2 and full_cost(sub) == full_cost(capped)


def test_give_up_stops_a_run_that_will_be_wrong_and_keeps_em():
    wrong = trace(h0=[0, 0, 0], h1=[0, 0, 0], labels=[0, 0, 0], final_em=False, reasoning_tokens=40, trace_id="w")
    right = trace(h0=[0, 0, 0], h1=[1, 1, 1], labels=[0, 0, 1], final_em=True, reasoning_tokens=40, trace_id="r")
    stop = P.ViewProbe(fixed_probe(0), free_view(), pays="stop", feature_names=NAMES)  # never fires here
    policy = P.GiveUp(stop, fixed_probe(1), free_view("final"), below=0.1).fit([wrong, right])
    out = policy.outcome(wrong)  # P(right) ~ 0 at the first probe: give up there, one forced answer
    assert out.index == 0 and out.ran == (0,) and out.total_tokens == 10 + 5 and out.em == wrong.final_em
    assert policy.outcome(right) == P.full_generation_outcome(right)  # keeps running, pays nothing extra
    # combined with the plain probe, a give-up pays every probe up to it
    plain = P.ViewProbe(fixed_probe(0), free_view(), pays="every")
    late = trace(h0=[0, 0, 0], h1=[1, 1, 0], final_em=False, reasoning_tokens=40, trace_id="late")
    assert P.GiveUp(plain, fixed_probe(1), free_view("final")).fit([late]).outcome(late).total_tokens == 30 + 15
    with pytest.raises(ValueError, match="target='final'"):
        P.GiveUp(stop, fixed_probe(1), free_view("probe"))


def test_give_up_learned_from_support_keeps_em():
    """A scratch P(full run right) on the free features, learned from support final EMs alone."""
    rng = np.random.default_rng(0)

    def traces(n, offset):
        out = []
        for i in range(n):
            em = bool(i % 2)
            out.append(trace(h0=rng.normal(size=4), h1=(1.5 if em else -1.5) + 0.2 * rng.normal(size=4),
                             labels=[0, 0, 0, int(em)], final_em=em, reasoning_tokens=60,
                             trace_id=f"fam/{offset + i:05d}#0"))
        return out

    support, query = traces(12, 0), traces(12, 100)

    def scratch(width: int) -> P.ProbePolicy:
        torch.manual_seed(0)
        adapter = InnerLoopAdapter(StoppingPredictor(width, hidden=8, depth=1), inner_lr=0.5, inner_steps=60,
                                   first_order=True)
        return P.ProbePolicy(adapter=adapter, renormalise=True, selector=FixedThreshold(0.9))

    stop = P.ViewProbe(scratch(2), free_view(), pays="stop", feature_names=NAMES)
    policy = P.GiveUp(stop, scratch(2), free_view("final"), below=0.2).fit(support)
    out = P.evaluate_policy(policy, query)
    wrong = ~out.full_em.astype(bool)
    assert out.stopped_early[wrong].all()  # every run that will be wrong is stopped at once...
    assert (out.em >= out.full_em).all()  # ...losing no EM
    assert out.total_tokens[wrong].max() == 10 + 5


def test_evaluate_runs_the_cost_aware_methods(tmp_path):
    from conftest import make_trace_rows
    from maml_stop.data import store
    from maml_stop.evaluate.config import EvaluateConfig
    from maml_stop.evaluate.methods import COST_AWARE_METHODS
    from maml_stop.evaluate.protocol import run

    root = tmp_path / "corpus"  # the tiny synthetic corpus, with feature names whose cost class is known
    names = ["h0", "h1", "h2", "h3", "logprob_mean", "same_as_prev", "tokens_so_far", "probe_index"]
    store.write_meta(root, {"feature_names": names, "model": {"name": "synthetic"}})
    for k, fam in enumerate(("fam_a", "fam_b", "fam_c")):
        store.write_shard(root, fam, "all", make_trace_rows(fam, 40, seed=k, shift=0.3 * k))
    methods = ["full", "scratch", *COST_AWARE_METHODS, "oracle"]
    cfg = EvaluateConfig(corpus=str(root), out=str(tmp_path / "out"), families=["fam_c"], k=[4], episodes=2,
                         methods=methods, scratch_steps=10, progress=False, crossfit=True)
    results = run(cfg)
    cells = results["results"]["fam_c"]["4"]
    assert list(cells) == methods
    for m in COST_AWARE_METHODS:
        fig = cells[m]["thresholds"]["em_target"]
        assert len(fig["savings"]) == 2 and all(np.isfinite(fig["savings_reasoning"]))
    # a free probe pays at most one forced answer (6 tokens in this corpus) per trace
    for m in ("free_probe", "free_give_up"):
        fig = cells[m]["thresholds"]["em_target"]
        assert all(t - r <= 6 + 1e-9 for t, r in zip(fig["tokens"], fig["reasoning_tokens"]))
    assert "free_probe" in (tmp_path / "out" / "results.md").read_text()
