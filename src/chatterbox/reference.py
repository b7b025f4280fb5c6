"""Reference audio for voice cloning: loading with clear errors, and loudness normalisation.

`load_reference(path_or_array, target_sr)` returns mono float32 at `target_sr` or raises:

| input | outcome |
| --- | --- |
| path that does not exist | `FileNotFoundError` |
| a directory, or a file that is not decodable audio (corrupt, text renamed .wav, ...) | `ValueError` naming the file |
| NaN or infinite samples | `ValueError` |
| shorter than `min_seconds` (default 1 s; Turbo passes 5) | `ValueError` naming the duration (exactly 5 s passes; upstream Turbo asserts > 5 s) |
| longer than `limit_seconds` (default `MAX_REFERENCE_SECONDS` = 120 s) | `ValueError` naming the duration, read from the file header before decoding |
| silent: peak below 1e-4 or RMS below 1e-5 | `ValueError` |
| any sample rate, mono or multi-channel | resampled (librosa, soxr_hq) and averaged to mono |

Memory stays bounded by what is kept: files are decoded with soundfile block by block and mixed
to mono as they are read, at most `max_seconds` (when given) or `limit_seconds` of them. A voice
reference longer than two minutes is almost certainly the wrong file (the models use its first
10 s for S3Gen and 6 s, Turbo 15 s, for the speech prompt), so it is an error, not a truncation.
`max_seconds` truncates instead: decode only that much. It is off by default because upstream's
voice-encoder embedding (and Turbo's loudness normalisation) sees the whole reference, so cutting
a reference longer than `max_seconds` changes the voice embedding slightly. Formats soundfile
cannot open go through librosa/audioread with the same bounds (duration from the audioread header
when it has one, else decode at most `limit_seconds` + 1 s and check).

`load_source(path_or_array, target_sr, max_seconds=MAX_VC_SOURCE_SECONDS)` loads the speech that
voice conversion re-speaks: the same checks, the whole file is used, and sources longer than
`max_seconds` (300 s) are refused with a pointer to streaming conversion.

`norm_loudness(wav, sr, target_lufs=-27)` is Turbo's reference normalisation: ITU-R BS.1770 integrated
loudness (K-weighting, 400 ms blocks with 75 % overlap, -70 LUFS absolute and -10 LU relative gates,
as pyloudnorm computes it) and one gain to reach `target_lufs`.
"""
from __future__ import annotations

import logging
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Union

import numpy as np
from scipy.signal import lfilter

logger = logging.getLogger(__name__)

SILENCE_PEAK = 1e-4
SILENCE_RMS = 1e-5
MAX_REFERENCE_SECONDS = 120.0  # longer is almost certainly the wrong file; the models use <= 15 s
MAX_VC_SOURCE_SECONDS = 300.0  # one-shot conversion tokenises and vocodes the whole source at once
_RESAMPLE_MARGIN_S = 0.1  # decoded past a cut so soxr_hq gives the same samples as a full decode
_BLOCK_FRAMES = 1 << 16  # frames per soundfile read while mixing to mono
_REFERENCE_HINT = ("a voice reference needs only 5-15 s of clean speech: is this the right file? "
                   "Trim it, or pass limit_seconds=None to load_reference to lift the check")
_SOURCE_HINT = ("one-shot voice conversion holds the whole source in memory: cut it into shorter files or "
                "use streaming conversion, which accepts a larger max_seconds")
AudioInput = Union[str, os.PathLike, np.ndarray]


def _to_mono(wav: np.ndarray) -> np.ndarray:
    # 2-D arrays: the shorter axis holds the channels ((C, N) as librosa, or (N, C) as soundfile)
    if wav.ndim == 1:
        return wav
    if wav.ndim != 2:
        raise ValueError(f"reference audio must be 1-D or 2-D (channels x samples), got shape {wav.shape}")
    return wav.mean(axis=0 if wav.shape[0] <= wav.shape[1] else 1)


def _check_file(path: Path, what: str) -> None:
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    if not path.is_file():
        raise ValueError(f"{what} {path} is not a file")


def _too_long(name: str, seconds: float, limit: float, hint: str) -> ValueError:
    return ValueError(f"{name} is {seconds:.1f} s long, above the limit of {limit:g} s; {hint}")


def _read_soundfile(path: Path, frames: int) -> tuple[np.ndarray, int]:
    """At most `frames` frames of `path`, mixed to mono block by block (float32)."""
    import soundfile as sf

    blocks: list[np.ndarray] = []
    with sf.SoundFile(str(path)) as f:
        sr, left = int(f.samplerate), frames
        while left > 0:
            block = f.read(min(_BLOCK_FRAMES, left), dtype="float32", always_2d=True)  # (n, C)
            if len(block) == 0:
                break
            blocks.append(block[:, 0].copy() if block.shape[1] == 1 else block.mean(axis=1))
            left -= len(block)
    wav = np.concatenate(blocks) if blocks else np.zeros(0, np.float32)
    return wav, sr


