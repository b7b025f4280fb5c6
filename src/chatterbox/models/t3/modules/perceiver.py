"""Perceiver resampler: 32 learned queries summarise the speech-prompt embeddings (English/MTL T3)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class AttentionBlock2(nn.Module):
    """Pre-norm multi-head attention of x1 over x2 with a residual on x1 (no MLP, no mask)."""

    def __init__(self, channels: int, num_heads: int = 1):
        super().__init__()
        assert channels % num_heads == 0
        self.channels, self.num_heads = channels, num_heads
        self.norm = nn.LayerNorm(channels)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.proj_out = nn.Linear(channels, channels)

    def _heads(self, x: Tensor) -> Tensor:  # (B, T, C) -> (B, H, T, C/H)
        B, T, _ = x.shape
        return x.view(B, T, self.num_heads, -1).transpose(1, 2)

    def forward(self, x1: Tensor, x2: Tensor) -> Tensor:
        n1, n2 = self.norm(x1), self.norm(x2)
        q, k, v = self._heads(self.to_q(n1)), self._heads(self.to_k(n2)), self._heads(self.to_v(n2))
        o = F.scaled_dot_product_attention(q, k, v)  # (B, H, T1, C/H), scale 1/sqrt(C/H)
        o = o.transpose(1, 2).reshape(x1.shape)
        return x1 + self.proj_out(o)


class Perceiver(nn.Module):
    def __init__(self, pre_attention_query_token: int = 32, pre_attention_query_size: int = 1024,
                 embedding_dim: int = 1024, num_attn_heads: int = 4):
        super().__init__()
        self.pre_attention_query = nn.Parameter(torch.empty(1, pre_attention_query_token, pre_attention_query_size))
        bound = math.sqrt(3.0) * math.sqrt(2.0 / (pre_attention_query_token + pre_attention_query_token))
        nn.init.uniform_(self.pre_attention_query, -bound, bound)
        self.attn = AttentionBlock2(embedding_dim, num_attn_heads)

    def forward(self, h: Tensor) -> Tensor:
        """(B, P, D) prompt embeddings -> (B, 32, D): cross-attention, then self-attention, shared weights."""
        q = self.pre_attention_query.expand(h.shape[0], -1, -1)
        p = self.attn(q, h)
        return self.attn(p, p)
