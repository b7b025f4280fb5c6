"""S3 speech tokenizer (16 kHz audio -> 25 Hz tokens) and the speech-token constants."""
from __future__ import annotations

import torch
from torch import Tensor

from .s3tokenizer import (
    S3_HOP,
    S3_SR,
    S3_TOKEN_HOP,
    S3_TOKEN_RATE,
    SPEECH_VOCAB_SIZE,
    S3Tokenizer,
)

SOS = SPEECH_VOCAB_SIZE  # T3's start-of-speech token
EOS = SPEECH_VOCAB_SIZE + 1  # T3's end-of-speech token

__all__ = ["S3_SR", "S3_HOP", "S3_TOKEN_HOP", "S3_TOKEN_RATE", "SPEECH_VOCAB_SIZE", "SOS", "EOS",
           "S3Tokenizer", "drop_invalid_tokens"]


def drop_invalid_tokens(x: Tensor) -> Tensor:
    """Keep the tokens after the first SOS (if any) and before the first EOS (if any); 1-D or (1, N).

    Looks at the values on the host (one sync); call it once per utterance, after decoding.
    """
    if not (x.dim() == 1 or (x.dim() == 2 and x.shape[0] == 1)):
        raise ValueError(f"drop_invalid_tokens expects (N,) or (1, N), got {tuple(x.shape)}")
    flat = x.reshape(-1)
    sos = torch.nonzero(flat == SOS).flatten()
    eos = torch.nonzero(flat == EOS).flatten()
    start = int(sos[0]) + 1 if sos.numel() else 0
    end = int(eos[0]) if eos.numel() else flat.numel()
    return x[..., start:end] if x.dim() == 2 else x[start:end]
