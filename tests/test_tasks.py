"""Task families: registry, deterministic draws, disjoint splits, and answer extraction + EM on real
generated questions of every reasoning-gym family."""

from __future__ import annotations

import re

import pytest

from maml_stop import cli
from tasks import answers, get_family, list_families
from tasks.base import SPLITS, Question, TaskError, split_of
from tasks.reasoning_gym_families import RG_FAMILIES, ReasoningGymFamily, generator_of

RG_NAMES = sorted(RG_FAMILIES)
N = 40  # questions per split drawn in the per-family tests


@pytest.fixture(scope="module")
def drawn() -> dict[str, tuple[ReasoningGymFamily, dict[str, list[Question]]]]:
    out = {}
    for name in RG_NAMES:
        fam = get_family(name)
        out[name] = (fam, {s: fam.questions(s, N, seed=0) for s in SPLITS})
    return out


def realistic_variants(kind: str, gold: str) -> list[str]:
    """How a model might state the right answer, beyond the gold string itself."""
    if kind == "number":
        value = answers.parse_number(gold)
        assert value is not None, gold
        out = [f"\\boxed{{{gold}}}", f"The answer is: {gold}.", f"{gold} in total", f"**{gold}**"]
        if float(value).is_integer() and abs(value) >= 1000:
            out.append(f"{int(value):,}")
        return out
    if kind == "number_list":
        nums = re.findall(r"-?\d+(?:\.\d+)?", gold)
        return [", ".join(nums), "[" + ", ".join(n.rstrip("0").rstrip(".") for n in nums) + "]"]
    if kind == "word_list":
        words = [w.strip() for w in gold.split(",")]
        return [",".join(words), str(words), ", ".join(w.upper() for w in words)]
    if kind == "yesno":
        return [gold.upper(), gold.lower() + ", it follows" if gold == "Yes" else gold.lower() + ", it does not follow"]
    if kind == "factors":
        return [gold.replace(" × ", "*"), " x ".join(reversed(gold.split(" × ")))]
    if kind == "duration":
        return [re.sub(r"(^|\s)0(\d):", r"\1\2:", gold)]  # drop a leading zero of the hours
    return [gold.upper() if gold.lower() != gold.upper() else gold, f"**{gold}**."]


def wrong_answer(family: ReasoningGymFamily, q: Question, pool: list[Question]) -> str:
    """The gold of another question that states a different answer (a realistic wrong answer)."""
    mine = answers.canonical(q.gold, family.answer_kind)
    for other in pool:
        if answers.canonical(other.gold, family.answer_kind) != mine and not family.score(other.gold, q):
            return other.gold
    raise AssertionError(f"{family.name}: every question has the same answer")


def test_registry_lists_every_family() -> None:
    names = list_families()
    assert set(RG_NAMES) <= set(names) and "dataset" in names
    assert len(RG_NAMES) >= 10


def test_unknown_family_names_valid_ones() -> None:
    with pytest.raises(ValueError, match="valid families: .*basic_arithmetic"):
        get_family("no_such_family")


def test_bad_constructor_argument_names_accepted_ones() -> None:
    with pytest.raises(TaskError, match="accepted: config"):
        get_family("gcd", bogus=1)


def test_bad_generator_config_is_a_task_error() -> None:
    with pytest.raises(TaskError, match="reasoning-gym cannot build"):
        get_family("gcd", config={"no_such_option": 3})


def test_unknown_split_names_valid_ones() -> None:
    with pytest.raises(ValueError, match="valid splits: train, validation, test"):
        get_family("chain_sum").questions("dev", 3)


def test_too_many_questions_is_a_clear_error() -> None:
    fam = get_family("gcd", config={"max_value": 4}, pool_size=2000)  # a tiny question space
    with pytest.raises(TaskError, match="has only \\d+ distinct test questions, 50 were asked for"):
        fam.questions("test", 50)


def test_negative_n_rejected() -> None:
    with pytest.raises(TaskError):
        get_family("chain_sum").questions("train", -1)


