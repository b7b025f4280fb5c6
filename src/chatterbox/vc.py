"""ChatterboxVC: voice conversion (S3 tokens of the source speech re-synthesised in a target voice)."""
from __future__ import annotations

from typing import Optional

import torch

from .checkpoints import download, load_into, load_weights, require_files, resolve_device
import time

import numpy as np

from .engine import Conditionals, EngineBase, StreamMetrics, to_pcm16
from .models.s3gen import S3Gen
from .models.s3tokenizer import S3_SR
from .reference import load_source

MAX_VC_STREAM_SECONDS = 1800.0  # generate_stream converts sources up to 30 min (tokenised in segments)
SOURCE_SEGMENT_SECONDS = 30.0
from .registry import get_spec
from .runtime.noise import PositionalNoise, RequestRandomness

REPO_ID = "ResembleAI/chatterbox"

__all__ = ["ChatterboxVC", "REPO_ID"]


class ChatterboxVC(EngineBase):
    ENC_COND_LEN = 6 * 16000
    DEC_COND_LEN = 10 * 24000

    def __init__(self, s3gen: S3Gen, device: str, ref_dict: Optional[dict] = None, *, watermark: bool = True):
        self._init_engine(device, watermark)
        self.t3 = None
        self.s3gen = s3gen
        self.ref_dict = None if ref_dict is None else {k: v.to(device) if torch.is_tensor(v) else v
                                                       for k, v in ref_dict.items()}

    @classmethod
    def from_local(cls, ckpt_dir, device, **kwargs) -> "ChatterboxVC":
        """Load s3gen.safetensors (and the default target voice from conds.pt if present)."""
        device = resolve_device(device)
        spec = get_spec("original")
        ckpt_dir = require_files(ckpt_dir, [spec.s3gen_file], "ChatterboxVC")
        s3gen = load_into(S3Gen(), load_weights(ckpt_dir / spec.s3gen_file), name=spec.s3gen_file,
                          strict=spec.s3gen_strict)
        ref_dict = None
        if (ckpt_dir / "conds.pt").is_file():
            ref_dict = Conditionals.load(ckpt_dir / "conds.pt", map_location="cpu").gen
        return cls(s3gen.to(device).eval(), device, ref_dict=ref_dict, **kwargs)

    @classmethod
    def from_pretrained(cls, device, **kwargs) -> "ChatterboxVC":
        device = resolve_device(device)
        return cls.from_local(download(REPO_ID, ["s3gen.safetensors", "conds.pt"]), device, **kwargs)

    def set_target_voice(self, wav_fpath) -> None:
        """Make the voice in `wav_fpath` (any rate, >= 1 s) the conversion target."""
        ref = self._embed_gen(self._load_ref24(wav_fpath))
        with self._lock:
            self.ref_dict = ref

    def _target(self, target_voice_path) -> dict:
        """The target voice of one call, read once (upstream: a path becomes the current target)."""
        if target_voice_path:
            self.set_target_voice(target_voice_path)
        ref = self.ref_dict
        if ref is None:
            raise RuntimeError("no target voice: pass target_voice_path=... or call set_target_voice() first")
        return ref

    def _source_tokens(self, audio) -> torch.Tensor:
        wav16 = torch.from_numpy(load_source(audio, S3_SR)).to(self.device)
        tokens, _ = self.s3gen.tokenizer(wav16[None])
        return self._valid_speech(tokens).to(self.device)

    @torch.inference_mode()
    def generate(self, audio, target_voice_path=None, *, seed: Optional[int] = None,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Re-speak the speech in `audio` (a file path) in the target voice; float32 (1, N) CPU tensor at 24 kHz."""
        ref = self._target(target_voice_path)
        speech = self._source_tokens(audio)
        if speech.numel() == 0:
            return self._finish(torch.zeros(1, 0))
        if generator is None and seed is not None:
            generator = torch.Generator().manual_seed(int(seed))
        rnd = RequestRandomness.create(self.device, generator=generator)
        return self._finish(self._s3gen_wavs([speech], [ref], [rnd])[0])

    def generate_stream(self, audio, target_voice_path=None, *, seed: Optional[int] = None,
                        generator: Optional[torch.Generator] = None, chunk_size: Optional[int] = None,
                        output: str = "float32"):
        """Convert a long source as a stream of (audio_chunk, metrics): the source is tokenised in 30 s
        segments and re-synthesised chunk by chunk (sources up to MAX_VC_STREAM_SECONDS)."""
        from .runtime.s3gen_stream import S3GenStreamer

        t0 = time.perf_counter()
        with torch.inference_mode():
            if output not in ("float32", "pcm16"):
                raise ValueError(f"output must be 'float32' or 'pcm16', got {output!r}")
            ref = self._target(target_voice_path)
            schedule = self.stream_schedule(chunk_size)
            wav16 = load_source(audio, S3_SR, max_seconds=MAX_VC_STREAM_SECONDS)
            if generator is None and seed is not None:
                generator = torch.Generator().manual_seed(int(seed))
            rnd = RequestRandomness.create(self.device, generator=generator)
            streamer = S3GenStreamer(self.s3gen, ref, flow_noise=PositionalNoise(rnd.flow, 80, self.s3gen.device),
                                     hift_generator=rnd.hift, schedule=schedule)
        metrics = StreamMetrics()

        def emit(chunk: torch.Tensor):
            metrics.elapsed = time.perf_counter() - t0
            if chunk.shape[-1] == 0:
                return None
            x = self.watermarker.apply_watermark(chunk.float().reshape(-1).cpu().numpy(), sample_rate=self.sr)
            chunk = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None]
            metrics.chunk_count += 1
            metrics.total_audio_duration += chunk.shape[1] / self.sr
            if metrics.latency_to_first_chunk is None:
                metrics.latency_to_first_chunk = metrics.elapsed
            metrics.rtf = metrics.elapsed / metrics.total_audio_duration
            return (to_pcm16(chunk) if output == "pcm16" else chunk), metrics

        seg = int(SOURCE_SEGMENT_SECONDS * S3_SR)
        for start in range(0, len(wav16), seg):
            with torch.inference_mode():
                piece = torch.from_numpy(wav16[start:start + seg]).to(self.device)
                tokens, _ = self.s3gen.tokenizer(piece[None])
                tokens = self._valid_speech(tokens).to(self.device)
                metrics.speech_tokens += tokens.numel()
                outs = streamer.push(tokens) if tokens.numel() else []
            for c in outs:
                got = emit(c)
                if got is not None:
                    yield got
        with torch.inference_mode():
            last = streamer.finish()
        got = emit(last)
        if got is not None:
            yield got
