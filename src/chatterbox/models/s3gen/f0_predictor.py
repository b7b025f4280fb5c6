"""F0 predictor of the HiFT vocoder (`ConvRNNF0Predictor`; despite the name there is no RNN)."""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm


class ConvRNNF0Predictor(nn.Module):
    """Mel (B, 80, T) -> F0 in Hz (B, T): 5 x (weight-normed conv k3 + ELU), linear, |.|."""

    def __init__(self, num_class: int = 1, in_channels: int = 80, cond_channels: int = 512):
        super().__init__()
        self.num_class = num_class
        layers: list[nn.Module] = []
        for i in range(5):
            c_in = in_channels if i == 0 else cond_channels
            layers += [weight_norm(nn.Conv1d(c_in, cond_channels, kernel_size=3, padding=1)), nn.ELU()]
        self.condnet = nn.Sequential(*layers)  # names condnet.{0,2,4,6,8}
        self.classifier = nn.Linear(cond_channels, num_class)

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_channels, T) -> (B, T) non-negative F0 (Hz)."""
        x = self.condnet(x).transpose(1, 2)  # (B, T, C)
        return torch.abs(self.classifier(x).squeeze(-1))
