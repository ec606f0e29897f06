"""Issue 29 E: LiveStopping refuses beam search and use_cache=False with a clear error (no IndexError, no
empty results), and its hooks go when the criterion is garbage-collected or leaves a ``with`` block."""

from __future__ import annotations

import gc

import pytest

from test_generation import PROMPTS, StopsAtProbe, _criterion, _encode, setup  # noqa: F401  (setup: a fixture)


def _n_hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _gen(setup, crit, **kw):  # noqa: F811
    tok, model = setup[0], setup[1]
    from transformers import StoppingCriteriaList

    return model.generate(**_encode(setup, PROMPTS), max_new_tokens=12, do_sample=False,
                          pad_token_id=tok.pad_token_id, stopping_criteria=StoppingCriteriaList([crit]), **kw)


def test_beam_search_is_refused(setup):  # noqa: F811
    with _criterion(setup, StopsAtProbe(2), 0.5) as crit:
        with pytest.raises(ValueError, match=r"beam search \(num_beams > 1\)"):
            _gen(setup, crit, num_beams=2)


def test_use_cache_false_is_refused_and_a_cached_run_then_works(setup):  # noqa: F811
    with _criterion(setup, StopsAtProbe(2), 0.5) as crit:
        with pytest.raises(ValueError, match="use_cache=True"):
            _gen(setup, crit, use_cache=False)
        _gen(setup, crit)  # the same criterion, a cached generation: one entry per row
        assert len(crit.stopped_at) == len(crit.answers) == len(PROMPTS)
        assert any(s is not None for s in crit.stopped_at)


def test_hooks_go_with_the_criterion(setup):  # noqa: F811
    model = setup[1]
    base = _n_hooks(model)
    with _criterion(setup, StopsAtProbe(2), 0.5):
        assert _n_hooks(model) > base
    assert _n_hooks(model) == base  # the with block removed them
    for _ in range(30):  # never remove_hooks()ed
        _criterion(setup, StopsAtProbe(2), 0.5)
    gc.collect()
    assert _n_hooks(model) == base
    crit = _criterion(setup, StopsAtProbe(2), 0.5)
    _gen(setup, crit)  # a live criterion keeps working while referenced
    assert len(crit.stopped_at) == len(PROMPTS)
    crit.remove_hooks()
    assert _n_hooks(model) == base
