"""Speaker encoder: 40-band mels -> 3-layer LSTM over 160-frame partials -> unit-norm (256,) embedding.

Weight-compatible with upstream's `VoiceEncoder` (same state-dict names and order). The mel front end
is numpy/librosa on the CPU (as upstream); the packed mels go to the module's device once and the
partial windows, LSTM, projection and averaging all stay there.
"""
from __future__ import annotations

import logging
import math
from typing import Sequence

import librosa
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import VoiceEncConfig
from .melspec import melspectrogram

logger = logging.getLogger(__name__)

DEFAULT_RATE = 1.3  # partial windows per second used by Chatterbox (upstream's default)


def frame_step(hp: VoiceEncConfig, overlap: float = 0.5, rate: float | None = None) -> int:
    """Hop between partial windows in mel frames: from `rate` (windows/s) if given, else from `overlap`."""
    if rate is not None:
        step = int(round((hp.sample_rate / rate) / hp.hop_size))
    else:
        step = int(round(hp.ve_partial_frames * (1 - overlap)))
    if not 0 < step <= hp.ve_partial_frames:
        raise ValueError(f"partial-window step {step} must be in (0, {hp.ve_partial_frames}]")
    return step


def num_windows(n_frames: int, step: int, win: int, min_coverage: float = 0.8) -> tuple[int, int]:
    """(number of partials, frames they span) for an utterance of `n_frames` mel frames."""
    n, rem = divmod(max(n_frames - win + step, 0), step)
    if n == 0 or (rem + win - step) / win >= min_coverage:
        n += 1  # the last, partly filled window covers enough of the utterance to keep it
    return n, win + step * (n - 1)


def pack(mels: Sequence[np.ndarray]) -> np.ndarray:
    """Zero-pad a list of (F_i, M) arrays into one (B, max F_i, M) float32 array."""
    out = np.zeros((len(mels), max(len(m) for m in mels), mels[0].shape[1]), dtype=np.float32)
    for i, m in enumerate(mels):
        out[i, : len(m)] = m
    return out


