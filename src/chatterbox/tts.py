"""ChatterboxTTS: the original English model (Llama T3 with CFG + CFM S3Gen), upstream's API."""
from __future__ import annotations

import logging
from typing import Optional

import torch

from .checkpoints import download, load_into, load_weights, require_files, resolve_device
from .engine import Conditionals, EngineBase, make_generator
from .models.s3gen import S3Gen
from .models.t3 import T3
from .models.t3.modules.t3_config import T3Config
from .models.tokenizers import EnTokenizer
from .models.voice_encoder import VoiceEncoder
from .text import punc_norm as _punc_norm
from .text import validate_text

logger = logging.getLogger(__name__)

REPO_ID = "ResembleAI/chatterbox"
FILES = ("ve.safetensors", "t3_cfg.safetensors", "s3gen.safetensors", "tokenizer.json", "conds.pt")
MAX_TEXT_CHARS = 8192  # well above what one call can speak (1000 speech tokens = 40 s)

__all__ = ["ChatterboxTTS", "Conditionals", "punc_norm", "REPO_ID"]


def punc_norm(text: str) -> str:
    """Upstream's English text clean-up (capitalise, collapse spaces, normalise punctuation, end with a period)."""
    return _punc_norm(text, "english")


class ChatterboxTTS(EngineBase):
    ENC_COND_LEN = 6 * 16000
    DEC_COND_LEN = 10 * 24000

    def __init__(self, t3: T3, s3gen: S3Gen, ve: VoiceEncoder, tokenizer: EnTokenizer, device: str,
                 conds: Optional[Conditionals] = None, *, watermark: bool = True):
        self._init_tts(t3, s3gen, ve, tokenizer, device, conds, watermark)

    @classmethod
    def from_local(cls, ckpt_dir, device, **kwargs) -> "ChatterboxTTS":
        """Load upstream's checkpoint files from a directory (ve/t3_cfg/s3gen .safetensors, tokenizer.json, optional conds.pt)."""
        device = resolve_device(device)
        ckpt_dir = require_files(ckpt_dir, FILES[:4], "ChatterboxTTS")
        ve = load_into(VoiceEncoder(), load_weights(ckpt_dir / "ve.safetensors"), name="ve.safetensors").to(device).eval()
        t3 = T3.from_state_dict(load_weights(ckpt_dir / "t3_cfg.safetensors"), T3Config.english_only()).to(device)
        s3gen = load_into(S3Gen(), load_weights(ckpt_dir / "s3gen.safetensors"), name="s3gen.safetensors", strict=False)
        s3gen = s3gen.to(device).eval()
        tokenizer = EnTokenizer(str(ckpt_dir / "tokenizer.json"))
        conds = None
        if (ckpt_dir / "conds.pt").is_file():
            conds = Conditionals.load(ckpt_dir / "conds.pt", map_location="cpu").to(device)
        return cls(t3, s3gen, ve, tokenizer, device, conds=conds, **kwargs)

    @classmethod
    def from_pretrained(cls, device, **kwargs) -> "ChatterboxTTS":
        """Download `ResembleAI/chatterbox` from the Hugging Face Hub (cached) and load it."""
        device = resolve_device(device)
        return cls.from_local(download(REPO_ID, FILES), device, **kwargs)

    def prepare_conditionals(self, wav_fpath, exaggeration: float = 0.5) -> None:
        """Make the voice in `wav_fpath` (any rate, mono or stereo, >= 1 s) the current voice."""
        with self._lock:
            self.conds = self._build_conditionals(self._load_ref24(wav_fpath), exaggeration)

    @torch.inference_mode()
    def generate(self, text, repetition_penalty=1.2, min_p=0.05, top_p=1.0, audio_prompt_path=None,
                 exaggeration=0.5, cfg_weight=0.5, temperature=0.8, *, seed: Optional[int] = None,
                 generator: Optional[torch.Generator] = None, max_new_tokens: int = 1000) -> torch.Tensor:
        """Speak `text`; returns a float32 (1, N) CPU tensor at `self.sr` (24 kHz).

        Extras beyond upstream: `seed`/`generator` for reproducible audio, `max_new_tokens`
        (speech tokens, 25 per second). `cfg_weight=0` runs without classifier-free guidance.
        Empty text raises ValueError (upstream speaks a placeholder sentence instead).
        """
        validate_text(text, MAX_TEXT_CHARS)
        with self._lock:
            if audio_prompt_path:
                self.prepare_conditionals(audio_prompt_path, exaggeration=exaggeration)
            gen = make_generator(self.device, seed, generator)
            speech = self._llama_speech(self.tokenizer.text_to_tokens(punc_norm(text)), self._conds_for(exaggeration),
                                        gen, max_new_tokens, temperature=temperature, cfg_weight=cfg_weight,
                                        repetition_penalty=repetition_penalty, min_p=min_p, top_p=top_p)
            if speech.numel() == 0:
                return self._empty("T3 stopped immediately")
            return self._finish(self._tokens_to_wav(speech, self.conds.gen, gen))
