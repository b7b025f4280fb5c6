"""Two VoiceStores on one directory (Ray Serve replicas sharing a voices folder): a voice saved by one is
used by the other on first request and listed; one deleted by one is gone from the other; start-up of
one never removes another's upload in progress."""
from __future__ import annotations

import os
import time

import numpy as np
import pytest

pytest.importorskip("av")
sf = pytest.importorskip("soundfile")

from chatterbox.serve.voices import JUNK_AGE_S, VoiceStore  # noqa: E402


class Conds:
    def __init__(self, value: float):
        self.value = value

    def save(self, path) -> None:
        with open(path, "w") as f:
            f.write(repr(self.value))


class Backend:
    """The calls VoiceStore makes: conditionals are the reference's peak, so each voice is recognisable."""

    kind = "nano"
    has_builtin_voice = True

    def __init__(self):
        self.made = self.loaded = 0

    def make_conditionals(self, path):
        self.made += 1
        wav, _ = sf.read(str(path))
        return Conds(round(float(np.abs(wav).max()), 3))

    def load_conditionals(self, path):
        self.loaded += 1
        with open(path) as f:
            return Conds(float(f.read()))


def upload(tmp_path, amp: float):
    p = tmp_path / f"up-{amp}.wav"
    t = np.arange(24000 * 2) / 24000
    sf.write(str(p), (amp * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 24000, subtype="FLOAT")
    return p


def test_voice_saved_by_one_store_is_seen_by_another(tmp_path):
    root = tmp_path / "voices"
    a, b = VoiceStore(root, Backend()), VoiceStore(root, Backend())
    a.load_all(), b.load_all()
    v = a.add("Shared", upload(tmp_path, 0.5))
    assert b.get(v.id).conds.value == 0.5 and b.backend.loaded == 1 and b.backend.made == 0  # conds.pt read
    assert b.get(v.id) is b.get(v.id) and b.backend.loaded == 1  # cached after the first use
    w = a.add("Second", upload(tmp_path, 0.25))
    assert [x.id for x in b.list()] == ["default", v.id, w.id]
    assert b.get("voice_0123456789abcdef") is None and b.get("../voices") is None  # unknown / not an id

    assert b.delete(w.id) and a.get(w.id) is None  # deleted through b: a drops it on the next use
    assert a.delete(v.id) and [x.id for x in b.list()] == ["default"]


def test_start_up_keeps_young_leftovers(tmp_path):
    root = tmp_path / "voices"
    root.mkdir()
    young, old = root / ".tmp-voice_young", root / ".tmp-voice_old"
    young.mkdir(), old.mkdir()
    upload_file = root / ".tmp-upload-abc"
    upload_file.write_bytes(b"partial")
    past = time.time() - JUNK_AGE_S - 60
    os.utime(old, (past, past))
    VoiceStore(root, Backend()).load_all()
    assert young.is_dir() and upload_file.is_file()  # maybe another server's upload in progress
    assert not old.exists()
