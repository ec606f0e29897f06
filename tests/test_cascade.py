"""The small -> large cascade (issue 28): pairing, the accounting on hand-built pairs, the policies'
thresholds against the large model, the live switch against the offline decision, and a tiny run of
``maml-stop evaluate``'s cascade block."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import make_trace_rows
from trace_helpers import make_trace
from maml_stop.data import store
from maml_stop.data.pairs import COST_FILE, CostModel, PairedTrace, load_pairs
from maml_stop.decide.policies import cascade as C
from maml_stop.decide.thresholds import EMTargetThreshold, FixedThreshold


class FixedRouter:
    """P(right) per probe given by hand, by trace id (a router's interface: fit, forget, prepare, scores)."""

    def __init__(self, p: dict[str, list[float]]) -> None:
        self.p, self.fitted = p, 0

    def fit(self, support) -> None:
        self.fitted += 1

    def forget(self, support) -> None:
        pass

    def prepare(self, traces) -> None:
        pass

    def scores(self, trace) -> np.ndarray:
        return np.asarray(self.p[trace.trace_id], dtype=np.float64)


def _pair(qid: str, small_em: bool, large_em: bool) -> PairedTrace:
    # small: probes at 10, 20, 30 (5 tokens each), 40 reasoning tokens; large: no probes needed, 100 tokens
    small = make_trace([0, 0, 1], final_em=small_em, step=10, reasoning_tokens=40, trace_id=f"{qid}#0")
    large = make_trace([1], final_em=large_em, step=50, reasoning_tokens=100, trace_id=f"{qid}#0")
    return PairedTrace(small, large)


PRICE = CostModel(ratio=2.5)


def test_accounting_on_a_hand_built_pair():
    pair = _pair("fam/q0", small_em=False, large_em=True)
    router = FixedRouter({"fam/q0#0": [0.9, 0.3, 0.2]})  # escalation score 1 - P: 0.1, 0.7, 0.8
    policy = C.EscalateAtProbe(router, PRICE, taus=[0.5, 0.75, 0.95])
    at = {tau: policy.outcome_at(pair, tau) for tau in (0.5, 0.75, 0.95)}
    # 0.5: hands over at probe 1 (20 small tokens, no forced answer paid), then the large model's 100 tokens
    assert at[0.5] == C.CascadeOutcome(True, 20, 100, True) and at[0.5].cost(PRICE) == 20 + 2.5 * 100
    assert at[0.75] == C.CascadeOutcome(True, 30, 100, True)
    assert at[0.95] == C.CascadeOutcome(False, 40, 0, False) and at[0.95].cost(PRICE) == 40  # the small run in full
    assert policy.outcome_at(pair, None) == C.CascadeOutcome(True, 0, 100, True)  # the large model alone
    start = C.EscalateAtStart(FixedRouter({"fam/q0#0": [0.45]}), PRICE, taus=[0.5, 0.6])
    assert start.outcome_at(pair, 0.5) == C.CascadeOutcome(True, 0, 100, True)  # 1 - 0.45 >= 0.5: large from the start
    assert start.outcome_at(pair, 0.6) == C.CascadeOutcome(False, 40, 0, False)
    both = C.RunBoth(FixedRouter({"fam/q0#0": [0.1, 0.1, 0.8]}), FixedRouter({"fam/q0#0": [0.6]}), PRICE, margins=[0.3, 0.1])
    assert both.outcome_at(pair, 0.3) == C.CascadeOutcome(True, 40, 100, True)  # gap 0.2 < 0.3: the large answer
    assert both.outcome_at(pair, 0.1) == C.CascadeOutcome(False, 40, 100, False)  # both paid, the small answer kept
    assert C.OracleRouter().outcome(pair) == C.CascadeOutcome(True, 0, 100, True)
    assert C.OracleRouter().outcome(_pair("fam/q1", True, True)) == C.CascadeOutcome(True, 40, 0, False)
    assert C.SmallOnly().outcome(pair).cost(PRICE) == 40 and C.LargeOnly().outcome(pair).cost(PRICE) == 250


def test_the_selector_measures_against_the_large_model():
    """The support sweep's reference is the large model alone; em_target picks the cheapest tau within delta."""
    pairs = [_pair(f"fam/q{i}", small_em=i % 2 == 0, large_em=True) for i in range(4)]
    # the router is right: low P(right) exactly where the small model is wrong
    router = FixedRouter({f"fam/q{i}#0": [0.9 if i % 2 == 0 else 0.1] * 3 for i in range(4)})
    policy = C.EscalateAtProbe(router, PRICE, taus=[0.05, 0.5, 0.95], selector=EMTargetThreshold(0.0)).fit(pairs)
    assert router.fitted == 1
    sweep = policy.support_sweep
    np.testing.assert_allclose(sweep.full_tokens, 250.0)
    np.testing.assert_allclose(sweep.em.mean(0), [1.0, 1.0, 0.5])
    assert policy.param == 0.5  # tau 0.95 never escalates and loses half; 0.05 escalates everything (dearer)
    assert policy.choose(FixedThreshold()) == policy.default_param


NAMES = ["h0", "h1", "h2", "h3", "logprob_mean", "same_as_prev", "tokens_so_far", "probe_index"]  # free and paid


def _two_corpora(tmp_path, families_large=("fam_a", "fam_b", "fam_c")):
    """Synthetic corpora of two 'models': 60 questions per family, the large one holding the first 40 of them."""
    roots = {}
    for which, n, seed in (("small", 60, 0), ("large", 40, 10)):
        root = roots[which] = tmp_path / which
        store.write_meta(root, {"feature_names": NAMES, "model": {"name": which}})
        for k, fam in enumerate(("fam_a", "fam_b", "fam_c") if which == "small" else families_large):
            store.write_shard(root, fam, "all", make_trace_rows(fam, n, seed=seed + k, shift=0.3 * k))
    return str(roots["small"]), str(roots["large"])


def test_pairs_share_question_ids_and_a_missing_family_is_named(tmp_path):
    small, large = _two_corpora(tmp_path, families_large=("fam_a", "fam_b"))
    pairs = load_pairs(small, large)
    assert sorted(pairs) == ["fam_a", "fam_b"] and all(len(ps) == 40 for ps in pairs.values())
    assert all(p.small.trace_id == p.large.trace_id and p.small is not p.large for p in pairs["fam_a"])
    with pytest.raises(store.CorpusError, match=r"\['fam_c'\] are missing from the large model's corpus .*"
                                                r"families there: \['fam_a', 'fam_b'\]"):
        load_pairs(small, large, families=["fam_a", "fam_c"])
    with pytest.raises(store.CorpusError, match=r"missing from the small model's corpus .*fam_a"):
        load_pairs(small, large, families=["fam_x"])


def test_cost_model_reads_the_benchmark_file(tmp_path):
    (tmp_path / COST_FILE).write_text(json.dumps({"ratios": {"wall": 2.0, "cpu": 2.4, "flops": 3.1}}))
    assert CostModel.load(tmp_path, "cpu") == CostModel(2.4, "cpu")
    with pytest.raises(ValueError, match=r"no 'joules' ratio.*\['cpu', 'flops', 'wall'\]"):
        CostModel.load(tmp_path, "joules")
    with pytest.raises(ValueError, match="valid: wall, cpu, flops"):
        CostModel(2.0, "joules")


def test_the_figure_plots_the_chosen_point_and_the_hindsight_curve():
    from maml_stop.evaluate.cascade_plot import _family_means, cascade_points

    ref = {"episodes": {"em": [0.5, 0.7], "cost_share": [0.4, 0.6]}}
    curve = {"candidates": [0.1, 0.9], "0.1": {"em": [0.8, 0.8], "cost_share": [1.0, 1.2]},
             "0.9": {"em": [0.5, 0.5], "cost_share": [0.5, 0.5]}}
    thresholded = {"selectors": {"em_target": {"em": [0.6, 0.8], "cost_share": [0.7, 0.9]}}, "curve": curve}
    assert cascade_points(ref, "em_target") == {"point": (0.5, 0.6), "curve": []}
    got = cascade_points(thresholded, "em_target")
    assert got["point"] == pytest.approx((0.8, 0.7)) and got["curve"] == [pytest.approx((1.1, 0.8)), (0.5, 0.5)]
    assert cascade_points(thresholded, "ltt")["point"] is None  # a selector not run: no chosen point
    two = {"families": {"a": {"16": {"small": ref, "m": thresholded}}, "b": {"16": {"small": ref}}}}
    means = _family_means(two, 16, "em_target")
    assert set(means) == {"small"} and means["small"]["point"] == pytest.approx((0.5, 0.6))  # only shared methods


@pytest.mark.parametrize("learned", [pytest.param(False), pytest.param(True, marks=pytest.mark.slow)])
def test_evaluate_cascade_block_runs_and_reports(tmp_path, learned):
    from maml_stop.evaluate.cascade import run_cascade
    from maml_stop.evaluate.config import EvaluateConfig

    torch.set_num_threads(1)
    small, large = _two_corpora(tmp_path)
    (tmp_path / "cost.json").write_text(json.dumps({"ratios": {"wall": 2.0}}))
    methods = ["small", "large", "oracle_router", "escalate_start_ridge", "escalate_probe_ridge"]
    if learned:  # the routers through the shared adapter: from scratch, meta-initialised, pooled
        methods += ["escalate_probe_scratch", "escalate_probe_meta", "run_both_pooled"]
    cfg = EvaluateConfig(corpus=small, out=str(tmp_path / "out"), k=[8], episodes=2, threshold_methods=["em_target"],
                         cascade={"pairs": large, "cost": str(tmp_path / "cost.json"), "methods": methods,
                                  "compare": ["escalate_probe_meta", "escalate_probe_scratch"] if learned
                                  else ["escalate_probe_ridge", "escalate_start_ridge"],
                                  "router": {"meta_steps": 3, "pooled_steps": 5, "scratch_steps": 5}})
    results = run_cascade(cfg)
    cell = results["families"]["fam_a"]["8"]
    assert set(cell) == set(methods)
    assert cell["large"]["episodes"]["cost_share"] == [1.0, 1.0] and cell["large"]["episodes"]["em_vs_large"] == [0.0, 0.0]
    assert all(0.0 <= s <= 1.0 for s in cell["oracle_router"]["episodes"]["cost_share"])  # never dearer than large
    assert len(cell["escalate_probe_ridge"]["selectors"]["em_target"]["em"]) == 2
    report = (tmp_path / "out" / "results.md").read_text()
    assert "| fam_a | oracle_router | - |" in report and "Paired bootstrap" in report and "all (stratified)" in report
    assert results["corpus_traces"]["large"] == {"fam_a": 40, "fam_b": 40, "fam_c": 40}
    assert "Routers' source traces" in report and "large model fam_a 40, fam_b 40, fam_c 40" in report
    assert "(em_cost_k8.png)" in report and (tmp_path / "out" / "em_cost_k8.png").stat().st_size > 0
    (tmp_path / "out" / "results.md").unlink()  # the report renders again from the stored figures alone
    from maml_stop.evaluate.command import main as evaluate_main
    assert evaluate_main(["--report_only", str(tmp_path / "out" / "results.json")]) == 0
    assert (tmp_path / "out" / "results.md").read_text() == report
    with pytest.raises(ValueError, match="unknown cascade methods \\['escalate_nowhere'\\]"):
        run_cascade(EvaluateConfig(corpus=small, cascade={"pairs": large, "methods": ["escalate_nowhere"]}))


# -- live: the CascadeGenerator's switch is the offline decision ----------------------------------------------


@pytest.fixture(scope="module")
def tiny_pair():
    import tiny_lm
    from maml_stop.probe.engine import ProbingGenerator
    from maml_stop.probe.features import ProbeFeaturizer
    from maml_stop.probe.schedule import ProbeSchedule
    from tasks import get_family

    torch.set_num_threads(1)
    tok = tiny_lm.build_tokenizer()
    small, large = tiny_lm.build_model(tok, seed=0), tiny_lm.build_model(tok, seed=1)
    feat = ProbeFeaturizer(small.config.hidden_size, proj_dim=8)
    sched = ProbeSchedule(every_n=4, boundary=True, align=2, max_probes=10)
    family = get_family("gsm_symbolic")
    prompts = ["Think step by step. First add 12 + 30, then subtract 4.", "Question: What is 3 + 4?\nAnswer:",
               "Calculate 7 * 6 please now."]
    harvested = ProbingGenerator(small, tok, sched, answer_trigger="\nFinal answer:", featurizer=feat,
                                 max_new_tokens=20).run(prompts, family.extract_probe_answer)
    return tok, small, large, feat, sched, family, prompts, harvested


class LinearRouter(torch.nn.Module):
    """A fixed random logit of P(right) on a probe's free features."""

    def __init__(self, n: int, seed: int) -> None:
        super().__init__()
        self.w = torch.randn(n, generator=torch.Generator().manual_seed(seed)) / math.sqrt(n)

    def forward(self, batch):
        return batch.features @ self.w


def test_live_switch_gives_the_offline_decision(tiny_pair):
    from types import SimpleNamespace

    from maml_stop.live.cascade import CascadeGenerator
    from maml_stop.probe.features import feature_cost

    tok, small, large, feat, sched, family, prompts, harvested = tiny_pair
    free = [i for i, n in enumerate(feat.feature_names) if feature_cost(n) == "free"]
    net = LinearRouter(len(free), seed=1)
    traces = [SimpleNamespace(trace_id=str(r), features=np.stack(h.features)[:, free],
                              positions=np.array([p.position for p in h.probes])) for r, h in enumerate(harvested)]
    with torch.no_grad():
        p_right = {t.trace_id: torch.sigmoid(net(SimpleNamespace(features=torch.tensor(t.features)))).tolist()
                   for t in traces}
    escalation = sorted({round(1 - p, 6) for ps in p_right.values() for p in ps})
    tau = float(np.median(escalation))  # some rows hand over mid-trace, some may not
    offline = C.EscalateAtProbe(FixedRouter(p_right), PRICE, taus=[tau])
    gen = CascadeGenerator(small, tok, large, tok, net, tau, [feat.feature_names[i] for i in free], feat, sched,
                           family, max_new_tokens=20)
    try:
        live = gen.generate(prompts)
    finally:
        gen.close()
    switched = 0
    for t, res in zip(traces, live):
        i = offline.escalation(SimpleNamespace(small=t), tau)
        if i is None:
            assert res.model == "small" and res.escalated_at is None and res.large_tokens == 0
        else:
            switched += 1
            assert res.model == "large" and res.escalated_at == res.small_tokens == int(t.positions[i])
            assert res.large_tokens > 0
    assert switched >= 1
