"""Audio encoding for responses: float32 chunks in, encoded bytes out, incrementally (streaming) or whole.

`wav` and `pcm` (24 kHz s16le) are written directly; `flac`, `mp3`, `opus` (Ogg) and `aac` (ADTS) go
through PyAV's encoders and muxers (no subprocess). `speed != 1` runs FFmpeg's `atempo` filter (tempo
change, pitch kept) in the same pipeline, so streamed audio is sped up chunk by chunk.
"""
from __future__ import annotations

import io
import struct
from fractions import Fraction
from typing import Optional

import numpy as np

FORMATS = ("mp3", "opus", "aac", "flac", "wav", "pcm")
MEDIA_TYPES = {
    "mp3": "audio/mpeg",
    "opus": "audio/ogg",
    "aac": "audio/aac",
    "flac": "audio/flac",
    "wav": "audio/wav",
    "pcm": "audio/pcm",
}
# format -> (PyAV muxer, codec, bit rate or None, muxer options)
_AV = {
    "mp3": ("mp3", "libmp3lame", 64_000, {}),
    "opus": ("ogg", "libopus", 32_000, {"page_duration": "20000"}),  # 20 ms pages: streamable
    "aac": ("adts", "aac", 64_000, {}),
    "flac": ("flac", "flac", None, {}),
}
MIN_SPEED, MAX_SPEED = 0.25, 4.0


def to_int16(x: np.ndarray) -> np.ndarray:
    """float32 [-1, 1] -> int16 (clipped, rounded, scale 32767)."""
    return np.round(np.clip(x, -1.0, 1.0) * 32767.0).astype(np.int16)


def wav_header(sr: int, n_samples: Optional[int]) -> bytes:
    """44-byte mono 16-bit WAV header; n_samples=None writes the 0xFFFFFFFF sizes used for streams."""
    data = 0xFFFFFFFF if n_samples is None else 2 * n_samples
    riff = 0xFFFFFFFF if n_samples is None else 36 + data
    return (b"RIFF" + struct.pack("<I", riff) + b"WAVEfmt " + struct.pack("<IHHIIHH", 16, 1, 1, sr, 2 * sr, 2, 16)
            + b"data" + struct.pack("<I", data))


def _atempo_factors(speed: float) -> list[float]:
    """atempo takes 0.5..2.0 per stage in every FFmpeg version; chain stages for the rest of 0.25..4."""
    out = []
    while speed < 0.5:
        out.append(0.5)
        speed /= 0.5
    while speed > 2.0:
        out.append(2.0)
        speed /= 2.0
    return out + [speed]


class _Sink:
    """A write-only, non-seekable file for PyAV muxers: bytes collect until `take()`."""

    def __init__(self):
        self._parts: list[bytes] = []

    def write(self, b) -> int:
        self._parts.append(bytes(b))
        return len(b)

    def take(self) -> bytes:
        out, self._parts = b"".join(self._parts), []
        return out


class _Tempo:
    """FFmpeg atempo filter graph over int16 mono frames."""

    def __init__(self, sr: int, speed: float):
        import av
        from av.filter import Graph

        self._av, self._sr, self._pts = av, sr, 0
        g = Graph()
        chain = [g.add_abuffer(format="s16", sample_rate=sr, layout="mono", time_base=f"1/{sr}")]
        chain += [g.add("atempo", f"{f:.6f}") for f in _atempo_factors(speed)]
        chain.append(g.add("abuffersink"))
        for a, b in zip(chain, chain[1:]):
            a.link_to(b)
        g.configure()
        self._g = g

    def _pull(self) -> np.ndarray:
        outs = []
        while True:
            try:
                frame = self._g.pull()
            except (self._av.BlockingIOError, self._av.EOFError):
                break
            outs.append(frame.to_ndarray().reshape(-1))
        return np.concatenate(outs).astype(np.int16) if outs else np.zeros(0, np.int16)

    def push(self, pcm: np.ndarray) -> np.ndarray:
        if pcm.size == 0:
            return pcm
        frame = self._av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = self._sr, self._pts, Fraction(1, self._sr)
        self._pts += pcm.size
        self._g.push(frame)
        return self._pull()

    def finish(self) -> np.ndarray:
        self._g.push(None)
        return self._pull()


