"""The service's configuration: nested dataclasses, small safe defaults (tuned values go in a YAML,
``experiments/serve.yaml``), each checked where it is made."""

from __future__ import annotations

from dataclasses import dataclass, field

from maml_stop.online import ABConfig, OnlineConfig

__all__ = ["BatchConfig", "ENGINES", "LimitsConfig", "ServeConfig"]

ENGINES = ("continuous", "generate")  # rows join a running batch (serve/decoder.py) | one generate() per batch


@dataclass(frozen=True)
class BatchConfig:
    """Dynamic batching. ``engine: continuous`` (default): requests join the running batch at its next
    step, up to ``max_batch`` active rows; when nothing runs, the first request waits as below for others
    to share its prefill. ``engine: generate``: a batch closes when no request came for ``window_ms``,
    when ``max_wait_ms`` have passed since its first request, or when it holds ``max_batch`` requests;
    then it runs as one generate() to its end."""

    window_ms: float = 10.0  # the gap after the latest request that closes a batch
    max_wait_ms: float = 50.0  # the longest the first request of a batch waits for others
    max_batch: int = 8  # rows of one generate() call, or active rows of the continuous batch
    engine: str = "continuous"  # one of ENGINES

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"unknown batch.engine {self.engine!r}; valid: {', '.join(ENGINES)}")
        if not (self.window_ms >= 0.0 and self.max_wait_ms >= self.window_ms) or self.max_batch < 1:
            raise ValueError(f"need 0 <= window_ms <= max_wait_ms and max_batch >= 1; got {self.window_ms}, "
                             f"{self.max_wait_ms}, {self.max_batch}")


@dataclass(frozen=True)
class LimitsConfig:
    """What a request may ask (a request past a limit gets a 4xx naming it)."""

    max_prompt_tokens: int = 1024  # rendered prompt tokens
    max_queue: int = 256  # requests waiting for the model; more: 503

    def __post_init__(self) -> None:
        if self.max_prompt_tokens < 1 or self.max_queue < 1:
            raise ValueError(f"need max_prompt_tokens >= 1 and max_queue >= 1; got {self.max_prompt_tokens}, "
                             f"{self.max_queue}")


@dataclass(frozen=True)
class ServeConfig:
    """``maml-stop serve``: the model, the adapted artifact(s), where state lives, and the online loop.

    ``corpus`` (the corpus the artifact's K support traces came from) and ``checkpoint`` (the meta-trained
    one; default: the one the artifact records) turn on re-adaptation: without them an arm serves the
    artifact frozen and only the monitor learns. ``artifact_b`` turns on the A/B mode: traffic split in
    randomised pairs between the two artifacts, judged by the always-valid test on gold feedback."""

    model: str
    artifact: str
    db: str = "serve.sqlite"
    corpus: str | None = None
    checkpoint: str | None = None
    artifact_b: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    host: str = "127.0.0.1"
    port: int = 8000
    batch: BatchConfig = field(default_factory=BatchConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    online: OnlineConfig = field(default_factory=OnlineConfig)
    ab: ABConfig = field(default_factory=ABConfig)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must lie in 0..65535; got {self.port}")
