"""The decision layer: the one first-hit rule (NumPy, torch, scalar and array forms against a brute-force
reference), the StopSelector interface (state round trip through the one registry, the back-off fitted
across families) and the layering (live/ and online/ import nothing from evaluate/)."""

from __future__ import annotations

import ast
import doctest
import importlib
from pathlib import Path

import numpy as np
import pytest
import torch

from maml_stop.decide import registry, rule, scores, selector
from maml_stop.decide.meta.rules import META_SELECTORS
from maml_stop.decide.registry import SELECTORS, make_selector, selector_from_state
from maml_stop.decide.rule import NEVER, first_hit, first_hits, reached
from maml_stop.decide.selector import SelectorEpisode, StopSelector, SupportSweep, ThresholdSelector
from maml_stop.decide.thresholds import BackoffEMTarget, backoff_figures, choose_backoff

PACKAGE = Path(__file__).resolve().parents[1] / "maml_stop"


def _brute(scores_row: np.ndarray, tau: float) -> int:
    for i, s in enumerate(scores_row):
        if s >= tau:
            return i
    return NEVER


@pytest.mark.parametrize("module", [rule, selector, registry, scores])
def test_doctests(module):
    assert doctest.testmod(module).failed == 0


def test_first_hit_forms_agree_with_brute_force():
    rng = np.random.default_rng(0)
    s = rng.random((50, 7))  # (T, P)
    taus = np.array([0.99, 0.9, 0.5, 0.1, 0.0])
    for row in s:
        want = [_brute(row, t) for t in taus]
        assert first_hits(row, taus).tolist() == want  # (J,) from one trace's (P,) against (J,) taus
        assert [first_hit(row, t) for t in taus] == [None if w == NEVER else w for w in want]
    for t in taus:  # torch, (T, P) against one tau, as the RL policy calls it
        got = first_hits(torch.from_numpy(s), float(t))
        assert got.dtype == torch.long and got.shape == (50,)
        assert got.tolist() == [_brute(row, t) for row in s]
    assert first_hit(s[0], None) is None and not reached(1.0, None) and not reached(1.0, float("inf"))
    assert reached(0.5, 0.5) and not reached(0.49, 0.5)


def test_first_hits_mask_hides_padding():
    s = np.array([[0.1, 0.9, 0.9], [0.9, 0.1, 0.1]])
    mask = np.array([[True, False, True], [False, True, True]])
    assert first_hits(s, 0.5, mask).tolist() == [2, NEVER]
    assert first_hits(torch.tensor(s), 0.5, torch.tensor(mask)).tolist() == [2, NEVER]


def _sweep(em, tokens, full_em, full_tokens) -> SupportSweep:
    return SupportSweep(np.array(em), np.array(tokens), np.array(full_em), np.array(full_tokens))


SWEEP = _sweep([[1, 1, 0], [1, 1, 1]], [[90, 50, 10], [80, 60, 20]], [1, 1], [100, 100])
SETTINGS = {"delta": 0.01, "alpha": 0.1, "value": 0.9, "token_price": 0.001, "wrong_answer_cost": 1.0}


@pytest.mark.parametrize("name", list(SELECTORS))
def test_every_rule_round_trips_its_state_and_decides_the_same(name):
    sel = make_selector(name, **SETTINGS)
    assert isinstance(sel, StopSelector) and sel.name == name
    state = sel.state_dict()
    # meta-learned rules (issue 25) also record what they fitted; tests/test_meta_select.py fits them
    assert state["name"] == name and set(state) == {"name", *type(sel).params, *getattr(type(sel), "fitted", ())}
    again = selector_from_state(state)
    assert type(again) is type(sel) and again.state_dict() == state
    if name in META_SELECTORS:
        return
    assert again.select([0.9, 0.5, 0.1], SWEEP, 0.5) == sel.select([0.9, 0.5, 0.1], SWEEP, 0.5)
    if name != "em_target_backoff":  # today's other rules learn nothing across families
        assert sel.fit([0.9, 0.5, 0.1], [SelectorEpisode("a", SWEEP, SWEEP)]).state_dict() == state


def test_registry_errors_name_the_valid_choices():
    with pytest.raises(ValueError, match="valid methods: fixed, em_target, ltt, cost"):
        make_selector("best")
    with pytest.raises(ValueError, match="unknown selector settings \\['detla'\\]"):
        make_selector("em_target", detla=0.02)
    with pytest.raises(ValueError, match="names its rule"):
        selector_from_state({"delta": 0.01})
    with pytest.raises(ValueError, match="unknown settings \\['alpha'\\]"):
        selector_from_state({"name": "em_target", "delta": 0.01, "alpha": 0.1})
    assert ThresholdSelector is StopSelector  # the former name still imports


def test_backoff_fit_across_families_matches_the_figures():
    """BackoffEMTarget.fit on two families' episodes: the smallest back-off within delta on both."""
    cands = [0.9, 0.5, 0.1]
    support = _sweep([[1, 1, 1], [1, 1, 1]], [[80, 50, 20]] * 2, [1, 1], [100, 100])  # em_target: index 2
    safe = _sweep([[1, 1, 1], [1, 1, 1]], [[80, 50, 20]] * 2, [1, 1], [100, 100])
    lossy = _sweep([[1, 1, 0], [1, 0, 0]], [[80, 50, 20]] * 2, [1, 1], [100, 100])  # within only at candidate 0
    episodes = [SelectorEpisode("a", support, safe), SelectorEpisode("b", support, lossy),
                SelectorEpisode("b", support, safe)]
    sel = BackoffEMTarget(delta=0.01).fit(cands, episodes)
    d_b = (backoff_figures(lossy, 2)[0] + backoff_figures(safe, 2)[0]) / 2  # family b's mean drop per back-off
    assert sel.backoff == choose_backoff(np.stack([backoff_figures(safe, 2)[0], d_b]), 0.01) == 2
    assert sel.select(cands, support, None) == 0.9
    assert selector_from_state(sel.state_dict()).backoff == 2
    with pytest.raises(ValueError, match="no source-family episodes"):
        BackoffEMTarget().fit(cands, [])


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


@pytest.mark.parametrize("runtime", ["live", "online", "decide", "serve"])
def test_the_runtime_imports_nothing_from_the_research_harness(runtime):
    bad = {f"{p.relative_to(PACKAGE)}: {m}" for p in (PACKAGE / runtime).rglob("*.py")
           for m in _imports(p) if m.startswith("maml_stop.evaluate")}
    assert not bad, f"{runtime}/ imports the research harness: {sorted(bad)}"


def test_the_decision_layer_stays_below_the_learner():
    """decide/ is given predictors and adapters (scores.SupportAdapter); it never imports learn/ itself."""
    bad = {f"{p.relative_to(PACKAGE)}: {m}" for p in (PACKAGE / "decide").rglob("*.py")
           for m in _imports(p) if m.split(".")[:2] in (["maml_stop", "learn"], ["maml_stop", "live"],
                                                        ["maml_stop", "online"])}
    assert not bad, sorted(bad)
    importlib.import_module("maml_stop.decide.policies")
