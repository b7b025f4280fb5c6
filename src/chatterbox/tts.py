"""ChatterboxTTS: the original English model (Llama T3 with CFG + CFM S3Gen), upstream's API."""
from __future__ import annotations

import logging
from typing import Optional

import torch

from .checkpoints import resolve_device
from .engine import Conditionals, EngineBase
from .registry import download_checkpoint, get_spec, load_components
from .text import punc_norm as _punc_norm

logger = logging.getLogger(__name__)

REPO_ID = "ResembleAI/chatterbox"

__all__ = ["ChatterboxTTS", "Conditionals", "punc_norm", "REPO_ID"]


def punc_norm(text: str) -> str:
    """Upstream's English text clean-up (capitalise, collapse spaces, normalise punctuation, end with a period)."""
    return _punc_norm(text, "english")


class ChatterboxTTS(EngineBase):
    ENC_COND_LEN = 6 * 16000
    DEC_COND_LEN = 10 * 24000

    def __init__(self, t3, s3gen, ve, tokenizer, device: str, conds: Optional[Conditionals] = None, *,
                 watermark: bool = True):
        self._init_tts(t3, s3gen, ve, tokenizer, device, conds, watermark)

    @classmethod
    def from_local(cls, ckpt_dir, device, **kwargs) -> "ChatterboxTTS":
        """Load upstream's checkpoint files from a directory (ve/t3_cfg/s3gen .safetensors, tokenizer.json, optional conds.pt)."""
        device = resolve_device(device)
        c = load_components(get_spec("original"), ckpt_dir, device)
        return cls(c.t3, c.s3gen, c.ve, c.tokenizer, device, conds=c.conds, **kwargs)

    @classmethod
    def from_pretrained(cls, device, **kwargs) -> "ChatterboxTTS":
        """Download `ResembleAI/chatterbox` from the Hugging Face Hub (cached) and load it."""
        device = resolve_device(device)
        return cls.from_local(download_checkpoint(get_spec("original")), device, **kwargs)

    def _text_ids(self, text: str, language: Optional[str]) -> torch.Tensor:
        return self.tokenizer.text_to_tokens(punc_norm(text))

    @torch.inference_mode()
    def generate(self, text, repetition_penalty=1.2, min_p=0.05, top_p=1.0, audio_prompt_path=None,
                 exaggeration=0.5, cfg_weight=0.5, temperature=0.8, *, conds: Optional[Conditionals] = None,
                 seed: Optional[int] = None, generator: Optional[torch.Generator] = None, max_new_tokens: int = 1000,
                 split_text: bool = False) -> torch.Tensor:
        """Speak `text`; returns a float32 (1, N) CPU tensor at `self.sr` (24 kHz).

        Extras beyond upstream (keyword-only): `conds` (a voice from `make_conditionals`, this call
        only), `seed`/`generator`, `max_new_tokens` (25 per second), `split_text` (long text in
        sentence pieces, decoded as one batch and crossfaded). `cfg_weight=0` runs without guidance.
        """
        return self._run([self._row(text, repetition_penalty, min_p, top_p, audio_prompt_path, exaggeration, cfg_weight,
                                    temperature, conds, seed, generator, max_new_tokens)], split_text=split_text)[0]

    def generate_stream(self, text, repetition_penalty=1.2, min_p=0.05, top_p=1.0, audio_prompt_path=None,
                        exaggeration=0.5, cfg_weight=0.5, temperature=0.8, *, conds: Optional[Conditionals] = None,
                        seed: Optional[int] = None, generator: Optional[torch.Generator] = None,
                        max_new_tokens: int = 1000, split_text: bool = False, chunk_size: Optional[int] = None,
                        output: str = "float32"):
        """Speak `text` as a stream: yields (audio_chunk, metrics) while T3 is still decoding.

        `audio_chunk` is a (1, n) float32 CPU tensor at 24 kHz (little-endian int16 bytes with
        `output="pcm16"`); `metrics` a `StreamMetrics`. Same arguments and errors as `generate`;
        `chunk_size` = speech tokens of the first chunk (25 per second; later chunks grow).
        Closing the iterator cancels the request. The same seed gives the same stream.
        """
        return self._stream(lambda: self._row(text, repetition_penalty, min_p, top_p, audio_prompt_path, exaggeration,
                                              cfg_weight, temperature, conds, seed, generator, max_new_tokens),
                            split_text=split_text, chunk_size=chunk_size, output=output)

    def _row(self, text, repetition_penalty, min_p, top_p, audio_prompt_path, exaggeration, cfg_weight, temperature,
             conds, seed, generator, max_new_tokens) -> dict:
        """Validate one call's arguments and read its voice once."""
        self._check_common(text, max_new_tokens)
        voice = self._voice(conds, audio_prompt_path, exaggeration)
        params = self._params(temperature=temperature, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty,
                              cfg_weight=cfg_weight)
        return dict(text=text, voice=voice, params=params, exaggeration=exaggeration, max_new_tokens=max_new_tokens,
                    seed=seed, generator=generator)

    def generate_batch(self, texts, *, conds=None, audio_prompt_path=None, seed=None, repetition_penalty=1.2,
                       min_p=0.05, top_p=1.0, exaggeration=0.5, cfg_weight=0.5, temperature=0.8, max_new_tokens=1000,
                       split_text: bool = False) -> list[torch.Tensor]:
        """Speak many texts at once; each argument is a scalar or one value per text. Row i equals
        `generate(texts[i], seed=seed[i], ...)` with the same voice and settings."""
        return self._batch(texts, conds=conds, audio_prompt_path=audio_prompt_path, seed=seed, split_text=split_text,
                           knobs=dict(repetition_penalty=repetition_penalty, min_p=min_p, top_p=top_p,
                                      exaggeration=exaggeration, cfg_weight=cfg_weight, temperature=temperature,
                                      max_new_tokens=max_new_tokens))
