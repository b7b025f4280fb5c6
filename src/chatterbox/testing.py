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


# ---------------------------------------------------------------------------------------------
# Checkpoint directories with upstream's file names, filled by the rule (tests, demo, benchmark)

CHECKPOINT_KINDS = ("english", "turbo", "nano", "multilingual")


def _det_t3_state(hp, salt: int) -> dict[str, torch.Tensor]:
    from .models.t3 import T3

    with torch.device("meta"):
        shell = T3(hp)
    return det_state_dict(shell, salt)  # GPT-2 variants keep tfmr.wte.weight, as released files do


def write_checkpoint(kind: str, directory, *, salt: int = 0, with_conds: bool = True, ref_seconds: float = 6.0):
    """Write a complete checkpoint directory for `kind` (english, turbo, nano, multilingual).

    Upstream's file names and tensor layouts, every weight from the deterministic rule, small but
    real tokenizers, and (with_conds) a `conds.pt` built-in voice prepared from `test_wav`.
    Returns the directory as a Path.
    """
    from pathlib import Path

    from safetensors.torch import save_file

    from .models.s3gen import S3Gen
    from .models.t3.modules.t3_config import T3Config
    from .models.voice_encoder import VoiceEncoder
    from .testing_tokenizers import write_cangjie_map, write_en_tokenizer, write_mtl_tokenizer, write_turbo_tokenizer

    if kind not in CHECKPOINT_KINDS:
        raise ValueError(f"kind must be one of {CHECKPOINT_KINDS}, got {kind!r}")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    ve = det_state_dict(VoiceEncoder(), salt)
    s3 = det_state_dict(S3Gen(meanflow=kind in ("turbo", "nano")), salt)
    s3 = {k: v.contiguous() for k, v in s3.items()}
    if kind == "english":
        save_file(ve, str(d / "ve.safetensors"))
        save_file(_det_t3_state(T3Config.english_only(), salt), str(d / "t3_cfg.safetensors"))
        save_file(s3, str(d / "s3gen.safetensors"))
        write_en_tokenizer(d)
    elif kind in ("turbo", "nano"):
        save_file(ve, str(d / "ve.safetensors"))
        hp = T3Config.nano() if kind == "nano" else T3Config.turbo()
        save_file(_det_t3_state(hp, salt), str(d / ("t3_nano_v1.safetensors" if kind == "nano" else "t3_turbo_v1.safetensors")))
        save_file(s3, str(d / "s3gen_meanflow.safetensors"))
        write_turbo_tokenizer(d)
    else:
        torch.save(ve, str(d / "ve.pt"))
        save_file(_det_t3_state(T3Config.multilingual(), salt), str(d / "t3_mtl23ls_v2.safetensors"))
        torch.save(s3, str(d / "s3gen.pt"))
        write_mtl_tokenizer(d)
        write_cangjie_map(d)
    del ve, s3
    if with_conds:
        import soundfile as sf

        ref = d / "_ref.wav"
        sf.write(str(ref), test_wav(24000, ref_seconds, seed=4321).numpy(), 24000, subtype="FLOAT")
        model = load_checkpoint(kind, d, "cpu", watermark=False)
        model.prepare_conditionals(str(ref))
        model.conds.save(d / "conds.pt")
        ref.unlink()
    return d


def load_checkpoint(kind: str, directory, device: str = "cpu", **kwargs):
    """`from_local` of the public class that serves `kind`."""
    if kind == "english":
        from .tts import ChatterboxTTS

        return ChatterboxTTS.from_local(directory, device, **kwargs)
    if kind in ("turbo", "nano"):
        from .tts_turbo import ChatterboxTurboTTS

        return ChatterboxTurboTTS.from_local(directory, device, nano=kind == "nano", **kwargs)
    if kind == "multilingual":
        from .mtl_tts import ChatterboxMultilingualTTS

        return ChatterboxMultilingualTTS.from_local(directory, device, **kwargs)
    raise ValueError(f"kind must be one of {CHECKPOINT_KINDS}, got {kind!r}")


# ---------------------------------------------------------------------------------------------
# CUDA-graph semantics on the CPU (tests, gpu_check --tiny)

class CudaGraphEmulator:
    """Emulates the output lifetime of CUDA-graph trees (`torch.compile(mode="reduce-overhead")`) on any device.

    Under CUDA graphs an output of a replay lives in the graph's memory pool and is overwritten by
    the next replay of any graph in the same tree. Functions wrapped by one emulator share one
    "pool": before each call, every tensor that an earlier call returned is filled with garbage
    (NaN for floats, a large negative number for integers, True for booleans). Code that keeps or
    feeds back an output without cloning it then computes garbage, exactly as it would on a GPU.
    """

    INT_GARBAGE = -(2 ** 30)

    def __init__(self):
        self._live: list[torch.Tensor] = []
        self.calls = 0

    def _poison(self) -> None:
        for t in self._live:
            if t.is_floating_point() or t.is_complex():
                t.fill_(float("nan"))
            elif t.dtype == torch.bool:
                t.fill_(True)
            else:
                t.fill_(self.INT_GARBAGE)
        self._live = []

    def _collect(self, out) -> None:
        if torch.is_tensor(out):
            self._live.append(out)
        elif isinstance(out, (tuple, list)):
            for o in out:
                self._collect(o)
        elif isinstance(out, dict):
            for o in out.values():
                self._collect(o)

    def wrap(self, fn: Callable) -> Callable:
        """`fn` with CUDA-graph output lifetimes: its (and its siblings') previous outputs die at each call."""
        import functools

        @functools.wraps(fn)
        def replay(*args, **kwargs):
            with torch.inference_mode(False), torch.no_grad():
                self._poison()
            out = fn(*args, **kwargs)
            self.calls += 1
            self._collect(out)
            return out

        replay.__wrapped_by_emulator__ = self
        return replay

    def compile_hook(self, original: Callable) -> Callable:
        """A drop-in for `chatterbox.runtime.compile.torch_compile`: reduce-overhead compiles become emulated graphs.

        Other modes go to `original` unchanged. The function itself runs eagerly under emulation
        (the emulation is about output lifetimes, not code generation).
        """
        def hook(fn, **kwargs):
            if kwargs.get("mode") == "reduce-overhead":
                return self.wrap(fn)
            return original(fn, **kwargs)

        return hook
