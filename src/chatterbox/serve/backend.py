"""The only place the server touches the model: calls from the public API contract, nothing deeper.

Every method here runs model code and is called from a worker thread, never from the event loop.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

logger = logging.getLogger("chatterbox.serve")

# Sampling knobs a request may set; None means "the model's default".
KNOBS = ("exaggeration", "cfg_weight", "temperature", "top_p", "min_p", "repetition_penalty", "top_k")
TOP_K_KINDS = ("turbo", "nano")


@dataclass
class SpeechJob:
    """One synthesis request as the model sees it."""

    text: str
    conds: Any = None  # a Conditionals, or None for the checkpoint's built-in voice
    seed: Optional[int] = None
    language: Optional[str] = None  # multilingual only
    max_new_tokens: Optional[int] = None
    knobs: dict = field(default_factory=dict)


def _to_numpy(chunk) -> np.ndarray:
    """A library chunk ((1, n) float32 tensor, or int16 bytes) -> (n,) float32."""
    if isinstance(chunk, (bytes, bytearray, memoryview)):
        return np.frombuffer(chunk, dtype="<i2").astype(np.float32) / 32768.0
    if hasattr(chunk, "detach"):
        chunk = chunk.detach().float().cpu().numpy()
    return np.asarray(chunk, dtype=np.float32).reshape(-1)


class AudioStream:
    """The library's stream iterator, chunks as float32 numpy; `close()` cancels (frees the decode slot).

    `cancel()` may be called from any thread: it uses the library stream's own thread-safe `cancel()`
    when it has one (the request stops at the scheduler's next step), else it only marks the stream so
    the worker closes it after the chunk in progress.
    """

    def __init__(self, it):
        self._it = it
        self.cancel_requested = False

    def __iter__(self) -> Iterator[tuple[np.ndarray, Any]]:
        return self

    def __next__(self) -> tuple[np.ndarray, Any]:
        chunk, metrics = next(self._it)
        return _to_numpy(chunk), metrics

    def cancel(self) -> None:
        self.cancel_requested = True
        fn = getattr(self._it, "cancel", None)
        if callable(fn):
            fn()

    def close(self) -> None:
        close = getattr(self._it, "close", None)
        if close is not None:
            close()


class SpeechBackend:
    """Wraps a loaded Chatterbox TTS model (any kind) behind the calls the server needs."""

    def __init__(self, model, kind: str):
        self.model, self.kind = model, kind
        self.sr = int(getattr(model, "sr", 24000))

    # ---------------------------------------------------------------- properties
    @property
    def has_builtin_voice(self) -> bool:
        return getattr(self.model, "conds", None) is not None

    @property
    def device(self) -> str:
        return str(getattr(self.model, "device", "cpu"))

    # ---------------------------------------------------------------- synthesis
    def _call_args(self, job: SpeechJob) -> tuple[tuple, dict]:
        args = (job.text, job.language or "en") if self.kind == "multilingual" else (job.text,)
        kw = {k: v for k, v in job.knobs.items() if v is not None}
        kw.update(conds=job.conds, seed=job.seed, split_text=True)
        if job.max_new_tokens is not None:
            kw["max_new_tokens"] = job.max_new_tokens
        return args, kw

    def generate(self, job: SpeechJob) -> np.ndarray:
        """The whole waveform, float32 (n,) at `sr` (model.generate with split_text=True)."""
        args, kw = self._call_args(job)
        return _to_numpy(self.model.generate(*args, **kw))

    def stream(self, job: SpeechJob) -> "AudioStream":
        """(float32 chunk, StreamMetrics) pairs as the model makes them. Close the stream to cancel."""
        args, kw = self._call_args(job)
        return AudioStream(self.model.generate_stream(*args, output="float32", **kw))

    # ---------------------------------------------------------------- voices
    def make_conditionals(self, wav_path: Path):
        """A prepared voice (Conditionals) from reference audio; ValueError for unusable audio."""
        return self.model.make_conditionals(str(wav_path))

    def load_conditionals(self, path: Path):
        """Conditionals saved by `Conditionals.save`, on the model's device."""
        from ..engine import Conditionals

        return Conditionals.load(path, map_location=self.device)

    # ---------------------------------------------------------------- engine
    def stats(self) -> dict:
        fn = getattr(self.model, "engine_stats", None)
        return dict(fn()) if fn is not None else {}

    def set_max_batch(self, n: int) -> None:
        self.model.set_max_batch(int(n))

    def max_batch(self) -> int:
        return int(self.stats().get("max_batch", 1))

    def close(self) -> None:
        fn = getattr(self.model, "close", None)
        if fn is not None:
            fn()
