"""What the public model classes share: conditionals, reference-voice preparation, the
tokens -> waveform tail, watermarking, seeding, compile switch and the per-model lock.

The public files (`tts.py`, `tts_turbo.py`, `mtl_tts.py`, `vc.py`) stay thin: each says what
differs for its model (files, text front end, T3 call) and leaves the rest here.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from .models.s3gen.const import S3GEN_SR
from .models.s3tokenizer import S3_SR, SPEECH_VOCAB_SIZE
from .models.t3.modules.cond_enc import T3Cond
from .reference import load_reference
from .reference import norm_loudness as _norm_loudness
from .watermark import get_watermarker

logger = logging.getLogger(__name__)

SAMPLES_PER_TOKEN = S3GEN_SR // 25  # 960 output samples per speech token


@dataclass
class Conditionals:
    """A prepared voice: T3 conditioning (`t3`) and the S3Gen reference dict (`gen`). Upstream's `conds.pt` format."""

    t3: T3Cond
    gen: dict

    def to(self, device) -> "Conditionals":
        self.t3 = self.t3.to(device=device)
        for k, v in self.gen.items():
            if torch.is_tensor(v):
                self.gen[k] = v.to(device)
        return self

    def save(self, fpath: Union[str, Path]) -> None:
        t3 = {f.name: getattr(self.t3, f.name) for f in fields(self.t3)}
        torch.save(dict(t3=t3, gen=self.gen), fpath)

    @classmethod
    def load(cls, fpath: Union[str, Path], map_location="cpu") -> "Conditionals":
        if isinstance(map_location, str):
            map_location = torch.device(map_location)
        try:
            d = torch.load(str(fpath), map_location=map_location, weights_only=True)
            return cls(T3Cond(**d["t3"]), d["gen"])
        except FileNotFoundError:
            raise
        except Exception as e:
            raise ValueError(f"{fpath} is not a Chatterbox conditionals file ({type(e).__name__}: {e})") from e


def make_generator(device: str, seed: Optional[int], generator: Optional[torch.Generator]) -> Optional[torch.Generator]:
    """The generator a request draws its noise from: the caller's, a fresh seeded one, or None (global RNG)."""
    if generator is not None:
        return generator
    if seed is None:
        return None
    return torch.Generator(device=torch.device(device)).manual_seed(int(seed))