@pytest.mark.parametrize("name", RG_NAMES)
def test_draws_are_deterministic_and_disjoint(name: str, drawn) -> None:
    fam, by_split = drawn[name]
    again = fam.questions("train", N, seed=0)
    assert [q.id for q in again] == [q.id for q in by_split["train"]]
    other_seed = fam.questions("train", N, seed=1)
    assert [q.id for q in other_seed] != [q.id for q in again]
    texts = {s: {q.question for q in qs} for s, qs in by_split.items()}
    for s, qs in by_split.items():
        assert len(texts[s]) == N  # distinct within a split
        assert all(q.split == s and split_of(q.question) == s and q.family == name for q in qs)
    assert not texts["train"] & texts["validation"]
    assert not texts["train"] & texts["test"]
    assert not texts["validation"] & texts["test"]
    # a different seed never moves a question into another split
    assert not {q.question for q in other_seed} & (texts["validation"] | texts["test"])


@pytest.mark.parametrize("name", RG_NAMES)
def test_gold_and_realistic_answers_score(name: str, drawn) -> None:
    fam, by_split = drawn[name]
    pool = by_split["train"]
    for q in pool[:15]:
        assert q.gold.strip()
        assert fam.score(q.gold, q), (q.question, q.gold)
        assert fam.rg_score(q.gold, q) == 1.0  # reasoning-gym's own scorer accepts its gold
        generation = f"Step 1: read the question.\nStep 2: work it out.\nFinal answer: {q.gold}"
        assert fam.score(fam.extract_answer(generation), q), (generation, fam.extract_answer(generation))
        probe = f" {q.gold}\nStep 3: check the result again"
        assert fam.score(fam.extract_probe_answer(probe), q), (probe, fam.extract_probe_answer(probe))
        for variant in realistic_variants(fam.answer_kind, q.gold):
            ext = fam.extract_answer(f"Step 1: think.\nFinal answer: {variant}")
            assert fam.score(ext, q), (variant, ext, q.gold)
            assert fam.score(fam.extract_probe_answer(f" {variant}\nStep 2: ..."), q), (variant, q.gold)
        wrong = wrong_answer(fam, q, pool)
        assert not fam.score(fam.extract_answer(f"Step 1: think.\nFinal answer: {wrong}"), q), (wrong, q.gold)
        assert not fam.score(fam.extract_probe_answer(f" {wrong}\nStep 2"), q), (wrong, q.gold)
        assert not fam.score(None, q)


@pytest.mark.parametrize("name", RG_NAMES)
def test_stored_question_scores_the_same(name: str, drawn) -> None:
    """A question read back from a trace corpus has no metadata: scoring must not depend on it."""
    fam, by_split = drawn[name]
    pool = by_split["test"]
    for q in pool[:10]:
        bare = Question(q.id, q.family, q.split, q.question, q.gold)
        assert fam.score(q.gold, bare)
        assert fam.rg_score(q.gold, bare) == 1.0
        wrong = wrong_answer(fam, q, pool)
        assert fam.score(wrong, bare) == fam.score(wrong, q) is False


def test_number_family_tricky_formats() -> None:
    fam = get_family("gsm_symbolic")
    q = Question("x", "gsm_symbolic", "train", "How much?", "1234.5")
    for text in ["$1,234.50", "\\boxed{1234.5}", "The answer is: 1234.5.", "1234.5 dollars"]:
        assert fam.score(fam.extract_answer(f"Final answer: {text}"), q), text
    neg = Question("y", "basic_arithmetic", "train", "Calculate 3 - 10.", "-7")
    fam2 = get_family("basic_arithmetic")
    assert fam2.score(fam2.extract_probe_answer(" -7\nStep 3: ..."), neg)
    assert not fam2.score(fam2.extract_probe_answer(" 7\nStep 3: ..."), neg)
    legs = Question("z", "leg_counting", "train", "How many legs?", "7")
    assert get_family("leg_counting").score("7 legs", legs)


def test_yes_no_case_insensitive() -> None:
    fam = get_family("syllogism")
    q = Question("x", "syllogism", "train", "Does it follow?", "Yes")
    assert fam.score(fam.extract_answer("Final answer: YES"), q)
    assert fam.score(fam.extract_probe_answer(" yes.\nStep 2"), q)
    assert not fam.score(fam.extract_answer("Final answer: NO"), q)


