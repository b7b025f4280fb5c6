"""The 24 kHz log-mel of S3Gen: the reference-prompt features and the space the flow predicts.

Natural log of a Slaney-normalised *amplitude* mel (librosa filters, 80 bins, 0-8 kHz) of a
1920-point STFT with hop 480 (50 frames/s), after a manual reflect pad of (n_fft - hop) / 2 on
both sides and `center=False`. The filterbank and window are cached per device, so repeated calls
do no host work; the range check of upstream (two host syncs per call) only runs for CPU inputs.
"""
from __future__ import annotations

import logging
from functools import lru_cache
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F
from librosa.filters import mel as librosa_mel_fn
from torch import Tensor

logger = logging.getLogger(__name__)

_TABLES: dict[tuple, tuple[Tensor, Tensor]] = {}


@lru_cache(maxsize=16)
def _librosa_basis(sr: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    return librosa_mel_fn(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax)


def mel_tables(n_fft: int, num_mels: int, sampling_rate: int, win_size: int, fmin: float,
               fmax: float, device: Union[str, torch.device]) -> tuple[Tensor, Tensor]:
    """Cached (mel basis (num_mels, n_fft // 2 + 1), periodic Hann window (win_size,)) on `device`."""
    device = torch.device(device)
    key = (n_fft, num_mels, sampling_rate, win_size, fmin, fmax, str(device))
    hit = _TABLES.get(key)
    if hit is None:
        basis = torch.from_numpy(_librosa_basis(sampling_rate, n_fft, num_mels, fmin, fmax)).float()
        hit = _TABLES[key] = (basis.to(device), torch.hann_window(win_size).to(device))
    return hit


def mel_spectrogram(y: Union[Tensor, np.ndarray], n_fft: int = 1920, num_mels: int = 80,
                    sampling_rate: int = 24000, hop_size: int = 480, win_size: int = 1920,
                    fmin: float = 0, fmax: float = 8000, center: bool = False) -> Tensor:
    """(L,) or (B, L) waveform -> (B, num_mels, frames) natural-log amplitude mel (frames = L // hop)."""
    if isinstance(y, np.ndarray):
        y = torch.from_numpy(y).float()
    if y.dim() == 1:
        y = y[None]
    if y.device.type == "cpu" and not torch.compiler.is_compiling():
        lo, hi = torch.aminmax(y)  # no device sync on the CPU
        if lo < -1.0 or hi > 1.0:
            logger.warning("Audio values outside normalized range: min=%.4f, max=%.4f", float(lo), float(hi))
    basis, window = mel_tables(n_fft, num_mels, sampling_rate, win_size, fmin, fmax, y.device)
    pad = (n_fft - hop_size) // 2
    y = F.pad(y[:, None], (pad, pad), mode="reflect")[:, 0]  # (B, L + 2 pad)
    spec = torch.stft(y, n_fft, hop_length=hop_size, win_length=win_size, window=window.to(y.dtype),
                      center=center, pad_mode="reflect", normalized=False, onesided=True,
                      return_complex=True)  # (B, n_fft/2 + 1, frames)
    spec = torch.view_as_real(spec)
    spec = torch.sqrt(spec.pow(2).sum(-1) + 1e-9)  # amplitude
    spec = torch.matmul(basis.to(spec.dtype), spec)  # (B, num_mels, frames)
    return torch.log(torch.clamp(spec, min=1e-5))
