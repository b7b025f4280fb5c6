"""S3Gen over padded length buckets: one compiled graph serves every request inside a bucket.

The flow (conformer encoder + CFM estimator) runs on [prompt | new tokens | padding] rows padded to
a bucket of total tokens (`S3Gen.set_length_buckets`); its masks make the padding exact, and each
row's mel is cut back to its own frames before the vocoder. HiFT is compiled with a dynamic length
instead (its convolutions are not causal, so padding would change the last samples).

`compile_s3gen` calls torch.compile through `chatterbox.runtime.compile.torch_compile` (looked up
at call time, so tests can swap it). Under `mode="reduce-overhead"` (CUDA graphs) every output of
a compiled region is cloned on return: a replay's outputs are overwritten by the next replay, and
the encoder's output outlives the estimator's steps, each step's velocity the next step, and a
row's waveform the next row's vocoding. The clones are a few hundred KB per call.
"""
from __future__ import annotations

import functools
import logging
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from ..models.s3gen.flow_matching import draw_noise
from ..models.s3gen.s3gen import bucket_for

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_BUCKETS", "HIFT_WARM_FRAMES", "bucket_for", "compile_s3gen", "bucketed_inference", "warm_hift"]

# total (prompt + new) speech tokens; a 10 s prompt is 250 tokens, 1000 new tokens is 40 s
DEFAULT_BUCKETS: tuple[int, ...] = (128, 256, 384, 512, 768, 1024, 1280)
# HiFT is compiled with a dynamic length, but the convolution kernels it lowers to change with the
# input size, so dynamo keeps a few size ranges apart; warming this ladder of mel lengths covers them.
HIFT_WARM_FRAMES: tuple[int, ...] = (4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


def _clone(out):
    """Tensors (in tuples/lists) cloned out of a CUDA-graph pool; anything else unchanged."""
    if torch.is_tensor(out):
        return out.clone()
    if isinstance(out, (tuple, list)):
        return type(out)(_clone(o) for o in out)
    return out


def _cloning(fn: Callable) -> Callable:
    """`fn` whose outputs are cloned, so they outlive the next CUDA-graph replay."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        return _clone(fn(*args, **kwargs))

    return call


def compile_s3gen(s3gen, *, buckets: Sequence[int] = DEFAULT_BUCKETS, mode: Optional[str] = None,
                  dtype: Optional[torch.dtype] = None, backend: str = "inductor") -> None:
    """Compile the encoder and estimator (static shapes, one graph per bucket) and HiFT's decode (dynamic length).

    `dtype` casts the flow only; HiFT and the reference front ends stay float32 (F0/phase and FFT
    precision). Sets the model's length buckets to `buckets`.
    """
    from . import compile as _c

    if dtype is not None and dtype != s3gen.dtype:
        s3gen.flow.to(dtype)
    mode = mode if backend == "inductor" else None
    clone = mode == "reduce-overhead"

    def wrap(name: str, fn: Callable) -> Callable:
        compiled = _c.torch_compile(fn, fullgraph=True, dynamic=name == "hift_decode", backend=backend, mode=mode)
        return _cloning(compiled) if clone else compiled

    s3gen.compile_regions(wrap)
    s3gen.set_length_buckets(buckets)


def bucketed_inference(s3gen, speech: Tensor, ref_dict: dict, *, generator: Optional[torch.Generator] = None,
                       n_cfm_timesteps: Optional[int] = None, buckets: Optional[Sequence[int]] = None) -> Tensor:
    """(N,) speech ids -> (1, 960 N) waveform with the start fade, through the bucketed flow.

    One generator for every draw, in the order of `S3Gen.inference` (meanflow's (1, 80, 2N), then the
    CFM's (1, 80, 2(P+N)), then HiFT's), so the audio equals `inference` with that generator.
    Kept for single-generator callers; `S3Gen.synthesize` is the batched, per-stream entry.
    """
    buckets = buckets or s3gen.length_buckets or DEFAULT_BUCKETS
    device, dtype = s3gen.device, s3gen.dtype
    n = speech.numel()
    p = ref_dict["prompt_token"].shape[-1]
    mf = draw_noise((1, 80, 2 * n), generator, device, dtype) if s3gen.meanflow else None
    noise = draw_noise((1, 80, 2 * (p + n)), generator, device, dtype)
    if mf is not None:
        noise = torch.cat([noise[..., : 2 * p], mf], dim=-1)
    mel = s3gen.synthesize_mels([speech], [ref_dict], [noise], n_cfm_timesteps=n_cfm_timesteps,
                                pad_to=bucket_for(p + n, buckets))[0]
    return s3gen.vocode([mel], [generator])[0]


@torch.inference_mode()
def warm_hift(s3gen, frames: Sequence[int] = HIFT_WARM_FRAMES) -> None:
    """Run HiFT once per mel length in `frames` so every size range has its compiled graph."""
    for t in frames:
        s3gen.hift_inference(torch.zeros(1, 80, int(t), device=s3gen.device, dtype=s3gen.vocoder_dtype),
                             deterministic=True)
