"""Time-embedding mixer of the meanflow (Turbo/Nano) estimator."""
import torch
from torch import nn


def get_intmeanflow_time_mixer(dims: int) -> nn.Linear:
    """Bias-free Linear(2*dims -> dims) initialised to [I | 0], so it starts by passing e_t through."""
    layer = nn.Linear(2 * dims, dims, bias=False)
    with torch.no_grad():
        layer.weight.zero_()
        layer.weight[:, :dims].copy_(torch.eye(dims))
    return layer
