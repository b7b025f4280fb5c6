"""Learned absolute position embeddings (English/multilingual T3)."""
from __future__ import annotations

from typing import Union

import torch
from torch import Tensor, nn


class LearnedPositionEmbeddings(nn.Module):
    def __init__(self, seq_len: int, model_dim: int, init: float = 0.02):
        super().__init__()
        self.emb = nn.Embedding(seq_len, model_dim)
        nn.init.normal_(self.emb.weight, std=init)

    def forward(self, x: Tensor) -> Tensor:
        """Embeddings of positions 0..x.shape[1]-1 -> (x.shape[1], D)."""
        return self.emb.weight[: x.shape[1]]

    def get_fixed_embedding(self, idx: Union[int, Tensor]) -> Tensor:
        """Embeddings of given positions: int -> (1, 1, D); (T,) -> (1, T, D); (B, T) -> (B, T, D)."""
        if isinstance(idx, int):
            return self.emb.weight[idx].view(1, 1, -1)
        return self.emb(torch.atleast_2d(idx.to(self.emb.weight.device)))
