"""Deterministic weights and test signals (PARITY.md's rule), for tests, demos and benchmarks.

Every tensor is a function of its state-dict name and shape alone, so any implementation with
upstream's names and shapes gets the very same numbers. Used by the test-suite, the benchmark and
the demo to run the whole pipeline end to end without downloading real checkpoints.
"""
from __future__ import annotations

import math
import zlib
from typing import Callable, Optional

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

CHECKPOINT_KINDS = ("english", "turbo", "nano", "multilingual")  # "english" = the original model (registry alias)


def _det_t3_state(hp, salt: int) -> dict[str, torch.Tensor]:
    from .models.t3 import T3

    with torch.device("meta"):
        shell = T3(hp)
    return det_state_dict(shell, salt)  # GPT-2 variants keep tfmr.wte.weight, as released files do


def write_checkpoint(kind: str, directory, *, salt: int = 0, with_conds: bool = True, ref_seconds: float = 6.0):
    """Write a complete checkpoint directory for `kind` (original/english, turbo, nano, multilingual).

    Upstream's file names and tensor layouts (from `chatterbox.registry`), every weight from the
    deterministic rule, small but real tokenizers, and (with_conds) a `conds.pt` built-in voice
    prepared from `test_wav`. Returns the directory as a Path.
    """
    from pathlib import Path

    from safetensors.torch import save_file

    from .models.s3gen import S3Gen
    from .models.t3.modules.t3_config import T3Config
    from .models.voice_encoder import VoiceEncoder
    from .registry import get_spec
    from .testing_tokenizers import write_cangjie_map, write_en_tokenizer, write_mtl_tokenizer, write_turbo_tokenizer

    spec = get_spec(kind)
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)

    def save(sd: dict, name: str) -> None:
        if name.endswith(".safetensors"):
            save_file({k: v.contiguous() for k, v in sd.items()}, str(d / name))
        else:
            torch.save(sd, str(d / name))

    save(det_state_dict(VoiceEncoder(), salt), spec.ve_file)
    save(_det_t3_state(getattr(T3Config, spec.t3_config)(), salt), spec.t3_file)
    save(det_state_dict(S3Gen(meanflow=spec.meanflow), salt), spec.s3gen_file)
    {"english": write_en_tokenizer, "gpt2": write_turbo_tokenizer, "multilingual": write_mtl_tokenizer}[spec.text_frontend](d)
    if spec.text_frontend == "multilingual":
        write_cangjie_map(d)
    if with_conds:
        import soundfile as sf

        ref = d / "_ref.wav"
        sf.write(str(ref), test_wav(24000, ref_seconds, seed=4321).numpy(), 24000, subtype="FLOAT")
        model = load_checkpoint(kind, d, "cpu", watermark=False)
        model.prepare_conditionals(str(ref))
        model.conds.save(d / "conds.pt")
        model.close()
        ref.unlink()
    return d


def load_checkpoint(kind: str, directory, device: str = "cpu", **kwargs):
    """`from_local` of the public class that serves `kind` (see `chatterbox.registry.load_model`)."""
    from .registry import load_model

    return load_model(kind, directory, device, **kwargs)


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
            with torch.inference_mode(t.is_inference()), torch.no_grad():
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


# ---------------------------------------------------------------------------------------------
# Small public models (tests, gpu_check --tiny): a 2-layer T3 of the kind's family + full-size S3Gen/VE

TINY_BACKBONES = {  # name -> (base config, overrides)
    "tiny_llama": ("Llama_520M", dict(num_hidden_layers=2, intermediate_size=256, num_attention_heads=4,
                                      num_key_value_heads=4, head_dim=256)),
    "tiny_gpt2_medium": ("GPT2_medium", dict(n_layer=2)),
    "tiny_gpt2_small": ("GPT2_small", dict(n_layer=2)),
}
_TINY_FOR_KIND = {"english": "tiny_llama", "original": "tiny_llama", "multilingual": "tiny_llama",
                  "turbo": "tiny_gpt2_medium", "nano": "tiny_gpt2_small"}


def tiny_t3(kind: str, salt: int = 0):
    """A T3 of `kind`'s variant with a 2-layer backbone, deterministic weights (registers the tiny config by name)."""
    from .models.t3 import T3
    from .models.t3.llama_configs import LLAMA_CONFIGS
    from .models.t3.modules.t3_config import T3Config
    from .registry import get_spec

    name = _TINY_FOR_KIND[kind]
    base, over = TINY_BACKBONES[name]
    LLAMA_CONFIGS.setdefault(name, dict(LLAMA_CONFIGS[base], **over))
    hp = getattr(T3Config, get_spec(kind).t3_config)()
    hp.llama_config_name = name
    with torch.device("meta"):
        shell = T3(hp)
    return T3.from_state_dict(det_state_dict(shell, salt), hp)


def tiny_model(kind: str, workdir, *, device: str = "cpu", ref_seconds: Optional[float] = None,
               watermark: bool = False, salt: int = 0, cfm_steps: Optional[int] = None):
    """A public model object of `kind` with a tiny T3 and full-size deterministic S3Gen/VoiceEncoder, voice prepared.

    Same classes and code paths as a real checkpoint; only the T3 backbone is 2 layers deep, so
    tests of the pipeline, batching, streaming and serving run in seconds on a CPU. `cfm_steps`
    overrides the S3Gen flow's step count (tests of logic rather than audio use 2 for CFM models).
    """
    from pathlib import Path

    import soundfile as sf

    from .models.s3gen import S3Gen
    from .models.voice_encoder import VoiceEncoder
    from .registry import _load_tokenizer, api_class, get_spec
    from .testing_tokenizers import write_cangjie_map, write_en_tokenizer, write_mtl_tokenizer, write_turbo_tokenizer

    spec = get_spec(kind)
    d = Path(workdir)
    d.mkdir(parents=True, exist_ok=True)
    {"english": write_en_tokenizer, "gpt2": write_turbo_tokenizer, "multilingual": write_mtl_tokenizer}[spec.text_frontend](d)
    if spec.text_frontend == "multilingual":
        write_cangjie_map(d)
    t3 = tiny_t3(spec.kind, salt).to(device)
    s3 = apply_det_weights(S3Gen(meanflow=spec.meanflow), salt).to(device).eval()
    ve = apply_det_weights(VoiceEncoder(), salt).to(device).eval()
    cls = api_class(spec.kind)
    kw = {"model_label": "Nano" if spec.kind == "nano" else "Turbo"} if spec.text_frontend == "gpt2" else {}
    model = cls(t3, s3, ve, _load_tokenizer(spec, d), device, watermark=watermark, **kw)
    if cfm_steps is not None:
        model.N_CFM_TIMESTEPS = cfm_steps
    seconds = ref_seconds or (5.5 if spec.meanflow else 2.0)
    ref = d / f"voice_{salt}.wav"
    sf.write(str(ref), test_wav(24000, seconds, seed=4321 + salt).numpy(), 24000, subtype="FLOAT")
    model.prepare_conditionals(str(ref))
    return model
