"""Signal front ends without torchaudio: resampler, 24 kHz mel, Kaldi fbank."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from chatterbox import audio
from chatterbox.audio import kaldi_fbank, resample, resample_kernel, resampled_length
from chatterbox.models.s3gen.utils.mel import mel_spectrogram
from chatterbox.testing import test_wav
from conftest import load_fixture, rel_err


@pytest.fixture(scope="module")
def frontend():
    return load_fixture("frontend")[0]


def test_resample_matches_torchaudio_fixture(frontend):
    wav16 = resample(frontend["wav24"][None], 24000, 16000)
    assert wav16.shape == frontend["wav16"].shape
    assert rel_err(wav16, frontend["wav16"]) <= 1e-6  # measured 0.0 (bit-exact)


def test_resample_kernel_geometry_and_cache():
    # (p, q, W) per SPEC A.5 and K = 2W + p taps
    for sr_in, sr_out, (p, q, w) in [(24000, 16000, (3, 2, 10)), (44100, 24000, (147, 80, 12)),
                                     (48000, 24000, (2, 1, 13)), (48000, 16000, (3, 1, 19)),
                                     (16000, 24000, (2, 3, 7))]:
        kernel, width = resample_kernel(sr_in, sr_out)
        assert width == w and kernel.shape == (q, 1, 2 * w + p) and kernel.dtype == torch.float32
        assert resample_kernel(sr_in, sr_out)[0] is kernel  # cached
    assert resampled_length(72000, 24000, 16000) == 48000
    assert resampled_length(1001, 24000, 16000) == math.ceil(2 * 1001 / 3)


def test_resample_shapes_dtype_identity():
    x = torch.randn(2, 3, 4410, generator=torch.Generator().manual_seed(0))
    y = resample(x, 44100, 24000)
    assert y.shape == (2, 3, 2400) and y.dtype == x.dtype
    assert torch.allclose(y[1, 2], resample(x[1, 2], 44100, 24000), atol=1e-6)
    assert resample(x, 16000, 16000) is x
    assert resample(x.double(), 44100, 24000).dtype == torch.float64
    with pytest.raises(TypeError):
        resample(torch.zeros(10, dtype=torch.int16), 24000, 16000)


@pytest.mark.parametrize("sr_in,sr_out", [(44100, 24000), (16000, 24000), (48000, 16000)])
def test_resample_preserves_a_tone(sr_in, sr_out):
    f = 440.0
    n = sr_in  # 1 s
    x = torch.sin(2 * math.pi * f * torch.arange(n, dtype=torch.float64) / sr_in).float()
    y = resample(x, sr_in, sr_out)
    ref = torch.sin(2 * math.pi * f * torch.arange(y.shape[-1], dtype=torch.float64) / sr_out).float()
    mid = slice(200, -200)  # away from the zero-padded edges
    assert rel_err(y[mid], ref[mid]) < 1e-3


def test_mel24_matches_fixture(frontend):
    mel = mel_spectrogram(frontend["wav24"][None])
    assert mel.shape == (1, 80, 150)
    assert rel_err(mel, frontend["mel24"]) <= 1e-5  # measured 3.4e-7


def test_mel24_batch_numpy_and_1d(frontend):
    w = frontend["wav24"][:24000]
    one = mel_spectrogram(w)
    assert one.shape == (1, 80, 50)
    both = mel_spectrogram(torch.stack([w, 0.5 * w]))
    assert torch.allclose(both[0], one[0], atol=1e-5)
    assert torch.allclose(mel_spectrogram(w.numpy()), one)


def test_mel24_warns_out_of_range(caplog):
    with caplog.at_level("WARNING"):
        mel_spectrogram(torch.full((4800,), 1.5))
    assert "outside normalized range" in caplog.text


def _fbank_reference(wav: np.ndarray) -> np.ndarray:
    """Kaldi fbank (SPEC F.1 table) written independently in float64 numpy."""
    win, hop, nfft, sr = 400, 160, 512, 16000.0
    m = 1 + (len(wav) - win) // hop
    n = np.arange(win)
    povey = (0.5 - 0.5 * np.cos(2 * np.pi * n / (win - 1))) ** 0.85
    mel = lambda f: 1127.0 * np.log(1.0 + f / 700.0)  # noqa: E731
    lo, hi = mel(20.0), mel(sr / 2)
    centers = lo + (np.arange(80)[:, None] + np.arange(3)[None]) * (hi - lo) / 81  # left, centre, right
    fmel = mel(np.arange(nfft // 2) * sr / nfft)[None]
    up = (fmel - centers[:, :1]) / (centers[:, 1:2] - centers[:, :1])
    down = (centers[:, 2:] - fmel) / (centers[:, 2:] - centers[:, 1:2])
    banks = np.pad(np.maximum(0.0, np.minimum(up, down)), ((0, 0), (0, 1)))
    out = np.empty((m, 80))
    for i in range(m):
        fr = wav[i * hop:i * hop + win].astype(np.float64)
        fr = fr - fr.mean()
        fr = fr - 0.97 * np.concatenate([fr[:1], fr[:-1]])
        spec = np.abs(np.fft.rfft(fr * povey, nfft)) ** 2
        out[i] = np.log(np.maximum(banks @ spec, np.finfo(np.float32).eps))
    return out


def test_kaldi_fbank_against_independent_reference():
    wav = test_wav(16000, 0.5, seed=3)
    ours = kaldi_fbank(wav)
    assert ours.shape == (1 + (8000 - 400) // 160, 80) and ours.dtype == torch.float32
    ref = _fbank_reference(wav.numpy())
    assert np.abs(ours.double().numpy() - ref).max() < 1e-3
    # batched rows equal single-row calls
    both = kaldi_fbank(torch.stack([wav, 0.3 * wav]))
    assert torch.allclose(both[0], ours, atol=1e-5)
    assert torch.allclose(both[1], kaldi_fbank(0.3 * wav), atol=1e-5)


def test_tables_are_cached_per_device():
    kaldi_fbank(torch.zeros(400) + 0.01)
    n = len(audio._FBANK_TABLES)
    kaldi_fbank(torch.ones(800) * 0.01)
    assert len(audio._FBANK_TABLES) == n


def test_front_ends_trace_fullgraph():
    """Dynamo captures the resampler and fbank in one graph each; the mel after one eager call
    (its filterbank comes from librosa/numpy and is cached on first use)."""
    import torch._dynamo

    torch._dynamo.reset()
    x = 0.1 * torch.randn(1, 24000, generator=torch.Generator().manual_seed(0))
    mel_spectrogram(x)  # warm the table cache
    for fn, args in [(resample, (x, 24000, 16000)), (kaldi_fbank, (x[:, :16000],)), (mel_spectrogram, (x,))]:
        compiled = torch.compile(fn, backend="eager", fullgraph=True)
        assert torch.equal(compiled(*args), fn(*args))