def _read_other(path: Path, seconds: float | None) -> tuple[np.ndarray, int]:
    """Formats soundfile cannot open: librosa (audioread) decodes at most `seconds`."""
    import librosa

    try:
        with warnings.catch_warnings():  # librosa's soundfile -> audioread fallback chatter
            warnings.filterwarnings("ignore", message="PySoundFile failed")
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            wav, sr = librosa.load(str(path), sr=None, mono=False, dtype=np.float32, duration=seconds)
    except Exception as e:  # soundfile / audioread raise many types; all mean "not audio we can read"
        raise ValueError(f"could not read {path} as audio ({type(e).__name__}: {e})") from e
    return (wav.mean(axis=0) if wav.ndim == 2 else wav), int(sr)


def _header(path: Path) -> tuple[float | None, int | None]:
    """(duration from the header or None, sample rate if soundfile opens the file else None)."""
    import soundfile as sf

    try:
        info = sf.info(str(path))
    except Exception:  # not a format soundfile opens (or not audio): ask audioread for a duration
        pass
    else:
        known = 0 < info.frames < 2**62 and info.samplerate > 0  # unknown lengths read as 0 or SF_COUNT_MAX
        return (info.frames / info.samplerate if known else None), int(info.samplerate)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)  # audioread's aifc/audioop imports
            import audioread

            with audioread.audio_open(str(path)) as f:
                return (float(f.duration) if f.duration else None), None
    except Exception:
        return None, None


def _decode(path: Path, max_seconds: float | None, limit_seconds: float | None, what: str,
            hint: str) -> tuple[np.ndarray, int]:
    """Mono float32 samples and their rate; at most `max_seconds` (+ a resampling margin) decoded."""
    _check_file(path, what)
    seconds, sf_rate = _header(path)
    if seconds is not None and limit_seconds is not None and seconds > limit_seconds:
        raise _too_long(str(path), seconds, limit_seconds, hint)
    # decode a little past max_seconds so resampling sees the same samples as a full decode would
    keep = None if max_seconds is None else max_seconds + _RESAMPLE_MARGIN_S
    guard = None if limit_seconds is None else limit_seconds + 1.0  # header lied or had no length
    read = keep if guard is None else guard if keep is None else min(keep, guard)
    if sf_rate is None:
        wav, sr = _read_other(path, read)
    else:
        try:
            wav, sr = _read_soundfile(path, sys.maxsize if read is None else int(math.ceil(read * sf_rate)))
        except Exception as e:
            raise ValueError(f"could not read {path} as audio ({type(e).__name__}: {e})") from e
    if limit_seconds is not None and len(wav) / sr > limit_seconds:
        raise _too_long(str(path), len(wav) / sr, limit_seconds, hint)
    return wav, sr


def _load(path_or_array: AudioInput, target_sr: int, min_seconds: float, array_sr: int | None,
          max_seconds: float | None, limit_seconds: float | None, what: str, hint: str) -> np.ndarray:
    if max_seconds is not None and max_seconds < min_seconds:
        raise ValueError(f"max_seconds={max_seconds:g} is below min_seconds={min_seconds:g}")
    if isinstance(path_or_array, (str, os.PathLike)):
        name = str(path_or_array)
        wav, sr = _decode(Path(path_or_array), max_seconds, limit_seconds, what, hint)
    else:
        name = what + " array"
        if hasattr(path_or_array, "detach"):  # a torch tensor
            path_or_array = path_or_array.detach().cpu().numpy()
        wav, sr = _to_mono(np.asarray(path_or_array, dtype=np.float32)), array_sr or target_sr
        if limit_seconds is not None and len(wav) / sr > limit_seconds:
            raise _too_long(name, len(wav) / sr, limit_seconds, hint)
        if max_seconds is not None:
            wav = wav[: int(math.ceil((max_seconds + _RESAMPLE_MARGIN_S) * sr))]
    if not np.isfinite(wav).all():
        raise ValueError(f"{name} contains NaN or infinite samples")
    if sr != target_sr and len(wav):
        import librosa

        wav = librosa.resample(wav, orig_sr=sr, target_sr=target_sr)  # soxr_hq, as librosa.load
    if max_seconds is not None:
        wav = wav[: int(round(max_seconds * target_sr))]
    wav = np.ascontiguousarray(wav, dtype=np.float32)
    seconds = len(wav) / target_sr
    if seconds < min_seconds:
        raise ValueError(f"{name} is {seconds:.2f} s long; a {what} needs at least {min_seconds:g} s")
    peak = float(np.abs(wav).max())
    rms = float(np.sqrt(np.mean(np.square(wav, dtype=np.float64))))
    if peak < SILENCE_PEAK or rms < SILENCE_RMS:
        raise ValueError(f"{name} is silent (peak {peak:.2e}, RMS {rms:.2e}); the {what} must contain speech")
    return wav


