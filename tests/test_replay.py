"""Teacher-forced replay (maml_stop.harvest.replay) against naive re-encoding, on the tiny local model."""

import numpy as np
import pytest
import torch

from maml_stop.harvest.replay import REPRESENTATIONS, check_tokens, replay_trace
from tiny_lm import build_model, build_tokenizer


@pytest.fixture(scope="module")
def lm():
    torch.set_num_threads(1)
    tok = build_tokenizer()
    return tok, build_model(tok).eval()


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_replay_matches_naive_forward(lm):
    tok, model = lm
    prompt, gen = "Question: What is 12 + 30? Answer:", " 12 + 30 = 42. Wait, let me check.\nFinal answer: 42"
    g = _ids(tok, gen)
    positions, texts = [0, 3, 7, len(g)], [" 7\n", " 42", " 12 + 30", " 42\n"]
    layers = [1, 2]
    rep = replay_trace(model, tok, prompt, gen, len(g), True, positions, texts, "\nFinal answer:", layers)
    assert rep is not None and set(rep.states) == set(REPRESENTATIONS)
    p, trig = _ids(tok, prompt), _ids(tok, "\nFinal answer:")
    prev = None
    for i, (t, text) in enumerate(zip(positions, texts)):
        a = _ids(tok, text.rstrip("\n"))
        with torch.no_grad():
            full = model(torch.tensor([p + g[:t] + trig + a]), output_hidden_states=True).hidden_states
        for j, layer in enumerate(layers):
            hs = full[layer][0]
            end = len(p) + t - 1
            np.testing.assert_allclose(rep.states["last"][i, j], hs[end].numpy(), atol=1e-4)
            np.testing.assert_allclose(rep.states["trigger"][i, j], hs[end + len(trig)].numpy(), atol=1e-4)
            np.testing.assert_allclose(rep.states["answer"][i, j], hs[-1].numpy(), atol=1e-4)
            start = end if prev is None or t == 0 else len(p) + prev
            np.testing.assert_allclose(rep.states["mean"][i, j], hs[start : end + 1].mean(0).numpy(), atol=1e-4)
        prev = t


def test_a_retokenisation_that_changes_the_length_is_refused(lm):
    tok, model = lm
    assert check_tokens([1, 2, 3], 4, ended_by_eos=True) is None
    assert "3 tokens" in check_tokens([1, 2, 3], 3, ended_by_eos=True)
    assert replay_trace(model, tok, "Question:", " 42", 9, True, [0], [" 4"], "\nFinal answer:", [1]) is None
