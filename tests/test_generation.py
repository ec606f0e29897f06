"""Live stopping inside generate(): the criterion's contract, no change to the generation, features equal
to the harvester's, and rows stopping at the first probe over the threshold."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from transformers import StoppingCriteriaList

import tiny_lm
from maml_stop.generation import LiveStopping
from maml_stop.harvest.features import ProbeFeaturizer
from maml_stop.harvest.generate import ProbingGenerator
from maml_stop.harvest.schedule import ProbeSchedule

PROMPTS = ["Question: What is 3 + 4?\nAnswer:", "Calculate 7 * 6 please now."]


class ConstantPredictor(nn.Module):
    """P(correct) = sigmoid(logit) with a fixed logit per probe (a stand-in predictor of known output)."""

    def __init__(self, logit: float) -> None:
        super().__init__()
        self.logit = logit

    def forward(self, batch):
        return torch.full((batch.features.shape[0],), self.logit)


@pytest.fixture(scope="module")
def setup():
    tok = tiny_lm.build_tokenizer()
    model = tiny_lm.build_model(tok)
    feat = ProbeFeaturizer(model.config.hidden_size, proj_dim=8)
    sched = ProbeSchedule(every_n=4, boundary=True, align=2, max_probes=10)
    return tok, model, feat, sched


def _generate(setup, predictor, threshold, prompts=PROMPTS, max_new_tokens=20):
    tok, model, feat, sched = setup
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    crit = LiveStopping(model, tok, predictor, threshold, enc["input_ids"].shape[1], feat.feature_names,
                        ProbeFeaturizer(model.config.hidden_size, proj_dim=8), sched)
    try:
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             stopping_criteria=StoppingCriteriaList([crit]), pad_token_id=tok.pad_token_id)
    finally:
        crit.remove_hooks()
    return enc, out, crit


def test_criterion_returns_one_bool_per_row(setup):
    tok, model, feat, sched = setup
    crit = LiveStopping(model, tok, ConstantPredictor(0.0), 0.9, 3, feat.feature_names, feat, sched)
    try:
        out = crit(torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 10))
    finally:
        crit.remove_hooks()
    assert out.shape == (2,) and out.dtype == torch.bool


def test_never_stopping_leaves_generation_unchanged_and_matches_harvest_features(setup):
    tok, model, feat, sched = setup
    enc, out, crit = _generate(setup, ConstantPredictor(-10.0), 0.5)
    plain = model.generate(**enc, max_new_tokens=20, do_sample=False, pad_token_id=tok.pad_token_id)
    assert torch.equal(out, plain)
    first_line = lambda s: s.strip().split("\n")[0] or None  # noqa: E731  (LiveStopping's default answer_fn)
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


def test_feature_mismatch_is_an_error(setup):
    tok, model, feat, sched = setup
    with pytest.raises(ValueError, match="features differ"):
        LiveStopping(model, tok, ConstantPredictor(0.0), 0.5, 3, ["a", "b"], feat, sched)
