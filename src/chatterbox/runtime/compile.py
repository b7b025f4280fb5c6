"""Compile policy: the one switch that makes a loaded model fast (`model.compile()`), and warm-up.

What it does, per model:
- T3: the decoder's step (`runtime.t3_decoder.T3Decoder._step`: backbone over the slot cache +
  on-device sampling for every row) is compiled as one full graph per (active rows, attention
  length) bucket; on CUDA with `mode="reduce-overhead"`, so each step replays as a CUDA graph.
  The decoder's shape is fixed for the model's life (`max_batch` slots x `max_len` positions, the
  attention-length buckets `kv_buckets`); `warmup()` compiles every bucket, so no request compiles.
  The prefill stays eager (variable length). Compiled T3 runs only on the scheduler's worker thread
  (CUDA-graph trees are thread-local): serve from any number of threads, warm up once.
- S3Gen: the flow encoder, the CFM estimator and HiFT's decode compiled (`fullgraph=True`) over
  padded token-length buckets, so a request of a new length inside warmed buckets never recompiles.
- Optional dtype for T3 (bfloat16 on GPU); sampling math and RoPE tables stay float32. S3Gen stays
  float32 unless `s3gen_dtype` is given (its front ends always run in float32).

Global settings touched, only when this is called (importing chatterbox changes nothing):
`torch._dynamo.config.cache_size_limit` is raised to fit the buckets, with `cache_dir` the
inductor cache directory (`TORCHINDUCTOR_CACHE_DIR`) is set so compiled kernels persist, and with
`tf32=True` TF32 matmuls/convolutions are allowed (`torch.backends.cuda.matmul.allow_tf32`,
`torch.backends.cudnn.allow_tf32`; faster float32 S3Gen on Ampere and newer, ~1e-3 relative error).
"""
from __future__ import annotations

import logging
import os
import time
from typing import Optional, Sequence, Union

import torch

logger = logging.getLogger(__name__)

DTypeLike = Union[str, torch.dtype, None]


def _dtype(d: DTypeLike) -> Optional[torch.dtype]:
    if d is None or isinstance(d, torch.dtype):
        return d
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                "float16": torch.float16, "fp16": torch.float16}[d]
    except KeyError:
        raise ValueError(f"unsupported dtype {d!r}; use float32, bfloat16 or float16") from None


def torch_compile(fn, **kwargs):
    """The one place the runtime calls `torch.compile` (tests swap it for `testing.CudaGraphEmulator.compile_hook`)."""
    return torch.compile(fn, **kwargs)


def configure_dynamo(cache_size_limit: int = 64, cache_dir: Optional[str] = None) -> None:
    """Raise dynamo's recompile limit so every bucket fits; optionally persist inductor's cache in `cache_dir`."""
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, cache_size_limit)
    if hasattr(torch._dynamo.config, "accumulated_cache_size_limit"):
        torch._dynamo.config.accumulated_cache_size_limit = max(
            torch._dynamo.config.accumulated_cache_size_limit, 4 * cache_size_limit)
    if cache_dir:
        os.makedirs(cache_dir, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir)


def t3_prompt_budget(t3, max_text_tokens: int) -> int:
    """Prefill length of a request with `max_text_tokens` text tokens: conditioning + text (+ start/stop, BOS)."""
    hp = t3.hp
    cond = 1 + (32 if hp.use_perceiver_resampler else hp.speech_cond_prompt_len) + (1 if hp.emotion_adv else 0)
    return cond + max_text_tokens + (4 if not t3.is_gpt else 1)


def default_kv_buckets(max_len: int) -> tuple[int, ...]:
    """Attention lengths the compiled step is specialised on: 256, 512, 1024, ... up to max_len."""
    out, b = [], 256
    while b < max_len:
        out.append(b)
        b *= 2
    return tuple(out + [max_len])


def compile_t3(model, *, mode: Optional[str] = None, dtype: DTypeLike = None, backend: str = "inductor",
               max_batch: Optional[int] = None, max_len: Optional[int] = None, max_text_tokens: int = 512,
               max_new_tokens: int = 1000, kv_buckets: Optional[Sequence[int]] = None,
               row_buckets: Optional[Sequence[int]] = None) -> None:
    """Compile T3's decode step (backbone over the slot cache + on-device sampling) as one full graph per bucket."""
    from .t3_decoder import backbone_positions, round_up

    t3 = model.t3
    dt = _dtype(dtype)
    if dt is not None and dt != t3.dtype:
        t3.to(dt)  # T3 keeps its RoPE tables in float32 (T3._apply)
    if mode is None and backend == "inductor":
        mode = "reduce-overhead" if t3.device.type == "cuda" else "default"
    if max_batch is not None:
        model.set_max_batch(max_batch)
    sched = model.scheduler
    if max_len is None:
        max_len = t3_prompt_budget(t3, max_text_tokens) + max_new_tokens
    max_len = min(round_up(max_len), backbone_positions(t3))
    if row_buckets is None and t3.device.type == "cuda":
        row_buckets = (sched.slots,)  # one graph over every slot: idle rows cost little on a GPU
    sched.configure(max_len=max_len, kv_buckets=tuple(kv_buckets or default_kv_buckets(max_len)),
                    row_buckets=None if row_buckets is None else tuple(row_buckets))
    sched.fixed_len = True
    compile_kw = dict(fullgraph=True, mode=mode, backend=backend, dynamic=False)
    sched.step_fn_factory = lambda dec: torch_compile(dec._step, **compile_kw)


