"""S3Gen token-to-mel flow: speech tokens -> conformer encoder -> mu -> conditional flow matching.

`CausalMaskedDiffWithXvec.inference` keeps upstream's signature. It validates the tokens on the
host (a clear `ValueError` instead of an out-of-range embedding lookup), draws the initial noise
outside compiled code, and runs `forward_mel`, a pure tensor program with every mask built on the
device from Python-int widths. Rows may be padded past their lengths (bucketing): frames below
each row's length are unaffected by the padding.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .flow_matching import CausalConditionalCFM, draw_noise
from .transformer.upsample_encoder import UpsampleConformerEncoder
from .utils.mask import make_non_pad_mask

logger = logging.getLogger(__name__)


def validate_tokens(tokens: Tensor, vocab_size: int) -> None:
    """Raise ValueError if any speech token is outside [0, vocab_size) (one host read)."""
    if tokens.numel() == 0:
        return
    lo, hi = torch.aminmax(tokens.detach())
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi >= vocab_size:
        raise ValueError(
            f"speech tokens must lie in [0, {vocab_size}); got values in [{lo}, {hi}]. "
            "Drop start/stop and other special tokens before S3Gen (e.g. keep tokens < SPEECH_VOCAB_SIZE)."
        )


def _batch(x: Tensor | None, b: int, ndim: int) -> Tensor | None:
    """Add missing leading dims and repeat a batch of 1 to b rows."""
    if x is None:
        return None
    while x.dim() < ndim:
        x = x[None]
    return x.expand(b, *x.shape[1:]) if x.size(0) == 1 and b > 1 else x


class CausalMaskedDiffWithXvec(nn.Module):
    """Token embedding + `encoder` + projection to 80 dims + CFM `decoder`, conditioned on an x-vector."""

    def __init__(self, input_size: int = 512, output_size: int = 80, spk_embed_dim: int = 192,
                 output_type: str = "mel", vocab_size: int = 6561, input_frame_rate: int = 25,
                 only_mask_loss: bool = True, token_mel_ratio: int = 2, pre_lookahead_len: int = 3,
                 encoder: UpsampleConformerEncoder | None = None, decoder: CausalConditionalCFM | None = None,
                 decoder_conf: dict | None = None, mel_feat_conf: dict | None = None):
        super().__init__()
        self.input_size = input_size
        self.output_size = output_size
        self.decoder_conf = decoder_conf
        self.mel_feat_conf = mel_feat_conf
        self.vocab_size = vocab_size
        self.output_type = output_type
        self.input_frame_rate = input_frame_rate
        self.only_mask_loss = only_mask_loss
        self.token_mel_ratio = token_mel_ratio
        self.pre_lookahead_len = pre_lookahead_len
        self.input_embedding = nn.Embedding(vocab_size, input_size)
        self.spk_embed_affine_layer = nn.Linear(spk_embed_dim, output_size)
        self.encoder = encoder
        self.encoder_proj = nn.Linear(encoder.output_size(), output_size)
        self.decoder = decoder

    def mel_length(self, n_tokens: int, finalize: bool = True) -> int:
        """Frames of mu (and of the CFM) for `n_tokens` tokens (prompt included)."""
        n = self.token_mel_ratio * n_tokens
        return n if finalize else n - self.pre_lookahead_len * self.token_mel_ratio

    def encode(self, token: Tensor, token_len: Tensor, finalize: bool = True) -> tuple[Tensor, Tensor]:
        """token (B, T) int, token_len (B,) -> mu (B, 80, T_mel), valid mask (B, 1, T_mel) float."""
        mask = make_non_pad_mask(token_len, token.size(1))[:, :, None]  # (B, T, 1)
        x = self.input_embedding(token.long()) * mask.to(self.input_embedding.weight.dtype)
        h, h_mask = self.encoder(x, token_len)  # (B, 2T, 512), (B, 1, 2T)
        h_len = token_len * self.token_mel_ratio
        if not finalize:  # streaming: the last frames still wait for look-ahead tokens
            cut = self.pre_lookahead_len * self.token_mel_ratio
            h = h[:, :-cut]
            h_len = (h_len - cut).clamp(min=0)
        mu = self.encoder_proj(h).transpose(1, 2)  # (B, 80, T_mel)
        mel_mask = make_non_pad_mask(h_len, mu.size(2))[:, None].to(mu.dtype)  # (B, 1, T_mel)
        return mu, mel_mask

    def forward_packed(self, x: Tensor, x_len: Tensor, cond: Tensor, embedding: Tensor, noise: Tensor,
                       n_timesteps: int = 10, meanflow: bool = False, finalize: bool = True) -> Tensor:
        """Pure tensor program on packed rows: -> mel (B, 80, T_mel) over the whole rows, prompt frames included.

        x (B, T) int: row i is [prompt_i | tokens_i | padding], x_len (B,) = P_i + N_i; cond (B, 80, T_mel)
        holds row i's prompt mel in its first M_i frames and zeros after; embedding (B, 192) raw
        x-vectors; noise (B, 80, T_mel) with T_mel = `mel_length(T, finalize)`. Frames below each
        row's own length `mel_length(x_len_i, finalize)` do not depend on the padding.
        """
        w = self.spk_embed_affine_layer.weight
        spks = self.spk_embed_affine_layer(F.normalize(embedding, dim=1).to(w.dtype))  # (B, 80)
        mu, mask = self.encode(x, x_len, finalize)  # (B, 80, T_mel), (B, 1, T_mel)
        z = noise.to(mu.dtype)
        t_span = self.decoder.time_grid(n_timesteps, meanflow, mu.device, mu.dtype)
        return self.decoder.solve(z, t_span, mu, mask, spks.to(mu.dtype), cond.to(mu.dtype), meanflow)

    def forward_mel(self, token: Tensor, token_len: Tensor, prompt_token: Tensor, prompt_token_len: Tensor,
                    prompt_feat: Tensor, embedding: Tensor, noise: Tensor, n_timesteps: int = 10,
                    meanflow: bool = False, finalize: bool = True) -> Tensor:
        """Pure tensor program (compile target): -> mel (B, 80, T_mel - M) after the M prompt frames.

        token (B, N) int, token_len (B,), prompt_token (1|B, P), prompt_token_len (1|B,),
        prompt_feat (1|B, M, 80), embedding (1|B, 192), noise (1|B, 80, T_mel) with
        T_mel = `mel_length(P + N, finalize)`; rows may be padded beyond their lengths. Tokens are not
        checked here (no host sync): call `validate_tokens` first, as `inference` does.
        """
        b = token.size(0)
        embedding = _batch(torch.atleast_2d(embedding), b, 2)
        prompt_token = _batch(prompt_token, b, 2)
        prompt_token_len = _batch(prompt_token_len, b, 1)
        prompt_feat = _batch(prompt_feat, b, 3)

        x = torch.cat([prompt_token.to(token.dtype), token], dim=1)  # (B, P+N)
        x_len = prompt_token_len.to(token_len.dtype) + token_len
        # prompt rows are never padded, so the new tokens follow the prompt directly
        t_mel = self.mel_length(x.size(1), finalize)
        m = prompt_feat.size(1)
        feat = prompt_feat.transpose(1, 2)  # (B, 80, M)
        cond = torch.cat([feat, feat.new_zeros(b, feat.size(1), t_mel - m)], dim=2)  # (B, 80, T_mel)
        z = noise.expand(b, -1, -1)
        mel = self.forward_packed(x, x_len, cond, embedding, z, n_timesteps, meanflow, finalize)
        return mel[:, :, m:]

    @torch.inference_mode()
    def inference(self, token: Tensor, token_len: Tensor, prompt_token: Tensor, prompt_token_len: Tensor,
                  prompt_feat: Tensor, prompt_feat_len: Tensor | None, embedding: Tensor, finalize: bool,
                  n_timesteps: int = 10, noised_mels: Tensor | None = None, meanflow: bool = False, *,
                  noise: Tensor | None = None, generator: torch.Generator | None = None) -> tuple[Tensor, None]:
        """Upstream's entry: -> (mel (B, 80, 2(P+N) - M), None).

        `noise` (1|B, 80, 2(P+N)) is the full initial CFM sample, prompt region included; if None
        it is drawn from `generator` (or the global RNG) like upstream's `randn_like(mu)`.
        `noised_mels` (1|B, 80, T_g) then overwrites its last T_g frames (meanflow). `prompt_feat_len`
        is unused, as upstream.
        """
        validate_tokens(token, self.vocab_size)
        validate_tokens(prompt_token, self.vocab_size)
        b = token.size(0)
        n_total = prompt_token.size(-1) + token.size(-1)
        t_mel = self.mel_length(n_total, finalize)
        dtype = self.spk_embed_affine_layer.weight.dtype
        if noise is None:
            noise = draw_noise((b, self.output_size, t_mel), generator, token.device, dtype)
        if noise.size(-1) != t_mel:
            raise ValueError(f"noise must have {t_mel} frames (prompt included), got {noise.size(-1)}")
        if noised_mels is not None:
            g = noised_mels.size(-1)
            noise = torch.cat([noise[..., : t_mel - g].expand(b, -1, -1),
                               noised_mels.to(noise).expand(b, -1, -1)], dim=-1)
        feat = self.forward_mel(token, token_len, prompt_token, prompt_token_len, prompt_feat, embedding,
                                noise, n_timesteps, meanflow, finalize)
        return feat, None
