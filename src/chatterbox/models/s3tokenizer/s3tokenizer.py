"""Chatterbox's S3 tokenizer: 16 kHz waveform -> 25 Hz speech tokens (our own implementation).

The module keeps upstream's state-dict layout (`_mel_filters`, `window`, `encoder.*`,
`quantizer._codebook.*`) and call signature. Differences from upstream, all invisible in outputs:
waves are processed without host syncs (lengths are host integers taken from shapes), the rotary
table is a device buffer, and inputs longer than 30 s take the same windowed path as upstream
but with one host sync at most.
"""
from __future__ import annotations

import logging
import math
from typing import Optional, Sequence, Union

import librosa
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .model import AudioEncoderV2, FSQVectorQuantization, ModelConfig

logger = logging.getLogger(__name__)

S3_SR = 16_000  # input rate
S3_HOP = 160  # 100 mel frames/s
S3_TOKEN_HOP = 640  # 25 tokens/s
S3_TOKEN_RATE = 25
SPEECH_VOCAB_SIZE = 6561  # 3^8

# Long-input handling (mel frames at 100 frames/s): 30 s windows every 26 s, 2 s dropped per side.
_MAX_FRAMES = 3000
_WINDOW_STRIDE = 2600
_OVERLAP_TOKENS = 2 * S3_TOKEN_RATE

WaveInput = Union[Tensor, np.ndarray, Sequence[Union[Tensor, np.ndarray]]]


