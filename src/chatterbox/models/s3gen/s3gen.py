"""S3Gen: S3 speech tokens + a reference voice -> 24 kHz waveform.

`S3Token2Mel` holds the reference front ends (S3 tokenizer, CAM++ speaker encoder, 24 kHz mel) and
the token-to-mel flow; `S3Token2Wav` (exported as `S3Gen`) adds the HiFT vocoder and the start fade.
Signatures, defaults and attribute names are upstream's; keyword-only extras make randomness
explicit: `generator` (one `torch.Generator` for every draw, in upstream's order), `noise` (the full
initial CFM sample, prompt frames included) and `deterministic_vocoder` (HiFT with zero phase
offsets and no noise). Same generator seed => same audio, eager or compiled.

Differences from upstream that users may notice: a given `ref_dict` is not modified in place (and
its integer tokens are not cast to float); out-of-range speech tokens raise `ValueError`;
`n_cfm_timesteps=0` raises instead of silently meaning the default; the start fade is applied out
of place and also works for outputs shorter than 40 ms.
"""
from __future__ import annotations

import functools
import logging
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor, nn

from ...audio import resample
from ..s3tokenizer import S3_SR, SPEECH_VOCAB_SIZE, S3Tokenizer
from .configs import CFM_PARAMS
from .const import S3GEN_SR
from .decoder import ConditionalDecoder
from .f0_predictor import ConvRNNF0Predictor
from .flow import CausalMaskedDiffWithXvec
from .flow_matching import CausalConditionalCFM, draw_noise
from .hifigan import HiFTGenerator
from .transformer.upsample_encoder import UpsampleConformerEncoder
from .utils.mel import mel_spectrogram
from .xvector import CAMPPlus

logger = logging.getLogger(__name__)

__all__ = ["S3Token2Mel", "S3Token2Wav", "S3GEN_SR", "S3_SR", "SPEECH_VOCAB_SIZE", "drop_invalid_tokens",
           "get_resampler"]

REF_KEYS = ("prompt_token", "prompt_token_len", "prompt_feat", "prompt_feat_len", "embedding")


def drop_invalid_tokens(x: Tensor) -> Tensor:
    """Keep the speech tokens below SPEECH_VOCAB_SIZE of a batch-1 sequence (data-dependent length)."""
    if x.dim() > 2 or x.shape[0] != 1:
        raise ValueError(f"only a batch of one is supported, got shape {tuple(x.shape)}")
    return x[x < SPEECH_VOCAB_SIZE]


@functools.lru_cache(100)
def get_resampler(src_sr: int, dst_sr: int, device=None) -> Callable[[Tensor], Tensor]:
    """A callable resampling (..., L) from `src_sr` to `dst_sr` (torchaudio's default sinc kernel)."""
    return functools.partial(resample, orig_sr=src_sr, new_sr=dst_sr)


def _fade_in(n_trim: int) -> Tensor:
    """(2 n_trim,) start fade: n_trim zeros, then a raised-cosine ramp from exactly 0 to exactly 1."""
    ramp = (torch.cos(torch.linspace(torch.pi, 0, n_trim)) + 1) / 2
    return torch.cat([torch.zeros(n_trim), ramp])