def test_number_sorting_accepts_plain_comma_list() -> None:
    fam = get_family("number_sorting")
    q = Question("x", "number_sorting", "train", "Sort these numbers in descending order: 30.0, 52.2", "['52.2', '30.0']")
    assert fam.score("52.2, 30.0", q)
    assert fam.score("['52.2', '30.0']", q)
    assert not fam.score("30.0, 52.2", q)


def test_probe_extraction_sees_only_its_continuation() -> None:
    fam = get_family("chain_sum")
    q = Question("x", "chain_sum", "train", "1 + 41 =", "42")
    assert fam.extract_probe_answer(" 42\nStep 3: 1 + 41 = 43\nFinal answer: 43") == "42"
    assert fam.score(fam.extract_probe_answer(" 42\nStep 3: ..."), q)


def test_render_prompt_plain_and_chat_template() -> None:
    fam = get_family("chain_sum")
    q = fam.questions("train", 1)[0]
    plain = fam.render_prompt(q)
    assert q.question in plain and "Final answer" in plain

    class Tok:
        chat_template = "x"

        def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
            assert not tokenize and add_generation_prompt
            return "|".join(f"<{m['role']}>{m['content']}" for m in messages)

    chat = fam.render_prompt(q, Tok())
    assert chat.startswith("<system>") and "<user>" in chat and q.question in chat


def test_canonical_answer_for_stability() -> None:
    fam = get_family("gsm_symbolic")
    assert fam.canonical_answer("$1,234.50") == fam.canonical_answer("1234.5")
    assert fam.canonical_answer(None) is None


def test_tasks_command_lists_every_family(capsys) -> None:
    assert cli.main(["tasks"]) == 0
    out = capsys.readouterr().out
    for name in RG_NAMES:
        assert re.search(rf"^{name}\s", out, re.MULTILINE), name
    assert "gold:" in out


