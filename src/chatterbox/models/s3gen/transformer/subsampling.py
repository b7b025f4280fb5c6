"""Input layer of the S3Gen encoder: Linear + LayerNorm, no subsampling."""
from __future__ import annotations

from torch import Tensor, nn


class LinearNoSubsampling(nn.Module):
    """x (B, T, idim) -> LN(W x + b) scaled by the positional module, plus pos_emb and the mask."""

    subsampling_rate = 1
    right_context = 0

    def __init__(self, idim: int, odim: int, dropout_rate: float, pos_enc_class: nn.Module):
        super().__init__()
        self.out = nn.Sequential(nn.Linear(idim, odim), nn.LayerNorm(odim, eps=1e-5), nn.Dropout(dropout_rate))
        self.pos_enc = pos_enc_class

    def forward(self, x: Tensor, x_mask: Tensor, offset: int | Tensor = 0) -> tuple[Tensor, Tensor, Tensor]:
        """(B, T, idim), mask (B, 1, T) -> (x (B, T, odim), pos_emb (1, 2T-1, odim), mask)."""
        x, pos_emb = self.pos_enc(self.out(x), offset)
        return x, pos_emb, x_mask
