"""generate_stream on the public classes: length and tokens equal generate's, determinism, quality
against the offline audio, seams, cancellation, bad input, concurrent streams, pcm16, long text,
voice conversion, and streams under emulated CUDA graphs."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import soundfile as sf
import torch

from chatterbox.runtime import compile as rt_compile
from chatterbox.testing import CudaGraphEmulator, test_wav, tiny_model

pytestmark = pytest.mark.slow

TEXT = "Streaming speech starts while the rest of the sentence is still being decoded."


@pytest.fixture(scope="module")
def models(tiny_models):
    return tiny_models  # shared across the test session (conftest)


def gen(model, kind, text=TEXT, **kw):
    return model.generate(text, "en", **kw) if kind == "multilingual" else model.generate(text, **kw)


def stream(model, kind, text=TEXT, **kw):
    it = model.generate_stream(text, "en", **kw) if kind == "multilingual" else model.generate_stream(text, **kw)
    chunks, metrics = [], None
    for c, metrics in it:
        chunks.append(c)
    return chunks, metrics


def spy_tokens(model):
    """Record the T3 tokens of every request the scheduler decodes from now on."""
    handles = []
    orig = model.scheduler.submit

    def submit(req, **kw):
        h = orig(req, **kw)
        handles.append(h)
        return h

    model.scheduler.submit = submit
    return handles


def log_mel(wav: torch.Tensor) -> torch.Tensor:
    from chatterbox.models.s3gen.utils.mel import mel_spectrogram

    return mel_spectrogram(wav.reshape(1, -1).float())[0]  # S3Gen's natural-log mel


def smooth(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.avg_pool2d(x[None, None], (4, 5))[0, 0]


def max_jump(x: np.ndarray) -> float:
    return float(np.abs(np.diff(x)).max()) if x.size > 1 else 0.0


@pytest.mark.parametrize("kind", ["english", pytest.param("nano", marks=pytest.mark.extended),
                                  pytest.param("multilingual", marks=pytest.mark.extended)])
def test_stream_equals_generate_in_tokens_and_length(kind, models):
    model = models(kind)
    handles = spy_tokens(model)
    try:
        offline = gen(model, kind, seed=3, max_new_tokens=70)
        chunks, metrics = stream(model, kind, seed=3, max_new_tokens=70)
    finally:
        del model.scheduler.submit
    assert handles[0].tokens == handles[1].tokens  # the stream decodes exactly generate's tokens
    audio = torch.cat(chunks, dim=1)
    assert audio.shape == offline.shape and audio.dtype == torch.float32
    assert metrics.chunk_count == len(chunks) >= 2
    assert abs(metrics.total_audio_duration - audio.shape[1] / 24000) < 1e-6
    assert 0 < metrics.latency_to_first_chunk <= metrics.elapsed and metrics.rtf > 0
    assert all(c.shape[0] == 1 and c.shape[1] > 0 for c in chunks)


@pytest.mark.parametrize("kind", ["english", pytest.param("nano", marks=pytest.mark.extended)])
def test_stream_quality_against_offline_and_smooth_seams(kind, models):
    """Same tokens, same noise sources: the stream's log-mel stays close to the offline one, and no
    boundary has a jump larger than the largest jump inside the chunks.

    Bounds: on these deterministic weights the vocoder locks to a flat F0, so the waveform log-mel
    saturates quickly (runtime.s3gen_stream measured ~0.26 for the stream and ~0.26 for a 0.1 Hz F0
    shift of the offline audio; even another seed is only ~0.30 away here). We assert the raw
    distance <= 0.35 and the smoothed one (4 bins x 5 frames, measured ~0.09) <= 0.15; the flow-level
    comparison, where a stream is 0.05-0.09 from offline and another seed ~1.0, is in
    tests/test_s3gen_stream.py.
    """
    model = models(kind)
    offline = gen(model, kind, seed=5, max_new_tokens=90)
    chunks, _ = stream(model, kind, seed=5, max_new_tokens=90)
    audio = torch.cat(chunks, dim=1)
    a, b = log_mel(audio), log_mel(offline)
    dist = float((a - b).abs().mean() / (b - b.mean()).abs().mean())
    sa, sb = smooth(a), smooth(b)
    smoothed = float((sa - sb).abs().mean() / (sb - sb.mean()).abs().mean())
    assert dist <= 0.35 and smoothed <= 0.15, (dist, smoothed)
    x = audio.reshape(-1).numpy()
    edges = np.cumsum([c.shape[1] for c in chunks])[:-1]
    inside = max(max_jump(c.reshape(-1).numpy()) for c in chunks)
    w = 120  # +-5 ms
    for e in edges:
        assert max_jump(x[e - w:e + w]) <= inside


def test_stream_is_deterministic_and_pcm16_matches(models):
    model = models("nano")
    a, _ = stream(model, "nano", seed=8, max_new_tokens=60)
    b, _ = stream(model, "nano", seed=8, max_new_tokens=60)
    assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
    pcm, _ = stream(model, "nano", seed=8, max_new_tokens=60, output="pcm16")
    assert all(isinstance(p, bytes) for p in pcm)
    ints = np.frombuffer(b"".join(pcm), dtype="<i2")
    ref = np.round(np.clip(torch.cat(a, 1).reshape(-1).numpy(), -1, 1) * 32767).astype(np.int16)
    assert np.array_equal(ints, ref)


def test_very_short_stream_is_one_chunk(models):
    model = models("nano")
    chunks, metrics = stream(model, "nano", text="Hi.", seed=1, max_new_tokens=6)
    offline = gen(model, "nano", text="Hi.", seed=1, max_new_tokens=6)
    assert metrics.chunk_count == 1 and torch.cat(chunks, 1).shape == offline.shape


def test_closing_the_stream_cancels_and_frees_the_slot(models):
    import time

    model = models("nano")
    handles = spy_tokens(model)
    try:
        it = model.generate_stream(TEXT, seed=2, max_new_tokens=600, chunk_size=8)
        chunk, _ = next(it)
        assert chunk.shape[1] > 0
        it.close()
    finally:
        del model.scheduler.submit
    h = handles[-1]
    deadline = time.time() + 30
    while model.engine_stats()["active"] and time.time() < deadline:
        time.sleep(0.01)
    assert model.engine_stats()["active"] == 0 and h.cancelled and len(h.tokens) < 600


@pytest.mark.parametrize("kw,err", [(dict(temperature=-1.0), ValueError), (dict(top_p=2.0), ValueError),
                                    (dict(max_new_tokens=0), ValueError), (dict(chunk_size=0), ValueError),
                                    (dict(output="mp3"), ValueError)])
def test_bad_stream_arguments_raise_on_first_next(models, kw, err):
    it = models("nano").generate_stream(TEXT, **kw)
    with pytest.raises(err):
        next(it)
    with pytest.raises(ValueError):
        next(models("nano").generate_stream("..."))


def test_four_concurrent_streams_share_the_engine(models):
    model = models("nano")
    texts = [f"Stream number {i} is speaking now." for i in range(4)]
    alone = [torch.cat(stream(model, "nano", text=t, seed=i, max_new_tokens=40)[0], 1) for i, t in enumerate(texts)]
    got, errors = {}, []
    steps0 = model.scheduler.steps

    def work(i):
        try:
            got[i] = torch.cat(stream(model, "nano", text=texts[i], seed=i, max_new_tokens=40)[0], 1)
        except Exception as e:  # reported below
            errors.append(e)

    ts = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(300)
    assert not errors and len(got) == 4
    for i in range(4):
        assert got[i].shape == alone[i].shape
        assert float((got[i] - alone[i]).norm() / alone[i].norm()) <= 1e-3
    assert model.scheduler.steps - steps0 < 4 * 41  # decode steps were shared


def test_long_text_stream_matches_generate_length(models):
    model = models("nano")
    text = " ".join(f"Sentence {i} of a longer text that the splitter cuts into pieces." for i in range(5))
    offline = model.generate(text, seed=4, max_new_tokens=24, split_text=True)
    chunks, metrics = stream(model, "nano", text=text, seed=4, max_new_tokens=24, split_text=True)
    audio = torch.cat(chunks, 1)
    assert abs(audio.shape[1] - offline.shape[1]) <= 480 and metrics.chunk_count >= 3


def test_voice_conversion_stream(models, tmp_path):
    from chatterbox.vc import ChatterboxVC

    model = models("english")
    vc = ChatterboxVC(model.s3gen, "cpu", ref_dict=model.conds.gen, watermark=False)
    src = tmp_path / "src.wav"
    sf.write(str(src), test_wav(16000, 2.4, seed=21).numpy(), 16000)  # 60 tokens: 3 chunks of 20
    offline = vc.generate(str(src), seed=1)
    chunks, metrics = [], None
    for c, metrics in vc.generate_stream(str(src), seed=1, chunk_size=20):
        chunks.append(c)
    audio = torch.cat(chunks, 1)
    assert audio.shape == offline.shape and metrics.chunk_count >= 2


def test_stream_under_emulated_cuda_graphs_equals_eager(tmp_path, monkeypatch):
    model = tiny_model("english", tmp_path, cfm_steps=2)
    eager, _ = stream(model, "english", seed=6, max_new_tokens=50)
    em = CudaGraphEmulator()
    monkeypatch.setattr(rt_compile, "torch_compile", em.compile_hook(rt_compile.torch_compile))
    model.compile(mode="reduce-overhead", s3gen=False, max_text_tokens=64, max_new_tokens=64)
    emulated, _ = stream(model, "english", seed=6, max_new_tokens=50)
    assert em.calls >= 49
    assert len(eager) == len(emulated) and all(torch.equal(a, b) for a, b in zip(eager, emulated))
    model.close()
