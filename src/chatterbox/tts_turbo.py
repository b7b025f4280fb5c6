"""ChatterboxTurboTTS: Turbo and Nano (GPT-2 T3, no CFG, meanflow S3Gen in 2 steps), upstream's API."""
from __future__ import annotations

import logging
import os
from typing import Optional

import numpy as np
import torch

from .checkpoints import load_into, load_weights, require_files, resolve_device, snapshot
from .engine import Conditionals, EngineBase, make_generator
from .models.s3gen import S3Gen
from .models.s3gen.const import S3GEN_SIL
from .models.t3 import T3
from .models.t3.modules.t3_config import T3Config
from .models.voice_encoder import VoiceEncoder
from .reference import norm_loudness as _norm_loudness
from .text import punc_norm as _punc_norm
from .text import validate_text

logger = logging.getLogger(__name__)

REPO_ID = "ResembleAI/chatterbox-turbo"
NANO_REPO_ID = "ResembleAI/chatterbox-nano"
ALLOW_PATTERNS = ["*.safetensors", "*.json", "*.txt", "*.pt", "*.model"]
EXPECTED_VOCAB = 50276
MAX_TEXT_CHARS = 8192

__all__ = ["ChatterboxTurboTTS", "Conditionals", "punc_norm", "REPO_ID", "NANO_REPO_ID"]


def punc_norm(text: str) -> str:
    """Upstream's Turbo text clean-up (keeps '...', ' - ' and ';')."""
    return _punc_norm(text, "turbo")


class ChatterboxTurboTTS(EngineBase):
    ENC_COND_LEN = 15 * 16000
    DEC_COND_LEN = 10 * 24000
    MIN_PROMPT_SECONDS = 5.0

    def __init__(self, t3: T3, s3gen: S3Gen, ve: VoiceEncoder, tokenizer, device: str,
                 conds: Optional[Conditionals] = None, model_label: str = "Turbo", *, watermark: bool = True):
        self._init_tts(t3, s3gen, ve, tokenizer, device, conds, watermark)
        self.model_label = model_label

    @classmethod
    def from_local(cls, ckpt_dir, device, nano: bool = False, **kwargs) -> "ChatterboxTurboTTS":
        """Load a Turbo (or, with nano=True, Nano) checkpoint directory with its tokenizer files."""
        from transformers import AutoTokenizer

        device = resolve_device(device)
        t3_file = "t3_nano_v1.safetensors" if nano else "t3_turbo_v1.safetensors"
        ckpt_dir = require_files(ckpt_dir, ["ve.safetensors", t3_file, "s3gen_meanflow.safetensors"],
                                 "ChatterboxTurboTTS (Nano)" if nano else "ChatterboxTurboTTS")
        ve = load_into(VoiceEncoder(), load_weights(ckpt_dir / "ve.safetensors"), name="ve.safetensors").to(device).eval()
        hp = T3Config.nano() if nano else T3Config.turbo()
        t3 = T3.from_state_dict(load_weights(ckpt_dir / t3_file), hp).to(device)
        s3gen = load_into(S3Gen(meanflow=True), load_weights(ckpt_dir / "s3gen_meanflow.safetensors"),
                          name="s3gen_meanflow.safetensors").to(device).eval()
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(ckpt_dir))
        except Exception as e:
            raise ValueError(f"could not load the Turbo tokenizer files from {ckpt_dir} ({type(e).__name__}: {e})") from e
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if len(tokenizer) != EXPECTED_VOCAB:
            logger.warning("tokenizer has %d entries; the released Turbo/Nano tokenizer has %d", len(tokenizer), EXPECTED_VOCAB)
        conds = None
        if (ckpt_dir / "conds.pt").is_file():
            conds = Conditionals.load(ckpt_dir / "conds.pt", map_location="cpu").to(device)
        return cls(t3, s3gen, ve, tokenizer, device, conds=conds, model_label="Nano" if nano else "Turbo", **kwargs)

    @classmethod
    def from_pretrained(cls, device, nano: bool = False, **kwargs) -> "ChatterboxTurboTTS":
        """Download `ResembleAI/chatterbox-turbo` (or `-nano`) from the Hub (cached) and load it."""
        device = resolve_device(device)
        repo = NANO_REPO_ID if nano else REPO_ID
        ckpt_dir = snapshot(repo, ALLOW_PATTERNS, token=os.getenv("HF_TOKEN") or None)
        return cls.from_local(ckpt_dir, device, nano=nano, **kwargs)

    def norm_loudness(self, wav: np.ndarray, sr: int, target_lufs: float = -27) -> np.ndarray:
        """Scale `wav` to `target_lufs` integrated loudness (ITU-R BS.1770), as upstream's pyloudnorm step."""
        return _norm_loudness(wav, sr, target_lufs)

    def prepare_conditionals(self, wav_fpath, exaggeration: float = 0.5, norm_loudness: bool = True) -> None:
        """Make the voice in `wav_fpath` (at least 5 s) the current voice."""
        with self._lock:
            ref24 = self._load_ref24(wav_fpath, min_seconds=self.MIN_PROMPT_SECONDS, norm_loudness=norm_loudness)
            self.conds = self._build_conditionals(ref24, exaggeration)

    @torch.inference_mode()
    def generate(self, text, repetition_penalty=1.2, min_p=0.00, top_p=0.95, audio_prompt_path=None,
                 exaggeration=0.0, cfg_weight=0.0, temperature=0.8, top_k=1000, norm_loudness=True, *,
                 seed: Optional[int] = None, generator: Optional[torch.Generator] = None,
                 max_new_tokens: int = 1000) -> torch.Tensor:
        """Speak `text`; returns a float32 (1, N) CPU tensor at 24 kHz. `cfg_weight`, `exaggeration`, `min_p` are ignored."""
        validate_text(text, MAX_TEXT_CHARS)
        if cfg_weight > 0.0 or exaggeration > 0.0 or min_p > 0.0:
            logger.warning("%s ignores cfg_weight, exaggeration and min_p", self.model_label)
        with self._lock:
            if audio_prompt_path:
                self.prepare_conditionals(audio_prompt_path, exaggeration=exaggeration, norm_loudness=norm_loudness)
            t3_cond = self._conds_for(exaggeration)
            ids = self.tokenizer(punc_norm(text), return_tensors="pt", padding=True, truncation=True).input_ids
            gen = make_generator(self.device, seed, generator)
            speech = self.t3.inference_turbo(t3_cond, ids.to(self.device), temperature=temperature, top_k=top_k,
                                             top_p=top_p, repetition_penalty=repetition_penalty,
                                             max_gen_len=max_new_tokens, generator=gen)
            speech = self._valid_speech(speech)
            if speech.numel() == 0:
                return self._empty("T3 stopped immediately")
            silence = torch.full((3,), S3GEN_SIL, dtype=speech.dtype, device=speech.device)
            wav = self._tokens_to_wav(torch.cat([speech, silence]), self.conds.gen, gen, n_cfm_timesteps=2)
            return self._finish(wav)
