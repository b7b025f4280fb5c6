"""Multi-head self-attention with Transformer-XL relative positions (S3Gen encoder).

Scores for query i, key j, head h:
    S = [(q_i + u_h) . k_j + (q_i + v_h) . p_{i-j}] / sqrt(d_k)
where p_r is the projected ESPnet encoding of relative position r = i - j. Only keys are masked; the
softmax and the value product run in `scaled_dot_product_attention` with the position term as an
additive bias.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MultiHeadedAttention(nn.Module):
    """Plain multi-head attention (the base of the relative-position variant)."""

    def __init__(self, n_head: int, n_feat: int, dropout_rate: float = 0.0, key_bias: bool = True):
        super().__init__()
        assert n_feat % n_head == 0
        self.d_k = n_feat // n_head
        self.h = n_head
        self.linear_q = nn.Linear(n_feat, n_feat)
        self.linear_k = nn.Linear(n_feat, n_feat, bias=key_bias)
        self.linear_v = nn.Linear(n_feat, n_feat)
        self.linear_out = nn.Linear(n_feat, n_feat)
        self.dropout = nn.Dropout(p=dropout_rate)

    def forward_qkv(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, T, D) x3 -> q, k, v (B, H, T, d_k)."""
        b = query.size(0)
        q = self.linear_q(query).view(b, -1, self.h, self.d_k).transpose(1, 2)
        k = self.linear_k(key).view(b, -1, self.h, self.d_k).transpose(1, 2)
        v = self.linear_v(value).view(b, -1, self.h, self.d_k).transpose(1, 2)
        return q, k, v

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
        """SDPA with an additive bias, heads merged and projected: -> (B, T, D)."""
        b, _, t, _ = q.shape
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0 / math.sqrt(self.d_k))
        return self.linear_out(out.transpose(1, 2).reshape(b, t, self.h * self.d_k))

    def forward(self, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None = None,
                pos_emb: Tensor | None = None) -> Tensor:
        """mask: (B, 1, T2) bool key mask (True = valid) or None -> (B, T1, D)."""
        q, k, v = self.forward_qkv(query, key, value)
        bias = torch.zeros((), dtype=q.dtype, device=q.device)
        if mask is not None:
            bias = key_bias(mask, q.dtype)
        return self._attend(q, k, v, bias.expand(q.size(0), 1, q.size(2), k.size(2)))


def key_bias(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, 1, T) bool key mask -> (B, 1, 1, T) additive bias: 0 for valid keys, -inf for padding."""
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    return torch.where(mask, zero, float("-inf"))[:, None]


def rel_shift(x: Tensor) -> Tensor:
    """(B, H, T, 2T-1) scores over relative rows c -> (B, H, T, T) with out[i, j] = x[i, j + T-1-i]."""
    b, h, t, n = x.shape
    x = F.pad(x, (1, 0)).view(b, h, n + 1, t)[:, :, 1:].reshape(b, h, t, n)
    return x[..., :t]


class RelPositionMultiHeadedAttention(MultiHeadedAttention):
    """Self-attention with Transformer-XL biases u, v and ESPnet relative positions."""

    def __init__(self, n_head: int, n_feat: int, dropout_rate: float = 0.0, key_bias: bool = True):
        super().__init__(n_head, n_feat, dropout_rate, key_bias)
        self.linear_pos = nn.Linear(n_feat, n_feat, bias=False)
        self.pos_bias_u = nn.Parameter(torch.empty(self.h, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.empty(self.h, self.d_k))
        nn.init.xavier_uniform_(self.pos_bias_u)
        nn.init.xavier_uniform_(self.pos_bias_v)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None = None,
                pos_emb: Tensor | None = None) -> Tensor:
        """query/key/value (B, T, D), mask (B, 1, T) bool, pos_emb (1, 2T-1, D) -> (B, T, D)."""
        q, k, v = self.forward_qkv(query, key, value)  # (B, H, T, d_k)
        p = self.linear_pos(pos_emb).view(pos_emb.size(0), -1, self.h, self.d_k).transpose(1, 2)  # (1, H, 2T-1, d_k)
        q_u = q + self.pos_bias_u[:, None]  # (B, H, T, d_k)
        q_v = q + self.pos_bias_v[:, None]
        bd = torch.matmul(q_v, p.transpose(-2, -1))  # (B, H, T, 2T-1)
        if bd.size(-1) != k.size(2):
            bd = rel_shift(bd)  # (B, H, T, T)
        bias = bd / math.sqrt(self.d_k)
        if mask is not None:
            bias = bias + key_bias(mask, bias.dtype)
        return self._attend(q_u, k, v, bias)