class AudioEncoder:
    """float32 mono chunks -> bytes of `fmt`; `push` returns what is ready now, `finish` the rest.

    stream=True writes a header that needs no total length (WAV sizes 0xFFFFFFFF, unseekable muxers);
    stream=False produces a complete file (exact WAV sizes, FLAC STREAMINFO with the sample count).
    """

    def __init__(self, fmt: str, sr: int = 24000, *, speed: float = 1.0, stream: bool = True):
        if fmt not in FORMATS:
            raise ValueError(f"response_format must be one of {', '.join(FORMATS)}, got {fmt!r}")
        if not (MIN_SPEED <= speed <= MAX_SPEED):
            raise ValueError(f"speed must be between {MIN_SPEED} and {MAX_SPEED}, got {speed}")
        self.fmt, self.sr, self.stream = fmt, sr, stream
        self.samples_out = 0  # samples after the tempo change
        self._tempo = _Tempo(sr, speed) if abs(speed - 1.0) > 1e-6 else None
        self._pcm_parts: list[np.ndarray] = []  # whole-file WAV only
        self._header_sent = False
        self._container = None
        if fmt in _AV:
            import av

            muxer, codec, bit_rate, options = _AV[fmt]
            self._file = _Sink() if stream else io.BytesIO()
            self._container = av.open(self._file, mode="w", format=muxer, options=dict(options))
            self._stream = self._container.add_stream(codec, rate=sr)
            self._stream.layout = "mono"
            if bit_rate:
                self._stream.bit_rate = bit_rate
            self._av, self._pts = av, 0

    # ------------------------------------------------------------------ internals
    def _encode(self, pcm: np.ndarray, final: bool) -> bytes:
        self.samples_out += pcm.size
        if self.fmt == "pcm":
            return pcm.astype("<i2").tobytes()
        if self.fmt == "wav":
            if not self.stream:
                self._pcm_parts.append(pcm)
                if not final:
                    return b""
                allpcm = np.concatenate(self._pcm_parts) if self._pcm_parts else np.zeros(0, np.int16)
                return wav_header(self.sr, allpcm.size) + allpcm.astype("<i2").tobytes()
            head = b"" if self._header_sent else wav_header(self.sr, None)
            self._header_sent = True
            return head + pcm.astype("<i2").tobytes()
        if pcm.size:
            frame = self._av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = self.sr, self._pts, Fraction(1, self.sr)
            self._pts += pcm.size
            for packet in self._stream.encode(frame):
                self._container.mux(packet)
        if final:
            for packet in self._stream.encode(None):
                self._container.mux(packet)
            self._container.close()
            self._container = None
            return self._file.take() if self.stream else self._file.getvalue()
        return self._file.take() if self.stream else b""

    # ------------------------------------------------------------------ API
    def push(self, audio: np.ndarray) -> bytes:
        """Encode a float32 chunk (any shape, flattened); returns the bytes ready so far (may be empty)."""
        pcm = to_int16(np.asarray(audio, dtype=np.float32).reshape(-1))
        if self._tempo is not None:
            pcm = self._tempo.push(pcm)
        return self._encode(pcm, final=False)

    def finish(self) -> bytes:
        """Flush the filter and the encoder; the last bytes of the stream (or the whole file)."""
        pcm = self._tempo.finish() if self._tempo is not None else np.zeros(0, np.int16)
        return self._encode(pcm, final=True)

    def close(self) -> None:
        """Release the encoder without finishing (a cancelled request)."""
        if self._container is not None:
            try:
                self._container.close()
            except Exception:  # a half-written container may complain; nothing to save
                pass
            self._container = None


def encode_whole(audio: np.ndarray, fmt: str, sr: int = 24000, speed: float = 1.0) -> bytes:
    """One complete file of `fmt` from a float32 waveform."""
    enc = AudioEncoder(fmt, sr, speed=speed, stream=False)
    return enc.push(audio) + enc.finish()