class S3Token2Mel(nn.Module):
    """Reference front ends + the token-to-mel flow (CFM, or meanflow for Turbo/Nano)."""

    def __init__(self, meanflow: bool = False):
        super().__init__()
        self.tokenizer = S3Tokenizer("speech_tokenizer_v2_25hz")
        self.mel_extractor = mel_spectrogram
        self.speaker_encoder = CAMPPlus(memory_efficient=False)
        self.meanflow = meanflow

        encoder = UpsampleConformerEncoder(
            output_size=512, attention_heads=8, linear_units=2048, num_blocks=6, dropout_rate=0.1,
            positional_dropout_rate=0.1, attention_dropout_rate=0.1, normalize_before=True,
            input_layer="linear", pos_enc_layer_type="rel_pos_espnet", selfattention_layer_type="rel_selfattn",
            input_size=512, use_cnn_module=False, macaron_style=False,
        )
        estimator = ConditionalDecoder(
            in_channels=320, out_channels=80, causal=True, channels=[256], dropout=0.0, attention_head_dim=64,
            n_blocks=4, num_mid_blocks=12, num_heads=8, act_fn="gelu", meanflow=meanflow,
        )
        decoder = CausalConditionalCFM(spk_emb_dim=80, cfm_params=CFM_PARAMS, estimator=estimator)
        self.flow = CausalMaskedDiffWithXvec(encoder=encoder, decoder=decoder)
        self.resamplers = {}

    @property
    def device(self) -> torch.device:
        """Device of the tokenizer's weights."""
        return next(self.tokenizer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the flow's weights."""
        return next(self.flow.parameters()).dtype

    def default_timesteps(self, n_cfm_timesteps: Optional[int]) -> int:
        """None -> 2 (meanflow) or 10; anything below 1 is an error."""
        if n_cfm_timesteps is None:
            return 2 if self.meanflow else 10
        if int(n_cfm_timesteps) < 1:
            raise ValueError(f"n_cfm_timesteps must be >= 1, got {n_cfm_timesteps}")
        return int(n_cfm_timesteps)

    @torch.no_grad()
    def embed_ref(self, ref_wav, ref_sr: int, device="auto", ref_fade_out: bool = True) -> dict:
        """Reference wave (L,) or (1, L) at `ref_sr` -> the ref dict (`ref_fade_out` is unused, as upstream).

        Keys: prompt_token (1, P) int64, prompt_token_len (1,), prompt_feat (1, 2P or 2P+1, 80) 24 kHz
        log-mel, prompt_feat_len None, embedding (1, 192) float32 CAM++ x-vector.
        """
        device = self.device if device == "auto" else torch.device(device)
        if isinstance(ref_wav, np.ndarray):
            ref_wav = torch.from_numpy(ref_wav).float()
        ref_wav = ref_wav.to(device)
        if ref_wav.dim() == 1:
            ref_wav = ref_wav[None]  # (1, L)
        if ref_wav.size(1) > 10 * ref_sr:
            logger.warning("s3gen received a reference longer than 10 s; the pipelines use only the first 10 s")

        wav24 = resample(ref_wav, ref_sr, S3GEN_SR).to(dtype=self.dtype)
        ref_mels = self.mel_extractor(wav24).transpose(1, 2).to(dtype=self.dtype)  # (1, M, 80)

        wav16 = resample(ref_wav, ref_sr, S3_SR)
        x_vector = self.speaker_encoder.inference(wav16.to(dtype=self.dtype))  # (1, 192)
        tokens, token_lens = self.tokenizer(wav16.float())  # (1, P), (1,)

        # the flow needs M == 2P: cut the tokens when the mel is shorter
        if ref_mels.size(1) != 2 * tokens.size(1):
            logger.warning("Reference mel length is not equal to 2 * reference token length.")
            tokens = tokens[:, : ref_mels.size(1) // 2]
            token_lens = token_lens.clamp(max=tokens.size(1))
        return dict(prompt_token=tokens.to(device), prompt_token_len=token_lens, prompt_feat=ref_mels,
                    prompt_feat_len=None, embedding=x_vector)

    def _ref_on_device(self, ref_dict: dict) -> dict:
        """A copy of `ref_dict` on the model device; floating tensors in the model dtype, tokens integer."""
        out = {}
        for key in REF_KEYS:
            v = ref_dict.get(key)
            if isinstance(v, np.ndarray):
                v = torch.from_numpy(v)
            if torch.is_tensor(v):
                floating = v.is_floating_point() and key not in ("prompt_token", "prompt_token_len")
                v = v.to(device=self.device, dtype=self.dtype if floating else torch.long)
            out[key] = v
        if out["prompt_token_len"] is None and out["prompt_token"] is not None:
            p = out["prompt_token"]
            out["prompt_token_len"] = torch.full((p.size(0),), p.size(-1), dtype=torch.long, device=p.device)
        return out

    def forward(self, speech_tokens: Tensor, ref_wav: Optional[Tensor], ref_sr: Optional[int],
                ref_dict: Optional[dict] = None, n_cfm_timesteps: Optional[int] = None, finalize: bool = False,
                speech_token_lens: Optional[Tensor] = None, noised_mels: Optional[Tensor] = None, *,
                noise: Optional[Tensor] = None, generator: Optional[torch.Generator] = None) -> Tensor:
        """Speech tokens (N,) or (B, N) + exactly one of ref_wav/ref_dict -> mel (B, 80, frames)."""
        if (ref_wav is None) == (ref_dict is None):
            raise ValueError("pass exactly one of ref_wav and ref_dict")
        if ref_dict is None:
            ref_dict = self.embed_ref(ref_wav, ref_sr)
        ref = self._ref_on_device(ref_dict)

        speech_tokens = torch.atleast_2d(speech_tokens).to(self.device)
        if speech_token_lens is None:
            b, n = speech_tokens.shape
            speech_token_lens = torch.full((b,), n, dtype=torch.long, device=self.device)
        speech_token_lens = speech_token_lens.to(self.device)
        mel, _ = self.flow.inference(
            token=speech_tokens, token_len=speech_token_lens, finalize=finalize,
            n_timesteps=self.default_timesteps(n_cfm_timesteps), noised_mels=noised_mels, meanflow=self.meanflow,
            noise=noise, generator=generator, **ref,
        )
        return mel


class S3Token2Wav(S3Token2Mel):
    """S3Token2Mel + HiFT vocoder: speech tokens -> 24 kHz waveform (exported as `S3Gen`)."""

    ignore_state_dict_missing = ("tokenizer._mel_filters", "tokenizer.window")

    def __init__(self, meanflow: bool = False):
        super().__init__(meanflow)
        self.mel2wav = HiFTGenerator(
            sampling_rate=S3GEN_SR,
            upsample_rates=[8, 5, 3],
            upsample_kernel_sizes=[16, 11, 7],
            source_resblock_kernel_sizes=[7, 7, 11],
            source_resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5], [1, 3, 5]],
            f0_predictor=ConvRNNF0Predictor(),
        )
        # 20 ms of silence then a 20 ms fade-in, against spill-over from the reference
        self.register_buffer("trim_fade", _fade_in(S3GEN_SR // 50), persistent=False)
        self.estimator_dtype = "fp32"

    def apply_trim_fade(self, wav: Tensor) -> Tensor:
        """Multiply the first len(trim_fade) samples by the start fade (out of place, any length)."""
        n = min(self.trim_fade.numel(), wav.size(-1))
        return torch.cat([wav[..., :n] * self.trim_fade[:n].to(wav.dtype), wav[..., n:]], dim=-1)

    def _meanflow_noise(self, speech_tokens: Tensor, noise: Optional[Tensor],
                        generator: Optional[torch.Generator]) -> Optional[Tensor]:
        """Meanflow's extra draw (1, 80, 2N) for the generated frames, made before the CFM's own draw."""
        if not self.meanflow or noise is not None:
            return None
        return draw_noise((1, 80, 2 * speech_tokens.size(-1)), generator, self.device, self.dtype)

    def forward(self, speech_tokens: Tensor, ref_wav: Optional[Tensor], ref_sr: Optional[int],
                ref_dict: Optional[dict] = None, finalize: bool = False, speech_token_lens: Optional[Tensor] = None,
                skip_vocoder: bool = False, n_cfm_timesteps: Optional[int] = None,
                noised_mels: Optional[Tensor] = None, *, noise: Optional[Tensor] = None,
                generator: Optional[torch.Generator] = None, deterministic_vocoder: bool = False) -> Tensor:
        """Tokens -> waveform (B, L) (or the mel with `skip_vocoder`); the start fade applies in eval mode."""
        mels = super().forward(speech_tokens, ref_wav=ref_wav, ref_sr=ref_sr, ref_dict=ref_dict,
                               n_cfm_timesteps=n_cfm_timesteps, finalize=finalize,
                               speech_token_lens=speech_token_lens, noised_mels=noised_mels, noise=noise,
                               generator=generator)
        if skip_vocoder:
            return mels
        wavs, _ = self.mel2wav.inference(mels, None, generator=generator, deterministic=deterministic_vocoder)
        return wavs if self.training else self.apply_trim_fade(wavs)

    @torch.inference_mode()
    def flow_inference(self, speech_tokens: Tensor, ref_wav: Optional[Tensor] = None, ref_sr: Optional[int] = None,
                       ref_dict: Optional[dict] = None, n_cfm_timesteps: Optional[int] = None,
                       finalize: bool = False, speech_token_lens: Optional[Tensor] = None, *,
                       noise: Optional[Tensor] = None, generator: Optional[torch.Generator] = None) -> Tensor:
        """Tokens -> mel (B, 80, 2N) (aligned reference). 10 CFG steps by default, 2 for meanflow.

        `noise` is the full initial sample (1 or B, 80, 2(P+N)), prompt frames included; when given,
        meanflow draws nothing else. Otherwise draws come from `generator` (or the global RNG).
        """
        noised_mels = self._meanflow_noise(speech_tokens, noise, generator)
        return S3Token2Mel.forward(self, speech_tokens, ref_wav=ref_wav, ref_sr=ref_sr, ref_dict=ref_dict,
                                   n_cfm_timesteps=n_cfm_timesteps, finalize=finalize,
                                   speech_token_lens=speech_token_lens, noised_mels=noised_mels, noise=noise,
                                   generator=generator)

    @torch.inference_mode()
    def hift_inference(self, speech_feat: Tensor, cache_source: Optional[Tensor] = None, *,
                       generator: Optional[torch.Generator] = None, deterministic: bool = False,
                       phase: Optional[Tensor] = None, noise: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """Mel (B, 80, T) -> (waveform (B, 480 T), source (B, 1, 480 T)); randomness as `HiFTGenerator.inference`."""
        return self.mel2wav.inference(speech_feat, cache_source, generator=generator, deterministic=deterministic,
                                      phase=phase, noise=noise)

    @torch.inference_mode()
    def inference(self, speech_tokens: Tensor, ref_wav: Optional[Tensor] = None, ref_sr: Optional[int] = None,
                  ref_dict: Optional[dict] = None, drop_invalid_tokens: bool = True,
                  n_cfm_timesteps: Optional[int] = None, speech_token_lens: Optional[Tensor] = None, *,
                  noise: Optional[Tensor] = None, generator: Optional[torch.Generator] = None,
                  deterministic_vocoder: bool = False) -> tuple[Tensor, Tensor]:
        """Tokens -> (waveform (B, 960 N), source (B, 1, 960 N)) with the start fade applied.

        `drop_invalid_tokens` is accepted and unused, as upstream: pass tokens < SPEECH_VOCAB_SIZE
        (others raise ValueError). `generator` feeds the CFM noise and then HiFT's phases and noise.
        """
        mels = self.flow_inference(speech_tokens, ref_wav=ref_wav, ref_sr=ref_sr, ref_dict=ref_dict,
                                   n_cfm_timesteps=n_cfm_timesteps, finalize=True,
                                   speech_token_lens=speech_token_lens, noise=noise, generator=generator)
        mels = mels.to(dtype=self.dtype)
        wavs, sources = self.hift_inference(mels, None, generator=generator, deterministic=deterministic_vocoder)
        return self.apply_trim_fade(wavs), sources