def compile_model(model, *, dtype: DTypeLike = None, mode: Optional[str] = None, t3: bool = True,
                  s3gen: Optional[bool] = None, s3gen_dtype: DTypeLike = None, buckets: Optional[Sequence[int]] = None,
                  cache_dir: Optional[str] = None, cache_size_limit: int = 64, backend: str = "inductor",
                  s3gen_backend: Optional[str] = None, tf32: bool = False, max_batch: Optional[int] = None,
                  max_len: Optional[int] = None, max_text_tokens: int = 512, max_new_tokens: int = 1000,
                  kv_buckets: Optional[Sequence[int]] = None, row_buckets: Optional[Sequence[int]] = None) -> None:
    """Compile the parts of a loaded Chatterbox model (see the module docstring for what and how).

    dtype: T3's dtype (default bfloat16 on CUDA, unchanged on CPU); mode: torch.compile mode for T3
    (default "reduce-overhead" = CUDA graphs on GPU); buckets: S3Gen total-token buckets;
    cache_dir: persistent inductor cache; backend / s3gen_backend: torch.compile backends
    ("eager" traces without generating code, useful to check graphs quickly).
    s3gen: compile S3Gen over length buckets; default True on CUDA and False on CPU, where the
    bucket padding costs more than compilation gains (measured, see BENCHMARKS.md).
    tf32: allow TF32 matmuls/convolutions (a global torch setting; off by default).
    T3 decoder shape (fixed once compiled): max_batch concurrent requests; max_len cache positions
    (default: the prompt of `max_text_tokens` text tokens + `max_new_tokens`); kv_buckets attention
    lengths; row_buckets active-row counts (CUDA default: all slots, one bucket).
    """
    if s3gen is None:
        s3gen = str(getattr(model, "device", "cpu")).startswith("cuda")
    configure_dynamo(cache_size_limit, cache_dir)
    if dtype is None and getattr(model, "device", "cpu").startswith("cuda"):
        dtype = torch.bfloat16
    if tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if t3 and getattr(model, "t3", None) is not None:
        compile_t3(model, mode=mode, dtype=dtype, backend=backend, max_batch=max_batch, max_len=max_len,
                   max_text_tokens=max_text_tokens, max_new_tokens=max_new_tokens, kv_buckets=kv_buckets,
                   row_buckets=row_buckets)
    if s3gen and getattr(model, "s3gen", None) is not None:
        from .s3gen_buckets import DEFAULT_BUCKETS, compile_s3gen

        compile_s3gen(model.s3gen, buckets=tuple(buckets or DEFAULT_BUCKETS), dtype=_dtype(s3gen_dtype),
                      backend=s3gen_backend or backend)
    model._compiled = True


def warmup(model, *, texts: Sequence[str] = ("Warm up.",), max_new_tokens: int = 32,
           s3gen_buckets: Optional[Sequence[int]] = None, hift_frames: Optional[Sequence[int]] = None,
           seed: int = 0, stream: bool = True) -> float:
    """Pre-compile before traffic; returns the seconds it took.

    Compiles T3's step for every (rows, attention length) bucket of the decoder on the scheduler's
    worker thread, runs `generate` on `texts` (prefill and S3Gen paths), then one S3Gen request per
    length bucket (default: every configured bucket that fits the current voice's prompt) and, with
    `stream`, every flow window shape of `generate_stream`'s default schedule, so later requests
    never compile.
    """
    t0 = time.perf_counter()
    if getattr(model, "t3", None) is not None:
        if getattr(model, "conds", None) is None:
            raise RuntimeError("warmup needs a voice: prepare_conditionals() first")
        model.scheduler.warm_steps()
        for text in texts:
            model.generate(*model.warmup_args(text), seed=seed, max_new_tokens=max_new_tokens)
    s3gen = getattr(model, "s3gen", None)
    buckets = s3gen.length_buckets if s3gen is not None else None
    if buckets:
        from .noise import PositionalNoise
        from .s3gen_buckets import HIFT_WARM_FRAMES, warm_hift

        ref = model.conds.gen if getattr(model, "conds", None) is not None else getattr(model, "ref_dict", None)
        if ref is None:
            raise RuntimeError("warmup needs a voice: prepare_conditionals()/set_target_voice() first")
        p = ref["prompt_token"].shape[-1]
        for b in (s3gen_buckets or buckets):
            if b > p:  # one request that fills bucket b exactly
                dummy = torch.zeros(b - p, dtype=torch.long, device=s3gen.device)
                s3gen.synthesize([dummy], [ref], flow_noise=[PositionalNoise(None, 80, s3gen.device)],
                                 hift_generators=[None], n_cfm_timesteps=getattr(model, "N_CFM_TIMESTEPS", None))
        warm_hift(s3gen, hift_frames or HIFT_WARM_FRAMES)
        if stream:  # every flow window shape of generate_stream's default schedule, for this voice
            from .s3gen_stream import warm_stream

            warm_stream(s3gen, ref, model.stream_schedule(), n_cfm_timesteps=getattr(model, "N_CFM_TIMESTEPS", None),
                        extra_tail_tokens=getattr(model, "STREAM_TAIL_TOKENS", 0))
    dt = time.perf_counter() - t0
    logger.info("warm-up took %.1f s", dt)
    return dt
