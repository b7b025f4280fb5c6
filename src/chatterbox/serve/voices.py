"""Uploaded voices: validated, prepared once (Conditionals), kept in memory, persisted under a directory.

Layout (one folder per voice, created by writing a temporary folder and renaming it, so a crash
never leaves half a voice):

    <voices_dir>/voice_<hex>/meta.json      {id, name, created_at, created_ns, model_kind, ...}
    <voices_dir>/voice_<hex>/reference.wav  the upload decoded to float32 WAV (what the model was given)
    <voices_dir>/voice_<hex>/conds.pt       Conditionals.save of the prepared voice

On start every folder is reloaded; conditionals saved by another model kind (or unreadable) are
rebuilt from the reference audio and rewritten atomically.

Several servers may share one directory (Ray Serve replicas, on a shared filesystem across nodes):
a voice another server saved is loaded on its first use here (and by `list`), one it deleted is
dropped, and start-up only clears leftovers old enough not to be another server's upload in progress.
"""
from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

logger = logging.getLogger("chatterbox.serve")

BUILTIN_ID = "default"
VOICE_ID = re.compile(r"voice_[0-9a-f]{16}")
JUNK_AGE_S = 3600.0  # start-up removes leftovers older than this (younger: maybe another server's upload)


@dataclass
class Voice:
    id: str
    name: str
    created_at: int
    conds: Any = None  # Conditionals; None for the checkpoint's built-in voice
    builtin: bool = False
    created_ns: int = 0  # creation order across servers sharing the folder (created_at is whole seconds)

    def public(self) -> dict:
        return {"id": self.id, "name": self.name, "created_at": self.created_at, "object": "audio.voice",
                "type": "audio_sample"}


def decode_upload(src: Path, dst: Path, max_seconds: float) -> float:
    """Decode any audio PyAV reads into a float32 WAV at its own rate and channels; returns seconds.

    ValueError when `src` is not audio, empty, or longer than `max_seconds`.
    """
    import av
    import soundfile as sf

    try:
        container = av.open(str(src))
    except Exception as e:  # av raises InvalidDataError and friends for non-media files
        raise ValueError(f"audio_sample is not a readable audio file ({type(e).__name__})") from None
    with container:
        if not container.streams.audio:
            raise ValueError("audio_sample has no audio stream")
        stream = container.streams.audio[0]
        parts: list[np.ndarray] = []
        rate = channels = None
        n = 0
        try:
            for frame in container.decode(stream):
                if rate is None:
                    rate, channels = frame.sample_rate, frame.layout.nb_channels
                    resampler = av.AudioResampler(format="fltp", layout=frame.layout, rate=rate)
                for out in resampler.resample(frame):
                    arr = out.to_ndarray().reshape(channels, -1)
                    parts.append(arr)
                    n += arr.shape[1]
                if n > max_seconds * rate:
                    raise ValueError(f"audio_sample is longer than {max_seconds:g} s; send a shorter clip "
                                     "(5-20 s of clean speech is plenty)")
        except ValueError:
            raise
        except Exception as e:
            raise ValueError(f"audio_sample could not be decoded ({type(e).__name__})") from None
    if not n:
        raise ValueError("audio_sample contains no audio samples")
    wav = np.concatenate(parts, axis=1).T  # (N, C)
    if not np.isfinite(wav).all():
        raise ValueError("audio_sample contains NaN or infinite samples")
    sf.write(str(dst), wav, rate, subtype="FLOAT", format="WAV")
    return n / rate


