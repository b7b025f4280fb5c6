"""ChatterboxMultilingualTTS: 23 languages (Llama T3 v2/v3 with CFG + CFM S3Gen), upstream main's API."""
from __future__ import annotations

import logging
import os
from typing import Optional

import torch

from .checkpoints import load_into, load_weights, require_files, resolve_device, snapshot
from .engine import SAMPLES_PER_TOKEN, Conditionals, EngineBase, make_generator
from .models.s3gen import S3Gen
from .models.t3 import T3
from .models.t3.modules.t3_config import T3Config
from .models.tokenizers import MTLTokenizer
from .models.voice_encoder import VoiceEncoder
from .text import SUPPORTED_LANGUAGES
from .text import punc_norm as _punc_norm
from .text import validate_language, validate_text

logger = logging.getLogger(__name__)

REPO_ID = "ResembleAI/chatterbox"
DEFAULT_MULTILINGUAL_T3_MODEL = "t3_mtl23ls_v2.safetensors"
MULTILINGUAL_T3_MODELS = {
    "v2": "t3_mtl23ls_v2.safetensors",
    "t3_mtl23ls_v2": "t3_mtl23ls_v2.safetensors",
    "v3": "t3_mtl23ls_v3.safetensors",
    "t3_mtl23ls_v3": "t3_mtl23ls_v3.safetensors",
}
TOKENIZER_FILE = "grapheme_mtl_merged_expanded_v1.json"
MAX_TEXT_CHARS = 8192

__all__ = ["ChatterboxMultilingualTTS", "Conditionals", "SUPPORTED_LANGUAGES", "punc_norm", "REPO_ID"]


def punc_norm(text: str) -> str:
    """Upstream's multilingual text clean-up (CJK sentence enders count as endings)."""
    return _punc_norm(text, "multilingual")


def resolve_t3_file(t3_model: Optional[str]) -> str:
    """'v2' (default) / 'v3' / a '*.safetensors' file name -> the T3 checkpoint file name."""
    if t3_model is None:
        return DEFAULT_MULTILINGUAL_T3_MODEL
    if t3_model in MULTILINGUAL_T3_MODELS:
        return MULTILINGUAL_T3_MODELS[t3_model]
    if t3_model.endswith(".safetensors"):
        return t3_model
    raise ValueError(f"unknown t3_model {t3_model!r}; use 'v2', 'v3' or a '.safetensors' file name")


class ChatterboxMultilingualTTS(EngineBase):
    ENC_COND_LEN = 6 * 16000
    DEC_COND_LEN = 10 * 24000

    def __init__(self, t3: T3, s3gen: S3Gen, ve: VoiceEncoder, tokenizer: MTLTokenizer, device: str,
                 conds: Optional[Conditionals] = None, *, watermark: bool = True):
        self._init_tts(t3, s3gen, ve, tokenizer, device, conds, watermark)

    @classmethod
    def get_supported_languages(cls) -> dict:
        return dict(SUPPORTED_LANGUAGES)

    @classmethod
    def from_local(cls, ckpt_dir, device, t3_model: Optional[str] = None, **kwargs) -> "ChatterboxMultilingualTTS":
        """Load ve.pt, the T3 file (v2 default, v3), s3gen.pt and the grapheme tokenizer from a directory."""
        device = resolve_device(device)
        t3_file = resolve_t3_file(t3_model)
        ckpt_dir = require_files(ckpt_dir, ["ve.pt", t3_file, "s3gen.pt", TOKENIZER_FILE], "ChatterboxMultilingualTTS")
        ve = load_into(VoiceEncoder(), load_weights(ckpt_dir / "ve.pt", device), name="ve.pt").to(device).eval()
        t3 = T3.from_state_dict(load_weights(ckpt_dir / t3_file), T3Config.multilingual()).to(device)
        s3gen = load_into(S3Gen(), load_weights(ckpt_dir / "s3gen.pt", device), name="s3gen.pt").to(device).eval()
        tokenizer = MTLTokenizer(str(ckpt_dir / TOKENIZER_FILE))
        conds = None
        if (ckpt_dir / "conds.pt").is_file():
            conds = Conditionals.load(ckpt_dir / "conds.pt", map_location="cpu").to(device)
        return cls(t3, s3gen, ve, tokenizer, device, conds=conds, **kwargs)

    @classmethod
    def from_pretrained(cls, device, t3_model: Optional[str] = None, **kwargs) -> "ChatterboxMultilingualTTS":
        """Download the multilingual files of `ResembleAI/chatterbox` from the Hub (cached) and load them."""
        device = resolve_device(device)
        files = ["ve.pt", resolve_t3_file(t3_model), "s3gen.pt", TOKENIZER_FILE, "conds.pt", "Cangjie5_TC.json"]
        ckpt_dir = snapshot(REPO_ID, files, token=os.getenv("HF_TOKEN") or None)
        return cls.from_local(ckpt_dir, device, t3_model=t3_model, **kwargs)

    def warmup_args(self, text: str) -> tuple:
        return (text, "en")

    def prepare_conditionals(self, wav_fpath, exaggeration: float = 0.5) -> None:
        """Make the voice in `wav_fpath` (any rate, mono or stereo, >= 1 s) the current voice."""
        with self._lock:
            self.conds = self._build_conditionals(self._load_ref24(wav_fpath), exaggeration)

    @torch.inference_mode()
    def generate(self, text, language_id, audio_prompt_path=None, exaggeration=0.5, cfg_weight=0.5,
                 temperature=0.8, repetition_penalty=1.2, min_p=0.05, top_p=1.0, *, seed: Optional[int] = None,
                 generator: Optional[torch.Generator] = None, max_new_tokens: int = 1000) -> torch.Tensor:
        """Speak `text` in `language_id` (a code of SUPPORTED_LANGUAGES); float32 (1, N) CPU tensor at 24 kHz."""
        language = validate_language(language_id)
        validate_text(text, MAX_TEXT_CHARS)
        with self._lock:
            if audio_prompt_path:
                self.prepare_conditionals(audio_prompt_path, exaggeration=exaggeration)
            gen = make_generator(self.device, seed, generator)
            ids = self.tokenizer.text_to_tokens(punc_norm(text), language_id=language)
            speech = self._llama_speech(ids, self._conds_for(exaggeration), gen, max_new_tokens,
                                        temperature=temperature, cfg_weight=cfg_weight,
                                        repetition_penalty=repetition_penalty, min_p=min_p, top_p=top_p)
            n = speech.numel()
            if n == 0:
                return self._empty("T3 stopped immediately")
            wav = self._tokens_to_wav(speech, self.conds.gen, gen)
            wav = wav[..., : max(1, n - 1) * SAMPLES_PER_TOKEN]  # upstream main drops the last token's audio
            return self._finish(wav)
