"""Reference-audio loading (every documented bad input) and BS.1770 loudness."""
from __future__ import annotations

import math

import numpy as np
import pytest
import soundfile as sf
import torch

from chatterbox.reference import integrated_loudness, load_reference, norm_loudness
from chatterbox.testing import test_wav


def _voice(sr: int, seconds: float, seed: int = 0) -> np.ndarray:
    return test_wav(sr, seconds, seed).numpy()


def test_mono_file_same_rate(tmp_path):
    x = _voice(24000, 2.0)
    sf.write(tmp_path / "a.wav", x, 24000, subtype="FLOAT")
    out = load_reference(tmp_path / "a.wav", 24000)
    assert out.dtype == np.float32 and out.ndim == 1
    np.testing.assert_allclose(out, x, atol=1e-6)
    assert isinstance(load_reference(str(tmp_path / "a.wav"), 24000), np.ndarray)  # str path too


@pytest.mark.parametrize("sr", [8000, 44100])
def test_other_rates_are_resampled(tmp_path, sr):
    sf.write(tmp_path / "a.wav", _voice(sr, 1.5), sr)
    out = load_reference(tmp_path / "a.wav", 16000)
    assert out.dtype == np.float32 and abs(len(out) - 24000) <= 1


def test_stereo_becomes_mono(tmp_path):
    left, right = _voice(16000, 1.5, 1), _voice(16000, 1.5, 2)
    sf.write(tmp_path / "s.wav", np.stack([left, right], 1), 16000, subtype="FLOAT")
    out = load_reference(tmp_path / "s.wav", 16000)
    np.testing.assert_allclose(out, (left + right) / 2, atol=1e-6)
    # arrays: (N, C) like soundfile, (C, N) like librosa, and torch tensors
    np.testing.assert_allclose(load_reference(np.stack([left, right], 1), 16000), out, atol=1e-6)
    np.testing.assert_allclose(load_reference(np.stack([left, right]), 16000), out, atol=1e-6)
    np.testing.assert_allclose(load_reference(torch.from_numpy(left), 16000), left)
    assert len(load_reference(_voice(24000, 1.5), 16000, array_sr=24000)) == 24000


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_reference(tmp_path / "missing.wav", 16000)


def test_not_audio_names_the_file(tmp_path):
    fake = tmp_path / "notes.wav"
    fake.write_text("this is a text file, not audio\n" * 50)
    with pytest.raises(ValueError, match="notes.wav"):
        load_reference(fake, 16000)
    truncated = tmp_path / "cut.wav"
    sf.write(truncated, _voice(16000, 2.0), 16000)
    truncated.write_bytes(truncated.read_bytes()[:30])  # header only, corrupt
    with pytest.raises(ValueError, match="cut.wav"):
        load_reference(truncated, 16000)
    with pytest.raises(ValueError, match="not a file"):
        load_reference(tmp_path, 16000)


def test_silent(tmp_path):
    sf.write(tmp_path / "z.wav", np.zeros(32000, np.float32), 16000)
    with pytest.raises(ValueError, match="silent"):
        load_reference(tmp_path / "z.wav", 16000)
    with pytest.raises(ValueError, match="silent"):
        load_reference(np.full(32000, 5e-5, np.float32), 16000)


def test_too_short_names_duration(tmp_path):
    sf.write(tmp_path / "short.wav", _voice(16000, 0.5), 16000)
    with pytest.raises(ValueError, match=r"0\.50 s"):
        load_reference(tmp_path / "short.wav", 16000)
    sf.write(tmp_path / "four.wav", _voice(24000, 4.0), 24000)
    assert len(load_reference(tmp_path / "four.wav", 24000)) == 96000
    with pytest.raises(ValueError, match=r"4\.00 s.*at least 5 s"):
        load_reference(tmp_path / "four.wav", 24000, min_seconds=5.0)


def test_nan_and_inf(tmp_path):
    x = _voice(16000, 2.0)
    x[100] = np.nan
    sf.write(tmp_path / "nan.wav", x, 16000, subtype="FLOAT")
    with pytest.raises(ValueError, match="NaN"):
        load_reference(tmp_path / "nan.wav", 16000)
    y = _voice(16000, 2.0)
    y[5] = np.inf
    with pytest.raises(ValueError, match="infinite"):
        load_reference(y, 16000)


# --- loudness -----------------------------------------------------------------------------------

