"""HiFT vocoder (HiFTNet: neural source filter + iSTFTNet): 24 kHz waveform from the S3Gen mel.

Pipeline (T mel frames, L = 480 T samples at 24 kHz):
    mel (B, 80, T) --f0_predictor--> F0 (B, T) --hold x480--> (B, 1, L)
        --SineGen + l_linear + tanh--> source s (B, 1, L)
    decode(mel, s): conv_pre, 3 x [LeakyReLU, ConvTranspose up, + source branch, MRF resblocks],
        conv_post -> 9 log-magnitudes + 9 "phases" per frame -> 16-point iSTFT, hop 4 -> (B, L)

Randomness (the harmonic phase offsets and the additive noise of the sine source) never happens
inside a forward: `HiFTGenerator.inference` draws it up front (from the global RNG exactly as
upstream does, or from a `torch.Generator`), or takes it as arguments, or skips it entirely with
`deterministic=True` (zero phase offsets, zero noise: the convention of the parity fixtures).
`decode`, `source` and the F0 predictor are pure tensor programs that compile with
`torch.compile(fullgraph=True)`; the STFT/iSTFT are real-valued convolutions with a DFT basis, so
no complex tensors enter the graph and no host sync happens.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from .f0_predictor import ConvRNNF0Predictor

__all__ = ["Snake", "ResBlock", "SineGen", "SourceModuleHnNSF", "HiFTGenerator", "ConvRNNF0Predictor"]


def get_padding(kernel_size: int, dilation: int = 1) -> int:
    """'Same' padding of a stride-1 conv with this kernel size and dilation."""
    return (kernel_size * dilation - dilation) // 2


class Snake(nn.Module):
    """Snake activation x + sin^2(alpha x) / alpha with one alpha per channel (linear scale)."""

    def __init__(self, channels: int, alpha: float = 1.0):
        super().__init__()
        self.alpha = nn.Parameter(torch.full((channels,), float(alpha)))
        self.eps = 1e-9

    def forward(self, x: Tensor) -> Tensor:
        alpha = self.alpha[None, :, None]  # (1, C, 1)
        return x + (1.0 / (alpha + self.eps)) * torch.sin(x * alpha).pow(2)


class ResBlock(nn.Module):
    """HiFi-GAN residual block: per dilation, Snake -> dilated conv -> Snake -> conv, residual."""

    def __init__(self, channels: int = 512, kernel_size: int = 3, dilations: Sequence[int] = (1, 3, 5)):
        super().__init__()
        self.convs1 = nn.ModuleList(
            weight_norm(nn.Conv1d(channels, channels, kernel_size, 1, dilation=d,
                                  padding=get_padding(kernel_size, d)))
            for d in dilations)
        self.convs2 = nn.ModuleList(
            weight_norm(nn.Conv1d(channels, channels, kernel_size, 1, dilation=1,
                                  padding=get_padding(kernel_size, 1)))
            for _ in dilations)
        self.activations1 = nn.ModuleList(Snake(channels) for _ in dilations)
        self.activations2 = nn.ModuleList(Snake(channels) for _ in dilations)

    def forward(self, x: Tensor) -> Tensor:
        for act1, conv1, act2, conv2 in zip(self.activations1, self.convs1, self.activations2, self.convs2):
            x = conv2(act2(conv1(act1(x)))) + x
        return x


class SineGen(nn.Module):
    """Harmonic sine source: F0 (B, 1, L) in Hz -> (B, H, L) excitations, H = harmonic_num + 1.

    Phase of harmonic h is 2 pi frac(cumsum((h + 1) f0 / sr)) accumulated in float32 over the
    whole utterance (as upstream), plus an optional constant offset `phase` (B, H, 1). Unvoiced
    samples (f0 <= voiced_threshold) carry only noise: `noise` (B, H, L) is standard normal and is
    scaled by noise_std where voiced and sine_amp / 3 where unvoiced; None means no noise.
    """

    def __init__(self, samp_rate: int, harmonic_num: int = 0, sine_amp: float = 0.1,
                 noise_std: float = 0.003, voiced_threshold: float = 0):
        super().__init__()
        self.sine_amp = sine_amp
        self.noise_std = noise_std
        self.harmonic_num = harmonic_num
        self.sampling_rate = samp_rate
        self.voiced_threshold = voiced_threshold
        harmonics = torch.arange(1, harmonic_num + 2, dtype=torch.float32)[None, :, None]  # (1, H, 1)
        self.register_buffer("harmonics", harmonics, persistent=False)

    def _f02uv(self, f0: Tensor) -> Tensor:
        return (f0 > self.voiced_threshold).to(torch.float32)

    def draw(self, batch: int, length: int, device: torch.device,
             generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
        """Random (phase (B, H, 1), noise (B, H, L)) on `device`.

        Without a generator the draws follow upstream's global-RNG order exactly (CPU uniform for
        the phases, then a device normal for the noise, then the device normal upstream draws and
        discards), so a seeded upstream run and this one consume the same random numbers.
        """
        h = self.harmonic_num + 1
        if generator is None:
            u = torch.rand(batch, h, 1)
            noise = torch.randn(batch, h, length, device=device)
            torch.randn(batch, length, 1, device=device)  # upstream's discarded noise branch
        else:
            gdev = generator.device
            u = torch.rand(batch, h, 1, generator=generator, device=gdev)
            noise = torch.randn(batch, h, length, generator=generator, device=gdev).to(device)
        low = torch.tensor(-np.pi, dtype=torch.float32)
        phase = low + u * (torch.tensor(np.pi, dtype=torch.float32) - low)  # U(-pi, pi) as upstream
        phase[:, 0] = 0.0  # the fundamental has no offset
        return phase.to(device), noise

    def forward(self, f0: Tensor, phase: Optional[Tensor] = None,
                noise: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """f0 (B, 1, L) -> (excitation (B, H, L) float32, uv (B, 1, L), scaled noise or None)."""
        f = f0.float() * self.harmonics / self.sampling_rate  # (B, H, L) cycles per sample
        theta = (2 * math.pi) * (torch.cumsum(f, dim=-1) % 1)  # float32 phase accumulation
        if phase is not None:
            theta = theta + phase
        sine = self.sine_amp * torch.sin(theta)
        uv = self._f02uv(f0)  # (B, 1, L)
        sine = sine * uv
        if noise is None:
            return sine, uv, None
        noise = (uv * self.noise_std + (1 - uv) * self.sine_amp / 3) * noise
        return sine + noise, uv, noise


class SourceModuleHnNSF(nn.Module):
    """Harmonic-plus-noise source: F0 (B, L, 1) -> tanh(linear(harmonics)) (B, L, 1)."""

    def __init__(self, sampling_rate: int, upsample_scale: int, harmonic_num: int = 0,
                 sine_amp: float = 0.1, add_noise_std: float = 0.003, voiced_threshod: float = 0):
        super().__init__()
        self.sine_amp = sine_amp
        self.noise_std = add_noise_std
        self.l_sin_gen = SineGen(sampling_rate, harmonic_num, sine_amp, add_noise_std, voiced_threshod)
        self.l_linear = nn.Linear(harmonic_num + 1, 1)
        self.l_tanh = nn.Tanh()

    def forward(self, x: Tensor, phase: Optional[Tensor] = None,
                noise: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
        """x = F0 (B, L, 1) -> (source (B, L, 1), noise branch (zeros: not drawn), uv (B, L, 1))."""
        sine, uv, _ = self.l_sin_gen(x.transpose(1, 2), phase, noise)
        sine = sine.to(self.l_linear.weight.dtype).transpose(1, 2)  # (B, L, H)
        merged = self.l_tanh(self.l_linear(sine))
        uv = uv.transpose(1, 2)
        return merged, torch.zeros_like(uv), uv


def _hann_periodic(n: int) -> np.ndarray:
    """Periodic Hann window (scipy.signal.get_window('hann', n, fftbins=True)) in float64."""
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / n)


def _dft_bases(n_fft: int, window: np.ndarray) -> tuple[Tensor, Tensor]:
    """Real conv kernels (2 (n_fft/2 + 1), 1, n_fft) for the windowed onesided STFT and its inverse."""
    k = np.arange(n_fft // 2 + 1)[:, None]
    n = np.arange(n_fft)[None, :]
    ang = 2.0 * np.pi * k * n / n_fft
    fwd = np.concatenate([np.cos(ang) * window, -np.sin(ang) * window], 0)  # [Re; Im] of X_k
    scale = np.where((k == 0) | (k == n_fft // 2), 1.0, 2.0) / n_fft  # onesided irfft weights
    inv = np.concatenate([scale * np.cos(ang) * window, -scale * np.sin(ang) * window], 0)
    fwd_t = torch.from_numpy(fwd).to(torch.float32)[:, None, :]
    inv_t = torch.from_numpy(inv).to(torch.float32)[:, None, :]
    return fwd_t, inv_t


class HiFTGenerator(nn.Module):
    """HiFTNet generator; `inference(mel) -> (wav (B, 480 T), source (B, 1, 480 T))`."""

    def __init__(
        self,
        in_channels: int = 80,
        base_channels: int = 512,
        nb_harmonics: int = 8,
        sampling_rate: int = 22050,
        nsf_alpha: float = 0.1,
        nsf_sigma: float = 0.003,
        nsf_voiced_threshold: float = 10,
        upsample_rates: Sequence[int] = (8, 8),
        upsample_kernel_sizes: Sequence[int] = (16, 16),
        istft_params: Optional[dict] = None,
        resblock_kernel_sizes: Sequence[int] = (3, 7, 11),
        resblock_dilation_sizes: Sequence[Sequence[int]] = ((1, 3, 5), (1, 3, 5), (1, 3, 5)),
        source_resblock_kernel_sizes: Sequence[int] = (7, 11),
        source_resblock_dilation_sizes: Sequence[Sequence[int]] = ((1, 3, 5), (1, 3, 5)),
        lrelu_slope: float = 0.1,
        audio_limit: float = 0.99,
        f0_predictor: Optional[nn.Module] = None,
    ):
        super().__init__()
        istft_params = dict(istft_params or {"n_fft": 16, "hop_len": 4})
        upsample_rates = [int(u) for u in upsample_rates]
        self.out_channels = 1
        self.nb_harmonics = nb_harmonics
        self.sampling_rate = sampling_rate
        self.istft_params = istft_params
        self.n_fft = int(istft_params["n_fft"])
        self.hop_len = int(istft_params["hop_len"])
        self.lrelu_slope = lrelu_slope
        self.audio_limit = audio_limit
        self.num_kernels = len(resblock_kernel_sizes)
        self.num_upsamples = len(upsample_rates)
        self.upsample_scale = math.prod(upsample_rates) * self.hop_len  # samples per mel frame

        self.m_source = SourceModuleHnNSF(
            sampling_rate=sampling_rate, upsample_scale=self.upsample_scale, harmonic_num=nb_harmonics,
            sine_amp=nsf_alpha, add_noise_std=nsf_sigma, voiced_threshod=nsf_voiced_threshold)
        self.conv_pre = weight_norm(nn.Conv1d(in_channels, base_channels, 7, 1, padding=3))

        self.ups = nn.ModuleList()
        for i, (u, k) in enumerate(zip(upsample_rates, upsample_kernel_sizes)):
            c_in, c_out = base_channels // 2**i, base_channels // 2 ** (i + 1)
            self.ups.append(weight_norm(nn.ConvTranspose1d(c_in, c_out, k, u, padding=(k - u) // 2)))

        # Source branch: STFT frames at the final rate, strided down to each stage's rate.
        spec_ch = self.n_fft + 2
        down_rates = [1] + upsample_rates[::-1][:-1]
        cum_rates = np.cumprod(down_rates)[::-1]
        self.source_downs = nn.ModuleList()
        self.source_resblocks = nn.ModuleList()
        for i, (u, k, d) in enumerate(zip(cum_rates, source_resblock_kernel_sizes, source_resblock_dilation_sizes)):
            u, ch = int(u), base_channels // 2 ** (i + 1)
            if u == 1:
                self.source_downs.append(nn.Conv1d(spec_ch, ch, 1, 1))
            else:
                self.source_downs.append(nn.Conv1d(spec_ch, ch, u * 2, u, padding=u // 2))
            self.source_resblocks.append(ResBlock(ch, k, d))

        self.resblocks = nn.ModuleList()
        for i in range(self.num_upsamples):
            ch = base_channels // 2 ** (i + 1)
            for k, d in zip(resblock_kernel_sizes, resblock_dilation_sizes):
                self.resblocks.append(ResBlock(ch, k, d))
        self.conv_post = weight_norm(nn.Conv1d(ch, spec_ch, 7, 1, padding=3))
        self.f0_predictor = f0_predictor if f0_predictor is not None else ConvRNNF0Predictor()

        window = _hann_periodic(self.n_fft)
        fwd, inv = _dft_bases(self.n_fft, window)
        self.register_buffer("stft_window", torch.from_numpy(window).float(), persistent=False)
        self.register_buffer("stft_basis", fwd, persistent=False)  # (n_fft + 2, 1, n_fft)
        self.register_buffer("istft_basis", inv, persistent=False)  # (n_fft + 2, 1, n_fft)
        self.register_buffer("istft_window_sq", fwd.new_tensor(window**2)[None, None], persistent=False)

    # ---- spectral transforms (real-valued, compile-friendly) ------------------------------------

    def _stft(self, x: Tensor) -> Tensor:
        """(B, 1, L) -> [Re; Im] (B, n_fft + 2, L // hop + 1): torch.stft(center=True, reflect)."""
        pad = self.n_fft // 2
        x = F.pad(x, (pad, pad), mode="reflect")
        return F.conv1d(x, self.stft_basis.to(x.dtype), stride=self.hop_len)

    def _istft(self, magnitude: Tensor, phase: Tensor) -> Tensor:
        """(B, n_fft/2 + 1, F) magnitude and phase -> (B, hop (F - 1)): torch.istft(center=True)."""
        magnitude = torch.clamp(magnitude, max=1e2)
        spec = torch.cat([magnitude * torch.cos(phase), magnitude * torch.sin(phase)], dim=1)
        frames = spec.shape[-1]
        y = F.conv_transpose1d(spec, self.istft_basis.to(spec.dtype), stride=self.hop_len)  # (B, 1, n)
        ones = torch.ones(1, 1, frames, device=spec.device, dtype=spec.dtype)
        env = F.conv_transpose1d(ones, self.istft_window_sq.to(spec.dtype), stride=self.hop_len)
        start, length = self.n_fft // 2, self.hop_len * (frames - 1)
        y = y[:, 0, start:start + length] / env[:, 0, start:start + length]
        return y

    # ---- network ---------------------------------------------------------------------------------

    def decode(self, x: Tensor, s: Tensor) -> Tensor:
        """mel x (B, 80, T) and source s (B, 1, 480 T) -> waveform (B, 480 T) in [-limit, limit]."""
        s_stft = self._stft(s.to(x.dtype))  # (B, 18, 120 T + 1)
        x = self.conv_pre(x)
        for i in range(self.num_upsamples):
            x = F.leaky_relu(x, self.lrelu_slope)
            x = self.ups[i](x)
            if i == self.num_upsamples - 1:
                x = F.pad(x, (1, 0), mode="reflect")  # left reflection pad: 120 T + 1 frames
            x = x + self.source_resblocks[i](self.source_downs[i](s_stft))
            xs = self.resblocks[i * self.num_kernels](x)
            for j in range(1, self.num_kernels):
                xs = xs + self.resblocks[i * self.num_kernels + j](x)
            x = xs / self.num_kernels
        x = F.leaky_relu(x)  # slope 0.01 here (PyTorch default), as upstream
        x = self.conv_post(x)
        half = self.n_fft // 2 + 1
        magnitude = torch.exp(x[:, :half])
        phase = torch.sin(x[:, half:])  # upstream's "phase" is the sine of the output
        wav = self._istft(magnitude, phase)
        return torch.clamp(wav, -self.audio_limit, self.audio_limit)

    def upsample_f0(self, f0: Tensor) -> Tensor:
        """(B, T) -> (B, 1, T * upsample_scale), each frame held (nearest neighbour)."""
        b, t = f0.shape
        return f0[:, :, None].expand(b, t, self.upsample_scale).reshape(b, 1, t * self.upsample_scale)

    def source(self, f0: Tensor, phase: Optional[Tensor] = None, noise: Optional[Tensor] = None) -> Tensor:
        """F0 (B, T) -> excitation (B, 1, L); phase (B, H, 1) / noise (B, H, L) as in `SineGen`."""
        f0_up = self.upsample_f0(f0).transpose(1, 2)  # (B, L, 1)
        s, _, _ = self.m_source(f0_up, phase, noise)
        return s.transpose(1, 2)

    def draw_noise(self, speech_feat: Tensor, generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
        """Random (phase (B, H, 1), noise (B, H, L)) for a mel (B, 80, T); see `SineGen.draw`."""
        b, _, t = speech_feat.shape
        return self.m_source.l_sin_gen.draw(b, t * self.upsample_scale, speech_feat.device, generator)

    @torch.inference_mode()
    def inference(self, speech_feat: Tensor, cache_source: Optional[Tensor] = None, *,
                  generator: Optional[torch.Generator] = None, deterministic: bool = False,
                  phase: Optional[Tensor] = None, noise: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """mel (B, 80, T) -> (waveform (B, 480 T), source (B, 1, 480 T)).

        Randomness: explicit `phase` (B, H, 1) and `noise` (B, H, L) win; otherwise
        `deterministic=True` uses zero phase offsets and no noise (the parity-fixture convention),
        and the default draws them from `generator` (or the global RNG, in upstream's order).
        `cache_source` (B, 1, n) overwrites the first n source samples (streaming continuity).
        """
        if phase is None and noise is None and not deterministic:
            phase, noise = self.draw_noise(speech_feat, generator)
        f0 = self.f0_predictor(speech_feat)  # (B, T)
        s = self.source(f0, phase, noise)  # (B, 1, L)
        if cache_source is not None and cache_source.shape[2] != 0:
            n = cache_source.shape[2]
            s = torch.cat([cache_source.to(s), s[:, :, n:]], dim=2)
        return self.decode(speech_feat, s), s
