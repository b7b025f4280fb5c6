"""VoiceEncoder: state-dict names, window arithmetic, fixture parity, batching and devices."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from chatterbox.models.voice_encoder import VoiceEncConfig, VoiceEncoder
from chatterbox.models.voice_encoder.melspec import melspectrogram
from chatterbox.models.voice_encoder.voice_encoder import frame_step, num_windows
from chatterbox.testing import apply_det_weights, test_wav
from conftest import load_fixture, read_inventory, rel_err


@pytest.fixture(scope="module")
def ve() -> VoiceEncoder:
    return apply_det_weights(VoiceEncoder()).eval()


def test_state_dict_matches_inventory():
    sd = VoiceEncoder().state_dict()
    inv = read_inventory("voice_encoder")
    assert list(sd) == list(inv)
    assert {k: tuple(v.shape) for k, v in sd.items()} == inv


def test_frame_step_and_windows():
    hp = VoiceEncConfig()
    assert frame_step(hp, rate=1.3) == 77
    assert frame_step(hp) == 80  # overlap 0.5, no rate
    expected = {50: 1, 160: 1, 200: 1, 236: 2, 250: 2, 300: 3, 314: 3, 600: 7, 1000: 12}
    for frames, n in expected.items():
        assert num_windows(frames, 77, 160)[0] == n, frames
    assert num_windows(600, 77, 160) == (7, 622)
    assert num_windows(1000, 77, 160) == (12, 1007)
    with pytest.raises(ValueError):
        frame_step(hp, rate=0.05)  # step > 160 frames


def test_melspec_shape():
    wav = test_wav(16000, 1.234, seed=0).numpy()
    mel = melspectrogram(wav)
    assert mel.shape == (40, 1 + len(wav) // 160) and mel.dtype == np.float32
    assert (mel >= 0).all()


@pytest.mark.slow
def test_parity_with_fixture(ve):
    t, _ = load_fixture("voice_encoder")
    ours = ve.embeds_from_wavs([t["wav16"].numpy()], sample_rate=16000)
    assert ours.shape == (1, 256) and ours.dtype == np.float32
    assert rel_err(torch.from_numpy(ours), t["embeds"]) <= 1e-4
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_batch_equals_single_and_chunking(ve):
    a = test_wav(16000, 2.0, seed=1).numpy()
    b = test_wav(16000, 4.5, seed=2).numpy()
    both = ve.embeds_from_wavs([a, b], sample_rate=16000)
    one = np.concatenate([ve.embeds_from_wavs([a], 16000), ve.embeds_from_wavs([b], 16000)])
    np.testing.assert_allclose(both, one, atol=1e-5)
    chunked = ve.embeds_from_wavs([a, b], sample_rate=16000, batch_size=2)
    np.testing.assert_allclose(chunked, both, atol=1e-5)
    spk = ve.embeds_from_wavs([a, b], sample_rate=16000, as_spk=True)
    assert spk.shape == (256,) and abs(np.linalg.norm(spk) - 1) < 1e-5
    assert ve.voice_similarity(both, spk) == pytest.approx(1.0, abs=1e-5)


def test_other_rates_and_tensor_output(ve):
    wav24 = test_wav(24000, 2.0, seed=3).numpy()
    wav16 = test_wav(16000, 2.0, seed=3).numpy()
    e24 = ve.embeds_from_wavs([wav24], sample_rate=24000)
    e16 = ve.embeds_from_wavs([wav16], sample_rate=16000)
    assert e24.shape == (1, 256)
    assert float((e24 @ e16.T)[0, 0]) > 0.99  # same signal at another rate -> nearly the same voice
    t = ve.embed_wavs([wav16], sample_rate=16000)
    assert isinstance(t, torch.Tensor) and t.device == ve.device and t.shape == (1, 256)
    np.testing.assert_allclose(t.numpy(), e16, atol=1e-6)


def test_empty_after_trim_is_a_clear_error(ve):
    with pytest.raises(ValueError, match="empty"):
        ve.embeds_from_wavs([np.zeros(0, np.float32)], sample_rate=16000)


@pytest.mark.gpu
def test_cuda_matches_cpu(ve):
    wav = test_wav(16000, 3.0, seed=4).numpy()
    cpu = ve.embeds_from_wavs([wav], 16000)
    ve_gpu = apply_det_weights(VoiceEncoder()).cuda().eval()
    out = ve_gpu.embed_wavs([wav], 16000)
    assert out.device.type == "cuda"
    np.testing.assert_allclose(out.cpu().numpy(), cpu, atol=1e-4)