def token_length(mel_len: int) -> int:
    """Tokens produced for `mel_len` mel frames (two k3/s2 convs): ceil(mel_len / 4)."""
    return ((mel_len - 1) // 2 + 1 - 1) // 2 + 1


class S3Tokenizer(nn.Module):
    """speech_tokenizer_v2_25hz with a log-mel front end; `forward(wavs) -> (tokens, lengths)`."""

    ignore_state_dict_missing = ("_mel_filters", "window")

    def __init__(self, name: str = "speech_tokenizer_v2_25hz", config: Optional[ModelConfig] = None):
        super().__init__()
        config = config or ModelConfig()
        if "v2" not in name:
            raise ValueError(f"only the v2 tokenizer is supported, got {name!r}")
        self.name = name
        self.config = config
        self.n_fft = 400
        self.encoder = AudioEncoderV2(config.n_mels, config.n_audio_state, config.n_audio_head,
                                      config.n_audio_layer, 2)
        self.quantizer = FSQVectorQuantization(config.n_audio_state, config.n_codebook_size)
        mel = librosa.filters.mel(sr=S3_SR, n_fft=self.n_fft, n_mels=config.n_mels)  # Slaney
        self.register_buffer("_mel_filters", torch.from_numpy(mel).float())  # (128, 201)
        self.register_buffer("window", torch.hann_window(self.n_fft))  # periodic Hann (400,)

    @property
    def device(self) -> torch.device:
        return self._mel_filters.device

    def pad(self, wavs: WaveInput, sr: int) -> list[Tensor]:
        """Zero-pad each wave (to (1, L')) so its length is a whole number of 40 ms tokens."""
        out = []
        for wav in self._as_list(wavs):
            n_tokens = math.ceil(wav.shape[-1] / sr * S3_TOKEN_RATE)
            out.append(F.pad(wav, (0, int(n_tokens * (sr / S3_TOKEN_RATE)) - wav.shape[-1])))
        return out

    @staticmethod
    def _as_list(wavs: WaveInput) -> list[Tensor]:
        items = [wavs] if isinstance(wavs, (Tensor, np.ndarray)) and wavs.ndim == 1 else wavs
        out = []
        for wav in items:
            wav = torch.from_numpy(wav) if isinstance(wav, np.ndarray) else wav
            out.append(wav[None] if wav.dim() == 1 else wav)  # (1, L)
        return out

    def log_mel_spectrogram(self, audio: Tensor, padding: int = 0) -> Tensor:
        """(1, L) or (L,) 16 kHz audio -> (1, 128, L // 160) or (128, L // 160) log10 mel, normalised.

        Power STFT (n_fft 400, hop 160, centred, last frame dropped) -> Slaney mel -> log10,
        floored at (max - 8), then (x + 4) / 4. The max is over the whole input.
        """
        if not torch.is_tensor(audio):
            audio = torch.from_numpy(audio)
        audio = audio.to(self.device)
        if padding > 0:
            audio = F.pad(audio, (0, padding))
        stft = torch.stft(audio, self.n_fft, S3_HOP, window=self.window, return_complex=True)
        magnitudes = stft[..., :-1].abs() ** 2  # (1, 201, T)
        mel = self._mel_filters @ magnitudes  # (1, 128, T)
        log_spec = torch.clamp(mel, min=1e-10).log10()
        log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
        return (log_spec + 4.0) / 4.0

    @torch.no_grad()
    def forward(self, wavs: WaveInput, accelerator=None, max_len: Optional[int] = None) -> tuple[Tensor, Tensor]:
        """16 kHz waves ((B, L) tensor, a (L,) tensor, or a list) -> (tokens (B, T) int64, lengths (B,) int64).

        Each wave is processed alone (its own log-mel normalisation). `max_len` keeps at most that many
        tokens (the mel is cut to 4 * max_len frames). `accelerator` is accepted for compatibility.
        """
        model = self if accelerator is None else accelerator.unwrap_model(self)
        mels = []
        for wav in self._as_list(wavs):
            mel = self.log_mel_spectrogram(wav)[0]  # (128, T)
            if max_len is not None:
                mel = mel[:, : max_len * 4]
            mels.append(mel)
        lengths = [m.shape[-1] for m in mels]
        batch = nn.utils.rnn.pad_sequence([m.t() for m in mels], batch_first=True).transpose(1, 2)  # (B, 128, T)
        tokens, token_lens = model._quantize(batch, lengths)
        return tokens.long(), token_lens.long()

    @torch.inference_mode()
    def quantize(self, mel: Tensor, mel_len: Tensor) -> tuple[Tensor, Tensor]:
        """log-mel (B, 128, T), lengths (B,) -> (tokens (B, T') int32, lengths (B,)); > 30 s is windowed.

        Only when T > 3000 (a possible long input) are the lengths read on the host (one sync).
        """
        if mel.shape[-1] <= _MAX_FRAMES:
            hidden, code_len = self.encoder(mel, mel_len.to(mel.device))
            return self.quantizer.encode(hidden), code_len
        return self._quantize(mel, [int(n) for n in mel_len.tolist()])

    def _quantize(self, mel: Tensor, lengths: list[int]) -> tuple[Tensor, Tensor]:
        """`quantize` with host-side lengths: no host sync on either path."""
        if max(lengths) <= _MAX_FRAMES:
            lens = torch.tensor(lengths, device=mel.device)
            hidden, code_len = self.encoder(mel, lens)
            return self.quantizer.encode(hidden), code_len
        return self._quantize_long(mel, lengths)

    def _quantize_long(self, mel: Tensor, lengths: list[int]) -> tuple[Tensor, Tensor]:
        """Upstream's long-input path: 30 s windows every 26 s, encoded as one batch, then merged
        by dropping 2 s of tokens at each inner window edge. Short items become one padded window."""
        segments, seg_lens, owner = [], [], []
        for b, n in enumerate(lengths):
            starts = [0] if n <= _MAX_FRAMES else list(range(0, n, _WINDOW_STRIDE))
            for start in starts:
                end = min(start + _MAX_FRAMES, n)
                seg = mel[b, :, start:end]
                segments.append(F.pad(seg, (0, _MAX_FRAMES - seg.shape[-1])))
                seg_lens.append(end - start)
                owner.append(b)
        lens = torch.tensor(seg_lens, device=mel.device)
        hidden, _ = self.encoder(torch.stack(segments), lens)
        codes = self.quantizer.encode(hidden).long()  # (S, 750)
        pieces: list[list[Tensor]] = [[] for _ in lengths]
        for i, b in enumerate(owner):
            pieces[b].append(codes[i, : token_length(seg_lens[i])])
        merged = []
        for b, parts in enumerate(pieces):
            if lengths[b] <= _MAX_FRAMES:
                merged.append(parts[0])
                continue
            keep = []
            for j, p in enumerate(parts):
                lo = 0 if j == 0 else _OVERLAP_TOKENS
                hi = p.shape[0] if j == len(parts) - 1 else p.shape[0] - _OVERLAP_TOKENS
                keep.append(p[lo:max(lo, hi)])
            merged.append(torch.cat(keep))
        out_lens = torch.tensor([m.shape[0] for m in merged], device=mel.device)
        out = nn.utils.rnn.pad_sequence(merged, batch_first=True)  # zero padded
        return out, out_lens
