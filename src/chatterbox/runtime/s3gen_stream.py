"""Streaming S3Gen: speech tokens arrive a few at a time, audio leaves in chunks with bounded cost.

One `S3GenStreamer` per request::

    streamer = S3GenStreamer(s3gen, ref_dict, flow_noise=PositionalNoise(rr.flow, 80, device),
                             hift_generator=rr.hift, schedule=ChunkSchedule(sizes=(15, 30, 60)))
    for tokens in token_pieces:          # (N,) speech ids < SPEECH_VOCAB_SIZE, any piece sizes
        for chunk in streamer.push(tokens):
            play(chunk)                  # (1, n) float32 on the model device
    play(streamer.finish())              # the rest (finalize=True)

Default schedule: 20, 30, then 60 new tokens per chunk. The first chunk needs 23 tokens and
returns 0.56 s of audio (40 mel frames minus the 12 held back for the vocoder's crossfade and right
context); later chunks return 2 frames (40 ms) per new token.

Flow (token -> mel). Chunk k commits `schedule.size(k)` new tokens once 3 more (the encoder's
pre-lookahead) have arrived. It runs the flow on one bounded window [prompt | up to
`schedule.context` already committed tokens | the new tokens | 3 look-ahead tokens] with
`finalize=False`; the last chunk (`finish`) appends no look-ahead and runs `finalize=True`. The
reference prompt (tokens, mel, x-vector) conditions every window, exactly as offline. The window's
initial noise is taken by absolute mel frame from `flow_noise` (prompt frames [0, 2P), then the
window's frames at their offline positions 2P + 2s ...), so re-decoded frames start from the noise
they start from offline (`S3Gen.synthesize` uses `flow_noise.window(0, F)`). Window widths are
padded (exactly: `S3Gen.synthesize_mels(pad_to=...)`) to `schedule.buckets`, else the model's
length buckets, else left unpadded; `stream_shapes` lists the widths a schedule can reach and
`warm_stream` runs each once, so a compiled flow never recompiles mid-stream.

Vocoder (mel -> audio). HiFT is not causal (about 13 frames each way, F0 another 5), so every
chunk vocodes the mel of its own flow window from `hift_context` frames before the first sample it
still owes: audio is final up to `hift_lookahead + crossfade` frames before the window's last
mel frame; the first `crossfade` frames of the next chunk's audio are blended with that held-back
tail by complementary raised-cosine (Hann) ramps that sum to exactly 1. The harmonic source is
phase-continuous by construction: its phase offset is set so that at the middle of the crossfade
the new call's sine phases equal the previous call's (cycles are accumulated in float64 from the
F0 of each call), HiFT's random phase offsets are drawn once per request and its additive noise
is taken by absolute sample position (`VocoderNoise`). So a chunk boundary is a crossfade between
two vocodings of nearly the same mel with the same phases: no click. The start fade is applied
once, by absolute sample index.

Length: the stream has exactly the samples of the offline waveform of the same tokens,
480 * (2 (P + N) - M) (960 per token when M = 2P); `extra_tail_tokens` appends that many silence
tokens (S3GEN_SIL) before the last chunk, as Turbo's offline pipeline does. A stream that never
received a token finishes with an empty (1, 0) chunk (no tail tokens are spoken).

`offline_waveform` renders the same tokens in one piece with the same noise sources (the
reference the stream approximates); `iter_stream` drives a streamer over an iterable of token
pieces (T3's token stream, or source-speech tokens for voice conversion of a long recording);
`benchmark_stream` measures the S3Gen cost per chunk and the time to the first chunk's audio.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Sequence

import torch
from torch import Tensor

from ..models.s3gen.const import S3GEN_SIL
from ..models.s3gen.flow import validate_tokens
from ..models.s3gen.s3gen import bucket_for
from .noise import PositionalNoise

logger = logging.getLogger(__name__)

__all__ = ["ChunkSchedule", "ChunkInfo", "S3GenStreamer", "VocoderNoise", "stream_shapes", "warm_stream",
           "offline_waveform", "vocode_offline", "iter_stream", "benchmark_stream"]


@dataclass(frozen=True)
class ChunkSchedule:
    """How a stream is cut: new tokens per chunk (small first, then larger; the last size repeats) and overlaps.

    sizes: new tokens committed by chunk k = sizes[min(k, len - 1)] (25 tokens = 1 s of audio).
    context: committed tokens re-decoded in front of each chunk's new tokens (flow continuity).
    hift_context: mel frames vocoded in front of the first sample still owed (not emitted).
    crossfade: mel frames (480 samples each) blended between consecutive chunks.
    hift_lookahead: mel frames at the end of each window whose audio waits for the next chunk
        (beyond the crossfade), so held-back audio has some right context.
    buckets: total window widths (prompt + window tokens) to pad the flow to; None uses the
        model's `length_buckets`, and no padding when it has none.
    """

    sizes: tuple[int, ...] = (20, 30, 60)
    context: int = 50
    hift_context: int = 18
    crossfade: int = 8
    hift_lookahead: int = 4
    buckets: Optional[tuple[int, ...]] = None

    def __post_init__(self):
        sizes = tuple(int(s) for s in self.sizes)
        object.__setattr__(self, "sizes", sizes)
        if self.buckets is not None:
            object.__setattr__(self, "buckets", tuple(sorted(int(b) for b in self.buckets)))
        if not sizes or min(sizes) < 1:
            raise ValueError(f"chunk sizes must be positive token counts, got {self.sizes}")
        if min(self.context, self.hift_context, self.crossfade, self.hift_lookahead) < 0:
            raise ValueError("context, hift_context, crossfade and hift_lookahead must be >= 0")
        held = self.crossfade + self.hift_lookahead
        if 2 * min(sizes) < held + 2:
            raise ValueError(f"every chunk must add more mel frames (2 per token) than are held back "
                             f"(crossfade + hift_lookahead + 2 = {held + 2}); got sizes {sizes}")
        if 2 * self.context < held + 2:
            raise ValueError(f"context ({self.context} tokens) must cover the held-back audio: "
                             f"need 2 * context >= crossfade + hift_lookahead + 2 = {held + 2}")

    @classmethod
    def from_chunk_size(cls, chunk_size: int, grow: bool = True, **kwargs) -> "ChunkSchedule":
        """`chunk_size` tokens first, then (with `grow`) 2x and 4x that; without `grow` a fixed size."""
        c = int(chunk_size)
        return cls(sizes=(c, 2 * c, 4 * c) if grow else (c,), **kwargs)

    def size(self, k: int) -> int:
        """New tokens of chunk k (0-based)."""
        return self.sizes[min(k, len(self.sizes) - 1)]


@dataclass
class ChunkInfo:
    """What one chunk did (for tests and benchmarks): tokens, flow window, samples emitted, timings."""

    new_tokens: int
    window_tokens: int  # context + new + look-ahead tokens in the flow window (prompt excluded)
    width: int  # flow width after padding (prompt included)
    finalize: bool
    samples: int
    vocoder_frames: int
    flow_s: float = 0.0
    vocoder_s: float = 0.0


class VocoderNoise:
    """HiFT's randomness for one request: phase offsets drawn once, additive noise by absolute sample.

    `phase` (1, H, 1) comes from the generator's first draw (as `HiFTGenerator.draw_noise` makes
    it), then `window(a, b)` gives the source noise (1, H, b - a) for samples [a, b) from a
    `PositionalNoise`, whatever windows were asked for before. `deterministic` gives no phase
    offsets and no noise (the parity-fixture convention).
    """

    def __init__(self, hift, generator: Optional[torch.Generator], device, deterministic: bool = False):
        self.harmonics = hift.nb_harmonics + 1
        self.deterministic = deterministic
        if deterministic:
            self.phase, self._noise = None, None
            return
        dtype = hift.conv_pre.bias.dtype
        phase, _ = hift.draw_noise(torch.zeros(1, hift.conv_pre.in_channels, 0, device=device, dtype=dtype), generator)
        self.phase = phase.float()  # (1, H, 1)
        self._noise = PositionalNoise(generator, self.harmonics, device, block=8 * hift.upsample_scale)

    def window(self, start: int, stop: int) -> Optional[Tensor]:
        """Source noise for samples [start, stop) as (1, H, stop - start), or None when deterministic."""
        return None if self._noise is None else self._noise.window(start, stop)

    def forget_before(self, sample: int) -> None:
        """Free noise wholly before `sample` (a stream never vocodes that far back again)."""
        if self._noise is not None:
            self._noise.forget_before(sample)


def _hann_ramp(n: int, device, dtype) -> Tensor:
    """(n,) rising raised-cosine ramp; ramp + flip(ramp) == 1 exactly at every sample."""
    i = torch.arange(n, device=device, dtype=torch.float64)
    return (0.5 - 0.5 * torch.cos(math.pi * (i + 0.5) / n)).to(dtype)


class _Vocoder:
    """HiFT over consecutive windows of one mel stream, phase-continuous (see the module docstring)."""

    def __init__(self, s3gen, randomness: VocoderNoise):
        self.s3gen = s3gen
        self.hift = s3gen.mel2wav
        self.rand = randomness
        self.hop = self.hift.upsample_scale  # samples per mel frame (480)
        h = randomness.harmonics
        acc = torch.float32 if s3gen.device.type == "mps" else torch.float64  # MPS has no float64
        self.cycles_per_hz = (torch.arange(1, h + 1, dtype=acc, device=s3gen.device)
                              * self.hop / self.hift.sampling_rate)[None, :, None]  # (1, H, 1)

    def run(self, mel: Tensor, start: int, anchor: int, anchor_cycles: Optional[Tensor],
            new_anchor: int) -> tuple[Tensor, Tensor]:
        """Vocode mel frames [start, start + T) -> (wav (1, 480 T), cycles at `new_anchor` (1, H, 1), float64 except on MPS).

        The sine phases at frame `anchor` equal `anchor_cycles` (None: a stream start, `start` = 0);
        cycles count whole periods accumulated before a frame's first sample, modulo 1.
        """
        hift = self.hift
        mel = mel.to(self.s3gen.vocoder_dtype)
        t = mel.size(-1)
        f0 = hift.f0_predictor(mel).clone()  # (1, T) Hz; cloned: a compiled region's output
        cycles = f0.to(self.cycles_per_hz.dtype)[:, None, :] * self.cycles_per_hz  # (1, H, T) periods per frame
        cum = torch.cumsum(cycles, dim=-1)
        if anchor_cycles is None:
            start_cycles = torch.zeros_like(cycles[..., :1])
        else:
            before = cum[..., anchor - start - 1: anchor - start] if anchor > start else torch.zeros_like(cum[..., :1])
            start_cycles = torch.remainder(anchor_cycles - before, 1.0)
        k = new_anchor - start
        upto = cum[..., k - 1: k] if k > 0 else torch.zeros_like(cum[..., :1])
        end_cycles = torch.remainder(start_cycles + upto, 1.0)

        phase = (2 * math.pi) * start_cycles
        if self.rand.phase is not None:
            phase = phase + self.rand.phase.to(phase.dtype)
        noise = self.rand.window(start * self.hop, (start + t) * self.hop)
        source = hift.source(f0, phase.float(), noise).clone()  # (1, 1, 480 T)
        wav = hift.decode(mel, source)[..., : t * self.hop].clone()  # (1, 480 T)
        return wav.float(), end_cycles


class S3GenStreamer:
    """Incremental token -> waveform decoder for one request (see the module docstring).

    s3gen: an `S3Gen` (CFM or meanflow). ref_dict: the voice (`embed_ref` output). flow_noise:
    noise by absolute mel frame (80 channels), e.g. `PositionalNoise(rr.flow, 80, device)`.
    hift_generator: HiFT's generator (phases, then noise by sample); `deterministic_vocoder`
    drops both. n_cfm_timesteps: None = the model default (10 CFM, 2 meanflow).
    extra_tail_tokens: silence tokens appended before the last chunk (Turbo: 3).
    time_chunks: record flow/vocoder seconds per chunk in `chunks` (synchronises CUDA; benchmarks).
    record_mel: keep, per chunk, the mel frames its new audio was vocoded from in `mels` (tests).
    """

    def __init__(self, s3gen, ref_dict: dict, *, flow_noise: PositionalNoise,
                 hift_generator: Optional[torch.Generator] = None, n_cfm_timesteps: Optional[int] = None,
                 schedule: Optional[ChunkSchedule] = None, extra_tail_tokens: int = 0,
                 deterministic_vocoder: bool = False, time_chunks: bool = False, record_mel: bool = False):
        self.s3gen = s3gen
        self.schedule = schedule if schedule is not None else ChunkSchedule()
        self.n_cfm_timesteps = s3gen.default_timesteps(n_cfm_timesteps)
        if int(extra_tail_tokens) < 0:
            raise ValueError(f"extra_tail_tokens must be >= 0, got {extra_tail_tokens}")
        self.extra_tail_tokens = int(extra_tail_tokens)
        self.time_chunks = time_chunks
        self.device = s3gen.device
        self.ref = ref_dict
        p_tok = ref_dict["prompt_token"]
        self.P = int(p_tok.shape[-1])
        self.M = int(ref_dict["prompt_feat"].shape[1])
        if p_tok.dim() != 2 or p_tok.shape[0] != 1:
            raise ValueError(f"ref_dict must hold one voice (prompt_token (1, P)), got {tuple(p_tok.shape)}")
        if not 2 * self.P <= self.M <= 2 * self.P + 1:
            raise ValueError(f"prompt mel must have 2P or 2P + 1 frames (P = {self.P} prompt tokens), got {self.M}")
        if getattr(flow_noise, "channels", 80) != s3gen.flow.output_size:
            raise ValueError(f"flow_noise must have {s3gen.flow.output_size} channels, got {flow_noise.channels}")
        self.flow_noise = flow_noise
        self.lookahead = int(s3gen.flow.pre_lookahead_len)
        self.ratio = int(s3gen.flow.token_mel_ratio)
        buckets = self.schedule.buckets if self.schedule.buckets is not None else s3gen.length_buckets
        self.buckets = tuple(buckets) if buckets else None

        self._prompt_noise = flow_noise.window(0, self.ratio * self.P).clone()  # (1, 80, 2P), kept for every window
        self._vocoder = _Vocoder(s3gen, VocoderNoise(s3gen.mel2wav, hift_generator, self.device,
                                                     deterministic=deterministic_vocoder))
        self._tokens = torch.zeros(0, dtype=torch.long, device=self.device)  # tokens from absolute index _t0 on
        self._t0 = 0
        self._committed = 0  # tokens whose mel frames have been produced
        self._chunk = 0
        self._emitted = 0  # mel frames (output coordinates) whose audio has left
        self._tail: Optional[Tensor] = None  # (1, 480 crossfade) held-back audio of frames [_emitted, ...)
        self._anchor = 0
        self._anchor_cycles: Optional[Tensor] = None
        self._samples_out = 0
        self._finished = False
        self.chunks: list[ChunkInfo] = []
        self.record_mel = record_mel
        self.mels: list[Tensor] = []  # with record_mel: per chunk, the mel frames behind its new audio

    # ------------------------------------------------------------------ public
    @property
    def tokens_received(self) -> int:
        """Speech tokens pushed so far."""
        return self._t0 + self._tokens.numel()

    @property
    def samples_emitted(self) -> int:
        """Samples returned so far."""
        return self._samples_out

    @torch.inference_mode()
    def push(self, tokens: Tensor) -> list[Tensor]:
        """New speech tokens (N,) or (1, N) -> zero or more audio chunks (1, n) float32 on the model device."""
        if self._finished:
            raise RuntimeError("push() after finish(): this stream is closed")
        tokens = self._check(tokens)
        self._tokens = torch.cat([self._tokens, tokens])
        out = []
        while self.tokens_received - self._committed >= self.schedule.size(self._chunk) + self.lookahead:
            out.append(self._step(self.schedule.size(self._chunk), final=False))
        return out

    @torch.inference_mode()
    def finish(self, tokens: Optional[Tensor] = None) -> Tensor:
        """Flush (after pushing `tokens`, if given): the last chunk (1, n), finalize=True, tail tokens included."""
        if self._finished:
            raise RuntimeError("finish() was already called")
        head = self.push(tokens) if tokens is not None else []
        self._finished = True
        if self.tokens_received == 0:
            return torch.zeros(1, 0, device=self.device)
        if self.extra_tail_tokens:
            sil = torch.full((self.extra_tail_tokens,), S3GEN_SIL, dtype=torch.long, device=self.device)
            self._tokens = torch.cat([self._tokens, sil])
        last = self._step(self.tokens_received - self._committed, final=True)
        return torch.cat(head + [last], dim=-1) if head else last

    # ------------------------------------------------------------------ internals
    def _check(self, tokens: Tensor) -> Tensor:
        if not torch.is_tensor(tokens) or tokens.is_floating_point() or tokens.is_complex():
            raise TypeError(f"speech tokens must be an integer tensor, got "
                            f"{tokens.dtype if torch.is_tensor(tokens) else type(tokens).__name__}")
        if tokens.dim() > 2 or (tokens.dim() == 2 and tokens.shape[0] != 1):
            raise ValueError(f"speech tokens must be (N,) or (1, N), got shape {tuple(tokens.shape)}")
        tokens = tokens.reshape(-1).to(device=self.device, dtype=torch.long)
        validate_tokens(tokens, self.s3gen.flow.vocab_size)
        return tokens

    def _sync(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _step(self, n_new: int, final: bool) -> Tensor:
        """One chunk: commit `n_new` tokens (plus look-ahead unless `final`), flow window, vocoder, emit."""
        r, sch = self.ratio, self.schedule
        a = self._committed
        e = a + n_new
        s = max(0, a - sch.context)
        w_end = e if final else e + self.lookahead
        window = self._tokens[s - self._t0: w_end - self._t0]  # (W,)
        n_win = window.numel()
        frames = self.s3gen.flow.mel_length(self.P + n_win, final)  # window frames, prompt included
        width = self.P + n_win if self.buckets is None else bucket_for(self.P + n_win, self.buckets)
        t_start = self._sync() if self.time_chunks else 0.0

        # noise by absolute frame: window frame w < 2P is frame w, w >= 2P is frame w + 2s
        gen = self.flow_noise.window(r * (self.P + s), r * s + frames)
        noise = torch.cat([self._prompt_noise, gen.to(self._prompt_noise.dtype)], dim=-1)
        mel = self.s3gen.synthesize_mels([window], [self.ref], [noise], n_cfm_timesteps=self.n_cfm_timesteps,
                                         finalize=final, pad_to=width)[0].clone()  # frames M..frames of the window
        t_flow = self._sync() if self.time_chunks else 0.0
        # output coordinates (offline frame index minus M): this mel covers [2s, 2P + 2e - M)
        lo = r * s
        hi = lo + mel.size(-1)
        assert hi == r * (self.P + e) - self.M, "flow window does not end where expected"

        emit_to = hi if final else hi - sch.hift_lookahead - sch.crossfade
        start = max(lo, self._emitted - sch.hift_context)
        if self._emitted < lo or emit_to < self._emitted + (sch.crossfade if self._tail is not None else 0):
            raise RuntimeError("internal: the chunk schedule left the vocoder without mel frames")
        new_anchor = emit_to + sch.crossfade // 2
        wav, cycles = self._vocoder.run(mel[..., start - lo:], start, self._anchor, self._anchor_cycles,
                                        min(new_anchor, hi))
        hop = self._vocoder.hop
        owed = wav[..., (self._emitted - start) * hop:]  # audio from the first frame still owed
        if self._tail is not None:
            x = self._tail.size(-1)
            ramp = _hann_ramp(x, owed.device, owed.dtype)
            owed = torch.cat([self._tail * (1 - ramp) + owed[..., :x] * ramp, owed[..., x:]], dim=-1)
        n_out = (emit_to - self._emitted) * hop
        chunk = owed[..., :n_out]
        if not final:
            self._tail = owed[..., n_out: n_out + sch.crossfade * hop].clone()
            self._anchor, self._anchor_cycles = new_anchor, cycles
        chunk = self._fade(chunk)
        if self.record_mel:
            self.mels.append(mel[..., self._emitted - lo: emit_to - lo].float().clone())
        t_voc = self._sync() if self.time_chunks else 0.0

        self.chunks.append(ChunkInfo(new_tokens=n_new, window_tokens=n_win, width=width, finalize=final,
                                     samples=chunk.size(-1), vocoder_frames=mel.size(-1) - (start - lo),
                                     flow_s=t_flow - t_start, vocoder_s=t_voc - t_flow))
        self._committed, self._emitted, self._chunk = e, emit_to, self._chunk + 1
        self._samples_out += chunk.size(-1)
        # forget what no later window can reach
        keep_from = max(0, e - sch.context)
        self._tokens = self._tokens[keep_from - self._t0:]
        self._t0 = keep_from
        self.flow_noise.forget_before(r * (self.P + keep_from))
        self._vocoder.rand.forget_before(max(0, r * keep_from) * hop)
        return chunk

    def _fade(self, chunk: Tensor) -> Tensor:
        """The start fade on samples [_samples_out, _samples_out + n) by absolute index."""
        fade = self.s3gen.trim_fade
        a = self._samples_out
        if a >= fade.numel() or chunk.size(-1) == 0:
            return chunk
        b = min(fade.numel(), a + chunk.size(-1))
        return torch.cat([chunk[..., : b - a] * fade[a:b].to(chunk.dtype), chunk[..., b - a:]], dim=-1)


# ---------------------------------------------------------------------- helpers around the streamer
def iter_stream(streamer: S3GenStreamer, pieces: Iterable[Tensor]) -> Iterator[Tensor]:
    """Feed token pieces (T3's stream, or source-speech tokens for voice conversion) and yield audio chunks."""
    for piece in pieces:
        yield from streamer.push(piece)
    yield streamer.finish()


def stream_shapes(schedule: ChunkSchedule, prompt_tokens: int, buckets: Optional[Sequence[int]] = None, *,
                  lookahead: int = 3, extra_tail_tokens: int = 0, max_chunks: int = 64) -> list[tuple[int, bool]]:
    """Every flow (width, finalize) a stream with this schedule and prompt can run, padded to `buckets`.

    Without buckets the widths are the exact window lengths (each a distinct shape).
    """
    buckets = schedule.buckets if schedule.buckets is not None else buckets
    pad = (lambda n: n) if not buckets else (lambda n: bucket_for(n, buckets))
    shapes: set[tuple[int, bool]] = set()
    committed = 0
    for k in range(max_chunks):
        ctx = min(schedule.context, committed)
        size = schedule.size(k)
        shapes.add((pad(prompt_tokens + ctx + size + lookahead), False))
        # a stream may end after k chunks with 1 .. size_k + lookahead - 1 tokens pending (k = 0: any count)
        for left in range(1, size + lookahead):
            shapes.add((pad(prompt_tokens + ctx + left + extra_tail_tokens), True))
        committed += size
        if committed >= schedule.context and k >= len(schedule.sizes):
            break
    return sorted(shapes)


@torch.inference_mode()
def warm_stream(s3gen, ref_dict: dict, schedule: Optional[ChunkSchedule] = None, *,
                n_cfm_timesteps: Optional[int] = None, extra_tail_tokens: int = 0) -> list[tuple[int, bool]]:
    """Run the flow once at every shape of `stream_shapes` (and one short stream for HiFT); returns the shapes.

    Without buckets (schedule's or model's) windows have no fixed shapes: nothing is run, [] is returned.
    """
    schedule = schedule or ChunkSchedule()
    if schedule.buckets is None and not s3gen.length_buckets:
        logger.info("warm_stream: no length buckets, so stream windows have no fixed shapes to warm")
        return []
    p = int(ref_dict["prompt_token"].shape[-1])
    lookahead = int(s3gen.flow.pre_lookahead_len)
    shapes = stream_shapes(schedule, p, s3gen.length_buckets, lookahead=lookahead,
                           extra_tail_tokens=extra_tail_tokens)
    for width, finalize in shapes:
        n = width - p
        frames = s3gen.flow.mel_length(width, finalize)
        noise = torch.zeros(1, s3gen.flow.output_size, frames, device=s3gen.device)
        s3gen.synthesize_mels([torch.zeros(n, dtype=torch.long, device=s3gen.device)], [ref_dict], [noise],
                              n_cfm_timesteps=n_cfm_timesteps, finalize=finalize, pad_to=width)
    streamer = S3GenStreamer(s3gen, ref_dict, flow_noise=PositionalNoise(torch.Generator().manual_seed(0), 80,
                                                                         s3gen.device),
                             n_cfm_timesteps=n_cfm_timesteps, schedule=schedule, deterministic_vocoder=True)
    n = sum(schedule.size(k) for k in range(len(schedule.sizes) + 1)) + lookahead
    streamer.push(torch.zeros(n, dtype=torch.long, device=s3gen.device))
    streamer.finish()
    return shapes


@torch.inference_mode()
def vocode_offline(s3gen, mel: Tensor, *, hift_generator: Optional[torch.Generator] = None,
                   deterministic_vocoder: bool = False) -> Tensor:
    """A whole mel (1, 80, T) -> waveform (1, 480 T) with the start fade, HiFT's randomness as the streamer draws it."""
    voc = _Vocoder(s3gen, VocoderNoise(s3gen.mel2wav, hift_generator, s3gen.device, deterministic=deterministic_vocoder))
    wav, _ = voc.run(mel, 0, 0, None, 0)
    return s3gen.apply_trim_fade(wav)


@torch.inference_mode()
def offline_waveform(s3gen, ref_dict: dict, tokens: Tensor, *, flow_noise: PositionalNoise,
                     hift_generator: Optional[torch.Generator] = None, n_cfm_timesteps: Optional[int] = None,
                     extra_tail_tokens: int = 0, deterministic_vocoder: bool = False) -> Tensor:
    """The whole-utterance waveform (1, L) of `tokens` with the streamer's noise sources (what a stream approximates).

    Flow noise `flow_noise.window(0, F)` (as `S3Gen.synthesize`), HiFT phases and noise as `VocoderNoise`.
    """
    tokens = tokens.reshape(-1).to(device=s3gen.device, dtype=torch.long)
    if extra_tail_tokens:
        tokens = torch.cat([tokens, torch.full((extra_tail_tokens,), S3GEN_SIL, dtype=torch.long, device=s3gen.device)])
    mel = s3gen.synthesize_mels([tokens], [ref_dict], [flow_noise], n_cfm_timesteps=n_cfm_timesteps)[0]
    return vocode_offline(s3gen, mel, hift_generator=hift_generator, deterministic_vocoder=deterministic_vocoder)


def benchmark_stream(s3gen, ref_dict: dict, *, n_tokens: int = 150, schedule: Optional[ChunkSchedule] = None,
                     n_cfm_timesteps: Optional[int] = None, seed: int = 0, warm: bool = True) -> dict:
    """S3Gen cost per chunk and the time from the first chunk's tokens to its audio (seconds).

    Tokens are pushed one at a time (as T3 produces them); the clock for the first chunk starts
    when its last needed token is pushed. Returns per-chunk flow/vocoder seconds, the first-chunk
    latency, the audio seconds and S3Gen's real-time factor (S3Gen time / audio time).
    """
    schedule = schedule or ChunkSchedule()
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, s3gen.flow.vocab_size, (n_tokens,), generator=g)
    if warm and (schedule.buckets is not None or s3gen.length_buckets):
        warm_stream(s3gen, ref_dict, schedule, n_cfm_timesteps=n_cfm_timesteps)
    streamer = S3GenStreamer(s3gen, ref_dict, flow_noise=PositionalNoise(torch.Generator().manual_seed(seed), 80,
                                                                         s3gen.device),
                             hift_generator=torch.Generator(s3gen.device).manual_seed(seed + 1),
                             n_cfm_timesteps=n_cfm_timesteps, schedule=schedule, time_chunks=True)
    first = None
    total = 0.0
    t0 = time.perf_counter()
    for i in range(n_tokens):
        t = time.perf_counter()
        out = streamer.push(tokens[i: i + 1])
        if out:
            out[-1].cpu()
            dt = time.perf_counter() - t
            total += dt
            first = dt if first is None else first
    t = time.perf_counter()
    last = streamer.finish().cpu()
    total += time.perf_counter() - t
    wall = time.perf_counter() - t0
    audio_s = streamer.samples_emitted / 24000
    del last
    return dict(device=str(s3gen.device), meanflow=bool(s3gen.meanflow), n_tokens=n_tokens,
                schedule=list(schedule.sizes), prompt_tokens=streamer.P,
                first_chunk_s=first if first is not None else total,
                chunks=[dict(new_tokens=c.new_tokens, width=c.width, finalize=c.finalize, samples=c.samples,
                             flow_ms=1e3 * c.flow_s, vocoder_ms=1e3 * c.vocoder_s) for c in streamer.chunks],
                s3gen_s=total, wall_s=wall, audio_s=audio_s, rtf=total / audio_s if audio_s else float("nan"))
