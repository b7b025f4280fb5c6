"""ChatterboxTurboTTS: Turbo and Nano (GPT-2 T3, no CFG, meanflow S3Gen in 2 steps), upstream's API."""
from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import torch

from .checkpoints import resolve_device
from .engine import Conditionals, EngineBase
from .models.s3gen.const import S3GEN_SIL
from .models.t3.inference.sampling import SamplingParams
from .reference import norm_loudness as _norm_loudness
from .registry import download_checkpoint, get_spec, load_components
from .text import punc_norm as _punc_norm

logger = logging.getLogger(__name__)

REPO_ID = "ResembleAI/chatterbox-turbo"
NANO_REPO_ID = "ResembleAI/chatterbox-nano"

__all__ = ["ChatterboxTurboTTS", "Conditionals", "punc_norm", "REPO_ID", "NANO_REPO_ID"]


def punc_norm(text: str) -> str:
    """Upstream's Turbo text clean-up (keeps '...', ' - ' and ';')."""
    return _punc_norm(text, "turbo")


class ChatterboxTurboTTS(EngineBase):
    ENC_COND_LEN = 15 * 16000
    DEC_COND_LEN = 10 * 24000
    MIN_PROMPT_SECONDS = 5.0
    N_CFM_TIMESTEPS = 2
    STREAM_TAIL_TOKENS = 3  # the offline path's three trailing silence tokens

    def __init__(self, t3, s3gen, ve, tokenizer, device: str, conds: Optional[Conditionals] = None,
                 model_label: str = "Turbo", *, watermark: bool = True):
        self._init_tts(t3, s3gen, ve, tokenizer, device, conds, watermark)
        self.model_label = model_label

    @classmethod
    def from_local(cls, ckpt_dir, device, nano: bool = False, **kwargs) -> "ChatterboxTurboTTS":
        """Load a Turbo (or, with nano=True, Nano) checkpoint directory with its tokenizer files."""
        device = resolve_device(device)
        c = load_components(get_spec("nano" if nano else "turbo"), ckpt_dir, device)
        return cls(c.t3, c.s3gen, c.ve, c.tokenizer, device, conds=c.conds, model_label="Nano" if nano else "Turbo",
                   **kwargs)

    @classmethod
    def from_pretrained(cls, device, nano: bool = False, **kwargs) -> "ChatterboxTurboTTS":
        """Download `ResembleAI/chatterbox-turbo` (or `-nano`) from the Hub (cached) and load it."""
        device = resolve_device(device)
        return cls.from_local(download_checkpoint(get_spec("nano" if nano else "turbo")), device, nano=nano, **kwargs)

    def norm_loudness(self, wav: np.ndarray, sr: int, target_lufs: float = -27) -> np.ndarray:
        """Scale `wav` to `target_lufs` integrated loudness (ITU-R BS.1770), as upstream's pyloudnorm step."""
        return _norm_loudness(wav, sr, target_lufs)

    def make_conditionals(self, wav_fpath, exaggeration: float = 0.5, norm_loudness: bool = True) -> Conditionals:
        """Build the voice in `wav_fpath` (at least 5 s) without touching `self.conds`."""
        return super().make_conditionals(wav_fpath, exaggeration, norm_loudness=norm_loudness)

    def prepare_conditionals(self, wav_fpath, exaggeration: float = 0.5, norm_loudness: bool = True) -> None:
        """Make the voice in `wav_fpath` (at least 5 s) the current voice."""
        super().prepare_conditionals(wav_fpath, exaggeration, norm_loudness=norm_loudness)

    # -------------------------------------------------------------- hooks
    def _text_ids(self, text: str, language: Optional[str]) -> torch.Tensor:
        return self.tokenizer(punc_norm(text), return_tensors="pt", padding=True, truncation=True).input_ids

    def _t3_request(self, ids, t3_cond, params, max_new_tokens, generator):
        from .runtime import t3_decoder as dec

        # upstream's max_gen_len counts the tokens after the first one
        return dec.gpt_request(self.t3, t3_cond, ids.to(self.device), params, max_new_tokens + 1, generator)

    def _params(self, *, temperature, top_p, min_p, repetition_penalty, cfg_weight, top_k=1000) -> SamplingParams:
        if cfg_weight > 0.0 or min_p > 0.0:
            logger.warning("%s ignores cfg_weight and min_p", self.model_label)
        return SamplingParams(temperature=temperature, top_p=top_p, min_p=0.0, top_k=top_k,
                              repetition_penalty=repetition_penalty, cfg_weight=0.0).validate(gpt=True)

    def _s3gen_tokens(self, speech: torch.Tensor) -> torch.Tensor:
        return torch.cat([speech, torch.full((3,), S3GEN_SIL, dtype=speech.dtype, device=speech.device)])

    def _t3_cond(self, voice: Conditionals, exaggeration: float):
        return super()._t3_cond(voice, 0.0)  # Turbo has no emotion input

    # -------------------------------------------------------------- API
    @torch.inference_mode()
    def generate(self, text, repetition_penalty=1.2, min_p=0.00, top_p=0.95, audio_prompt_path=None,
                 exaggeration=0.0, cfg_weight=0.0, temperature=0.8, top_k=1000, norm_loudness=True, *,
                 conds: Optional[Conditionals] = None, seed: Optional[int] = None,
                 generator: Optional[torch.Generator] = None, max_new_tokens: int = 1000,
                 split_text: bool = False) -> torch.Tensor:
        """Speak `text`; returns a float32 (1, N) CPU tensor at 24 kHz. `cfg_weight`, `exaggeration`, `min_p` are ignored."""
        return self._run([self._row(text, repetition_penalty, min_p, top_p, audio_prompt_path, exaggeration, cfg_weight,
                                    temperature, top_k, norm_loudness, conds, seed, generator, max_new_tokens)],
                         split_text=split_text)[0]

    def generate_stream(self, text, repetition_penalty=1.2, min_p=0.00, top_p=0.95, audio_prompt_path=None,
                        exaggeration=0.0, cfg_weight=0.0, temperature=0.8, top_k=1000, norm_loudness=True, *,
                        conds: Optional[Conditionals] = None, seed: Optional[int] = None,
                        generator: Optional[torch.Generator] = None, max_new_tokens: int = 1000,
                        split_text: bool = False, chunk_size: Optional[int] = None, output: str = "float32"):
        """Speak `text` as a stream of (audio_chunk, metrics); see `ChatterboxTTS.generate_stream`."""
        return self._stream(lambda: self._row(text, repetition_penalty, min_p, top_p, audio_prompt_path, exaggeration,
                                              cfg_weight, temperature, top_k, norm_loudness, conds, seed, generator,
                                              max_new_tokens),
                            split_text=split_text, chunk_size=chunk_size, output=output)

    def _row(self, text, repetition_penalty, min_p, top_p, audio_prompt_path, exaggeration, cfg_weight, temperature,
             top_k, norm_loudness, conds, seed, generator, max_new_tokens) -> dict:
        self._check_common(text, max_new_tokens)
        if exaggeration > 0.0:
            logger.warning("%s ignores exaggeration", self.model_label)
        voice = self._voice(conds, audio_prompt_path, exaggeration, norm_loudness=norm_loudness)
        params = self._params(temperature=temperature, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty,
                              cfg_weight=cfg_weight, top_k=top_k)
        return dict(text=text, voice=voice, params=params, exaggeration=0.0, max_new_tokens=max_new_tokens, seed=seed,
                    generator=generator)

    def generate_batch(self, texts, *, conds=None, audio_prompt_path=None, seed=None, repetition_penalty=1.2,
                       min_p=0.0, top_p=0.95, exaggeration=0.0, cfg_weight=0.0, temperature=0.8, top_k=1000,
                       max_new_tokens=1000, norm_loudness: bool = True, split_text: bool = False) -> list[torch.Tensor]:
        """Speak many texts at once; each argument is a scalar or one value per text (row i = `generate(texts[i], ...)`)."""
        return self._batch(texts, conds=conds, audio_prompt_path=audio_prompt_path, seed=seed, split_text=split_text,
                           knobs=dict(repetition_penalty=repetition_penalty, min_p=min_p, top_p=top_p,
                                      exaggeration=exaggeration, cfg_weight=cfg_weight, temperature=temperature,
                                      top_k=top_k, max_new_tokens=max_new_tokens),
                           prep=dict(norm_loudness=norm_loudness))