def load_reference(
    path_or_array: AudioInput,
    target_sr: int,
    min_seconds: float = 1.0,
    array_sr: int | None = None,
    *,
    max_seconds: float | None = None,
    limit_seconds: float | None = MAX_REFERENCE_SECONDS,
) -> np.ndarray:
    """Mono float32 reference at `target_sr` from a file path or an array (at `array_sr`, default `target_sr`).

    `max_seconds` keeps (and decodes) only the first seconds; `limit_seconds` refuses longer input.
    """
    return _load(path_or_array, target_sr, min_seconds, array_sr, max_seconds, limit_seconds,
                 "voice reference", _REFERENCE_HINT)


def load_source(
    path_or_array: AudioInput,
    target_sr: int,
    max_seconds: float | None = MAX_VC_SOURCE_SECONDS,
    *,
    min_seconds: float = 0.1,
    array_sr: int | None = None,
) -> np.ndarray:
    """Mono float32 voice-conversion source at `target_sr`, all of it; longer than `max_seconds` is refused."""
    return _load(path_or_array, target_sr, min_seconds, array_sr, None, max_seconds,
                 "voice-conversion source", _SOURCE_HINT)


# --- loudness (ITU-R BS.1770-4, the way pyloudnorm's Meter computes it) -----------------------------


def _biquad(kind: str, gain_db: float, q: float, fc: float, sr: int) -> tuple[np.ndarray, np.ndarray]:
    # Audio-EQ-cookbook biquads; K-weighting = high shelf (+4 dB above ~1.5 kHz) then a 38 Hz high-pass.
    a_lin = 10 ** (gain_db / 40)
    w0 = 2 * math.pi * fc / sr
    cos, alpha = math.cos(w0), math.sin(w0) / (2 * q)
    if kind == "high_shelf":
        s = 2 * math.sqrt(a_lin) * alpha
        b = [a_lin * ((a_lin + 1) + (a_lin - 1) * cos + s), -2 * a_lin * ((a_lin - 1) + (a_lin + 1) * cos),
             a_lin * ((a_lin + 1) + (a_lin - 1) * cos - s)]
        a = [(a_lin + 1) - (a_lin - 1) * cos + s, 2 * ((a_lin - 1) - (a_lin + 1) * cos),
             (a_lin + 1) - (a_lin - 1) * cos - s]
    elif kind == "high_pass":
        b = [(1 + cos) / 2, -(1 + cos), (1 + cos) / 2]
        a = [1 + alpha, -2 * cos, 1 - alpha]
    else:
        raise ValueError(kind)
    return np.array(b) / a[0], np.array(a) / a[0]


def integrated_loudness(wav: np.ndarray, sr: int, block_s: float = 0.4, overlap: float = 0.75) -> float:
    """Integrated loudness in LUFS of a mono or (N, C) signal; -inf when every block is gated out."""
    x = np.asarray(wav, dtype=np.float64)
    x = x[:, None] if x.ndim == 1 else x  # (N, C); all channels weighted 1 (no surround channels)
    if x.shape[0] < block_s * sr:
        raise ValueError(f"loudness needs at least {block_s} s of audio, got {x.shape[0] / sr:.3f} s")
    for kind, g, q, fc in (("high_shelf", 4.0, 1 / math.sqrt(2), 1500.0), ("high_pass", 0.0, 0.5, 38.0)):
        b, a = _biquad(kind, g, q, fc, sr)
        x = lfilter(b, a, x, axis=0)
    frac = 1 - overlap  # block hop as a fraction of the block
    n_blocks = int(round((x.shape[0] / sr - block_s) / (block_s * frac))) + 1
    power = np.empty(n_blocks)  # mean square per block, summed over channels
    sq = np.square(x).sum(axis=1)
    for j in range(n_blocks):
        lo, hi = int(block_s * (j * frac) * sr), int(block_s * (j * frac + 1) * sr)
        power[j] = sq[lo:hi].sum() / (block_s * sr)
    with np.errstate(divide="ignore"):
        block_lufs = -0.691 + 10 * np.log10(power)
    keep = block_lufs >= -70.0  # absolute gate
    if not keep.any():
        return -math.inf
    relative = -0.691 + 10 * math.log10(power[keep].mean()) - 10.0
    keep &= block_lufs > relative  # relative gate
    if not keep.any():
        return -math.inf
    return -0.691 + 10 * math.log10(power[keep].mean())


def norm_loudness(wav: np.ndarray, sr: int, target_lufs: float = -27.0) -> np.ndarray:
    """Scale `wav` to `target_lufs` integrated loudness; unchanged (with a log line) if not measurable."""
    try:
        gain = 10.0 ** ((target_lufs - integrated_loudness(wav, sr)) / 20.0)
    except ValueError as e:  # shorter than one 400 ms block
        logger.warning("norm_loudness skipped: %s", e)
        return wav
    if not (math.isfinite(gain) and gain > 0.0):  # silent signal: loudness -inf
        logger.warning("norm_loudness skipped: loudness not measurable (silent input)")
        return wav
    return wav * np.float32(gain) if wav.dtype == np.float32 else wav * gain
