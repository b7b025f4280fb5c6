"""S3Gen over padded length buckets: one compiled graph serves every request inside a bucket.

The flow (conformer encoder + CFM estimator) runs on [prompt | new tokens | padding] padded to a
bucket of total tokens; its masks make the padding exact, and the mel is cut back to the real
length before the vocoder. HiFT is compiled with a dynamic length instead (its convolutions are
not causal, so padding would change the last samples). Noise is drawn exactly as the unbucketed
path draws it (same generator, same order, same shapes), so bucketed and plain runs of one seed
give the same audio.
"""
from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..models.s3gen.flow_matching import draw_noise

logger = logging.getLogger(__name__)

# total (prompt + new) speech tokens; a 10 s prompt is 250 tokens, 1000 new tokens is 40 s
DEFAULT_BUCKETS: tuple[int, ...] = (128, 256, 384, 512, 768, 1024, 1280)
# HiFT is compiled with a dynamic length, but the convolution kernels it lowers to change with the
# input size, so dynamo keeps a few size ranges apart; warming this ladder of mel lengths covers them.
HIFT_WARM_FRAMES: tuple[int, ...] = (4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


def bucket_for(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= n; beyond the largest, round up to a multiple of 256."""
    for b in sorted(buckets):
        if n <= b:
            return b
    return -(-n // 256) * 256


def compile_s3gen(s3gen, *, buckets: Sequence[int] = DEFAULT_BUCKETS, mode: Optional[str] = None,
                  dtype: Optional[torch.dtype] = None, backend: str = "inductor") -> None:
    """Compile the encoder and estimator (static shapes, one graph per bucket) and HiFT's decode (dynamic length)."""
    if dtype is not None and dtype != s3gen.dtype:
        s3gen.flow.to(dtype)  # HiFT and the front ends stay float32 (F0/phase precision)
    kw = dict(fullgraph=True, backend=backend, mode=mode if backend == "inductor" else None)
    s3gen.flow.encoder.compile(dynamic=False, **kw)
    s3gen.flow.decoder.estimator.compile(dynamic=False, **kw)
    hift = s3gen.mel2wav
    hift.decode = torch.compile(type(hift).decode.__get__(hift), dynamic=True, **kw)
    s3gen._length_buckets = tuple(sorted(buckets))


def bucketed_inference(s3gen, speech: Tensor, ref_dict: dict, *, generator: Optional[torch.Generator] = None,
                       n_cfm_timesteps: Optional[int] = None, buckets: Optional[Sequence[int]] = None) -> Tensor:
    """(N,) speech ids -> (1, 960 N) waveform with the start fade, through the bucketed flow."""
    buckets = buckets or getattr(s3gen, "_length_buckets", DEFAULT_BUCKETS)
    ref = s3gen._ref_on_device(ref_dict)
    device, dtype = s3gen.device, s3gen.dtype
    n = speech.numel()
    p = ref["prompt_token"].size(-1)
    m = ref["prompt_feat"].size(1)
    n_pad = bucket_for(p + n, buckets) - p
    # draws as the unpadded path makes them: meanflow's (1, 80, 2N) first, then the CFM's (1, 80, 2(P+N))
    mf = draw_noise((1, 80, 2 * n), generator, device, dtype) if s3gen.meanflow else None
    noise = draw_noise((1, 80, 2 * (p + n)), generator, device, dtype)
    if mf is not None:
        noise = torch.cat([noise[..., : 2 * p], mf], dim=-1)
    noise = torch.cat([noise, noise.new_zeros(1, 80, 2 * (n_pad - n))], dim=-1)
    tokens = torch.cat([speech.to(device).long(), speech.new_zeros(n_pad - n).to(device).long()])[None]
    lens = torch.full((1,), n, dtype=torch.long, device=device)
    mel = s3gen.flow_inference(tokens, ref_dict=ref, n_cfm_timesteps=n_cfm_timesteps, finalize=True,
                               speech_token_lens=lens, noise=noise)
    mel = mel[..., : 2 * (p + n) - m].to(next(s3gen.mel2wav.parameters()).dtype)
    wav, _ = s3gen.hift_inference(mel, None, generator=generator)
    return s3gen.apply_trim_fade(wav)


@torch.inference_mode()
def warm_hift(s3gen, frames: Sequence[int] = HIFT_WARM_FRAMES) -> None:
    """Run HiFT once per mel length in `frames` so every size range has its compiled graph."""
    dtype = next(s3gen.mel2wav.parameters()).dtype
    for t in frames:
        s3gen.mel2wav.inference(torch.zeros(1, 80, int(t), device=s3gen.device, dtype=dtype), deterministic=True)
