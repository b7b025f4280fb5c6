"""Model kinds: one declarative spec per kind (files, configs, text front end) and the one loader they share.

The public classes (`ChatterboxTTS.from_local`, ...), the command line, the server, the demo and
the tests all load checkpoints through `load_components` / `load_model`, so a kind's files and
layout are written down exactly once.
"""
from __future__ import annotations

import dataclasses
import importlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

logger = logging.getLogger(__name__)

MODEL_KINDS = ("original", "turbo", "nano", "multilingual")
GPT2_TOKENIZER_PATTERNS = ("*.json", "*.txt", "*.model")
EXPECTED_GPT2_VOCAB = 50276


@dataclass(frozen=True)
class ModelSpec:
    """Everything that differs between model kinds at load time."""

    kind: str  # one of MODEL_KINDS
    api_class: str  # "module:Class" of the public class serving it
    repo_id: str  # Hugging Face Hub repository
    ve_file: str
    t3_file: str
    s3gen_file: str
    t3_config: str  # T3Config preset: english_only | multilingual | turbo | nano
    meanflow: bool  # S3Gen variant (Turbo/Nano: meanflow, 2 steps)
    text_frontend: str  # "english" (EnTokenizer) | "multilingual" (MTLTokenizer) | "gpt2" (AutoTokenizer files)
    tokenizer_file: Optional[str] = None  # for english / multilingual
    extra_files: tuple[str, ...] = ()  # also fetched from the Hub (optional locally): conds.pt, Cangjie5_TC.json
    s3gen_strict: bool = True

    @property
    def label(self) -> str:
        return {"original": "ChatterboxTTS", "turbo": "ChatterboxTurboTTS", "nano": "ChatterboxTurboTTS (Nano)",
                "multilingual": "ChatterboxMultilingualTTS"}[self.kind]

    def required_files(self) -> list[str]:
        files = [self.ve_file, self.t3_file, self.s3gen_file]
        return files + ([self.tokenizer_file] if self.tokenizer_file else [])

    def hub_patterns(self) -> list[str]:
        """Files (or glob patterns for the GPT-2 tokenizer) to download from the Hub."""
        pats = self.required_files() + list(self.extra_files)
        return pats + (list(GPT2_TOKENIZER_PATTERNS) if self.text_frontend == "gpt2" else [])


SPECS: dict[str, ModelSpec] = {
    "original": ModelSpec("original", "chatterbox.tts:ChatterboxTTS", "ResembleAI/chatterbox", "ve.safetensors",
                          "t3_cfg.safetensors", "s3gen.safetensors", "english_only", False, "english",
                          tokenizer_file="tokenizer.json", extra_files=("conds.pt",), s3gen_strict=False),
    "turbo": ModelSpec("turbo", "chatterbox.tts_turbo:ChatterboxTurboTTS", "ResembleAI/chatterbox-turbo",
                       "ve.safetensors", "t3_turbo_v1.safetensors", "s3gen_meanflow.safetensors", "turbo", True, "gpt2",
                       extra_files=("conds.pt",)),
    "nano": ModelSpec("nano", "chatterbox.tts_turbo:ChatterboxTurboTTS", "ResembleAI/chatterbox-nano",
                      "ve.safetensors", "t3_nano_v1.safetensors", "s3gen_meanflow.safetensors", "nano", True, "gpt2",
                      extra_files=("conds.pt",)),
    "multilingual": ModelSpec("multilingual", "chatterbox.mtl_tts:ChatterboxMultilingualTTS", "ResembleAI/chatterbox",
                              "ve.pt", "t3_mtl23ls_v2.safetensors", "s3gen.pt", "multilingual", False, "multilingual",
                              tokenizer_file="grapheme_mtl_merged_expanded_v1.json",
                              extra_files=("conds.pt", "Cangjie5_TC.json")),
}
ALIASES = {"english": "original"}  # the internal name of the original model in older code and fixtures


