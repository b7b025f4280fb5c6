"""Per-request randomness: independent streams for T3, the flow and the vocoder, and noise by position.

A request's seed (or the caller's `torch.Generator`) is split once, on the calling thread, into
independent generators created on the model device. T3's sampling noise, the flow's initial noise
and HiFT's phases/noise then never interleave on one generator, so the audio of a seed does not
depend on how decoding and vocoding overlap (batching, streaming, threads), and a CPU generator
works with a CUDA model (only the sub-seeds are drawn from it).

`PositionalNoise` gives noise by absolute position (mel frame or sample): values for positions
[a, b) are the same whatever else was asked before, so a streaming decoder that re-decodes a
context window starts from the same noise as the offline path.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor

Device = Union[str, torch.device]


def draw_seeds(generator: Optional[torch.Generator], n: int) -> list[int]:
    """`n` 62-bit seeds from `generator` (on its own device) or, without one, from the global CPU RNG."""
    if generator is None:
        t = torch.randint(0, 2 ** 62, (n,), dtype=torch.int64)
    else:
        t = torch.randint(0, 2 ** 62, (n,), dtype=torch.int64, generator=generator, device=generator.device)
    return [int(v) for v in t.cpu()]


def seeded_generator(seed: int, device: Device) -> torch.Generator:
    """A fresh generator on `device` seeded with `seed`."""
    return torch.Generator(device=torch.device(device)).manual_seed(int(seed))


@dataclass
class RequestRandomness:
    """The three independent generators one request draws from (all on the model device)."""

    t3: torch.Generator
    flow: torch.Generator
    hift: torch.Generator

    @classmethod
    def create(cls, device: Device, seed: Optional[int] = None,
               generator: Optional[torch.Generator] = None) -> "RequestRandomness":
        """Split `generator` (wins), else a generator seeded with `seed`, else the global RNG, into three streams."""
        if generator is None and seed is not None:
            generator = torch.Generator().manual_seed(int(seed))
        s = draw_seeds(generator, 3)
        return cls(*(seeded_generator(x, device) for x in s))


class PositionalNoise:
    """Standard-normal noise (1, C, L) by absolute position, drawn lazily in blocks of `block` positions.

    Block k holds positions [k*block, (k+1)*block), drawn as one (block, C) float32 tensor from the
    generator in order; `window(a, b)` returns positions [a, b). The values of a position never
    depend on which windows were asked for, or in which order.
    """

    def __init__(self, generator: Optional[torch.Generator], channels: int, device: Device, block: int = 16):
        self.generator = generator
        self.channels = channels
        self.device = torch.device(device)
        self.block = block
        self._blocks: list[Tensor] = []  # each (block, C) float32 on device

    def _ensure(self, stop: int) -> None:
        need = -(-stop // self.block)
        while len(self._blocks) < need:
            g = self.generator
            if g is None:
                z = torch.randn(self.block, self.channels, device=self.device)
            else:
                z = torch.randn(self.block, self.channels, generator=g, device=g.device).to(self.device)
            self._blocks.append(z)

    def window(self, start: int, stop: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """Noise for positions [start, stop) as (1, C, stop - start) in `dtype`."""
        if start < 0 or stop < start:
            raise ValueError(f"bad noise window [{start}, {stop})")
        if stop == start:
            return torch.zeros(1, self.channels, 0, device=self.device, dtype=dtype)
        self._ensure(stop)
        b0, b1 = start // self.block, -(-stop // self.block)
        if any(b is None for b in self._blocks[b0:b1]):
            raise ValueError(f"noise before position {start} was already released (forget_before)")
        z = torch.cat(self._blocks[b0:b1], dim=0)[start - b0 * self.block: stop - b0 * self.block]  # (L, C)
        return z.t()[None].to(dtype)

    def forget_before(self, position: int) -> None:
        """Free the blocks wholly before `position` (a stream never looks back further than its context)."""
        k = position // self.block
        for i in range(min(k, len(self._blocks))):
            self._blocks[i] = None  # type: ignore[assignment]
