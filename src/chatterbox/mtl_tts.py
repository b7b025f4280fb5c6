"""ChatterboxMultilingualTTS: 23 languages (Llama T3 v2/v3 with CFG + CFM S3Gen), upstream main's API."""
from __future__ import annotations

import logging
from typing import Optional

import torch

from .checkpoints import resolve_device
from .engine import SAMPLES_PER_TOKEN, Conditionals, EngineBase, per_row
from .registry import download_checkpoint, get_spec, load_components
from .text import SUPPORTED_LANGUAGES
from .text import punc_norm as _punc_norm
from .text import validate_language

logger = logging.getLogger(__name__)

REPO_ID = "ResembleAI/chatterbox"
DEFAULT_MULTILINGUAL_T3_MODEL = "t3_mtl23ls_v2.safetensors"
MULTILINGUAL_T3_MODELS = {
    "v2": "t3_mtl23ls_v2.safetensors",
    "t3_mtl23ls_v2": "t3_mtl23ls_v2.safetensors",
    "v3": "t3_mtl23ls_v3.safetensors",
    "t3_mtl23ls_v3": "t3_mtl23ls_v3.safetensors",
}

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


def _language(language_id) -> str:
    code = validate_language(language_id)
    if code is None:
        raise ValueError("language_id is required, e.g. 'en' or 'fr' (see SUPPORTED_LANGUAGES)")
    return code


class ChatterboxMultilingualTTS(EngineBase):
    ENC_COND_LEN = 6 * 16000
    DEC_COND_LEN = 10 * 24000

    def __init__(self, t3, s3gen, ve, tokenizer, device: str, conds: Optional[Conditionals] = None, *,
                 watermark: bool = True):
        self._init_tts(t3, s3gen, ve, tokenizer, device, conds, watermark)

    @classmethod
    def get_supported_languages(cls) -> dict:
        return dict(SUPPORTED_LANGUAGES)

    @classmethod
    def from_local(cls, ckpt_dir, device, t3_model: Optional[str] = None, **kwargs) -> "ChatterboxMultilingualTTS":
        """Load ve.pt, the T3 file (v2 default, v3), s3gen.pt and the grapheme tokenizer from a directory."""
        device = resolve_device(device)
        c = load_components(get_spec("multilingual", t3_file=resolve_t3_file(t3_model)), ckpt_dir, device)
        return cls(c.t3, c.s3gen, c.ve, c.tokenizer, device, conds=c.conds, **kwargs)

    @classmethod
    def from_pretrained(cls, device, t3_model: Optional[str] = None, **kwargs) -> "ChatterboxMultilingualTTS":
        """Download the multilingual files of `ResembleAI/chatterbox` from the Hub (cached) and load them."""
        device = resolve_device(device)
        spec = get_spec("multilingual", t3_file=resolve_t3_file(t3_model))
        return cls.from_local(download_checkpoint(spec), device, t3_model=t3_model, **kwargs)

    def warmup_args(self, text: str) -> tuple:
        return (text, "en")

    def _text_ids(self, text: str, language: Optional[str]) -> torch.Tensor:
        return self.tokenizer.text_to_tokens(punc_norm(text), language_id=language)

    def _trim_wav(self, wav: torch.Tensor, n_speech: int) -> torch.Tensor:
        return wav[..., : max(1, n_speech - 1) * SAMPLES_PER_TOKEN]  # upstream main drops the last token's audio

    @torch.inference_mode()
    def generate(self, text, language_id, audio_prompt_path=None, exaggeration=0.5, cfg_weight=0.5,
                 temperature=0.8, repetition_penalty=1.2, min_p=0.05, top_p=1.0, *,
                 conds: Optional[Conditionals] = None, seed: Optional[int] = None,
                 generator: Optional[torch.Generator] = None, max_new_tokens: int = 1000,
                 split_text: bool = False) -> torch.Tensor:
        """Speak `text` in `language_id` (a code of SUPPORTED_LANGUAGES); float32 (1, N) CPU tensor at 24 kHz."""
        return self._run([self._row(text, language_id, audio_prompt_path, exaggeration, cfg_weight, temperature,
                                    repetition_penalty, min_p, top_p, conds, seed, generator, max_new_tokens)],
                         split_text=split_text)[0]

    def generate_stream(self, text, language_id, audio_prompt_path=None, exaggeration=0.5, cfg_weight=0.5,
                        temperature=0.8, repetition_penalty=1.2, min_p=0.05, top_p=1.0, *,
                        conds: Optional[Conditionals] = None, seed: Optional[int] = None,
                        generator: Optional[torch.Generator] = None, max_new_tokens: int = 1000,
                        split_text: bool = False, chunk_size: Optional[int] = None, output: str = "float32"):
        """Speak `text` in `language_id` as a stream of (audio_chunk, metrics); see `ChatterboxTTS.generate_stream`."""
        return self._stream(lambda: self._row(text, language_id, audio_prompt_path, exaggeration, cfg_weight,
                                              temperature, repetition_penalty, min_p, top_p, conds, seed, generator,
                                              max_new_tokens),
                            split_text=split_text, chunk_size=chunk_size, output=output)

    def _row(self, text, language_id, audio_prompt_path, exaggeration, cfg_weight, temperature, repetition_penalty,
             min_p, top_p, conds, seed, generator, max_new_tokens) -> dict:
        language = _language(language_id)
        self._check_common(text, max_new_tokens)
        voice = self._voice(conds, audio_prompt_path, exaggeration)
        params = self._params(temperature=temperature, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty,
                              cfg_weight=cfg_weight)
        return dict(text=text, voice=voice, params=params, exaggeration=exaggeration, max_new_tokens=max_new_tokens,
                    seed=seed, generator=generator, language=language)

    def _stream_holdback(self) -> int:
        return SAMPLES_PER_TOKEN  # the last token's audio is dropped at the end

    def _stream_keep(self, n_speech: int) -> Optional[int]:
        return max(1, n_speech - 1) * SAMPLES_PER_TOKEN

    def generate_batch(self, texts, language_id, *, conds=None, audio_prompt_path=None, seed=None,
                       exaggeration=0.5, cfg_weight=0.5, temperature=0.8, repetition_penalty=1.2, min_p=0.05,
                       top_p=1.0, max_new_tokens=1000, split_text: bool = False) -> list[torch.Tensor]:
        """Speak many texts at once; `language_id` and every argument a scalar or one value per text."""
        n = len(texts) if isinstance(texts, (list, tuple)) else 0
        languages = [_language(x) for x in per_row("language_id", language_id, n)]
        return self._batch(texts, conds=conds, audio_prompt_path=audio_prompt_path, seed=seed, split_text=split_text,
                           languages=languages,
                           knobs=dict(repetition_penalty=repetition_penalty, min_p=min_p, top_p=top_p,
                                      exaggeration=exaggeration, cfg_weight=cfg_weight, temperature=temperature,
                                      max_new_tokens=max_new_tokens))
