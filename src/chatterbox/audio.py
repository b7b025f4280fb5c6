"""Signal processing shared by the package: resampling and the Kaldi filterbank front end.

Everything here is float32 by default, runs on the device of its input and never imports
torchaudio. The numerics follow torchaudio's defaults step by step (same operation order, same
intermediate dtypes), so results agree with upstream chatterbox to float rounding:

- `resample(wav, orig_sr, new_sr)` is `torchaudio.transforms.Resample(orig_sr, new_sr)` with its
  defaults (windowed sinc, Hann window, `lowpass_filter_width=6`, `rolloff=0.99`).
- `kaldi_fbank(wav)` is `torchaudio.compliance.kaldi.fbank(wav, num_mel_bins=80)` with every other
  option at its default (the front end of CAM++), batched over rows.
- `crossfade_join(wavs, sr)` joins separately generated pieces (long text split into sentences)
  with a short raised-cosine crossfade, or fades to an optional silence gap between them.
"""
from __future__ import annotations

import logging
import math
from typing import Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

logger = logging.getLogger(__name__)

DeviceKey = str

# Kernels and tables are cached per (parameters, device, dtype); they are small and built once.
_RESAMPLE_KERNELS: dict[tuple, tuple[Tensor, int]] = {}
_FBANK_TABLES: dict[tuple, tuple[Tensor, Tensor]] = {}


def _device_key(device: Union[str, torch.device]) -> DeviceKey:
    """A canonical cache key: 'cuda' and 'cuda:0' map to the same entry."""
    device = torch.device(device)
    if device.type != "cpu" and device.index is None:
        index = torch.cuda.current_device() if device.type == "cuda" else 0
        device = torch.device(device.type, index)
    return str(device)


# ------------------------------------------------------------------------------------------------
# Resampling (windowed sinc, as torchaudio.functional.resample with method "sinc_interp_hann")
# ------------------------------------------------------------------------------------------------

def _sinc_kernel(p: int, q: int, lowpass_filter_width: int, rolloff: float) -> tuple[Tensor, int]:
    """Polyphase kernel (q, 1, 2W + p) for p -> q (reduced rates) in float64, and its half width W."""
    base = min(p, q) * rolloff
    width = math.ceil(lowpass_filter_width * p / base)
    idx = torch.arange(-width, width + p, dtype=torch.float64)[None, None] / p  # (1, 1, K)
    # torchaudio builds the output-phase term from an int64 arange, so it is divided in float32
    # and only then promoted to float64; keep that rounding.
    phase = torch.arange(0, -q, -1)[:, None, None] / q  # (q, 1, 1) float32
    t = (phase + idx) * base
    t = t.clamp(-lowpass_filter_width, lowpass_filter_width)
    window = torch.cos(t * math.pi / lowpass_filter_width / 2) ** 2
    t = t * math.pi
    kernel = torch.where(t == 0, torch.ones((), dtype=t.dtype), t.sin() / t)
    kernel = kernel * (window * (base / p))
    return kernel, width


