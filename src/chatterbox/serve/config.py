"""Server options (one dataclass; the CLI fills it, tests build it directly)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

MODEL_KINDS = ("original", "turbo", "nano", "multilingual")


def default_voices_dir() -> Path:
    """Where uploaded voices live without `--voices-dir` (next to the demo's cached checkpoints)."""
    root = Path(os.environ.get("CHATTERBOX_FAST_CACHE", Path.home() / ".cache" / "chatterbox-fast"))
    return root / "voices"


@dataclass
class ServeConfig:
    """What the server accepts and how much work it takes on.

    Admission: at most `max_batch` requests decode together (the model's scheduler slots) and at most
    `max_queue` more wait for a slot; the next one gets 429 with Retry-After.
    """

    model_kind: str = "nano"
    voices_dir: Optional[Path] = None  # None: default_voices_dir()
    max_batch: Optional[int] = None  # None: keep the model's own setting (engine_stats()["max_batch"])
    max_queue: int = 32
    request_timeout: float = 300.0  # seconds from admission to the last byte; 0 disables
    max_input_chars: int = 4096
    max_voice_bytes: int = 10 * 1024 * 1024
    max_voice_seconds: float = 60.0
    default_max_new_tokens: Optional[int] = None  # None: the library's default per sentence
    max_new_tokens_limit: int = 4096
    retry_after_s: int = 1
    weights_note: Optional[str] = None  # shown by /v1/models and / when the weights are not speech

    def __post_init__(self) -> None:
        if self.model_kind not in MODEL_KINDS:
            raise ValueError(f"model_kind must be one of {MODEL_KINDS}, got {self.model_kind!r}")
        if self.max_batch is not None and self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")
        if self.request_timeout < 0:
            raise ValueError(f"request_timeout must be >= 0 (0 disables), got {self.request_timeout}")
        self.voices_dir = Path(self.voices_dir) if self.voices_dir is not None else default_voices_dir()

    @property
    def model_id(self) -> str:
        """The id `/v1/models` lists and `model` accepts (plus the aliases in `model_aliases`)."""
        return f"chatterbox-{self.model_kind}"

    @property
    def model_aliases(self) -> tuple[str, ...]:
        """Names accepted as `model`: ours, the kind, and OpenAI's TTS names so unmodified clients work."""
        return (self.model_id, self.model_kind, "chatterbox", "tts-1", "tts-1-hd", "gpt-4o-mini-tts")
