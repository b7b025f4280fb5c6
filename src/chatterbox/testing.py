"""Deterministic weights and test signals (PARITY.md's rule), for tests, demos and benchmarks.

Every tensor is a function of its state-dict name and shape alone, so any implementation with
upstream's names and shapes gets the very same numbers. Used by the test-suite, the benchmark and
the demo to run the whole pipeline end to end without downloading real checkpoints.
"""
from __future__ import annotations

import math
import zlib
from typing import Callable

import torch
from torch import nn

# Per-name overrides keep random-weight audio in a useful range (PARITY.md, step 4). Keys are names
# as they appear in the S3Gen state dict; `prefix` maps a sub-module's names onto them.
OVERRIDES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "mel2wav.f0_predictor.classifier.bias": lambda x: 150.0 + 20.0 * x,
    "mel2wav.conv_post.parametrizations.weight.original0": lambda x: 0.05 * x,
}


def _randn(name: str, shape, salt: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(f"{salt}:{name}".encode()))
    return torch.randn(tuple(shape), generator=g, dtype=torch.float32)


def det_tensor(name: str, shape, salt: int = 0, prefix: str = "") -> torch.Tensor:
    """The deterministic value of state-dict entry `name` with `shape` (float32)."""
    x = _randn(name, shape, salt)
    override = OVERRIDES.get(prefix + name)
    if override is not None:
        return override(x)
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "running_var":
        return 1.0 + 0.1 * x.abs()
    if leaf == "running_mean":
        return 0.1 * x
    if x.dim() <= 1:
        return 1.0 + 0.1 * x if leaf == "weight" else 0.1 * x
    return x / math.sqrt(math.prod(x.shape[1:]))


def det_state_dict(module: nn.Module, salt: int = 0, prefix: str = "") -> dict[str, torch.Tensor]:
    """A full state dict for `module` filled by the rule (other buffers keep the module's values)."""
    params = {n for n, _ in module.named_parameters()}
    out = {}
    for k, v in module.state_dict().items():
        leaf = k.rsplit(".", 1)[-1]
        if k in params or leaf in ("running_mean", "running_var"):
            out[k] = det_tensor(k, v.shape, salt, prefix).to(v.dtype)
        else:
            out[k] = v
    return out


@torch.no_grad()
def apply_det_weights(module: nn.Module, salt: int = 0, prefix: str = "") -> nn.Module:
    """Fill `module` in place with deterministic weights (strict load); returns the module."""
    module.load_state_dict(det_state_dict(module, salt, prefix), strict=True)
    return module


def test_wav(sr: int, seconds: float, seed: int) -> torch.Tensor:
    """A deterministic speech-like signal: a gliding harmonic tone with AM and a little noise."""
    g = torch.Generator().manual_seed(seed)
    n = int(sr * seconds)
    t = torch.arange(n, dtype=torch.float64) / sr
    f0 = 120 + 40 * torch.sin(2 * math.pi * 0.7 * t)
    phase = 2 * math.pi * torch.cumsum(f0, 0) / sr
    x = sum((0.5 / k) * torch.sin(k * phase) for k in range(1, 6))
    x = x * (0.6 + 0.4 * torch.sin(2 * math.pi * 3.0 * t).abs())
    x = x + 0.01 * torch.randn(n, generator=g, dtype=torch.float64)
    return (0.3 * x / x.abs().max()).float()


test_wav.__test__ = False  # not a pytest test