def _write_json(path: Path, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class VoiceStore:
    """Voice id -> prepared voice; blocking methods (model calls, disk) run in worker threads."""

    def __init__(self, root: Path, backend, *, max_seconds: float = 60.0):
        self.root = Path(root)
        self.backend = backend
        self.max_seconds = max_seconds
        self._voices: dict[str, Voice] = {}
        self._lock = threading.Lock()
        self._builtin = Voice(BUILTIN_ID, "built-in voice", int(time.time()), None, builtin=True)

    # ---------------------------------------------------------------- reads (event loop)
    def get(self, voice_id: str) -> Optional[Voice]:
        """The voice, also one another server sharing the directory saved since `load_all` (None if gone)."""
        if voice_id == BUILTIN_ID:
            return self._builtin if self.backend.has_builtin_voice else None
        with self._lock:
            voice = self._voices.get(voice_id)
        if voice is None:
            return self._load_new(voice_id)
        if not (self.root / voice_id).is_dir():  # deleted through another server
            with self._lock:
                self._voices.pop(voice_id, None)
            return None
        return voice

    def list(self) -> list[Voice]:
        self._sync()
        with self._lock:
            custom = sorted(self._voices.values(), key=lambda v: (v.created_ns or v.created_at * 10**9, v.id))
        return ([self._builtin] if self.backend.has_builtin_voice else []) + custom

    # ---------------------------------------------------------------- blocking (worker threads)
    def _save_conds(self, conds, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        conds.save(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def load_all(self) -> int:
        """Reload every persisted voice (rebuilding conditionals made by another model kind); returns the count."""
        self.root.mkdir(parents=True, exist_ok=True)
        now = time.time()
        for junk in list(self.root.glob(".tmp-*")) + list(self.root.glob(".trash-*")):
            try:
                old = now - junk.stat().st_mtime > JUNK_AGE_S
            except OSError:  # removed meanwhile
                continue
            if old:
                if junk.is_dir():
                    shutil.rmtree(junk, ignore_errors=True)
                else:
                    junk.unlink(missing_ok=True)
        loaded = 0
        for d in sorted(self.root.glob("voice_*")):
            voice = self._load_folder(d)
            if voice is None:
                continue
            with self._lock:
                self._voices[voice.id] = voice
            loaded += 1
        if loaded:
            logger.info("loaded %d voice(s) from %s", loaded, self.root)
        return loaded

    def _load_folder(self, d: Path) -> Optional[Voice]:
        """One persisted voice (conditionals rebuilt when made by another model kind); None if unusable."""
        try:
            meta = json.loads((d / "meta.json").read_text())
            conds = None
            if meta.get("model_kind") == self.backend.kind and (d / "conds.pt").is_file():
                try:
                    conds = self.backend.load_conditionals(d / "conds.pt")
                except (ValueError, OSError) as e:
                    logger.warning("voice %s: conds.pt unreadable (%s); rebuilding from the reference", d.name, e)
            if conds is None:
                conds = self.backend.make_conditionals(d / "reference.wav")
                self._save_conds(conds, d / "conds.pt")
                meta["model_kind"] = self.backend.kind
                tmp = d / "meta.json.tmp"
                _write_json(tmp, meta)
                os.replace(tmp, d / "meta.json")
            return Voice(meta["id"], meta["name"], int(meta["created_at"]), conds,
                         created_ns=int(meta.get("created_ns", 0)))
        except Exception as e:  # one broken folder must not stop the server
            logger.error("skipping voice folder %s: %s: %s", d, type(e).__name__, e)
            return None

    def _load_new(self, voice_id: str) -> Optional[Voice]:
        """A voice another server sharing the directory saved after our `load_all`; None if there is none."""
        if not VOICE_ID.fullmatch(voice_id) or not (self.root / voice_id / "meta.json").is_file():
            return None
        voice = self._load_folder(self.root / voice_id)
        if voice is None:
            return None
        with self._lock:
            return self._voices.setdefault(voice.id, voice)

    def _sync(self) -> None:
        """Pick up voices other servers sharing the directory added, drop those they deleted."""
        try:
            on_disk = {d.name for d in self.root.glob("voice_*") if d.is_dir()}
        except OSError:
            return
        with self._lock:
            gone = set(self._voices) - on_disk
            for vid in gone:
                del self._voices[vid]
            new = on_disk - set(self._voices)
        for vid in sorted(new):
            self._load_new(vid)

    def add(self, name: str, upload: Path, *, consent: Optional[str] = None) -> Voice:
        """Validate and prepare `upload`, persist it atomically, cache it; ValueError for unusable audio."""
        self.root.mkdir(parents=True, exist_ok=True)
        vid = "voice_" + secrets.token_hex(8)
        tmp = self.root / f".tmp-{vid}"
        tmp.mkdir()
        try:
            decode_upload(upload, tmp / "reference.wav", self.max_seconds)
            conds = self.backend.make_conditionals(tmp / "reference.wav")
            created_ns = time.time_ns()
            created = created_ns // 10**9
            self._save_conds(conds, tmp / "conds.pt")
            meta = {"id": vid, "name": name, "created_at": created, "created_ns": created_ns, "object": "audio.voice",
                    "model_kind": self.backend.kind, "reference": "reference.wav", "conds": "conds.pt"}
            if consent:
                meta["consent"] = consent
            _write_json(tmp / "meta.json", meta)
            _fsync_dir(tmp)
            os.rename(tmp, self.root / vid)
            _fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        voice = Voice(vid, name, created, conds, created_ns=created_ns)
        with self._lock:
            self._voices[vid] = voice
        return voice

    def delete(self, voice_id: str) -> bool:
        """Remove a custom voice from memory and disk; False if there is no such voice."""
        with self._lock:
            voice = self._voices.pop(voice_id, None)
        d = self.root / voice_id
        if voice is None or not d.is_dir():
            return voice is not None
        trash = self.root / f".trash-{voice_id}-{secrets.token_hex(4)}"
        os.rename(d, trash)  # gone for a restart at once; the files go next
        _fsync_dir(self.root)
        shutil.rmtree(trash, ignore_errors=True)
        return True