def get_spec(kind: str, **overrides) -> ModelSpec:
    """The spec for `kind` (aliases accepted), with field overrides (e.g. `t3_file=` for multilingual v3)."""
    key = ALIASES.get(kind, kind)
    if key not in SPECS:
        raise ValueError(f"unknown model kind {kind!r}; choose one of {', '.join(MODEL_KINDS)}")
    spec = SPECS[key]
    return dataclasses.replace(spec, **overrides) if overrides else spec


@dataclass
class Components:
    """The loaded parts every TTS class is built from."""

    t3: object
    s3gen: object
    ve: object
    tokenizer: object
    conds: object  # Conditionals or None


def _load_tokenizer(spec: ModelSpec, ckpt_dir: Path):
    if spec.text_frontend == "english":
        from .models.tokenizers import EnTokenizer

        return EnTokenizer(str(ckpt_dir / spec.tokenizer_file))
    if spec.text_frontend == "multilingual":
        from .models.tokenizers import MTLTokenizer

        return MTLTokenizer(str(ckpt_dir / spec.tokenizer_file))
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(ckpt_dir))
    except Exception as e:
        raise ValueError(f"could not load the {spec.kind} tokenizer files from {ckpt_dir} ({type(e).__name__}: {e})") from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if len(tok) != EXPECTED_GPT2_VOCAB:
        logger.warning("tokenizer has %d entries; the released Turbo/Nano tokenizer has %d", len(tok), EXPECTED_GPT2_VOCAB)
    return tok


def load_components(spec: ModelSpec, ckpt_dir, device: str) -> Components:
    """Load a checkpoint directory laid out as `spec` says onto `device` (already resolved)."""
    from .checkpoints import load_into, load_weights, require_files
    from .engine import Conditionals
    from .models.s3gen import S3Gen
    from .models.t3 import T3
    from .models.t3.modules.t3_config import T3Config
    from .models.voice_encoder import VoiceEncoder

    ckpt_dir = require_files(ckpt_dir, spec.required_files(), spec.label)
    ve = load_into(VoiceEncoder(), load_weights(ckpt_dir / spec.ve_file, device), name=spec.ve_file).to(device).eval()
    hp = getattr(T3Config, spec.t3_config)()
    t3 = T3.from_state_dict(load_weights(ckpt_dir / spec.t3_file), hp).to(device)
    s3gen = load_into(S3Gen(meanflow=spec.meanflow), load_weights(ckpt_dir / spec.s3gen_file, device),
                      name=spec.s3gen_file, strict=spec.s3gen_strict).to(device).eval()
    tokenizer = _load_tokenizer(spec, ckpt_dir)
    conds = None
    if (ckpt_dir / "conds.pt").is_file():
        conds = Conditionals.load(ckpt_dir / "conds.pt", map_location="cpu").to(device)
    return Components(t3, s3gen, ve, tokenizer, conds)


def download_checkpoint(spec: ModelSpec) -> Path:
    """Fetch a kind's files from the Hugging Face Hub (cached); returns the local directory."""
    from .checkpoints import snapshot

    return snapshot(spec.repo_id, spec.hub_patterns(), token=os.getenv("HF_TOKEN") or None)


def api_class(kind: str):
    """The public class that serves `kind`."""
    mod, name = get_spec(kind).api_class.split(":")
    return getattr(importlib.import_module(mod), name)


def load_model(kind: str, ckpt_dir=None, device: Optional[str] = None, **kwargs):
    """A ready model of `kind`: `from_local(ckpt_dir)` when given, else `from_pretrained` (Hugging Face Hub)."""
    spec = get_spec(kind)
    cls = api_class(spec.kind)
    extra = {"nano": True} if spec.kind == "nano" else {}
    if ckpt_dir is not None:
        return cls.from_local(ckpt_dir, device, **extra, **kwargs)
    return cls.from_pretrained(device, **extra, **kwargs)