# Reference readings of pyloudnorm 0.2.0 (Meter(sr), K-weighting) for 5 s 997 Hz sines; BS.1770's
# calibration point is -3.01 LUFS at 0 dBFS, pyloudnorm's cookbook filters read a few 0.01 dB lower.
PYLOUDNORM_997HZ = {48000: -3.05168977268654, 24000: -3.06346631115333, 16000: -3.083227497136297,
                    44100: -3.052412953638152}


@pytest.mark.parametrize("sr", sorted(PYLOUDNORM_997HZ))
def test_sine_loudness(sr):
    s = np.sin(2 * np.pi * 997 * np.arange(5 * sr) / sr)
    assert integrated_loudness(s, sr) == pytest.approx(PYLOUDNORM_997HZ[sr], abs=1e-6)
    assert integrated_loudness(s, sr) == pytest.approx(-3.01, abs=0.08)
    assert integrated_loudness(0.1 * s, sr) == pytest.approx(PYLOUDNORM_997HZ[sr] - 20, abs=1e-6)  # -20 dBFS
    assert integrated_loudness(np.stack([s, s], 1), sr) == pytest.approx(PYLOUDNORM_997HZ[sr] + 10 * math.log10(2))


def test_gating():
    sr = 16000
    s = 0.1 * np.sin(2 * np.pi * 997 * np.arange(4 * sr) / sr)
    padded = np.concatenate([s, np.zeros(8 * sr)])  # silence is gated out (absolute gate):
    # without gates the reading would drop by 10*log10(3) = 4.8 dB; only edge blocks lower it a little
    assert integrated_loudness(padded, sr) == pytest.approx(integrated_loudness(s, sr), abs=0.3)
    quiet = np.concatenate([s, 0.001 * s])  # -40 dB part falls under the relative gate
    assert integrated_loudness(quiet, sr) == pytest.approx(integrated_loudness(s, sr), abs=0.3)
    assert integrated_loudness(np.zeros(sr), sr) == -math.inf


def test_norm_loudness():
    sr = 24000
    x = _voice(sr, 6.0)
    y = norm_loudness(x, sr)
    assert y.dtype == np.float32 and y.shape == x.shape
    assert integrated_loudness(y, sr) == pytest.approx(-27.0, abs=1e-3)
    assert integrated_loudness(norm_loudness(x, sr, target_lufs=-20), sr) == pytest.approx(-20.0, abs=1e-3)
    z = np.zeros(sr, np.float32)
    assert norm_loudness(z, sr) is z  # silent: unchanged
    short = x[: int(0.3 * sr)]
    assert norm_loudness(short, sr) is short  # shorter than one 400 ms block: unchanged


# --- length caps and bounded decoding -------------------------------------------------------------

def _write_long(path, seconds: float, sr: int, channels: int = 1, chunk_s: float = 10.0) -> None:
    """A long PCM_16 file written chunk by chunk, so the test never holds it in memory."""
    chunk = _voice(sr, chunk_s, seed=5)
    with sf.SoundFile(str(path), "w", sr, channels, subtype="PCM_16") as f:
        left = int(seconds * sr)
        while left > 0:
            block = chunk[: min(left, len(chunk))]
            f.write(np.repeat(block[:, None], channels, 1) if channels > 1 else block)
            left -= len(block)


def _peak_bytes(fn):
    import tracemalloc

    tracemalloc.start()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_too_long_reference_refused_from_header(tmp_path):
    from chatterbox.reference import MAX_REFERENCE_SECONDS

    path = tmp_path / "lecture.wav"
    _write_long(path, 150.0, 48000, channels=2)  # 150 s > 120 s
    assert MAX_REFERENCE_SECONDS == 120.0
    with pytest.raises(ValueError, match=r"lecture\.wav is 150\.0 s long, above the limit of 120 s.*right file"):
        load_reference(path, 24000)
    load_reference(_voice(48000, 1.0), 24000, array_sr=48000)  # warm up librosa/soxr outside the measurement
    _, peak = _peak_bytes(lambda: pytest.raises(ValueError, load_reference, path, 24000))
    assert peak < 1_000_000  # decided from the header: nothing decoded (the samples would be 57 MB)
    # the cap can be lifted or moved, and max_seconds still decodes only the start
    out, peak = _peak_bytes(lambda: load_reference(path, 24000, limit_seconds=None, max_seconds=5.0))
    assert len(out) == 5 * 24000 and peak < 6_000_000  # ~2.4 MB measured; all 150 s as mono is 28.8 MB
    assert len(load_reference(path, 24000, limit_seconds=200, max_seconds=2.0)) == 48000


