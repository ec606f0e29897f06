"""Live stopping inside generate(): the criterion's contract, no change to the generation, features equal
to the harvester's, and rows stopping at the first probe over the threshold."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from transformers import StoppingCriteria, StoppingCriteriaList

import tiny_lm
from maml_stop.live.stopping import LiveStopping
from maml_stop.probe.features import ProbeFeaturizer
from maml_stop.probe.engine import ProbingGenerator
from maml_stop.probe.schedule import ProbeSchedule

PROMPTS = ["Question: What is 3 + 4?\nAnswer:", "Calculate 7 * 6 please now."]
PROMPTS3 = ["Think step by step. First add 12 + 30, then subtract 4.", *PROMPTS]  # longer: another prompt length


def first_line(text: str) -> str | None:
    """The answer extraction of these tests (LiveStopping has no default: it takes the harvest's)."""
    return text.strip().split("\n")[0] or None


class ConstantPredictor(nn.Module):
    """P(correct) = sigmoid(logit) with a fixed logit per probe (a stand-in predictor of known output)."""

    def __init__(self, logit: float) -> None:
        super().__init__()
        self.logit = logit

    def forward(self, batch):
        return torch.full((batch.features.shape[0],), self.logit)


class StopsAtProbe(nn.Module):
    """P(correct) high from a row's ``k``-th probe on: rows stop at their k-th probe, not before."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def forward(self, batch):
        p = batch.features.shape[0]  # one row's probes so far
        return torch.where(torch.arange(p) >= self.k - 1, 10.0, -10.0)


class Recording(StoppingCriteria):
    """Passes a criterion's output on and keeps (shape, dtype, probes fired so far) of every call."""

    def __init__(self, crit: LiveStopping) -> None:
        self.crit, self.calls = crit, []

    def __call__(self, input_ids, scores, **kwargs):
        out = self.crit(input_ids, scores, **kwargs)
        self.calls.append((tuple(out.shape), out.dtype, sum(len(f) for f in self.crit.features)))
        return out


@pytest.fixture(scope="module")
def setup():
    tok = tiny_lm.build_tokenizer()
    model = tiny_lm.build_model(tok)
    feat = ProbeFeaturizer(model.config.hidden_size, proj_dim=8)
    sched = ProbeSchedule(every_n=4, boundary=True, align=2, max_probes=10)
    return tok, model, feat, sched


def _encode(setup, prompts):
    tok = setup[0]
    tok.padding_side = "left"
    return tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)


def _criterion(setup, predictor, threshold, prompt_length=None) -> LiveStopping:
    tok, model, feat, sched = setup
    return LiveStopping(model, tok, predictor, threshold, prompt_length, feat.feature_names,
                        ProbeFeaturizer(model.config.hidden_size, proj_dim=8), sched, answer_fn=first_line)


def _run(setup, crit, enc, max_new_tokens=20, criteria=None):
    tok, model = setup[0], setup[1]
    return model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                          stopping_criteria=StoppingCriteriaList([criteria or crit]))


def _generate(setup, predictor, threshold, prompts=PROMPTS, max_new_tokens=20):
    enc = _encode(setup, prompts)
    crit = _criterion(setup, predictor, threshold, prompt_length=enc["input_ids"].shape[1])
    try:
        out = _run(setup, crit, enc, max_new_tokens)
    finally:
        crit.remove_hooks()
    return enc, out, crit


def test_criterion_returns_one_bool_per_row(setup):
    """The (batch,) bool contract holds on every call of a real generation, probes and stops included."""
    enc = _encode(setup, PROMPTS3)
    crit = _criterion(setup, StopsAtProbe(2), 0.5)
    rec = Recording(crit)
    try:
        _run(setup, crit, enc, criteria=rec)
    finally:
        crit.remove_hooks()
    assert all(shape == (3,) and dtype == torch.bool for shape, dtype, _ in rec.calls)
    assert rec.calls[-1][2] >= 4 and any(s is not None for s in crit.stopped_at)  # probes fired, rows stopped