class VoiceEncoder(nn.Module):
    """Upstream-compatible speaker encoder; `embeds_from_wavs` is the entry point the API uses."""

    def __init__(self, hp: VoiceEncConfig | None = None):
        super().__init__()
        self.hp = hp = hp or VoiceEncConfig()
        self.lstm = nn.LSTM(hp.num_mels, hp.ve_hidden_size, num_layers=3, batch_first=True)
        if hp.flatten_lstm_params:
            self.lstm.flatten_parameters()
        self.proj = nn.Linear(hp.ve_hidden_size, hp.speaker_embed_size)
        # Training-time similarity scale/offset (GE2E); kept for state-dict compatibility only.
        self.similarity_weight = nn.Parameter(torch.tensor([10.0]))
        self.similarity_bias = nn.Parameter(torch.tensor([-5.0]))

    @property
    def device(self) -> torch.device:
        return self.proj.weight.device

    def forward(self, mels: Tensor) -> Tensor:
        """Embeddings of equal-length partials: mels (B, W, M) -> (B, E), each row of unit L2 norm."""
        _, (h, _) = self.lstm(mels)  # h: (layers, B, H)
        x = self.proj(h[-1])  # (B, E)
        if self.hp.ve_final_relu:
            x = F.relu(x)
        return x / torch.linalg.norm(x, dim=1, keepdim=True)

    def inference(
        self,
        mels: Tensor,
        mel_lens: Sequence[int] | Tensor,
        overlap: float = 0.5,
        rate: float | None = None,
        min_coverage: float = 0.8,
        batch_size: int | None = None,
    ) -> Tensor:
        """Utterance embeddings (B, E) of packed mels (B, F, M), on the mels' device (upstream: CPU)."""
        if isinstance(mel_lens, Tensor):
            mel_lens = mel_lens.tolist()
        win = self.hp.ve_partial_frames
        step = frame_step(self.hp, overlap, rate)
        wins = [num_windows(int(n), step, win, min_coverage) for n in mel_lens]
        counts = [n for n, _ in wins]
        span = max(t for _, t in wins)
        if span > mels.shape[1]:
            mels = F.pad(mels, (0, 0, 0, span - mels.shape[1]))  # zero frames, on device
        # All windows of every utterance as a strided view, then keep each utterance's first n_i.
        frames = mels.unfold(1, win, step).transpose(2, 3)  # (B, n_max, W, M)
        partials = torch.cat([frames[i, :n] for i, n in enumerate(counts)])  # (N, W, M)
        partials = partials.to(self.proj.weight.dtype)

        n_chunks = math.ceil(len(partials) / batch_size) if batch_size else 1
        embeds = torch.cat([self(chunk) for chunk in partials.chunk(n_chunks)])  # (N, E)

        utt = torch.stack([e.mean(0) for e in embeds.split(counts)])  # (B, E)
        return utt / torch.linalg.norm(utt, dim=1, keepdim=True)

    @staticmethod
    def utt_to_spk_embed(utt_embeds: np.ndarray) -> np.ndarray:
        """Speaker embedding (E,) = L2-normalised mean of utterance embeddings (B, E)."""
        assert utt_embeds.ndim == 2, utt_embeds.shape
        mean = utt_embeds.mean(axis=0)
        return mean / np.linalg.norm(mean, 2)

    @staticmethod
    def voice_similarity(embeds_x: np.ndarray, embeds_y: np.ndarray) -> float:
        """Cosine similarity of two utterance sets (B, E) or speaker embeddings (E,)."""
        x = embeds_x if embeds_x.ndim == 1 else VoiceEncoder.utt_to_spk_embed(embeds_x)
        y = embeds_y if embeds_y.ndim == 1 else VoiceEncoder.utt_to_spk_embed(embeds_y)
        return x @ y

    def embed_mels(self, mels: Sequence[np.ndarray] | Tensor, mel_lens=None, batch_size: int = 32, **kwargs) -> Tensor:
        """Utterance embeddings (B, E) on `self.device` of (F_i, M) mels or a packed (B, F, M) tensor."""
        if not isinstance(mels, Tensor):
            mels = [np.asarray(m) for m in mels]
            if any(m.ndim != 2 or m.shape[1] != self.hp.num_mels for m in mels):
                raise ValueError(f"mels must be (frames, {self.hp.num_mels}) arrays")
            mel_lens = [len(m) for m in mels]
            mels = torch.from_numpy(pack(mels))
        elif mel_lens is None:
            mel_lens = [mels.shape[1]] * mels.shape[0]
        with torch.no_grad():  # not inference_mode: callers may keep and modify the result
            return self.inference(mels.to(self.device), mel_lens, batch_size=batch_size, **kwargs)

    def embeds_from_mels(
        self, mels: Sequence[np.ndarray] | Tensor, mel_lens=None, as_spk: bool = False, batch_size: int = 32, **kwargs
    ) -> np.ndarray:
        """Utterance embeddings (B, E), or one speaker embedding (E,) if `as_spk`, as numpy float32."""
        utt = self.embed_mels(mels, mel_lens, batch_size=batch_size, **kwargs).float().cpu().numpy()
        return self.utt_to_spk_embed(utt) if as_spk else utt

    def wavs_to_mels(self, wavs: Sequence[np.ndarray], sample_rate: int, trim_top_db: float | None = 20) -> list[np.ndarray]:
        """Resample to 16 kHz, trim silent ends, and compute (F_i, M) mels (CPU, numpy)."""
        hp = self.hp
        wavs = [np.asarray(w, dtype=np.float32).reshape(-1) for w in wavs]
        if sample_rate != hp.sample_rate:
            wavs = [_resample(w, sample_rate, hp.sample_rate) for w in wavs]
        if trim_top_db:
            wavs = [librosa.effects.trim(w, top_db=trim_top_db)[0] for w in wavs]
        if any(len(w) == 0 for w in wavs):
            raise ValueError("VoiceEncoder got an empty waveform (after trimming silence)")
        return [melspectrogram(w, hp).T for w in wavs]

    def embed_wavs(
        self, wavs: Sequence[np.ndarray], sample_rate: int, batch_size: int = 32, trim_top_db: float | None = 20, **kwargs
    ) -> Tensor:
        """Utterance embeddings (B, E) of waveforms as a tensor on `self.device` (no host copy back)."""
        kwargs.setdefault("rate", DEFAULT_RATE)
        mels = self.wavs_to_mels(wavs, sample_rate, trim_top_db)
        return self.embed_mels(mels, batch_size=batch_size, **kwargs)

    def embeds_from_wavs(
        self,
        wavs: Sequence[np.ndarray],
        sample_rate: int,
        as_spk: bool = False,
        batch_size: int = 32,
        trim_top_db: float | None = 20,
        **kwargs,
    ) -> np.ndarray:
        """Upstream's entry point: numpy (B, 256) utterance embeddings, or (256,) if `as_spk`."""
        utt = self.embed_wavs(wavs, sample_rate, batch_size, trim_top_db, **kwargs).float().cpu().numpy()
        return self.utt_to_spk_embed(utt) if as_spk else utt


def _resample(wav: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    # Upstream uses librosa's "kaiser_fast", which needs the optional `resampy`; without it we use
    # librosa's default (soxr_hq), a slightly different but higher-quality filter.
    try:
        import resampy  # noqa: F401

        res_type = "kaiser_fast"
    except ImportError:
        res_type = "soxr_hq"
    return librosa.resample(wav, orig_sr=orig_sr, target_sr=target_sr, res_type=res_type)
