"""The family choice of corpus v2 (experiments/studies/corpus_v2_pilot.py) on hand-made pilot figures: each drop
rule, the cap rule (highest cap first, families outside the EM band before those inside), and the split
of the kept families into two harvest lists of about equal work."""

from __future__ import annotations

from experiment_scripts import load_script


def _pilot():
    return load_script("corpus_v2_pilot")


def fig(final_em=0.5, hit_cap=0.0, no_reasoning=0.0, truncated=0.0, any_correct=0.6, tokens=100.0, traces=32):
    return {"traces": traces, "final_em": final_em, "start_em": 0.0, "first_scheduled_em": 0.0, "hit_cap": hit_cap,
            "no_reasoning": no_reasoning, "truncated": truncated, "any_correct": any_correct,
            "reasoning_tokens": tokens, "probes": 5.0}


RULES = {"em_band": (0.1, 0.9), "max_truncated": 0.2, "max_no_reasoning": 0.5, "min_signal": 0.1, "max_cap_share": 0.2}


def test_each_drop_rule_and_the_cap_rule():
    pilot = _pilot()
    figs = {
        "fits": fig(), "long_answers": fig(truncated=0.3), "answers_at_once": fig(no_reasoning=0.6),
        "no_signal": fig(final_em=0.05, any_correct=0.05),
        "capped_in_band": fig(hit_cap=0.5), "capped_out_of_band": fig(final_em=0.95, hit_cap=0.3),
        "mild_cap": fig(hit_cap=0.3),
    }
    d = pilot.choose(figs, RULES)
    assert d["fits"] == "keep" and d["mild_cap"] == "keep"
    assert d["long_answers"].startswith("drop: 30% of forced answers")
    assert d["answers_at_once"].startswith("drop: 60% of traces end before")
    assert d["no_signal"].startswith("drop: no signal")
    # kept before the cap rule: fits 0, capped_in_band .5, capped_out_of_band .3, mild_cap .3 -> 1.1/4 > 0.2:
    # the family outside the EM band goes first (0.8/3 > 0.2 still), then the highest cap in the band
    assert d["capped_out_of_band"].startswith("drop: cap share (30%")
    assert d["capped_in_band"].startswith("drop: cap share (50%")
    kept = [f for f, x in d.items() if x == "keep"]
    assert sum(figs[f]["hit_cap"] for f in kept) / len(kept) <= RULES["max_cap_share"]


def test_harvest_lists_balance_the_work():
    pilot = _pilot()
    figs = {"a": fig(tokens=200), "b": fig(tokens=150), "c": fig(tokens=100), "d": fig(tokens=60), "e": fig(tokens=40)}
    lists = pilot.harvest_lists(list(figs), figs)
    assert sorted(f for x in lists for f in x) == sorted(figs) and len(lists) == 2
    # greedy, longest first: a | b, then c -> b's list (150 < 200), d -> a's (200 < 250), e -> b's (250 < 260)
    work = sorted(sum(figs[f]["reasoning_tokens"] for f in x) for x in lists)
    assert work == [260, 290] and lists == [sorted(x) for x in lists]
    assert pilot.harvest_lists(["a"], figs) == [["a"]]  # one family: one list