def test_never_stopping_leaves_generation_unchanged_and_matches_harvest_features(setup):
    tok, model, feat, sched = setup
    enc, out, crit = _generate(setup, ConstantPredictor(-10.0), 0.5)
    plain = model.generate(**enc, max_new_tokens=20, do_sample=False, pad_token_id=tok.pad_token_id)
    assert torch.equal(out, plain)
    harvested = ProbingGenerator(model, tok, sched, featurizer=feat, max_new_tokens=20).run(PROMPTS, first_line)
    n_probes = 0
    for r, h in enumerate(harvested):
        assert len(crit.features[r]) == len(h.features)
        for live, stored in zip(crit.features[r], h.features):
            np.testing.assert_allclose(live, stored, atol=1e-4)
            n_probes += 1
        assert crit.probe_answers[r] == [p.answer for p in h.probes]
    assert n_probes >= 4
    assert crit.answers == [None, None]


def test_stops_at_first_probe_over_threshold(setup):
    enc, out, crit = _generate(setup, ConstantPredictor(10.0), 0.5)
    prompt_len = enc["input_ids"].shape[1]
    # every row stops at its first probe (position 2 or 4 on this schedule), so generation ends there
    assert all(s is not None and s <= 4 for s in crit.stopped_at)
    assert out.shape[1] - prompt_len == max(crit.stopped_at)
    assert all(a == pa[0] for a, pa in zip(crit.answers, crit.probe_answers))


def _outcome(crit: LiveStopping, out: torch.Tensor) -> dict:
    return {"tokens": out.tolist(), "prompt_length": crit.prompt_length, "stopped_at": list(crit.stopped_at),
            "answers": list(crit.answers), "probe_answers": [list(a) for a in crit.probe_answers],
            "probabilities": [list(p) for p in crit.probabilities],
            "n_probes": [len(f) for f in crit.features]}


@pytest.mark.parametrize("first,second", [(PROMPTS3, PROMPTS), (PROMPTS, PROMPTS3)], ids=["3then2", "2then3"])
def test_second_generate_call_equals_a_fresh_criterion(setup, first, second):
    """Issue 16: state from a previous generate() call (other batch size, other prompt length) leaks nowhere."""
    enc = _encode(setup, second)
    reused = _criterion(setup, StopsAtProbe(2), 0.5)
    try:
        _run(setup, reused, _encode(setup, first))
        again = _outcome(reused, _run(setup, reused, enc))
    finally:
        reused.remove_hooks()
    fresh = _criterion(setup, StopsAtProbe(2), 0.5)
    try:
        expected = _outcome(fresh, _run(setup, fresh, enc))
    finally:
        fresh.remove_hooks()
    assert again["prompt_length"] == enc["input_ids"].shape[1]
    assert again == expected
    # probes ran in the second call and rows stopped at their second probe, none after one token
    assert sum(again["n_probes"]) >= 4 and any(s is not None for s in again["stopped_at"])
    assert all(s is None or n == 2 for s, n in zip(again["stopped_at"], again["n_probes"]))
    for live, ref in zip(reused.features, fresh.features):
        np.testing.assert_array_equal(np.stack(live), np.stack(ref))


def test_given_prompt_length_is_checked(setup):
    enc = _encode(setup, PROMPTS)
    crit = _criterion(setup, ConstantPredictor(-10.0), 0.5, prompt_length=enc["input_ids"].shape[1] + 1)
    try:
        with pytest.raises(ValueError, match="prompt_length=.* this generation's prompt is"):
            _run(setup, crit, enc)
    finally:
        crit.remove_hooks()


def test_feature_mismatch_is_an_error(setup):
    tok, model, feat, sched = setup
    with pytest.raises(ValueError, match="features differ"):
        LiveStopping(model, tok, ConstantPredictor(0.0), 0.5, 3, ["a", "b"], feat, sched, answer_fn=first_line)


def test_answer_extraction_is_required(setup):
    """No silent default that could differ from the harvest's extraction (issue 10)."""
    tok, model, feat, sched = setup
    with pytest.raises(ValueError, match="exactly one of family="):
        LiveStopping(model, tok, ConstantPredictor(0.0), 0.5, None, feat.feature_names, feat, sched)
