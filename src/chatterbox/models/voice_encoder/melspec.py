"""The VoiceEncoder's 40-band power mel spectrogram (numpy/librosa on the CPU, as upstream)."""
from __future__ import annotations

from functools import lru_cache

import librosa
import numpy as np

from .config import VoiceEncConfig


@lru_cache(maxsize=8)
def _mel_basis(sr: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    # Slaney mel scale with Slaney area normalisation (librosa's defaults), (n_mels, n_fft//2+1)
    return librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax, dtype=np.float32)


def melspectrogram(wav: np.ndarray, hp: VoiceEncConfig = VoiceEncConfig()) -> np.ndarray:
    """Mel spectrogram of a 1-D waveform -> (num_mels, 1 + len // hop) float32, linear amplitude."""
    wav = np.asarray(wav, dtype=np.float32)
    if hp.preemphasis > 0:
        wav = np.append(wav[:1], wav[1:] - hp.preemphasis * wav[:-1])
    spec = librosa.stft(
        wav, n_fft=hp.n_fft, hop_length=hp.hop_size, win_length=hp.win_size,
        window="hann", center=True, pad_mode="reflect",
    )  # (n_fft//2+1, F) complex64
    power = np.abs(spec) ** hp.mel_power
    mel = _mel_basis(hp.sample_rate, hp.n_fft, hp.num_mels, hp.fmin, hp.fmax) @ power  # (M, F)
    if hp.mel_type != "amp" or hp.normalized_mels:
        raise NotImplementedError("only mel_type='amp' without normalisation is used by Chatterbox")
    assert mel.shape[-1] == 1 + len(wav) // hp.hop_size, mel.shape
    return mel.astype(np.float32, copy=False)
