"""Task families backed by reasoning-gym procedural generators.

Each family wraps one generator with a fixed configuration. EM uses reasoning-gym's own
``score_answer`` (a score of 1.0) and falls back to our normalised/numeric match, so that formats
reasoning-gym rejects ("$1,234", "\\boxed{12}", "7 apples") still count when the value is right.
"""

from __future__ import annotations

import zlib
from typing import Any, Iterator

from tasks.base import Question, TaskFamily, register_family
from tasks import answers

# registry name -> (reasoning-gym generator, its config, numeric answers?)
# Configs keep the problems at a difficulty where a 0.5B instruct model is right sometimes, not always.
RG_FAMILIES: dict[str, tuple[str, dict[str, Any], bool]] = {
    "basic_arithmetic": ("basic_arithmetic", {"min_terms": 2, "max_terms": 4, "min_digits": 1, "max_digits": 2}, True),
    "chain_sum": ("chain_sum", {"min_terms": 3, "max_terms": 5, "min_digits": 1, "max_digits": 2}, True),
    "gsm_symbolic": ("gsm_symbolic", {}, True),
    "leg_counting": ("leg_counting", {"min_animals": 2, "max_animals": 3, "max_instances": 4}, True),
    "letter_counting": ("letter_counting", {"min_words": 3, "max_words": 6}, True),
    "number_sorting": ("number_sorting", {"min_numbers": 3, "max_numbers": 4, "min_decimals": 0, "max_decimals": 0}, False),
    "spell_backward": ("spell_backward", {"min_word_len": 3, "max_word_len": 6}, False),
    "gcd": ("gcd", {"min_numbers": 2, "max_numbers": 2, "max_value": 100}, True),
    "lcm": ("lcm", {"min_numbers": 2, "max_numbers": 2, "max_value": 20}, True),
    "count_bits": ("count_bits", {"max_n": 255}, True),
    "base_conversion": ("base_conversion", {"min_base": 2, "max_base": 10, "min_value": 0, "max_value": 100}, False),
    "simple_equations": ("simple_equations", {}, True),
    "word_sorting": ("word_sorting", {"min_words": 3, "max_words": 5}, False),
    "syllogism": ("syllogism", {}, False),
    "family_relationships": ("family_relationships", {}, False),
    "time_intervals": ("time_intervals", {}, False),
    "decimal_arithmetic": ("decimal_arithmetic", {}, True),
    "prime_factorization": ("prime_factorization", {"min_value": 2, "max_value": 100}, False),
    "word_sequence_reversal": ("word_sequence_reversal", {"min_words": 3, "max_words": 5}, False),
    "caesar_cipher": ("caesar_cipher", {"min_words": 1, "max_words": 2}, False),
    "aiw": ("aiw", {}, True),
    "coin_flip": ("coin_flip", {}, False),
}


class ReasoningGymFamily(TaskFamily):
    """One reasoning-gym generator as a task family."""

    def __init__(
        self,
        name: str,
        generator: str,
        config: dict[str, Any] | None = None,
        numeric: bool = False,
        pool_size: int = 20000,
        **kwargs: Any,
    ) -> None:
        super().__init__(name=name, **kwargs)
        self.generator = generator
        self.config = dict(config or {})
        self.numeric = numeric
        self.pool_size = pool_size
        self._datasets: dict[int, Any] = {}

    def _dataset(self, seed: int) -> Any:
        if seed not in self._datasets:
            import reasoning_gym

            # the family name enters the seed so that two families never share a draw order
            base = zlib.crc32(self.name.encode()) ^ (seed * 1_000_003)
            self._datasets[seed] = reasoning_gym.create_dataset(
                self.generator, size=self.pool_size, seed=base & 0x7FFFFFFF, **self.config
            )
        return self._datasets[seed]

    def _candidates(self, seed: int) -> Iterator[tuple[str, str, dict[str, Any]]]:
        ds = self._dataset(seed)
        for i in range(len(ds)):
            entry = ds[i]
            if entry.get("answer") is None:
                continue
            yield entry["question"], str(entry["answer"]), {"rg_index": i, "rg_seed": seed}

    def score(self, answer: str | None, question: Question) -> bool:
        if answer is None:
            return False
        if answers.exact_match(answer, question.gold, numeric=self.numeric):
            return True
        ds = self._dataset(question.metadata.get("rg_seed", 0)) if "rg_index" in question.metadata else None
        if ds is None:
            return False
        entry = ds[question.metadata["rg_index"]]
        try:
            return float(ds.score_answer(answers.clean(answer), entry)) >= 1.0
        except Exception:  # reasoning-gym scorers raise on odd text; an unreadable answer is wrong
            return False


def _make(name: str, generator: str, config: dict[str, Any], numeric: bool):
    def factory(**kwargs: Any) -> ReasoningGymFamily:
        return ReasoningGymFamily(name=name, generator=generator, config={**config, **kwargs.pop("config", {})},
                                  numeric=numeric, **kwargs)

    return factory


for _name, (_gen, _cfg, _num) in RG_FAMILIES.items():
    register_family(_name, _make(_name, _gen, _cfg, _num))