def test_tasks_command_on_some_families(capsys) -> None:
    assert cli.main(["tasks", "--families", "gcd", "syllogism", "--split", "test", "--seed", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [ln.split()[0] for ln in lines] == ["gcd", "syllogism"]


# families whose question space is smaller by design, with the recipe they serve
SMALLER_POOLS = {
    # 3 dice up to d12: 318 distinct train questions; corpus v2 takes 160 per family (112/16/32)
    "dice": {"train": 300, "validation": 40, "test": 80},
    # 1,023 numbers (708 / 87 / 228 by the hash split) and 999 (713 / 102 / 184): enough for v2's 112/16/32
    "count_bits_small": {"train": 400, "validation": 80, "test": 200},
    "prime_factorization_small": {"train": 400, "validation": 100, "test": 180},
    # binary strings of 5-8 characters: 83 distinct validation and 150 test questions, enough for v2's 16 / 32
    "binary_alternation_short": {"train": 400, "validation": 60, "test": 120},
    # pairs of numbers up to 20: 265 distinct train questions
    "lcm_tiny": {"train": 200, "validation": 30, "test": 60},
}


@pytest.mark.slow
@pytest.mark.parametrize("name", RG_NAMES)
def test_every_family_is_large_enough(name: str) -> None:
    """400 train, 100 validation, 200 test questions: the 70/10/20 hash split of ~2,000 distinct ones."""
    fam = get_family(name)
    sizes = SMALLER_POOLS.get(name, {"train": 400, "validation": 100, "test": 200})
    drawn = {s: fam.questions(s, n, seed=0) for s, n in sizes.items()}
    texts = [q.question for qs in drawn.values() for q in qs]
    assert len(set(texts)) == sum(sizes.values())


def near_misses(kind: str, gold: str) -> list[str]:
    """Wrong answers that a lenient scorer might accept: prefixes, extra items, off-by-one numbers."""
    out = ["0", gold + ", extra", gold + " 1", gold[: max(1, len(gold) // 2)]]
    if kind in ("number", "number_list"):
        out.append(re.sub(r"-?\d+(?:\.\d+)?", lambda m: str(float(m.group(0)) + 1), gold, count=1))
    return out


def within_declared_tolerance(name: str, answer: str, gold: str) -> bool:
    """reasoning-gym's decimal_arithmetic accepts answers 1e-3 off (its configured precision)."""
    try:
        return generator_of(name) == "decimal_arithmetic" and abs(float(answer) - float(gold)) <= 1e-3
    except ValueError:
        return False


@pytest.mark.parametrize("name", RG_NAMES)
def test_near_misses_are_wrong(name: str, drawn) -> None:
    fam, by_split = drawn[name]
    for q in by_split["train"][:15]:
        for bad in near_misses(fam.answer_kind, q.gold):
            if answers.exact_match(bad, q.gold, kind=fam.answer_kind, rel_tol=fam.rel_tol):
                continue  # really the same answer ("24 1" is 24 to a number family)
            if not within_declared_tolerance(name, bad, q.gold):
                assert not fam.score(bad, q), (bad, q.gold)


def test_unsound_reasoning_gym_scorers_are_off() -> None:
    coin = get_family("coin_flip")
    q = Question("x", "coin_flip", "train", "What is the probability of getting exactly 2 heads in 9 fair coin flips?",
                 "0.04788167289")
    assert coin.rg_score("0.000000000", q) == 1.0  # reasoning-gym's prefix credit: the reason it is off
    assert not coin.score("0.000000000", q)
    assert coin.score("0.0479", q) and coin.score("0.04788", q) and not coin.score("0.05", q)
    ns = get_family("number_sorting")
    q = Question("y", "number_sorting", "train", "Sort these numbers in descending order: 5.0, 6.0", "['6.0', '5.0']")
    assert ns.rg_score("['6.0', '4.0']", q) == 1.0 and not ns.score("6, 4", q)
    ws = get_family("word_sorting")
    q = Question("z", "word_sorting", "train", "sort in ascending order: b, a", "a, b")
    assert ws.rg_score("a, b, c", q) == 1.0 and not ws.score("a, b, c", q)


def test_real_model_outputs() -> None:
    """Generations of Qwen2.5-0.5B-Instruct on these families, with what a probe or extraction must read."""
    se = get_family("simple_equations")
    assert se.extract_probe_answer(" -10p = -220") == "-220"  # not the coefficient -10
    gsm = get_family("gsm_symbolic")
    assert gsm.extract_probe_answer(" 310,000\n   \\]\n\n") == "310000"
    assert gsm.extract_answer("Therefore, the number of Snapchat friends Emily has is \\(\\boxed{22}\\).") == "22"
    ba = get_family("basic_arithmetic")
    assert ba.extract_answer("...\nTherefore, the final answer is \\(\\boxed{-85}\\).") == "-85"
    assert ba.extract_answer("Step 1: 3 + 4 = 7\nFinal answer:") == "7"  # empty final line: last number
    ti = get_family("time_intervals")
    q = Question("t", "time_intervals", "train", "How long? Answer in HH:MM.", "11:22")
    assert ti.score(ti.extract_probe_answer(" 11:22"), q) and not ti.score(ti.extract_answer("Final answer: 11:11"), q)


def test_questions_do_not_depend_on_the_hash_seed() -> None:
    """Every family draws the same questions in processes with different PYTHONHASHSEED (a generator that
    iterates over a set of strings does not: a resumed harvest would mix two question orders)."""
    import os
    import subprocess
    import sys

    code = ("import hashlib; from tasks import get_family\n"
            "from tasks.reasoning_gym_families import RG_FAMILIES\n"
            "for f in sorted(RG_FAMILIES):\n"
            "    qs = get_family(f).questions('train', 6, seed=0) + get_family(f).questions('test', 3, seed=1)\n"
            "    print(f, hashlib.md5('|'.join(q.id for q in qs).encode()).hexdigest())\n")
    outs = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        outs.append(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                   check=True).stdout.splitlines())
    differ = [a.split()[0] for a, b in zip(*outs) if a != b]
    assert len(outs[0]) == len(RG_FAMILIES) and not differ, differ
