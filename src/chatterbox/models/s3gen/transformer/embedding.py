"""ESPnet-style relative positional encoding for the S3Gen conformer encoder.

The (1, 2L-1, d) sinusoid table is built once at construction (float32, as upstream computes it) and
kept as a non-persistent buffer, so `module.to(device, dtype)` moves it once and every call only
slices it. Row c of a length-T slice holds relative position r = T - 1 - c.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def rel_position_table(n: int, d_model: int, device=None) -> Tensor:
    """(1, 2n-1, d_model) float32 table: rows r = n-1, ..., 1, 0, -1, ..., -(n-1)."""
    pos = torch.arange(n, dtype=torch.float32, device=device)[:, None]  # (n, 1)
    freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32, device=device)
                     * -(math.log(10000.0) / d_model))  # (d/2,)
    ang_pos = pos * freq  # (n, d/2) angles for r >= 0
    ang_neg = -1 * pos * freq  # (n, d/2) angles for r <= 0
    pos_tab = torch.stack([ang_pos.sin(), ang_pos.cos()], dim=-1).flatten(1)  # interleave sin/cos
    neg_tab = torch.stack([ang_neg.sin(), ang_neg.cos()], dim=-1).flatten(1)
    return torch.cat([pos_tab.flip(0), neg_tab[1:]], dim=0)[None]


class EspnetRelPositionalEncoding(nn.Module):
    """x -> (x * sqrt(d), pos_emb (1, 2T-1, d)); the encoding is not added to x."""

    def __init__(self, d_model: int, dropout_rate: float = 0.0, max_len: int = 5000):
        super().__init__()
        self.d_model = d_model
        self.xscale = math.sqrt(d_model)
        self.max_len = max_len
        self.dropout = nn.Dropout(p=dropout_rate)
        self.register_buffer("pe", rel_position_table(max_len, d_model), persistent=False)

    def position_encoding(self, offset: int | Tensor = 0, size: int = 0) -> Tensor:
        """(1, 2*size-1, d) slice of the table centred on r = 0 (`offset` is unused, as upstream)."""
        if size > self.max_len:  # longer than the table: compute this slice on the device, no mutation
            return rel_position_table(size, self.d_model, self.pe.device).to(self.pe.dtype)
        centre = self.pe.size(1) // 2
        return self.pe[:, centre - size + 1: centre + size]

    def forward(self, x: Tensor, offset: int | Tensor = 0) -> tuple[Tensor, Tensor]:
        """x (B, T, d) -> (scaled x, pos_emb (1, 2T-1, d)) in x's dtype."""
        pos_emb = self.position_encoding(offset, x.size(1)).to(x.dtype)
        return self.dropout(x * self.xscale), self.dropout(pos_emb)