def resample_kernel(orig_sr: int, new_sr: int, device: Union[str, torch.device] = "cpu",
                    dtype: torch.dtype = torch.float32, lowpass_filter_width: int = 6,
                    rolloff: float = 0.99) -> tuple[Tensor, int]:
    """The cached (kernel (q, 1, K), width) pair for `orig_sr -> new_sr` on `device` in `dtype`."""
    key = (int(orig_sr), int(new_sr), lowpass_filter_width, rolloff, _device_key(device), dtype)
    hit = _RESAMPLE_KERNELS.get(key)
    if hit is None:
        g = math.gcd(int(orig_sr), int(new_sr))
        kernel, width = _sinc_kernel(int(orig_sr) // g, int(new_sr) // g, lowpass_filter_width, rolloff)
        # torchaudio stores the float64 kernel as float32; cast through float32 for other dtypes.
        kernel = kernel.to(torch.float32).to(device=device, dtype=dtype)
        hit = _RESAMPLE_KERNELS[key] = (kernel, width)
    return hit


def resampled_length(length: int, orig_sr: int, new_sr: int) -> int:
    """Output length of `resample` for an input of `length` samples: ceil(new * length / orig).

    torchaudio rounds the quotient to float32 before the ceil; this does the same on the host.
    """
    g = math.gcd(int(orig_sr), int(new_sr))
    p, q = int(orig_sr) // g, int(new_sr) // g
    return int(math.ceil(float(np.float32(q * length / p))))


def resample(wav: Tensor, orig_sr: int, new_sr: int, lowpass_filter_width: int = 6,
             rolloff: float = 0.99) -> Tensor:
    """Resample (..., L) from `orig_sr` to `new_sr` like torchaudio's default `Resample`.

    Returns (..., ceil(new_sr * L / orig_sr)) on the input's device and in its dtype. The
    polyphase kernel is cached per (rates, device, dtype); no host sync happens.
    """
    if int(orig_sr) == int(new_sr):
        return wav
    if not wav.is_floating_point():
        raise TypeError(f"resample expects a floating-point waveform, got {wav.dtype}")
    g = math.gcd(int(orig_sr), int(new_sr))
    p = int(orig_sr) // g
    kernel, width = resample_kernel(orig_sr, new_sr, wav.device, wav.dtype, lowpass_filter_width, rolloff)
    shape = wav.shape
    x = wav.reshape(-1, shape[-1])  # (N, L)
    n, length = x.shape
    x = F.pad(x, (width, width + p))  # (N, L + 2W + p)
    y = F.conv1d(x[:, None], kernel, stride=p)  # (N, q, frames)
    y = y.transpose(1, 2).reshape(n, -1)  # (N, frames * q), interleaved phases
    y = y[:, : resampled_length(length, orig_sr, new_sr)]
    return y.reshape(shape[:-1] + y.shape[-1:])


# ------------------------------------------------------------------------------------------------
# Kaldi filterbank (torchaudio.compliance.kaldi.fbank, CAM++ options)
# ------------------------------------------------------------------------------------------------

def _kaldi_mel(freq: Tensor) -> Tensor:
    return 1127.0 * (1.0 + freq / 700.0).log()


def kaldi_mel_banks(num_bins: int = 80, padded_window: int = 512, sample_rate: float = 16000.0,
                    low_freq: float = 20.0, high_freq: float = 0.0) -> Tensor:
    """Kaldi's triangular mel filters (num_bins, padded_window // 2 + 1), float32, Nyquist column 0.

    Mel scale 1127 ln(1 + f/700), centres equally spaced in mel, no normalisation, no VTLN.
    """
    nyquist = 0.5 * sample_rate
    if high_freq <= 0.0:
        high_freq += nyquist
    bin_width = sample_rate / padded_window
    mel_low = 1127.0 * math.log(1.0 + low_freq / 700.0)
    mel_high = 1127.0 * math.log(1.0 + high_freq / 700.0)
    delta = (mel_high - mel_low) / (num_bins + 1)
    b = torch.arange(num_bins).unsqueeze(1)  # (n, 1) int64, promoted to float32 below
    left = mel_low + b * delta
    center = mel_low + (b + 1.0) * delta
    right = mel_low + (b + 2.0) * delta
    mel = _kaldi_mel(bin_width * torch.arange(padded_window / 2)).unsqueeze(0)  # (1, F/2)
    up = (mel - left) / (center - left)
    down = (right - mel) / (right - center)
    banks = torch.max(torch.zeros(1), torch.min(up, down))  # (n, F/2)
    return F.pad(banks, (0, 1))  # (n, F/2 + 1): the Nyquist bin gets weight 0


def povey_window(size: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Kaldi's 'povey' window: a symmetric Hann window raised to the power 0.85."""
    return torch.hann_window(size, periodic=False, dtype=dtype).pow(0.85)


def _fbank_tables(num_mel_bins: int, frame_length: int, padded: int, sample_rate: float,
                  low_freq: float, high_freq: float, device: torch.device,
                  dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    key = (num_mel_bins, frame_length, padded, sample_rate, low_freq, high_freq, _device_key(device), dtype)
    hit = _FBANK_TABLES.get(key)
    if hit is None:
        window = povey_window(frame_length, dtype).to(device)
        banks = kaldi_mel_banks(num_mel_bins, padded, sample_rate, low_freq, high_freq)
        hit = _FBANK_TABLES[key] = (window, banks.to(device=device, dtype=dtype))
    return hit


def kaldi_fbank(wav: Tensor, num_mel_bins: int = 80, sample_rate: float = 16000.0,
                frame_length_ms: float = 25.0, frame_shift_ms: float = 10.0,
                preemphasis: float = 0.97, low_freq: float = 20.0, high_freq: float = 0.0) -> Tensor:
    """Kaldi log-mel filterbank of (L,) or (B, L) float samples -> (frames, bins) or (B, frames, bins).

    Matches `torchaudio.compliance.kaldi.fbank(wav[None], num_mel_bins=...)` with its defaults:
    snip_edges (frames = 1 + (L - 400) // 160 at 16 kHz), no dither, per-frame DC removal,
    pre-emphasis within the frame, Povey window, zero-padding to a power of two, power spectrum,
    natural log floored at float32 epsilon. Rows of a batch are processed independently.
    """
    squeeze = wav.dim() == 1
    x = wav[None] if squeeze else wav  # (B, L)
    win = int(sample_rate * frame_length_ms * 0.001)
    hop = int(sample_rate * frame_shift_ms * 0.001)
    padded = 1 << (win - 1).bit_length()
    if x.shape[-1] < win:
        raise ValueError(f"kaldi_fbank needs at least {win} samples, got {x.shape[-1]}")
    window, banks = _fbank_tables(num_mel_bins, win, padded, sample_rate, low_freq, high_freq,
                                  x.device, x.dtype)
    frames = x.unfold(-1, win, hop)  # (B, M, win)
    frames = frames - frames.mean(dim=-1, keepdim=True)
    prev = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)  # x[-1] := x[0]
    frames = frames - preemphasis * prev
    frames = frames * window
    frames = F.pad(frames, (0, padded - win))  # (B, M, padded)
    power = torch.fft.rfft(frames).abs().pow(2.0)  # (B, M, padded/2 + 1)
    mel = torch.matmul(power, banks.T)  # (B, M, bins)
    eps = torch.finfo(mel.dtype).eps
    mel = mel.clamp_min(eps).log()
    return mel[0] if squeeze else mel


# ------------------------------------------------------------------------------------------------
# Small helpers
# ------------------------------------------------------------------------------------------------

def check_range(wav: Tensor, name: str = "audio") -> None:
    """Log a warning if samples lie outside [-1, 1] (one host sync; call it outside hot paths)."""
    lo, hi = torch.aminmax(wav.detach())
    lo, hi = float(lo), float(hi)
    if lo < -1.0 or hi > 1.0:
        logger.warning("%s values outside the normalised range: min=%.4f, max=%.4f", name, lo, hi)


def _fade_in(n: int, equal_power: bool, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(n,) rising gain, sampled at the sample centres; the falling gain is its mirror (equal_power) or 1 - it."""
    t = (torch.arange(n, device=device, dtype=torch.float64) + 0.5) / n
    g = torch.sin(0.5 * math.pi * t)
    return (g if equal_power else g * g).to(dtype)


def crossfade_join(wavs: Sequence[Tensor], sr: int, fade_ms: float = 20.0, gap_ms: float = 0.0, *,
                   equal_power: bool = False) -> Tensor:
    """Join pieces (1, n_i) or (n_i,) into one (1, N) waveform without clicks at the joins.

    gap_ms == 0 (default): consecutive pieces overlap by F = min(fade, output so far, next piece)
    samples, crossfaded; N = sum(n_i) - sum(F_j). Chatterbox pieces start with ~20 ms of near
    silence, so a 20 ms overlap mostly fades the previous piece's tail out and adds no pause.
    gap_ms > 0: the output fades out over its last F samples, gap_ms of zeros follow, the next piece
    fades in over its first F; N = sum(n_i) + (k - 1) * gap. Use ~100-300 ms when the pieces are
    sentences and the model's own trailing silence is too short a pause.
    The default raised-cosine (sin^2) gains sum to 1, so a shared level passes through unchanged;
    equal_power=True uses sin/cos gains whose squares sum to 1, which keeps the loudness of two
    unrelated loud signals (no ~3 dB dip mid-fade). Empty pieces are skipped; [] gives (1, 0).
    """
    if fade_ms < 0 or gap_ms < 0:
        raise ValueError(f"fade_ms and gap_ms must be >= 0, got {fade_ms} and {gap_ms}")
    rows = []
    for i, w in enumerate(wavs):
        if w.dim() == 2 and w.shape[0] == 1:
            w = w[0]
        if w.dim() != 1:
            raise ValueError(f"piece {i} must have shape (1, n) or (n,), got {tuple(w.shape)}")
        if w.shape[0]:
            rows.append(w)
    if not rows:
        return torch.zeros(1, 0, dtype=torch.float32)
    device, dtype = rows[0].device, rows[0].dtype
    fade = int(round(fade_ms * sr / 1000.0))
    gap = int(round(gap_ms * sr / 1000.0))
    # lengths first, so the output is allocated once (no O(k * N) re-concatenation)
    overlaps, end = [], rows[0].shape[0]
    for w in rows[1:]:
        f = 0 if gap else min(fade, end, w.shape[0])
        overlaps.append(f)
        end += w.shape[0] - f + gap
    out = torch.zeros(end, device=device, dtype=dtype)
    out[: rows[0].shape[0]] = rows[0]
    end = rows[0].shape[0]
    for w, f in zip(rows[1:], overlaps):
        w = w.to(device=device, dtype=dtype)
        n = w.shape[0]
        if gap:
            f_out, f_in = min(fade, end), min(fade, n)
            if f_out:
                g = _fade_in(f_out, equal_power, device, dtype)
                out[end - f_out: end] *= g.flip(0) if equal_power else 1 - g
            start = end + gap
            out[start: start + n] = w
            if f_in:
                out[start: start + f_in] *= _fade_in(f_in, equal_power, device, dtype)
            end = start + n
            continue
        start = end - f
        if f:
            g = _fade_in(f, equal_power, device, dtype)
            g_out = g.flip(0) if equal_power else 1 - g
            out[start:end] = out[start:end] * g_out + w[:f] * g
        out[end: start + n] = w[f:]
        end = start + n
    return out[None]
