"""Conformer encoder layer as used by S3Gen: pre-norm self-attention + feed-forward, no conv module."""
from __future__ import annotations

from torch import Tensor, nn


class ConformerEncoderLayer(nn.Module):
    """x <- x + MHA(LN(x)); x <- x + FFN(LN(x)) (LN eps 1e-12). Macaron and conv modules are optional."""

    def __init__(self, size: int, self_attn: nn.Module, feed_forward: nn.Module | None = None,
                 feed_forward_macaron: nn.Module | None = None, conv_module: nn.Module | None = None,
                 dropout_rate: float = 0.0, normalize_before: bool = True):
        super().__init__()
        if feed_forward_macaron is not None or conv_module is not None:
            raise NotImplementedError("S3Gen's encoder layers have no macaron FFN and no conv module")
        self.self_attn = self_attn
        self.feed_forward = feed_forward
        self.feed_forward_macaron = None
        self.conv_module = None
        self.norm_ff = nn.LayerNorm(size, eps=1e-12)
        self.norm_mha = nn.LayerNorm(size, eps=1e-12)
        self.ff_scale = 1.0
        self.dropout = nn.Dropout(dropout_rate)
        self.size = size
        self.normalize_before = normalize_before

    def forward(self, x: Tensor, mask: Tensor, pos_emb: Tensor) -> Tensor:
        """x (B, T, D), key mask (B, 1, T) bool, pos_emb (1, 2T-1, D) -> (B, T, D)."""
        res = x
        if self.normalize_before:
            x = self.norm_mha(x)
        x = res + self.dropout(self.self_attn(x, x, x, mask, pos_emb))
        if not self.normalize_before:
            x = self.norm_mha(x)
        res = x
        if self.normalize_before:
            x = self.norm_ff(x)
        x = res + self.ff_scale * self.dropout(self.feed_forward(x))
        if not self.normalize_before:
            x = self.norm_ff(x)
        return x
