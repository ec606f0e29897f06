"""One probe engine for the harvest and live stopping (issue 10): in every live mode the live stop equals
the offline replay (``maml_stop.live.stopping.replay``) of the same rule over the harvested trace of the
same prompt; live features (mid-layer summary included) equal the harvester's; a row that stops leaves
the other rows of its batch untouched; a rule that never fires gives plain ``generate()``'s tokens."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from transformers import StoppingCriteriaList

import tiny_lm
from maml_stop.live.stopping import MODES, LiveStopping, replay
from maml_stop.probe.engine import ProbingGenerator
from maml_stop.probe.features import ProbeFeaturizer, answer_key, feature_cost
from maml_stop.probe.schedule import ProbeSchedule
from tasks import get_family

PROMPTS = ["Think step by step. First add 12 + 30, then subtract 4.", "Question: What is 3 + 4?\nAnswer:",
           "Calculate 7 * 6 please now."]
MAX_NEW = 20
TRIGGER = "\nFinal answer:"


class Linear(nn.Module):
    """A fixed random linear logit of a probe's features (a stand-in predictor of known output)."""

    def __init__(self, n_features: int, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(n_features, generator=g) / math.sqrt(n_features)

    def forward(self, batch):
        return batch.features @ self.w


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    tok = tiny_lm.build_tokenizer()
    model = tiny_lm.build_model(tok)
    feat = ProbeFeaturizer(model.config.hidden_size, proj_dim=8, mid_layer=1)
    sched = ProbeSchedule(every_n=4, boundary=True, align=2, max_probes=10, at_start=True, at_cap=True)
    family = get_family("gsm_symbolic")
    harvested = ProbingGenerator(model, tok, sched, answer_trigger=TRIGGER, featurizer=feat,
                                 max_new_tokens=MAX_NEW).run(PROMPTS, family.extract_probe_answer)
    return tok, model, feat, sched, family, harvested


def _names(feat, kind):
    return [n for n in feat.feature_names if kind == "all" or feature_cost(n) == kind]


def _rule(setup, mode):
    """The predictors of a mode: (stop predictor, its names, gate, gate names)."""
    feat = setup[2]
    names = _names(feat, "free" if mode == "free" else "all")
    gate_names = _names(feat, "free") if mode == "gated" else None
    gate = Linear(len(gate_names), seed=2) if gate_names else None
    seed = 3 if mode == "every" else 1  # seeds whose stops fall mid-trace too, not only at the start probe
    return Linear(len(names), seed=seed), names, gate, gate_names


def _replay(setup, mode, threshold, gate_threshold=0.5):
    feat, harvested = setup[2], setup[5]
    pred, names, gate, gate_names = _rule(setup, mode)
    return [replay(np.stack(h.features), feat.feature_names, [p.answer for p in h.probes], pred, threshold, mode,
                   predictor_features=names, gate=gate, gate_threshold=gate_threshold, gate_features=gate_names)
            for h in harvested]


def _between(values, k):
    """A threshold between the k-th and (k+1)-th largest distinct values (no value near it)."""
    v = sorted(set(round(x, 6) for x in values), reverse=True)
    assert len(v) > k + 1, v
    return (v[k] + v[k + 1]) / 2


def _thresholds(setup, mode, stopping_rows):
    """(threshold, gate threshold) under which replay stops ``stopping_rows`` of the three rows: 1 = only
    the row of the highest P, 2 = the two highest. The gate forces about half the probes."""
    gate_threshold = 0.5
    if mode == "gated":
        every = [p for r in _replay(setup, mode, math.inf, math.inf) for p in r.gate_probabilities]
        gate_threshold = _between(every, len(every) // 2)
    rows = _replay(setup, mode, math.inf, gate_threshold)
    best = [max(p for p in r.stop_probabilities if p is not None) for r in rows]
    return _between(best, stopping_rows - 1), gate_threshold


def _live(setup, mode, threshold, gate_threshold=0.5, predictor_names=None):
    tok, model, feat, sched, family = setup[:5]
    pred, names, gate, gate_names = _rule(setup, mode)
    crit = LiveStopping(model, tok, pred, threshold, None, predictor_names or names, feat, sched,
                        answer_trigger=TRIGGER, family=family, mode=mode, gate=gate, gate_threshold=gate_threshold,
                        gate_feature_names=gate_names, max_new_tokens=MAX_NEW)
    tok.padding_side = "left"
    enc = tok(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)
    try:
        out = model.generate(**enc, max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=tok.pad_token_id,
                             stopping_criteria=StoppingCriteriaList([crit]))
    finally:
        crit.remove_hooks()
    return enc, out, crit


@pytest.fixture(scope="module")
def plain(setup):
    tok, model = setup[:2]
    tok.padding_side = "left"
    enc = tok(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)
    return model.generate(**enc, max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=tok.pad_token_id)


def test_every_mode_features_equal_the_harvest_with_mid_layer(setup):
    feat, harvested = setup[2], setup[5]
    _, _, crit = _live(setup, "every", math.inf)
    for r, h in enumerate(harvested):
        assert crit.reasons[r] == [p.reason for p in h.probes]
        assert crit.probe_answers[r] == [p.answer for p in h.probes]
        np.testing.assert_allclose(np.stack(crit.features[r]), np.stack(h.features), atol=1e-4)
    mid = [i for i, n in enumerate(feat.feature_names) if n.startswith("m")]
    assert mid and np.abs(np.stack(harvested[0].features)[:, mid]).sum() > 0  # the mid-layer summary is there
    assert {"start", "cap"} <= {p.reason for h in harvested for p in h.probes}


@pytest.mark.parametrize("mode", MODES)
def test_never_firing_run_equals_plain_generate(setup, plain, mode):
    gate_threshold = _thresholds(setup, mode, 1)[1]
    _, out, crit = _live(setup, mode, math.inf, gate_threshold)
    assert torch.equal(out, plain)
    assert crit.stopped_at == [None] * 3
    capped = [r for r in range(3) if crit.reasons[r][-1] == "cap"]
    assert capped and len(capped) < 3  # one row ends by EOS
    assert crit.answers == [crit.probe_answers[r][-1] if r in capped else None for r in range(3)]  # cap answers
    forced = sum(sum(f) for f in crit.forced)
    n_probes = sum(len(f) for f in crit.features)
    if mode == "every":
        assert forced == n_probes
    elif mode == "free":
        assert forced == len(capped) and all(crit.forced[r][-1] for r in capped)  # the cap answers only
    else:
        assert len(capped) < forced < n_probes


@pytest.mark.parametrize("stopping_rows", [1, 2])
@pytest.mark.parametrize("mode", MODES)
def test_live_stop_equals_replay_and_other_rows_continue(setup, plain, mode, stopping_rows):
    feat, harvested = setup[2], setup[5]
    threshold, gate_threshold = _thresholds(setup, mode, stopping_rows)
    replays = _replay(setup, mode, threshold, gate_threshold)
    enc, out, crit = _live(setup, mode, threshold, gate_threshold)
    P = enc["input_ids"].shape[1]
    stopped = [r for r in range(3) if crit.stopped_at[r] is not None]
    assert len(stopped) == stopping_rows
    if stopping_rows == 1:
        assert crit.stopped_at[stopped[0]] > 0  # a stop inside the trace
    for r, (h, rep) in enumerate(zip(harvested, replays)):
        expected = None if rep.stop is None else h.probes[rep.stop].position
        assert crit.stopped_at[r] == expected, (mode, r)
        n_live = len(crit.features[r])
        policy_forced = [i for i, f in enumerate(crit.forced[r]) if f and not
                         (crit.reasons[r][i] == "cap" and i not in rep.forced)]
        assert policy_forced == rep.forced
        np.testing.assert_allclose(np.array(crit.probabilities[r], dtype=float),
                                   np.array(rep.stop_probabilities[:n_live], dtype=float), atol=1e-4)
        if expected is None:  # the row continues: token for token the plain run
            assert torch.equal(out[r], plain[r, :out.shape[1]])
        else:  # the row ends after its stop token (the first one for a stop at the start probe)
            kept = P + max(expected, 1)
            assert torch.equal(out[r, :kept], plain[r, :kept])
            assert (out[r, kept:] == setup[0].pad_token_id).all()
            assert crit.answers[r] == h.probes[rep.stop].answer
            forced_vec = crit.features[r][-1]
            assert np.isfinite(forced_vec).all()
    if mode != "every":  # unforced probe points have unknown paid features
        paid = [i for i, n in enumerate(feat.feature_names) if feature_cost(n) == "paid"]
        unforced = [v for r in range(3) for v, f in zip(crit.features[r], crit.forced[r]) if not f]
        assert unforced and all(np.isnan(v[paid]).all() for v in unforced)


def test_gated_stability_counts_forced_answers_only(setup):
    """The stability features are computed over the forced answers only; the free features are the harvest's."""
    feat, harvested = setup[2], setup[5]
    gate_threshold = _thresholds(setup, "gated", 1)[1]
    _, _, crit = _live(setup, "gated", math.inf, gate_threshold)
    free = [i for i, n in enumerate(feat.feature_names) if feature_cost(n) == "free"]
    n_distinct = feat.feature_names.index("n_distinct")
    for r, h in enumerate(harvested):
        live, stored = np.stack(crit.features[r]), np.stack(h.features)
        np.testing.assert_allclose(live[:, free], stored[:, free], atol=1e-4)
        keys = [answer_key(a) for a, f in zip(crit.probe_answers[r], crit.forced[r]) if f]
        assert live[np.array(crit.forced[r]), n_distinct].tolist() == [len(set(keys[:i + 1])) for i in range(len(keys))]


def test_free_mode_refuses_a_predictor_with_paid_features(setup):
    tok, model, feat, sched, family = setup[:5]
    with pytest.raises(ValueError, match=r"free features only .* paid features \['logprob_mean'"):
        LiveStopping(model, tok, Linear(len(feat.feature_names), 0), 0.5, None, feat.feature_names, feat, sched,
                     family=family, mode="free")
    with pytest.raises(ValueError, match="needs a gate"):
        LiveStopping(model, tok, Linear(len(feat.feature_names), 0), 0.5, None, feat.feature_names, feat, sched,
                     family=family, mode="gated")
    with pytest.raises(ValueError, match="unknown live mode"):
        LiveStopping(model, tok, Linear(len(feat.feature_names), 0), 0.5, None, feat.feature_names, feat, sched,
                     family=family, mode="sometimes")
