"""Position-wise feed-forward block of the S3Gen encoder."""
from __future__ import annotations

from torch import Tensor, nn


class PositionwiseFeedForward(nn.Module):
    """FFN(x) = W2 act(W1 x + b1) + b2 (act is SiLU in S3Gen)."""

    def __init__(self, idim: int, hidden_units: int, dropout_rate: float = 0.0,
                 activation: nn.Module | None = None):
        super().__init__()
        self.w_1 = nn.Linear(idim, hidden_units)
        self.activation = activation if activation is not None else nn.ReLU()
        self.dropout = nn.Dropout(dropout_rate)
        self.w_2 = nn.Linear(hidden_units, idim)

    def forward(self, xs: Tensor) -> Tensor:
        """(B, T, D) -> (B, T, D)."""
        return self.w_2(self.dropout(self.activation(self.w_1(xs))))
