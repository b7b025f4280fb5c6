"""Conditional flow matching for S3Gen: Euler integration of the estimator from noise to a mel.

The initial noise is an argument (`noise`), drawn by the caller from an optional `torch.Generator`
outside any compiled code; `solve` is a pure tensor program (no host syncs, no RNG) that
`torch.compile(fullgraph=True)` captures whole with the step loop unrolled.

- Standard (CFM) models: cosine time grid, 10 steps, classifier-free guidance as one stacked batch
  [cond; uncond] per step (the unconditional half zeroes mu, spks and cond), v = 1.7 v_c - 0.7 v_u.
- Meanflow (Turbo/Nano) models: linear grid, 2 steps, no CFG, the step's end time r goes to the
  estimator as well.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .configs import CFM_PARAMS


def time_span(n_timesteps: int, cosine: bool, device=None, dtype=torch.float32) -> Tensor:
    """(n+1,) grid from 0 to 1: linspace, or 1 - cos(pi/2 * linspace) for the cosine schedule."""
    t = torch.linspace(0, 1, n_timesteps + 1, device=device, dtype=dtype)
    return 1 - torch.cos(t * 0.5 * torch.pi) if cosine else t


def draw_noise(shape: tuple[int, ...], generator: torch.Generator | None = None, device=None,
               dtype=torch.float32) -> Tensor:
    """Standard-normal noise drawn in float32 (so a seed gives the same values in any model dtype),
    from `generator` on its own device if given, else from the global RNG; returned on `device` in `dtype`."""
    if generator is not None:
        z = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)
    else:
        z = torch.randn(shape, device=device, dtype=torch.float32)
    return z.to(device=device, dtype=dtype)


class CausalConditionalCFM(nn.Module):
    """Flow-matching sampler around `estimator` (a `ConditionalDecoder`)."""

    def __init__(self, in_channels: int = 240, cfm_params=CFM_PARAMS, n_spks: int = 1, spk_emb_dim: int = 80,
                 estimator: nn.Module | None = None):
        super().__init__()
        self.n_feats = in_channels
        self.n_spks = n_spks
        self.spk_emb_dim = spk_emb_dim
        self.solver = cfm_params.solver
        self.sigma_min = cfm_params.get("sigma_min", 1e-4)
        self.t_scheduler = cfm_params.t_scheduler
        self.training_cfg_rate = cfm_params.training_cfg_rate
        self.inference_cfg_rate = cfm_params.inference_cfg_rate
        self.estimator = estimator
        self.rand_noise = None
        self._grids: dict[tuple, Tensor] = {}

    def time_grid(self, n_timesteps: int, meanflow: bool, device, dtype: torch.dtype) -> Tensor:
        """The (n+1,) time grid, cached per (n, schedule, device, dtype) so calls allocate nothing."""
        cosine = (not meanflow) and self.t_scheduler == "cosine"
        key = (n_timesteps, cosine, str(torch.device(device)), dtype)
        grid = self._grids.get(key)
        if grid is None:
            with torch.inference_mode(False):  # a normal tensor, usable outside inference mode too
                grid = self._grids[key] = time_span(n_timesteps, cosine, device, dtype)
        return grid

    @torch.inference_mode()
    def forward(self, mu: Tensor, mask: Tensor, n_timesteps: int, temperature: float = 1.0,
                spks: Tensor | None = None, cond: Tensor | None = None, noised_mels: Tensor | None = None,
                meanflow: bool = False, *, noise: Tensor | None = None,
                generator: torch.Generator | None = None) -> tuple[Tensor, None]:
        """mu (B, 80, T), mask (B, 1, T) -> (mel (B, 80, T), None).

        `noise` (B or 1, 80, T) is the initial sample; if None it is drawn like mu from `generator`
        (or the global RNG). `noised_mels` (·, 80, T_g) replaces its last T_g frames. `temperature`
        is accepted and unused, as upstream.
        """
        if noise is None:
            noise = draw_noise(tuple(mu.shape), generator, mu.device, mu.dtype)
        z = noise.to(device=mu.device, dtype=mu.dtype).expand_as(mu)
        if noised_mels is not None:
            prompt_len = mu.size(2) - noised_mels.size(2)
            z = torch.cat([z[..., :prompt_len], noised_mels.to(z).expand(z.size(0), -1, -1)], dim=2)
        t_span = self.time_grid(n_timesteps, meanflow, mu.device, mu.dtype)
        return self.solve(z, t_span, mu, mask, spks, cond, meanflow), None

    def solve(self, z: Tensor, t_span: Tensor, mu: Tensor, mask: Tensor, spks: Tensor | None,
              cond: Tensor | None, meanflow: bool = False) -> Tensor:
        """Pure Euler integration from z over the grid `t_span` (n+1,); returns x in z's dtype."""
        if meanflow:
            return self.basic_euler(z, t_span, mu, mask, spks, cond)
        return self.solve_euler(z, t_span, mu, mask, spks, cond)

    def _cast(self, *xs: Tensor | None) -> list[Tensor | None]:
        dtype = self.estimator.dtype
        return [x if x is None or not x.is_floating_point() else x.to(dtype) for x in xs]

    def solve_euler(self, x: Tensor, t_span: Tensor, mu: Tensor, mask: Tensor, spks: Tensor | None,
                    cond: Tensor | None, meanflow: bool = False) -> Tensor:
        """Euler with classifier-free guidance; the batch is stacked [cond; uncond] (2B rows)."""
        in_dtype = x.dtype
        x, t_span, mu, mask, spks, cond = self._cast(x, t_span, mu, mask, spks, cond)
        b = mu.size(0)
        rate = self.inference_cfg_rate
        # loop-invariant halves, built once: (2B, ...)
        mask_in = torch.cat([mask, mask], dim=0)
        mu_in = torch.cat([mu, torch.zeros_like(mu)], dim=0)
        spks_in = None if spks is None else torch.cat([spks, torch.zeros_like(spks)], dim=0)
        cond_in = None if cond is None else torch.cat([cond, torch.zeros_like(cond)], dim=0)
        for k in range(t_span.size(0) - 1):
            t, r = t_span[k: k + 1], t_span[k + 1: k + 2]  # (1,) each
            x_in = torch.cat([x, x], dim=0)
            v = self.estimator(x_in, mask_in, mu_in, t.expand(2 * b), spks_in, cond_in)
            v_c, v_u = v[:b], v[b:]
            v = (1.0 + rate) * v_c - rate * v_u
            x = x + (r - t) * v
        return x.to(in_dtype)

    def basic_euler(self, x: Tensor, t_span: Tensor, mu: Tensor, mask: Tensor, spks: Tensor | None,
                    cond: Tensor | None) -> Tensor:
        """Meanflow Euler without CFG: v = estimator(x, ..., t, r); x <- x + (r - t) v."""
        in_dtype = x.dtype
        x, t_span, mu, mask, spks, cond = self._cast(x, t_span, mu, mask, spks, cond)
        for k in range(t_span.size(0) - 1):
            t, r = t_span[k: k + 1], t_span[k + 1: k + 2]  # (1,) each
            v = self.estimator(x, mask, mu, t, spks, cond, r)
            x = x + (r - t) * v
        return x.to(in_dtype)
