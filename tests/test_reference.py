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
