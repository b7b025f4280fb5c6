"""T3 conditioning: the `T3Cond` container and the encoder that turns it into prefix embeddings."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional, Union

import torch
from torch import Tensor, nn

from .perceiver import Perceiver
from .t3_config import T3Config


@dataclass
class T3Cond:
    """Everything T3 is conditioned on besides text: speaker, speech prompt, emotion."""

    speaker_emb: Tensor
    clap_emb: Optional[Tensor] = None
    cond_prompt_speech_tokens: Optional[Tensor] = None
    cond_prompt_speech_emb: Optional[Tensor] = None
    emotion_adv: Optional[Union[Tensor, float]] = 0.5

    def to(self, *, device=None, dtype=None) -> "T3Cond":
        """Move every tensor field; `dtype` applies to floating tensors only (decided from the dtype, no host read)."""
        for f in fields(self):
            v = getattr(self, f.name)
            if torch.is_tensor(v):
                setattr(self, f.name, v.to(device=device, dtype=dtype if v.is_floating_point() else None))
        return self

    def save(self, fpath) -> None:
        torch.save({f.name: getattr(self, f.name) for f in fields(self)}, fpath)

    @staticmethod
    def load(fpath, map_location="cpu") -> "T3Cond":
        return T3Cond(**torch.load(fpath, map_location=map_location, weights_only=True))


class T3CondEnc(nn.Module):
    """[speaker | prompt (Perceiver-resampled for Llama variants) | emotion] -> (B, len_cond, D)."""

    def __init__(self, hp: T3Config):
        super().__init__()
        self.hp = hp
        if hp.encoder_type != "voice_encoder":
            raise NotImplementedError(f"encoder_type={hp.encoder_type!r}")
        self.spkr_enc = nn.Linear(hp.speaker_embed_size, hp.n_channels)
        self.emotion_adv_fc = nn.Linear(1, hp.n_channels, bias=False) if hp.emotion_adv else None
        self.perceiver = Perceiver() if hp.use_perceiver_resampler else None

    def forward(self, cond: T3Cond) -> Tensor:
        if (cond.cond_prompt_speech_tokens is None) != (cond.cond_prompt_speech_emb is None):
            raise ValueError("cond_prompt_speech_tokens and cond_prompt_speech_emb must be given together")
        if cond.clap_emb is not None:
            raise NotImplementedError("clap_emb conditioning is not supported (upstream neither)")
        parts = [self.spkr_enc(cond.speaker_emb.view(-1, self.hp.speaker_embed_size))[:, None]]  # (B, 1, D)
        prompt = cond.cond_prompt_speech_emb
        if prompt is not None:
            parts.append(self.perceiver(prompt) if self.perceiver is not None else prompt)
        if self.emotion_adv_fc is not None:
            if cond.emotion_adv is None:
                raise ValueError("this model needs T3Cond.emotion_adv (exaggeration)")
            emo = cond.emotion_adv
            if not torch.is_tensor(emo):
                emo = torch.full((1, 1, 1), float(emo), device=parts[0].device, dtype=parts[0].dtype)
            parts.append(self.emotion_adv_fc(emo.to(parts[0].dtype).view(-1, 1, 1)))  # (B, 1, D)
        if len({p.shape[0] for p in parts}) > 1:
            B = max(p.shape[0] for p in parts)
            parts = [p.expand(B, -1, -1) for p in parts]
        return torch.cat(parts, dim=1)
