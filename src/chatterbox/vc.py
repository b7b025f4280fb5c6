"""ChatterboxVC: voice conversion (S3 tokens of the source speech re-synthesised in a target voice)."""
from __future__ import annotations

from typing import Optional

import torch

from .checkpoints import download, load_into, load_weights, require_files, resolve_device
from .engine import Conditionals, EngineBase
from .models.s3gen import S3Gen
from .models.s3tokenizer import S3_SR
from .reference import load_source
from .registry import get_spec
from .runtime.noise import RequestRandomness

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
