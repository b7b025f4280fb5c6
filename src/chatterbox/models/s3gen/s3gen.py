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

Batched synthesis (`S3Token2Wav.synthesize`, and its halves `synthesize_mels` / `vocode`) runs
many requests through the flow as one padded batch: rows differ in token count and in voice
(prompt tokens, prompt mel, x-vector); masks make the padding exact, each row's mel is cut back to
its own frames, and HiFT (not causal) vocodes each row unpadded. With `set_length_buckets` the
flow's token width is rounded up to a bucket, so compiled code sees a few fixed shapes. The
reference front ends (resampler, mels, CAM++, S3 tokenizer) always compute in float32, whatever
dtype the flow or the whole model was cast to.
"""
from __future__ import annotations

import functools
import logging
from typing import Callable, Optional, Protocol, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...audio import resample
from ..s3tokenizer import S3_SR, SPEECH_VOCAB_SIZE, S3Tokenizer
from .configs import CFM_PARAMS
from .const import S3GEN_SR
from .decoder import ConditionalDecoder
from .f0_predictor import ConvRNNF0Predictor
from .flow import CausalMaskedDiffWithXvec, validate_tokens
from .flow_matching import CausalConditionalCFM, draw_noise
from .hifigan import HiFTGenerator
from .transformer.upsample_encoder import UpsampleConformerEncoder
from .utils.mel import mel_spectrogram
from .xvector import CAMPPlus, extract_feature

logger = logging.getLogger(__name__)

__all__ = ["S3Token2Mel", "S3Token2Wav", "S3GEN_SR", "S3_SR", "SPEECH_VOCAB_SIZE", "drop_invalid_tokens",
           "get_resampler", "bucket_for", "NoiseSource"]

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


def bucket_for(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= n; beyond the largest, round up to a multiple of 256."""
    for b in sorted(buckets):
        if n <= b:
            return int(b)
    return -(-n // 256) * 256


class NoiseSource(Protocol):
    """Noise by absolute position, e.g. `chatterbox.runtime.noise.PositionalNoise` (80 channels)."""

    def window(self, start: int, stop: int) -> Tensor:
        """Positions [start, stop) as (1, 80, stop - start)."""
        ...


def _float32_state(module: nn.Module) -> Optional[dict[str, Tensor]]:
    """None if every floating parameter/buffer of `module` is float32, else float32 copies of all of them."""
    tensors = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    if all(not t.is_floating_point() or t.dtype == torch.float32 for t in tensors.values()):
        return None
    return {k: t.float() if t.is_floating_point() else t for k, t in tensors.items()}


def _call_float32(module: nn.Module, *args):
    """`module(*args)` computed in float32, with temporary float32 weights if the module was cast down."""
    state = _float32_state(module)
    if state is None:
        return module(*args)
    return torch.func.functional_call(module, state, args)


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
        self._length_buckets: Optional[tuple[int, ...]] = None

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
        log-mel, prompt_feat_len None, embedding (1, 192) CAM++ x-vector. Everything here is computed
        and returned in float32 (FFTs reject half precision on CUDA, and bf16 on the CPU); the flow
        casts prompt_feat and embedding to its own dtype when it uses them.
        """
        device = self.device if device == "auto" else torch.device(device)
        if isinstance(ref_wav, np.ndarray):
            ref_wav = torch.from_numpy(ref_wav)
        ref_wav = ref_wav.to(device=device, dtype=torch.float32)
        if ref_wav.dim() == 1:
            ref_wav = ref_wav[None]  # (1, L)
        if ref_wav.size(1) > 10 * ref_sr:
            logger.warning("s3gen received a reference longer than 10 s; the pipelines use only the first 10 s")

        wav24 = resample(ref_wav, ref_sr, S3GEN_SR)
        ref_mels = self.mel_extractor(wav24).transpose(1, 2)  # (1, M, 80)

        wav16 = resample(ref_wav, ref_sr, S3_SR)
        fbank, _, _ = extract_feature(wav16)  # (1, frames, 80) float32
        x_vector = _call_float32(self.speaker_encoder, fbank)  # (1, 192)
        tokens, token_lens = _call_float32(self.tokenizer, wav16)  # (1, P), (1,)

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

    # ---- length buckets and batched flow ----------------------------------------------------------

    @property
    def length_buckets(self) -> Optional[tuple[int, ...]]:
        """Total-token widths (prompt + new) the batched flow pads to, or None (pad to the longest row)."""
        return self._length_buckets

    def set_length_buckets(self, buckets: Optional[Sequence[int]]) -> None:
        """Pad the batched flow's rows to the smallest of these total-token widths (None: no buckets)."""
        if buckets is None or len(buckets) == 0:
            self._length_buckets = None
            return
        b = tuple(sorted(int(x) for x in buckets))
        if b[0] < 1:
            raise ValueError(f"length buckets must be positive, got {buckets}")
        self._length_buckets = b

    def padded_length(self, n_tokens: int) -> int:
        """Token width (prompt + new) the batched flow uses for a longest row of `n_tokens`."""
        return n_tokens if self._length_buckets is None else bucket_for(n_tokens, self._length_buckets)

    def noise_frames(self, ref_dict: dict, n_tokens: int, finalize: bool = True) -> int:
        """Frames of initial flow noise a request of `n_tokens` new tokens needs (prompt frames included)."""
        return self.flow.mel_length(ref_dict["prompt_token"].shape[-1] + int(n_tokens), finalize)

    @torch.inference_mode()
    def synthesize_mels(self, tokens: Sequence[Tensor], refs: Sequence[dict],
                        noise: Sequence[Union[Tensor, NoiseSource]], *, n_cfm_timesteps: Optional[int] = None,
                        finalize: bool = True, pad_to: Optional[int] = None) -> list[Tensor]:
        """Many requests through the flow as one padded batch -> per row its own mel (1, 80, T_i).

        Row i is [prompt_i | tokens_i | padding] with its own voice `refs[i]`; its initial noise is
        `noise[i]`, either a tensor (1, 80, F_i) or a source whose `window(0, F_i)` gives it, with
        F_i = `noise_frames(refs[i], N_i, finalize)` absolute frames from the start of the prompt
        (meanflow uses the same noise for the generated frames: no second draw). The output is
        frames M_i .. F_i (M_i = prompt mel length), exactly what the row gives alone: with
        `finalize=False` the held-back look-ahead frames are each row's own last ones. The token
        width is `pad_to`, else the length bucket of the longest row (`set_length_buckets`), else
        the longest row. Rows with no output frames get (1, 80, 0) and skip the flow.
        """
        b = len(tokens)
        if b == 0 or len(refs) != b or len(noise) != b:
            raise ValueError(f"need as many refs and noises as token rows (>= 1), got {b}, {len(refs)}, {len(noise)}")
        steps = self.default_timesteps(n_cfm_timesteps)
        device, dtype = self.device, self.dtype
        rows = []  # (index, ref, tokens (N,), n_total, mel frames F, prompt mel M)
        out: list[Optional[Tensor]] = [None] * b
        for i in range(b):
            tok = tokens[i]
            if not torch.is_tensor(tok) or tok.is_floating_point():
                raise TypeError(f"tokens[{i}] must be an integer tensor, got {type(tok).__name__}"
                                + (f" of {tok.dtype}" if torch.is_tensor(tok) else ""))
            tok = tok.reshape(-1).to(device=device, dtype=torch.long)
            ref = self._ref_on_device(refs[i])
            if ref["prompt_token"].dim() != 2 or ref["prompt_token"].size(0) != 1:
                raise ValueError(f"refs[{i}] must hold one voice (prompt_token (1, P)), "
                                 f"got {tuple(ref['prompt_token'].shape)}")
            p, m = ref["prompt_token"].size(-1), ref["prompt_feat"].size(1)
            f = self.flow.mel_length(p + tok.numel(), finalize)
            if f - m <= 0:
                out[i] = torch.zeros(1, self.flow.output_size, 0, device=device, dtype=dtype)
                continue
            rows.append((i, ref, tok, p + tok.numel(), f, m))
        if not rows:
            return out  # type: ignore[return-value]

        longest = max(r[3] for r in rows)
        width = self.padded_length(longest) if pad_to is None else int(pad_to)
        if width < longest:
            raise ValueError(f"pad_to={pad_to} is shorter than the longest row ({longest} tokens with its prompt)")
        t_mel = self.flow.mel_length(width, finalize)
        xs, conds, zs, embs = [], [], [], []
        for i, ref, tok, n_total, f, m in rows:
            xs.append(F.pad(torch.cat([ref["prompt_token"].reshape(-1), tok]), (0, width - n_total)))
            feat = ref["prompt_feat"][0].t()  # (80, M)
            conds.append(F.pad(feat, (0, t_mel - m)))
            z = noise[i] if torch.is_tensor(noise[i]) else noise[i].window(0, f)
            z = z.reshape(-1, z.size(-1))
            if tuple(z.shape) != (self.flow.output_size, f):
                raise ValueError(f"noise[{i}] must be (1, {self.flow.output_size}, {f}) (prompt frames included), "
                                 f"got {tuple(noise[i].shape) if torch.is_tensor(noise[i]) else tuple(z.shape)}")
            zs.append(F.pad(z.to(device=device, dtype=dtype), (0, t_mel - f)))
            embs.append(ref["embedding"].reshape(-1))
        x = torch.stack(xs)  # (B', W)
        validate_tokens(x, self.flow.vocab_size)
        x_len = torch.tensor([r[3] for r in rows], dtype=torch.long, device=device)
        mel = self.flow.forward_packed(x, x_len, torch.stack(conds), torch.stack(embs), torch.stack(zs), steps,
                                       self.meanflow, finalize)  # (B', 80, T_mel)
        for k, (i, _ref, _tok, _n, f, m) in enumerate(rows):
            out[i] = mel[k: k + 1, :, m:f]
        return out  # type: ignore[return-value]

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
        wavs, _ = self.mel2wav.inference(mels.to(self.vocoder_dtype), None, generator=generator,
                                         deterministic=deterministic_vocoder)
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
        wavs, sources = self.hift_inference(mels.to(self.vocoder_dtype), None, generator=generator,
                                            deterministic=deterministic_vocoder)
        return self.apply_trim_fade(wavs), sources

    # ---- batched synthesis ------------------------------------------------------------------------

    @property
    def vocoder_dtype(self) -> torch.dtype:
        """Dtype of HiFT's weights (mels are cast to it before vocoding)."""
        return self.mel2wav.conv_pre.bias.dtype

    @torch.inference_mode()
    def vocode(self, mels: Sequence[Tensor], generators: Sequence[Optional[torch.Generator]], *,
               trim_fade: bool = True, sources: Optional[Sequence] = None) -> list[Tensor]:
        """Per-row mels (1, 80, T_i) -> waveforms (1, 480 T_i), HiFT's phases and noise from `generators[i]`.

        HiFT is not causal, so rows are never padded: only rows of equal length run together. Each
        row draws exactly what a single `inference` call draws from its generator, in that order
        (None: the global RNG, rows in order). `sources[i]`, when given, supplies row i's
        randomness instead: `.phase` (1, H, 1) and `.window(0, L)` -> noise (1, H, L) (the pipeline's
        noise by sample position, shared with streaming). `trim_fade` applies the start fade.
        """
        if len(generators) != len(mels):
            raise ValueError(f"need one generator (or None) per mel, got {len(generators)} for {len(mels)}")
        hift, dtype = self.mel2wav, self.vocoder_dtype
        mels = [m.reshape(1, m.size(-2), m.size(-1)).to(device=self.device, dtype=dtype) for m in mels]
        if sources is not None:
            if len(sources) != len(mels):
                raise ValueError(f"need one noise source per mel, got {len(sources)} for {len(mels)}")
            draws = [(src.phase, src.window(0, m.size(-1) * hift.upsample_scale)) if m.size(-1) else None
                     for m, src in zip(mels, sources)]
        else:
            draws = [hift.draw_noise(m, g) if m.size(-1) else None for m, g in zip(mels, generators)]
        out: list[Optional[Tensor]] = [None] * len(mels)
        groups: dict[int, list[int]] = {}
        for i, m in enumerate(mels):
            groups.setdefault(m.size(-1), []).append(i)
        for t, idx in groups.items():
            if t == 0:
                for i in idx:
                    out[i] = mels[i].new_zeros(1, 0)
                continue
            phase = torch.cat([draws[i][0] for i in idx])
            noise = torch.cat([draws[i][1] for i in idx])
            wav, _ = hift.inference(torch.cat([mels[i] for i in idx]), None, phase=phase, noise=noise)
            for k, i in enumerate(idx):
                out[i] = self.apply_trim_fade(wav[k: k + 1]) if trim_fade else wav[k: k + 1]
        return out  # type: ignore[return-value]

    @torch.inference_mode()
    def synthesize(self, tokens: Sequence[Tensor], refs: Sequence[dict], *, flow_noise: Sequence[NoiseSource],
                   hift_generators: Sequence[Optional[torch.Generator]], n_cfm_timesteps: Optional[int] = None,
                   trim_fade: bool = True) -> list[Tensor]:
        """Speech tokens (N_i,) of many requests, each with its own voice -> waveforms (1, 960 N_i - 480 (M_i - 2 P_i)).

        The flow runs all rows as one exactly padded batch (`synthesize_mels`, noise
        `flow_noise[i].window(0, F_i)`), HiFT each row unpadded (`vocode`). Row i's audio equals
        the same request synthesized alone; a single request is a list of one.
        """
        if not (len(tokens) == len(refs) == len(flow_noise) == len(hift_generators)):
            raise ValueError("tokens, refs, flow_noise and hift_generators must have one entry per request")
        mels = self.synthesize_mels(tokens, refs, flow_noise, n_cfm_timesteps=n_cfm_timesteps, finalize=True)
        return self.vocode(mels, hift_generators, trim_fade=trim_fade)

    # ---- compilation hook -------------------------------------------------------------------------

    COMPILE_REGIONS = ("encoder", "estimator", "hift_decode")

    def compile_regions(self, wrap: Optional[Callable[[str, Callable], Callable]]) -> None:
        """Route the flow encoder, the CFM estimator and HiFT's decode through `wrap(name, fn)` (None: eager).

        `fn` is the region's eager bound method; the result is installed as an instance attribute
        (`forward` / `decode`), so the modules, their names and state-dict keys stay unchanged.
        The encoder and estimator see bucketed (static) shapes, HiFT's decode a per-row length.
        """
        regions = {"encoder": (self.flow.encoder, "forward"), "estimator": (self.flow.decoder.estimator, "forward"),
                   "hift_decode": (self.mel2wav, "decode")}
        for name, (module, attr) in regions.items():
            module.__dict__.pop(attr, None)
            if wrap is not None:
                setattr(module, attr, wrap(name, getattr(type(module), attr).__get__(module)))
