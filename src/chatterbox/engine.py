"""What the public model classes share: voices, the request pipeline (text -> T3 -> S3Gen -> audio),
batching, watermarking, seeding, the scheduler and the compile switch.

The public files (`tts.py`, `tts_turbo.py`, `mtl_tts.py`, `vc.py`) stay thin: each says what differs
for its model (text front end, T3 request, defaults) and leaves the pipeline here.

Concurrency: every model has one `runtime.scheduler.Scheduler`; T3 decoding of all concurrent
calls (threads, `generate_batch` rows, streams) is batched on its worker thread. S3Gen runs in the
calling thread (a batch's rows together). A call reads `self.conds` once, so a concurrent voice
change never mixes two voices in one output.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import numpy as np
import torch

from .models.s3gen.const import S3GEN_SR
from .models.s3tokenizer import S3_SR, SPEECH_VOCAB_SIZE
from .models.t3.inference.sampling import SamplingParams
from .models.t3.modules.cond_enc import T3Cond
from .reference import load_reference
from .reference import norm_loudness as _norm_loudness
from .runtime.noise import PositionalNoise, RequestRandomness
from .watermark import get_watermarker

logger = logging.getLogger(__name__)

SAMPLES_PER_TOKEN = S3GEN_SR // 25  # 960 output samples per speech token
MEL_CHANNELS = 80


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
        t3 = {f.name: getattr(self.t3, f.name) for f in fields(self.t3) if f.name != "cond_prompt_speech_emb"}
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
    """The generator a request draws from: the caller's, a fresh seeded one, or None (global RNG)."""
    if generator is not None:
        return generator
    if seed is None:
        return None
    return torch.Generator(device=torch.device(device)).manual_seed(int(seed))