class EngineBase:
    """State and helpers shared by ChatterboxTTS, ChatterboxTurboTTS, ChatterboxMultilingualTTS and ChatterboxVC."""

    ENC_COND_LEN = 6 * S3_SR
    DEC_COND_LEN = 10 * S3GEN_SR

    def _init_tts(self, t3, s3gen, ve, tokenizer, device: str, conds: Optional[Conditionals], watermark: bool) -> None:
        self._init_engine(device, watermark)
        self.t3, self.s3gen, self.ve, self.tokenizer = t3, s3gen, ve, tokenizer
        self.conds = conds

    def _init_engine(self, device: str, watermark: bool) -> None:
        self.sr = S3GEN_SR
        self.device = device
        self.watermarker = get_watermarker(watermark)
        # One request at a time per model: T3's static caches and compiled graphs are shared state.
        self._lock = threading.RLock()

    # -------------------------------------------------------------- voice
    def _load_ref24(self, wav_fpath, min_seconds: float = 1.0, norm_loudness: bool = False) -> np.ndarray:
        ref24 = load_reference(wav_fpath, S3GEN_SR, min_seconds=min_seconds)
        if norm_loudness:
            ref24 = _norm_loudness(ref24, S3GEN_SR)
        return ref24

    def _embed_gen(self, ref24: np.ndarray) -> dict:
        """S3Gen's reference dict from the first DEC_COND_LEN samples of a 24 kHz reference."""
        return self.s3gen.embed_ref(ref24[: self.DEC_COND_LEN], S3GEN_SR, device=self.device)

    def _build_conditionals(self, ref24: np.ndarray, exaggeration: float) -> Conditionals:
        """Upstream's conditioning recipe: S3Gen ref from 24 kHz; prompt tokens and speaker embedding from 16 kHz."""
        import librosa

        ref16 = librosa.resample(ref24, orig_sr=S3GEN_SR, target_sr=S3_SR)  # soxr_hq, as upstream
        gen = self._embed_gen(ref24)
        prompt_len = self.t3.hp.speech_cond_prompt_len
        prompt_tokens = None
        if prompt_len:
            prompt_tokens, _ = self.s3gen.tokenizer.forward([ref16[: self.ENC_COND_LEN]], max_len=prompt_len)
            prompt_tokens = torch.atleast_2d(prompt_tokens).to(self.device)
        speaker = self.ve.embed_wavs([ref16], sample_rate=S3_SR).float().mean(dim=0, keepdim=True).to(self.device)
        t3_cond = T3Cond(speaker_emb=speaker, cond_prompt_speech_tokens=prompt_tokens,
                         emotion_adv=torch.full((1, 1, 1), float(exaggeration), device=self.device))
        return Conditionals(t3_cond, gen)

    def _conds_for(self, exaggeration: float) -> T3Cond:
        """The current voice's T3 conditioning with this request's exaggeration (no host read, prompt embedding kept)."""
        if getattr(self, "conds", None) is None:
            raise RuntimeError("no voice prepared: pass audio_prompt_path=... or call prepare_conditionals() first "
                               "(the checkpoint directory had no conds.pt built-in voice)")
        c = self.conds.t3
        if c.cond_prompt_speech_tokens is not None and c.cond_prompt_speech_emb is None:
            c.cond_prompt_speech_emb = self.t3.embed_prompt_tokens(c.cond_prompt_speech_tokens)  # once per voice
        return T3Cond(speaker_emb=c.speaker_emb, clap_emb=c.clap_emb,
                      cond_prompt_speech_tokens=c.cond_prompt_speech_tokens,
                      cond_prompt_speech_emb=c.cond_prompt_speech_emb,
                      emotion_adv=torch.full((1, 1, 1), float(exaggeration), device=self.device))

    def _llama_speech(self, text_ids: torch.Tensor, t3_cond: T3Cond, generator: Optional[torch.Generator],
                      max_new_tokens: int, **sampling) -> torch.Tensor:
        """(1, T) text ids without start/stop -> (N,) valid speech ids from the Llama T3 (English, multilingual)."""
        hp = self.t3.hp
        ids = torch.cat([torch.tensor([[hp.start_text_token]]), text_ids.long().cpu(),
                         torch.tensor([[hp.stop_text_token]])], dim=1)
        speech = self.t3.inference(t3_cond=t3_cond, text_tokens=ids.to(self.device), max_new_tokens=max_new_tokens,
                                   generator=generator, **sampling)
        return self._valid_speech(speech)

    # -------------------------------------------------------------- tokens -> audio
    @staticmethod
    def _valid_speech(tokens: torch.Tensor) -> torch.Tensor:
        """(1, N) or (N,) T3 output -> (N,) ids S3Gen can embed (drops start/stop and out-of-vocabulary ids)."""
        tokens = tokens.reshape(-1)
        return tokens[tokens < SPEECH_VOCAB_SIZE]

    def _tokens_to_wav(self, speech: torch.Tensor, ref_dict: dict, generator: Optional[torch.Generator],
                       n_cfm_timesteps: Optional[int] = None) -> torch.Tensor:
        """(N,) speech ids -> (1, M) float32 waveform on the model device."""
        if getattr(self.s3gen, "_length_buckets", None):  # compiled: padded length buckets, no recompiles
            from .runtime.s3gen_buckets import bucketed_inference

            return bucketed_inference(self.s3gen, speech, ref_dict, generator=generator, n_cfm_timesteps=n_cfm_timesteps)
        kw = {} if n_cfm_timesteps is None else {"n_cfm_timesteps": n_cfm_timesteps}
        wav, _ = self.s3gen.inference(speech_tokens=speech[None], ref_dict=ref_dict, generator=generator, **kw)
        return wav

    def _finish(self, wav: torch.Tensor) -> torch.Tensor:
        """Model waveform -> watermarked float32 (1, N) CPU tensor."""
        wav_np = wav.detach().float().reshape(-1).cpu().numpy()
        if wav_np.size:
            wav_np = self.watermarker.apply_watermark(wav_np, sample_rate=self.sr)
        return torch.from_numpy(np.ascontiguousarray(wav_np, dtype=np.float32))[None]

    @staticmethod
    def _empty(reason: str) -> torch.Tensor:
        logger.warning("no speech generated (%s); returning empty audio", reason)
        return torch.zeros(1, 0)

    # -------------------------------------------------------------- speed
    def compile(self, **options) -> "EngineBase":
        """Make this model fast: compiled decode step (CUDA graphs on GPU), compiled S3Gen, optional bf16.

        See `chatterbox.runtime.compile.compile_model` for the options. Returns self.
        """
        from .runtime.compile import compile_model

        with self._lock:
            compile_model(self, **options)
        return self

    def warmup_args(self, text: str) -> tuple:
        """Positional arguments of `generate` for a warm-up request (multilingual adds a language)."""
        return (text,)

    def warmup(self, **options) -> float:
        """Pre-compile the shape buckets (see `chatterbox.runtime.compile.warmup`); returns seconds taken."""
        from .runtime.compile import warmup

        with self._lock:
            return warmup(self, **options)
