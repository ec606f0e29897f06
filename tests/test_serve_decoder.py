"""The continuous decoder of ``maml-stop serve`` (issue 27) against ``generate()`` with ``LiveStopping`` on the
tiny model, greedy: for a row alone, for rows in a fixed batch and for rows that join a running batch at
other steps, the same tokens, probes (positions, reasons, forced answers, features), stop points and
answers, in live modes ``every`` and ``free``; plain rows beside them give plain ``generate()``'s tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from test_feature_subsets import FAMILY, MAX_NEW, _artifact, harvested  # noqa: F401  (harvested: a fixture)

SEED = {"every": 0, "free": 2}  # random predictor weights that give stops before the cap in both modes
PROBE_LISTS = ("reasons", "positions", "forced", "probe_answers")


def _prompts(tok, n: int = 6) -> list[str]:
    from tasks import get_family

    fam = get_family(FAMILY)
    return [fam.render_prompt(q, tok, "plain") for q in fam.questions("test", n, seed=3)]


@pytest.fixture(scope="module")
def artifacts(harvested, tmp_path_factory):  # noqa: F811
    """Artifacts on every feature (mode every) and on the free ones (mode free), each with tau between two
    middle per-row maxima of a never-stopping run on the test prompts: some rows stop, late or early, others not."""
    from maml_stop.data import store
    from maml_stop.live.artifact import save_adapted
    from maml_stop.live.stopping import LiveStopping
    from maml_stop.probe.features import feature_cost

    _, model, tok = harvested
    root = tmp_path_factory.mktemp("decoder")
    names = store.read_meta(harvested[0])["feature_names"]
    free = [n for n in names if feature_cost(n) == "free"]
    out = {}
    for mode, subset in (("every", names), ("free", free)):
        path, adapted = _artifact(harvested, root, subset, f"{mode}.pt")
        torch.manual_seed(SEED[mode])
        with torch.no_grad():  # the tiny predictor's P only falls with progress: random weights move it up and down
            for layer in (m for m in adapted.predictor.modules() if isinstance(m, torch.nn.Linear)):
                layer.weight.normal_(0.0, 0.5)
        adapted.tau = None
        never = LiveStopping.from_adapted(save_adapted(adapted, root / f"{mode}.never.pt"), model, tok, mode="every")
        tok.padding_side = "left"
        enc = tok(_prompts(tok), return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            model.generate(**enc, max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=tok.pad_token_id,
                           stopping_criteria=[never])
        never.remove_hooks()
        adapted.tau = _mid_run_tau(never.probabilities)
        out[mode] = str(save_adapted(adapted, path))
    return out


def _mid_run_tau(probabilities: list[list[float | None]]) -> float:
    """The probe probability that, as tau, gives the rows the most different stop points, one of them
    "never" (runs to its end)."""
    from maml_stop.decide.rule import first_hit

    rows = [np.array([-1.0 if p is None else p for p in row]) for row in probabilities]

    def spread(tau: float) -> int:
        hits = {first_hit(r, tau) for r in rows}
        return len(hits) if None in hits else 0

    return float(max((t for r in rows for t in r if t >= 0), key=spread))


def _row(criteria, r: int, ids: list[int], eos, tok) -> dict:
    from maml_stop.live.generate import result_row
    from tasks import get_family

    out = result_row(criteria, r, ids, eos, get_family(FAMILY), tok, MAX_NEW)
    out["ids"] = list(ids[:max(out["reasoning_tokens"], 1)])
    for name in PROBE_LISTS:
        out[name] = list(getattr(criteria, name)[r])
    out["features"] = np.asarray(criteria.features[r], dtype=np.float64)
    return out


def _generate(harvested, path: str | None, prompts: list[str]) -> list[dict]:
    """``generate()`` on ``prompts`` as one fixed batch, with LiveStopping of ``path`` (None: plain)."""
    from transformers import StoppingCriteriaList

    from maml_stop.live.stopping import LiveStopping
    from maml_stop.probe.forcing import eos_ids

    _, model, tok = harvested
    eos = set(eos_ids(model, tok))
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    crit = None if path is None else LiveStopping.from_adapted(path, model, tok)
    try:
        with torch.no_grad():
            seqs = model.generate(**enc, max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=tok.pad_token_id,
                                  stopping_criteria=StoppingCriteriaList([crit] if crit else []))
    finally:
        if crit is not None:
            crit.remove_hooks()
    new = seqs[:, enc["input_ids"].shape[1]:].tolist()
    if crit is None:
        return [{"ids": ids[:next((i + 1 for i, t in enumerate(ids) if t in eos), len(ids))]} for ids in new]
    return [_row(crit, r, new[r], eos, tok) for r in range(len(prompts))]


def _decode(harvested, rows: list[tuple[str, str | None, int]], max_rows: int = 8) -> list[dict]:
    """The decoder on ``(prompt, artifact or None, step it joins at)`` rows."""
    from maml_stop.live.recipe import live_parts
    from maml_stop.live.rule import StopRule
    from maml_stop.probe.forcing import eos_ids
    from maml_stop.serve.decoder import Decoder, LiveRecord, LiveSpec

    _, model, tok = harvested
    eos = set(eos_ids(model, tok))
    specs = {}
    out: dict[int, dict] = {}

    def done(key, ids, live):
        out[key] = {"ids": ids[:next((i + 1 for i, t in enumerate(ids) if t in eos), len(ids))]} if live is None \
            else _row(live, 0, ids, eos, tok)

    def entry(i: int):
        prompt, path, _ = rows[i]
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        if path is None:
            return i, ids, None
        parts = live_parts(path, model)
        if path not in specs:
            rest = {k: v for k, v in parts.items() if k not in ("predictor", "tau", "feature_names",
                                                                "featurizer", "schedule", "mode")}
            specs[path] = LiveSpec.from_parts(model, tok, parts["predictor"], parts["feature_names"],
                                              parts["featurizer"], parts["schedule"], parts["mode"], **rest)
        spec = specs[path]
        rule = StopRule(spec.featurizer.feature_names, parts["predictor"], parts["tau"], parts["mode"],
                        parts["feature_names"])
        return i, ids, LiveRecord(spec, rule, None)

    dec = Decoder(model, tok, MAX_NEW, eos, done, max_rows)
    step = 0
    while len(out) < len(rows):
        joining = [entry(i) for i, (_, _, at) in enumerate(rows) if at == step]
        if joining:
            dec.add(joining)
        dec.step()
        step += 1
        assert step < 10 * MAX_NEW
    assert not dec.rows and dec.cache is None
    return [out[i] for i in range(len(rows))]


def _same(mine: dict, ref: dict) -> None:
    for key in ref:
        if key == "features":
            assert mine[key].shape == ref[key].shape
            np.testing.assert_allclose(mine[key], ref[key], rtol=1e-4, atol=1e-4)
        else:
            assert mine[key] == ref[key], key


@pytest.mark.parametrize("mode", ["every", "free"])
def test_a_row_alone_and_a_fixed_batch_match_generate(harvested, artifacts, mode):  # noqa: F811
    path = artifacts[mode]
    prompts = _prompts(harvested[2], 6)
    alone = [_generate(harvested, path, [p])[0] for p in prompts]
    batch = _generate(harvested, path, prompts)
    stops = [r["stopped_at"] for r in batch]
    assert any(s is not None for s in stops) and any(s is None for s in stops), stops  # both kinds of row
    for mine, ref in zip(_decode(harvested, [(p, path, 0) for p in prompts]), batch):
        _same(mine, ref)
    for p, ref in zip(prompts, alone):
        _same(_decode(harvested, [(p, path, 0)])[0], ref)


def test_rows_that_join_a_running_batch_get_what_they_get_alone(harvested, artifacts):  # noqa: F811
    """Live rows of both modes and plain rows join at different steps, leave at different steps, and
    share every forward: each gets its own alone-run (tokens, probes, stop point, answer)."""
    prompts = _prompts(harvested[2], 6)
    rows = [(prompts[0], artifacts["every"], 0), (prompts[1], None, 0), (prompts[2], artifacts["free"], 3),
            (prompts[3], artifacts["every"], 5), (prompts[4], None, 6), (prompts[5], artifacts["every"], 11),
            (prompts[1], artifacts["free"], 2)]
    mine = _decode(harvested, rows, max_rows=8)
    for (p, path, _), got in zip(rows, mine):
        _same(got, _generate(harvested, path, [p])[0])


def test_a_generation_config_with_a_greedy_processor_is_refused(harvested):  # noqa: F811
    import copy

    from maml_stop.serve.decoder import Decoder

    _, model, tok = harvested
    other = copy.copy(model)
    other.generation_config = copy.deepcopy(model.generation_config)
    other.generation_config.repetition_penalty = 1.1
    with pytest.raises(ValueError, match="repetition_penalty=1.1.*batch.engine: generate"):
        Decoder(other, tok, MAX_NEW, {tok.eos_token_id}, lambda *a: None, 4)