def _finite(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    return float(v)


def per_row(name: str, value: Any, n: int) -> list:
    """A scalar for every row, or a list/tuple with exactly one value per row."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} values for {n} texts")
        return list(value)
    return [value] * n


@dataclass
class StreamMetrics:
    """Running figures of one `generate_stream` call, updated with every chunk."""

    chunk_count: int = 0
    latency_to_first_chunk: Optional[float] = None  # seconds from the call to the first audio
    rtf: Optional[float] = None  # wall seconds so far / audio seconds so far
    total_audio_duration: float = 0.0  # seconds of audio yielded so far
    elapsed: float = 0.0  # wall seconds since the call
    speech_tokens: int = 0  # T3 tokens received so far


def to_pcm16(chunk: torch.Tensor) -> bytes:
    """(1, n) float waveform -> little-endian signed 16-bit PCM bytes (clipped to [-1, 1])."""
    x = np.clip(chunk.detach().float().reshape(-1).cpu().numpy(), -1.0, 1.0)
    return (np.round(x * 32767.0)).astype("<i2").tobytes()


class AudioStream:
    """What `generate_stream` returns: an iterator of (audio_chunk, StreamMetrics).

    `close()` (or dropping the iterator) and `cancel()` stop the request and free its decode slots;
    `cancel()` may be called from any thread (a consumer blocked in `next()` then gets
    `RequestCancelled`). Bad arguments raise on the first `next()`.
    """

    def __init__(self, make_gen):
        self._handles: list = []
        self._gen = make_gen(self._handles)

    def __iter__(self) -> "AudioStream":
        return self

    def __next__(self):
        return next(self._gen)

    def close(self) -> None:
        self._gen.close()

    def cancel(self) -> None:
        for h in list(self._handles):
            h.cancel()


class _Emitter:
    """Turns a request's pieces of audio into output chunks: holds back what may still change.

    `holdback` samples at the end of a piece wait for the piece's end (multilingual drops the last
    token's audio); between pieces the last `join` samples are crossfaded with the next piece's
    start exactly as `audio.crossfade_join` joins offline pieces.
    """

    def __init__(self, sr: int, holdback: int = 0, join_ms: float = 20.0):
        self.sr = sr
        self.holdback = holdback
        self.join = int(round(join_ms * sr / 1000.0))
        self._held = torch.zeros(1, 0)  # not yet emitted, end of the current piece
        self._tail: Optional[torch.Tensor] = None  # the previous piece's last `join` samples
        self.piece_samples = 0

    def push(self, chunk: torch.Tensor) -> torch.Tensor:
        chunk = chunk.detach().float().reshape(1, -1).cpu()
        self.piece_samples += chunk.shape[1]
        buf = torch.cat([self._held, chunk], dim=1)
        keep = min(buf.shape[1], self.holdback)
        out, self._held = buf[:, : buf.shape[1] - keep], buf[:, buf.shape[1] - keep:]
        return self._join(out)

    def _join(self, out: torch.Tensor) -> torch.Tensor:
        if self._tail is not None and out.shape[1]:
            from .audio import crossfade_join

            out = crossfade_join([self._tail, out], self.sr)
            self._tail = None
        return out

    def end_piece(self, chunk: torch.Tensor, keep_samples: Optional[int], last: bool) -> torch.Tensor:
        """Close a piece with its final `chunk`: keep only its first `keep_samples` (None: all); hold the join tail unless `last`."""
        chunk = chunk.detach().float().reshape(1, -1).cpu()
        emitted = self.piece_samples - self._held.shape[1]
        held = torch.cat([self._held, chunk], dim=1)
        if keep_samples is not None:
            held = held[:, : max(0, keep_samples - emitted)]
        self._held = torch.zeros(1, 0)
        self.piece_samples = 0
        out = self._join(held) if held.shape[1] else held
        if last:
            if self._tail is not None:  # the final piece produced nothing: release the held tail
                out, self._tail = torch.cat([self._tail, out], dim=1), None
            return out
        if self._tail is not None:  # an empty piece between two others: keep the older tail
            out, self._tail = torch.cat([self._tail, out], dim=1), None
        cut = max(0, out.shape[1] - self.join)
        self._tail = out[:, cut:]
        return out[:, :cut]


@dataclass
class Job:
    """One utterance through the pipeline: its T3 request, voice and randomness."""

    request: Any  # runtime.t3_decoder.DecodeRequest
    conds: Conditionals
    rnd: RequestRandomness


class EngineBase:
    """State and pipeline shared by ChatterboxTTS, ChatterboxTurboTTS, ChatterboxMultilingualTTS and ChatterboxVC."""

    ENC_COND_LEN = 6 * S3_SR
    DEC_COND_LEN = 10 * S3GEN_SR
    MIN_PROMPT_SECONDS = 1.0
    N_CFM_TIMESTEPS: Optional[int] = None  # S3Gen steps (None: the S3Gen default)

    def _init_tts(self, t3, s3gen, ve, tokenizer, device: str, conds: Optional[Conditionals], watermark: bool) -> None:
        self._init_engine(device, watermark)
        self.t3, self.s3gen, self.ve, self.tokenizer = t3, s3gen, ve, tokenizer
        self.conds = conds

    def _init_engine(self, device: str, watermark: bool) -> None:
        self.sr = S3GEN_SR
        self.device = device
        self.watermarker = get_watermarker(watermark)
        self._lock = threading.RLock()  # guards voice changes and (re)configuration, not requests
        self._scheduler = None
        self._max_batch = 16 if str(device).startswith("cuda") else 4

    # -------------------------------------------------------------- scheduler
    @property
    def scheduler(self):
        """The continuous-batching scheduler that decodes this model's T3 requests (created on first use)."""
        if self._scheduler is None:
            with self._lock:
                if self._scheduler is None:
                    from .runtime.scheduler import Scheduler

                    self._scheduler = Scheduler(self.t3, max_batch=self._max_batch)
        return self._scheduler

    def set_max_batch(self, n: int) -> None:
        """How many requests T3 decodes together (decode slots; a CFG request uses two rows). Set before serving."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"max_batch must be an integer >= 1, got {n!r}")
        self._max_batch = n
        if self._scheduler is not None:
            self._scheduler.configure(max_batch=n)

    def engine_stats(self) -> dict:
        """Scheduler counters: queue_depth, active, max_batch, tokens_generated, requests_done, steps."""
        if getattr(self, "t3", None) is None:
            return dict(queue_depth=0, active=0, max_batch=0, tokens_generated=0, requests_done=0, steps=0)
        if self._scheduler is None:
            return dict(queue_depth=0, active=0, max_batch=self._max_batch, tokens_generated=0, requests_done=0, steps=0)
        return self._scheduler.stats()

    def close(self) -> None:
        """Finish in-flight requests and stop the scheduler thread (idempotent)."""
        if self._scheduler is not None:
            self._scheduler.close()

    # -------------------------------------------------------------- voice
    def _load_ref24(self, wav_fpath, min_seconds: Optional[float] = None, norm_loudness: bool = False) -> np.ndarray:
        ref24 = load_reference(wav_fpath, S3GEN_SR, min_seconds=self.MIN_PROMPT_SECONDS if min_seconds is None
                               else min_seconds)
        if norm_loudness:
            ref24 = _norm_loudness(ref24, S3GEN_SR)
        return ref24

    def _embed_gen(self, ref24: np.ndarray) -> dict:
        """S3Gen's reference dict from the first DEC_COND_LEN samples of a 24 kHz reference."""
        return self.s3gen.embed_ref(ref24[: self.DEC_COND_LEN], S3GEN_SR, device=self.device)

    def _build_conditionals(self, ref24: np.ndarray, exaggeration: float) -> Conditionals:
        """Upstream's conditioning recipe: S3Gen ref from 24 kHz; prompt tokens and speaker embedding from 16 kHz."""
        import librosa

        exaggeration = _finite("exaggeration", exaggeration)
        ref16 = librosa.resample(ref24, orig_sr=S3GEN_SR, target_sr=S3_SR)  # soxr_hq, as upstream
        gen = self._embed_gen(ref24)
        prompt_len = self.t3.hp.speech_cond_prompt_len
        prompt_tokens = None
        if prompt_len:
            prompt_tokens, _ = self.s3gen.tokenizer.forward([ref16[: self.ENC_COND_LEN]], max_len=prompt_len)
            prompt_tokens = torch.atleast_2d(prompt_tokens).to(self.device)
        speaker = self.ve.embed_wavs([ref16], sample_rate=S3_SR).float().mean(dim=0, keepdim=True).to(self.device)
        t3_cond = T3Cond(speaker_emb=speaker, cond_prompt_speech_tokens=prompt_tokens,
                         emotion_adv=torch.full((1, 1, 1), exaggeration, device=self.device))
        return Conditionals(t3_cond, gen)

    def make_conditionals(self, wav_fpath, exaggeration: float = 0.5, **kwargs) -> Conditionals:
        """Build the voice in `wav_fpath` without touching `self.conds` (pass it as `generate(..., conds=)`)."""
        return self._build_conditionals(self._load_ref24(wav_fpath, **kwargs), exaggeration)

    def prepare_conditionals(self, wav_fpath, exaggeration: float = 0.5, **kwargs) -> None:
        """Make the voice in `wav_fpath` the current voice (`self.conds`), as upstream."""
        voice = self.make_conditionals(wav_fpath, exaggeration, **kwargs)
        with self._lock:
            self.conds = voice

    def _voice(self, conds: Optional[Conditionals], audio_prompt_path, exaggeration: float, **prep) -> Conditionals:
        """The voice of one call, read once: `conds`, else the prompt file (upstream: it becomes the current voice), else self.conds."""
        if conds is not None:
            if not isinstance(conds, Conditionals):
                raise TypeError(f"conds must be a Conditionals (from make_conditionals), got {type(conds).__name__}")
            return conds
        if audio_prompt_path:
            voice = self.make_conditionals(audio_prompt_path, exaggeration, **prep)
            with self._lock:
                self.conds = voice
            return voice
        voice = getattr(self, "conds", None)
        if voice is None:
            raise RuntimeError("no voice prepared: pass audio_prompt_path=... or conds=..., or call prepare_conditionals() "
                               "first (the checkpoint directory had no conds.pt built-in voice)")
        return voice

    def _t3_cond(self, voice: Conditionals, exaggeration: float) -> T3Cond:
        """The voice's T3 conditioning with this request's exaggeration (prompt embedding computed once per voice)."""
        c = voice.t3
        if c.cond_prompt_speech_tokens is not None and c.cond_prompt_speech_emb is None:
            c.cond_prompt_speech_emb = self.t3.embed_prompt_tokens(c.cond_prompt_speech_tokens)
        return T3Cond(speaker_emb=c.speaker_emb, clap_emb=c.clap_emb,
                      cond_prompt_speech_tokens=c.cond_prompt_speech_tokens,
                      cond_prompt_speech_emb=c.cond_prompt_speech_emb,
                      # on the host: T3 moves it; the decoder's voice-prefix cache keys it by value
                      emotion_adv=torch.full((1, 1, 1), _finite("exaggeration", exaggeration)))

    # -------------------------------------------------------------- per-model hooks
    def _text_ids(self, text: str, language: Optional[str]) -> torch.Tensor:
        """Normalised text -> (1, T) token ids for T3 (without start/stop for Llama models)."""
        raise NotImplementedError

    def _t3_request(self, ids: torch.Tensor, t3_cond: T3Cond, params: SamplingParams, max_new_tokens: int,
                    generator: Optional[torch.Generator]):
        """The model's DecodeRequest for one utterance."""
        from .runtime import t3_decoder as dec

        hp = self.t3.hp
        ids = torch.cat([torch.tensor([[hp.start_text_token]]), ids.long().cpu(),
                         torch.tensor([[hp.stop_text_token]])], dim=1).to(self.device)
        return dec.llama_request(self.t3, t3_cond, ids, params, max_new_tokens, generator)

    def _s3gen_tokens(self, speech: torch.Tensor) -> torch.Tensor:
        """Valid T3 speech ids (N,) -> the tokens S3Gen vocodes (Turbo appends silence)."""
        return speech

    def _trim_wav(self, wav: torch.Tensor, n_speech: int) -> torch.Tensor:
        """S3Gen's waveform -> this model's output length (multilingual drops the last token's audio)."""
        return wav

    def _params(self, *, temperature, top_p, min_p, repetition_penalty, cfg_weight) -> SamplingParams:
        """This model's validated sampler settings for one request (Llama models: CFG, no top-k)."""
        return SamplingParams(temperature=temperature, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty,
                              cfg_weight=cfg_weight).validate(gpt=False)

    # -------------------------------------------------------------- the pipeline
    def _job(self, text: str, *, voice: Conditionals, params: SamplingParams, exaggeration: float,
             max_new_tokens: int, rnd: RequestRandomness, language: Optional[str] = None) -> Job:
        """Text -> a validated T3 request (raises ValueError/TypeError on bad input, before anything runs)."""
        ids = self._text_ids(text, language)
        req = self._t3_request(ids, self._t3_cond(voice, exaggeration), params, max_new_tokens, rnd.t3)
        self.scheduler.check(req)
        return Job(req, voice, rnd)

    @staticmethod
    def _valid_speech(tokens) -> torch.Tensor:
        """T3 ids -> (N,) ids S3Gen can embed (drops start/stop and other out-of-vocabulary ids)."""
        t = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
        return t[t < SPEECH_VOCAB_SIZE]

    def _decode_jobs(self, jobs: list[Job]) -> list[torch.Tensor]:
        """Submit every job's T3 request at once (they share decode steps); (N_i,) valid speech ids each."""
        handles = [self.scheduler.submit(j.request) for j in jobs]
        try:
            return [self._valid_speech(h.result()).to(self.device) for h in handles]
        except BaseException:
            for h in handles:
                h.cancel()
            raise

    def _vocode(self, jobs: list[Job], speech: list[torch.Tensor]) -> list[torch.Tensor]:
        """Speech ids per job -> model waveforms (1, L_i) on the device; rows with no speech give (1, 0)."""
        out: list[Optional[torch.Tensor]] = [None] * len(jobs)
        rows = [i for i, s in enumerate(speech) if s.numel() > 0]
        for i in range(len(jobs)):
            if i not in rows:
                logger.warning("no speech generated (T3 stopped immediately); returning empty audio")
                out[i] = torch.zeros(1, 0, device=self.device)
        if rows:
            toks = [self._s3gen_tokens(speech[i]) for i in rows]
            wavs = self._s3gen_wavs(toks, [jobs[i].conds.gen for i in rows], [jobs[i].rnd for i in rows])
            for i, w in zip(rows, wavs):
                out[i] = self._trim_wav(w, speech[i].numel())
        return out  # type: ignore[return-value]

    def _s3gen_wavs(self, tokens: list[torch.Tensor], refs: list[dict], rnds: list[RequestRandomness]) -> list[torch.Tensor]:
        """S3Gen for several rows: the flow as one exactly padded batch with noise by absolute frame from each
        row's flow generator, HiFT per row with phases and noise by sample from its own generator (the same
        randomness a stream of the request uses)."""
        from .runtime.s3gen_stream import VocoderNoise

        dev = self.s3gen.device
        mels = self.s3gen.synthesize_mels(tokens, refs, [PositionalNoise(r.flow, MEL_CHANNELS, dev) for r in rnds],
                                          n_cfm_timesteps=self.N_CFM_TIMESTEPS)
        sources = [VocoderNoise(self.s3gen.mel2wav, r.hift, dev) for r in rnds]
        return self.s3gen.vocode(mels, [r.hift for r in rnds], sources=sources)

    def _finish(self, wav: torch.Tensor) -> torch.Tensor:
        """Model waveform -> watermarked float32 (1, N) CPU tensor."""
        wav_np = wav.detach().float().reshape(-1).cpu().numpy()
        if wav_np.size:
            wav_np = self.watermarker.apply_watermark(wav_np, sample_rate=self.sr)
        return torch.from_numpy(np.ascontiguousarray(wav_np, dtype=np.float32))[None]

    def _pieces(self, text: str, split: bool, language: Optional[str]) -> list[str]:
        if not split:
            return [text]
        from .text import split_text

        pieces = split_text(text, language=language)
        if not pieces:
            raise ValueError("text is empty or only whitespace; pass the words to speak")
        return pieces

    def _run(self, rows: list[dict], *, split_text: bool) -> list[torch.Tensor]:
        """rows: one dict per output (text, voice, params, exaggeration, max_new_tokens, seed, generator, language).

        Each row may be split into pieces; every piece of every row is decoded together and vocoded
        together, then each row's pieces are joined with a short crossfade and watermarked.
        """
        with torch.inference_mode():
            return self._run_rows(rows, split_text)

    def _run_rows(self, rows: list[dict], split_text: bool) -> list[torch.Tensor]:
        jobs: list[Job] = []
        owners: list[int] = []
        for i, r in enumerate(rows):
            gen = r["generator"]
            if gen is None and r["seed"] is not None:
                gen = torch.Generator().manual_seed(int(r["seed"]))
            for piece in self._pieces(r["text"], split_text, r.get("language")):
                rnd = RequestRandomness.create(self.device, generator=gen)
                jobs.append(self._job(piece, voice=r["voice"], params=r["params"], exaggeration=r["exaggeration"],
                                      max_new_tokens=r["max_new_tokens"], rnd=rnd, language=r.get("language")))
                owners.append(i)
        speech = self._decode_jobs(jobs)
        wavs = self._vocode(jobs, speech)
        out = []
        for i in range(len(rows)):
            parts = [w for w, o in zip(wavs, owners) if o == i]
            if len(parts) == 1:
                out.append(self._finish(parts[0]))
            else:
                from .audio import crossfade_join

                out.append(self._finish(crossfade_join([p.float().cpu() for p in parts], self.sr)))
        return out

    def _check_common(self, text, max_new_tokens) -> None:
        from .text import validate_text

        validate_text(text, self.MAX_TEXT_CHARS)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")

    MAX_TEXT_CHARS = 8192

    def _batch(self, texts, *, conds, audio_prompt_path, seed, knobs: dict, split_text: bool,
               languages: Optional[list] = None, prep: Optional[dict] = None) -> list[torch.Tensor]:
        """`generate_batch`: every argument a scalar (all rows) or a list (one per row); one output per text, in order."""
        if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
            raise TypeError("texts must be a list of strings (use generate() for one text)")
        n = len(texts)
        if n == 0:
            return []
        per = {k: per_row(k, v, n) for k, v in knobs.items()}
        for t, m in zip(texts, per["max_new_tokens"]):
            self._check_common(t, m)
        conds_rows = per_row("conds", conds, n)
        paths = per_row("audio_prompt_path", audio_prompt_path, n)
        seeds = per_row("seed", seed, n)
        made: dict = {}
        rows = []
        for i in range(n):
            voice = conds_rows[i]
            if voice is None and paths[i]:
                key = (str(paths[i]), float(per["exaggeration"][i]))
                if key not in made:
                    made[key] = self.make_conditionals(paths[i], per["exaggeration"][i], **(prep or {}))
                voice = made[key]
            voice = self._voice(voice, None, per["exaggeration"][i])
            sampling = {k: v[i] for k, v in per.items() if k not in ("exaggeration", "max_new_tokens")}
            rows.append(dict(text=texts[i], voice=voice, params=self._params(**sampling),
                             exaggeration=per["exaggeration"][i], max_new_tokens=per["max_new_tokens"][i],
                             seed=seeds[i], generator=None, language=None if languages is None else languages[i]))
        return self._run(rows, split_text=split_text)

    # -------------------------------------------------------------- streaming
    STREAM_TAIL_TOKENS = 0  # silence tokens S3Gen appends at the end (Turbo: 3, as its offline path)

    def _stream_holdback(self) -> int:
        return 0

    def _stream_keep(self, n_speech: int) -> Optional[int]:
        """Samples a finished piece keeps (None: all S3Gen made)."""
        return None

    def stream_schedule(self, chunk_size: Optional[int] = None):
        """The chunk schedule of `generate_stream`: `chunk_size` tokens first, then growing (default 20, 30, 60)."""
        from .runtime.s3gen_stream import ChunkSchedule

        if chunk_size is None:
            return ChunkSchedule()
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive number of speech tokens (25 per second), got {chunk_size!r}")
        return ChunkSchedule.from_chunk_size(max(chunk_size, 8))

    def _stream(self, make_row, *, split_text: bool, chunk_size: Optional[int], output: str) -> AudioStream:
        """`generate_stream`'s iterator (see `AudioStream`)."""
        return AudioStream(lambda handles: self._stream_gen(make_row, handles, split_text=split_text,
                                                            chunk_size=chunk_size, output=output))

    def _stream_gen(self, make_row, handles: list, *, split_text: bool, chunk_size: Optional[int],
                    output: str) -> Iterator:
        """Generator behind `generate_stream`: T3 tokens as they decode -> S3Gen chunks -> (chunk, metrics).

        `make_row()` validates the arguments and builds the request row, so bad input raises on the
        first `next()`, exactly as `generate` would raise.
        """
        from .runtime.s3gen_stream import S3GenStreamer

        t0 = time.perf_counter()
        with torch.inference_mode():  # never around a `yield`: the consumer's code must not run in inference mode
            row = make_row()
            if output not in ("float32", "pcm16"):
                raise ValueError(f"output must be 'float32' or 'pcm16', got {output!r}")
            schedule = self.stream_schedule(chunk_size)
            gen = row["generator"]
            if gen is None and row["seed"] is not None:
                gen = torch.Generator().manual_seed(int(row["seed"]))
            jobs = [self._job(piece, voice=row["voice"], params=row["params"], exaggeration=row["exaggeration"],
                              max_new_tokens=row["max_new_tokens"],
                              rnd=RequestRandomness.create(self.device, generator=gen), language=row.get("language"))
                    for piece in self._pieces(row["text"], split_text, row.get("language"))]
        handles.extend(self.scheduler.submit(j.request) for j in jobs)  # every piece decodes at once
        metrics = StreamMetrics()
        emitter = _Emitter(self.sr, holdback=self._stream_holdback())

        def emit(chunk: torch.Tensor):
            metrics.elapsed = time.perf_counter() - t0
            if chunk.shape[1] == 0:
                return None
            wav = chunk.numpy().reshape(-1)
            wav = self.watermarker.apply_watermark(wav, sample_rate=self.sr)  # per chunk (see README)
            chunk = torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32))[None]
            metrics.chunk_count += 1
            metrics.total_audio_duration += chunk.shape[1] / self.sr
            if metrics.latency_to_first_chunk is None:
                metrics.latency_to_first_chunk = metrics.elapsed
            metrics.rtf = metrics.elapsed / metrics.total_audio_duration
            return (to_pcm16(chunk) if output == "pcm16" else chunk), metrics

        try:
            for k, (job, h) in enumerate(zip(jobs, handles)):
                with torch.inference_mode():
                    streamer = S3GenStreamer(self.s3gen, job.conds.gen,
                                             flow_noise=PositionalNoise(job.rnd.flow, MEL_CHANNELS, self.s3gen.device),
                                             hift_generator=job.rnd.hift, n_cfm_timesteps=self.N_CFM_TIMESTEPS,
                                             schedule=schedule, extra_tail_tokens=self.STREAM_TAIL_TOKENS)
                n_speech = 0
                for toks in h:
                    metrics.speech_tokens += len(toks)
                    valid = [t for t in toks if t < SPEECH_VOCAB_SIZE]
                    if not valid:
                        continue
                    n_speech += len(valid)
                    with torch.inference_mode():
                        outs = [emitter.push(c) for c in
                                streamer.push(torch.tensor(valid, dtype=torch.long, device=self.s3gen.device))]
                    for out in outs:
                        got = emit(out)
                        if got is not None:
                            yield got
                with torch.inference_mode():
                    last = streamer.finish() if n_speech else torch.zeros(1, 0)
                    out = emitter.end_piece(last, self._stream_keep(n_speech) if n_speech else 0,
                                            last=k == len(jobs) - 1)
                if not n_speech:
                    logger.warning("no speech generated (T3 stopped immediately) for a piece of the stream")
                got = emit(out)
                if got is not None:
                    yield got
        finally:
            for h in handles:
                h.cancel()  # the client went away (generator closed) or an error: free the decode slots

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

        return warmup(self, **options)