def test_max_seconds_decodes_only_the_start_and_matches_a_full_decode(tmp_path):
    sf.write(tmp_path / "r.wav", _voice(44100, 20.0, 3), 44100, subtype="FLOAT")
    full = load_reference(tmp_path / "r.wav", 24000)
    cut = load_reference(tmp_path / "r.wav", 24000, max_seconds=10.0)
    assert len(cut) == 240000
    np.testing.assert_array_equal(cut, full[:240000])  # the resampling margin makes the cut exact
    short = load_reference(tmp_path / "r.wav", 24000, max_seconds=30.0)  # longer than the file: all of it
    np.testing.assert_array_equal(short, full)
    arr = load_reference(_voice(44100, 20.0, 3), 24000, array_sr=44100, max_seconds=10.0)
    np.testing.assert_array_equal(arr, cut)
    with pytest.raises(ValueError, match="below min_seconds"):
        load_reference(tmp_path / "r.wav", 24000, min_seconds=5.0, max_seconds=2.0)


def test_multichannel_mixed_across_read_blocks(tmp_path):
    left, right, centre = _voice(48000, 5.0, 1), _voice(48000, 5.0, 2), _voice(48000, 5.0, 3)  # 4 blocks
    sf.write(tmp_path / "s.wav", np.stack([left, right, centre], 1), 48000, subtype="FLOAT")
    out = load_reference(tmp_path / "s.wav", 48000)
    np.testing.assert_array_equal(out, np.stack([left, right, centre], 1).mean(axis=1))


def test_array_references_are_capped_too():
    with pytest.raises(ValueError, match=r"121\.0 s long, above the limit of 120 s"):
        load_reference(np.full(121 * 1000, 0.1, np.float32), 16000, array_sr=1000)


def test_header_without_length_is_still_bounded(tmp_path, monkeypatch):
    import chatterbox.reference as ref

    path = tmp_path / "stream.wav"
    _write_long(path, 130.0, 8000)
    monkeypatch.setattr(ref, "_header", lambda p: (None, 8000))  # as for a stream whose length is unknown
    with pytest.raises(ValueError, match=r"121\.0 s long, above the limit of 120 s"):  # stopped at 120 + 1 s
        load_reference(path, 8000)


def test_formats_soundfile_cannot_open_fall_back_with_the_same_bounds(tmp_path, monkeypatch):
    import soundfile

    short, long = tmp_path / "short.wav", tmp_path / "long.wav"
    sf.write(short, _voice(16000, 3.0, 4), 16000, subtype="PCM_16")
    _write_long(long, 125.0, 8000)
    expected = load_reference(short, 16000)

    def no_info(path, *a, **k):
        raise RuntimeError("format not supported")

    monkeypatch.setattr(soundfile, "info", no_info)  # _header asks audioread, decoding goes through librosa
    np.testing.assert_allclose(load_reference(short, 16000), expected, atol=1e-7)
    assert len(load_reference(short, 16000, max_seconds=1.0)) == 16000
    with pytest.raises(ValueError, match=r"125\.0 s long"):
        load_reference(long, 8000)


def test_vc_source_cap(tmp_path):
    from chatterbox.reference import MAX_VC_SOURCE_SECONDS, load_source

    path = tmp_path / "talk.wav"
    _write_long(path, 301.0, 8000)
    assert MAX_VC_SOURCE_SECONDS == 300.0
    with pytest.raises(ValueError, match=r"talk\.wav is 301\.0 s long, above the limit of 300 s.*streaming"):
        load_source(path, 16000)
    assert len(load_source(path, 8000, max_seconds=400)) == 301 * 8000  # streaming passes a larger cap: all of it
    sf.write(tmp_path / "s.wav", _voice(16000, 0.5, 1), 16000)
    assert len(load_source(tmp_path / "s.wav", 16000)) == 8000  # short sources are fine (>= 0.1 s)
    with pytest.raises(ValueError, match="silent"):
        load_source(np.zeros(16000, np.float32), 16000)
    with pytest.raises(FileNotFoundError, match="voice-conversion source"):
        load_source(tmp_path / "missing.wav", 16000)
