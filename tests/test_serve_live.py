"""`chatterbox serve` on a real (deterministic-weight) Nano checkpoint, through the official `openai` client
against a live uvicorn server on 127.0.0.1: same samples as `generate`, formats, streaming, SSE, voices
across a restart, errors, 16 concurrent requests, 429, disconnects, and the CLI's SIGTERM drain.

Bounded for CI: one checkpoint and one model for the module, a few speech tokens per request.
"""
from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
sf = pytest.importorskip("soundfile")

from chatterbox.testing import test_wav  # noqa: E402
from chatterbox.tts_turbo import ChatterboxTurboTTS  # noqa: E402

CONTRACT = ("make_conditionals", "engine_stats", "set_max_batch", "close")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not all(hasattr(ChatterboxTurboTTS, m) for m in CONTRACT),
                       reason="the library's serving API (make_conditionals, engine_stats, ...) is not there yet"),
]
needs_stream = pytest.mark.skipif(not hasattr(ChatterboxTurboTTS, "generate_stream"),
                                  reason="the library has no generate_stream yet")

TOKENS = 12  # speech tokens per request (~0.5 s): enough to exercise every path, small enough for CI
SR = 24000


@pytest.fixture(scope="module")
def ckpt(checkpoint_dir):
    return checkpoint_dir("nano")  # ref_seconds=5.5, shared with tests/test_api.py


@pytest.fixture(scope="module")
def model(ckpt):
    from chatterbox.registry import load_model

    m = load_model("nano", ckpt, "cpu", watermark=False)
    yield m
    m.close()


@pytest.fixture(scope="module")
def voices_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("voices")


def start(model, voices_dir, **cfg):
    from chatterbox.serve import ServeConfig, create_app
    from chatterbox.serve.runner import ServerThread

    cfg.setdefault("default_max_new_tokens", TOKENS)
    cfg.setdefault("request_timeout", 300.0)
    s = ServerThread(create_app(model, config=ServeConfig(model_kind="nano", voices_dir=voices_dir, **cfg))).start()
    s.wait_ready(60)
    return s


@pytest.fixture(scope="module")
def live(model, voices_dir):
    s = start(model, voices_dir, max_queue=16)
    yield s
    s.stop()


def client(s):
    return openai.OpenAI(api_key="unused", base_url=s.url + "/v1", max_retries=0, timeout=300)


def int16(wav) -> np.ndarray:
    from chatterbox.serve.codecs import to_int16

    return to_int16(wav.numpy().reshape(-1))


def decode_any(data: bytes) -> tuple[np.ndarray, int]:
    import av

    with av.open(io.BytesIO(data)) as c:
        frames = list(c.decode(c.streams.audio[0]))
    return np.concatenate([f.to_ndarray().reshape(-1) for f in frames]), frames[0].sample_rate


def test_wav_is_the_same_samples_as_generate(live, model):
    text = "Hello from the speech server."
    wav = client(live).audio.speech.create(model="chatterbox-nano", voice="default", input=text,
                                           response_format="wav", extra_body={"seed": 11}).content
    y, rate = sf.read(io.BytesIO(wav), dtype="int16")
    assert rate == SR and y.ndim == 1 and len(y) > SR // 10
    ref = model.generate(text, seed=11, max_new_tokens=TOKENS, split_text=True)
    assert np.array_equal(y, int16(ref))


def test_formats_decode(live):
    c = client(live)
    out = {}

    def one(fmt):
        out[fmt] = c.audio.speech.create(model="nano", voice="default", input="Formats check.",
                                         response_format=fmt, extra_body={"seed": 3}).content

    threads = [threading.Thread(target=one, args=(f,)) for f in ("pcm", "flac", "mp3", "opus")]
    [t.start() for t in threads]
    [t.join(300) for t in threads]
    pcm = np.frombuffer(out["pcm"], "<i2")
    assert len(pcm) > SR // 10 and np.abs(pcm).max() > 0
    flac, rate = sf.read(io.BytesIO(out["flac"]), dtype="int16")
    assert rate == SR and np.array_equal(flac, pcm)  # lossless, same seed, same samples
    for fmt in ("mp3", "opus"):
        y, rate = decode_any(out[fmt])
        assert rate in (SR, 48000) and abs(len(y) * SR / rate - len(pcm)) < 0.1 * SR, fmt


@needs_stream
def test_streaming_audio_and_sse(live, model):
    text = "Streaming speech arrives while the rest is still being made, chunk after chunk."
    t0 = time.perf_counter()
    arrivals, parts = [], []
    with httpx.stream("POST", live.url + "/v1/audio/speech", timeout=300,
                      json=dict(model="nano", voice="default", input=text, response_format="pcm",
                                stream_format="audio", seed=5, max_new_tokens=45)) as r:
        assert r.status_code == 200
        for b in r.iter_bytes():
            arrivals.append(time.perf_counter() - t0)
            parts.append(b)
    total = time.perf_counter() - t0
    pcm = np.frombuffer(b"".join(parts), "<i2")
    assert len(pcm) > SR // 2
    assert arrivals[0] < 0.8 * total, (arrivals[0], total)  # the first audio came well before the end

    r = httpx.post(live.url + "/v1/audio/speech", timeout=300,
                   json=dict(model="nano", voice="default", input=text, response_format="pcm",
                             stream_format="sse", seed=5, max_new_tokens=45))
    events = [json.loads(line[6:]) for line in r.text.split("\n\n") if line.startswith("data: ")]
    assert events[-1]["type"] == "speech.audio.done" and len(events) >= 2
    assert {e["type"] for e in events[:-1]} == {"speech.audio.delta"}
    sse_pcm = np.frombuffer(b"".join(base64.b64decode(e["audio"]) for e in events[:-1]), "<i2")
    assert np.array_equal(sse_pcm, pcm)  # same request, same seed: same stream


def test_voices_upload_speak_restart_delete(live, model, voices_dir, tmp_path):
    ref = tmp_path / "ref.wav"
    sf.write(str(ref), test_wav(24000, 5.5, seed=99).numpy(), 24000)
    c = client(live)
    with open(ref, "rb") as f:
        v = c.audio.voices.create(name="Tester", audio_sample=f, consent="cons_1")
    assert v.id.startswith("voice_") and v.object == "audio.voice"
    listed = httpx.get(live.url + "/v1/audio/voices").json()["data"]
    assert [x["id"] for x in listed][:1] == ["default"] and v.id in [x["id"] for x in listed]
    mine = c.audio.speech.create(model="nano", voice=v.id, input="My own voice.", response_format="pcm",
                                 extra_body={"seed": 2}).content
    builtin = c.audio.speech.create(model="nano", voice="default", input="My own voice.", response_format="pcm",
                                    extra_body={"seed": 2}).content
    assert mine != builtin

    again = start(model, voices_dir)  # a restart: the voice is read back from disk
    try:
        assert v.id in [x["id"] for x in httpx.get(again.url + "/v1/audio/voices").json()["data"]]
        after = client(again).audio.speech.create(model="nano", voice=v.id, input="My own voice.",
                                                  response_format="pcm", extra_body={"seed": 2}).content
        assert after == mine
        assert client(again).audio.voices.delete(v.id).deleted
    finally:
        again.stop()
    assert not (voices_dir / v.id).exists()

    short = tmp_path / "short.wav"  # Nano needs at least 5 s of reference
    sf.write(str(short), test_wav(24000, 2.0, seed=1).numpy(), 24000)
    with open(short, "rb") as f:
        r = httpx.post(live.url + "/v1/audio/voices", data={"name": "short"}, files={"audio_sample": f})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_audio"


def test_errors_from_the_real_model(live):
    r = httpx.post(live.url + "/v1/audio/speech", json=dict(model="nano", voice="default", input="x", top_p=1.5))
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert "Traceback" not in r.text
    with pytest.raises(openai.NotFoundError):
        client(live).audio.speech.create(model="nano", voice="alloy", input="x")
    with pytest.raises(openai.BadRequestError):
        client(live).audio.speech.create(model="nano", voice="default", input="x" * 4097)


def test_16_concurrent_requests_all_correct(live, model):
    texts = ["First sentence here.", "A second, different one."]
    out = [None] * 16
    c = client(live)

    def one(i):  # two distinct requests, eight times each, in any order of arrival
        out[i] = c.audio.speech.create(model="nano", voice="default", input=texts[i % 2], response_format="pcm",
                                       extra_body={"seed": i % 2}).content

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    [t.start() for t in threads]
    [t.join(600) for t in threads]
    assert all(o is not None for o in out)
    refs = [int16(model.generate(texts[k], seed=k, max_new_tokens=TOKENS, split_text=True)) for k in range(2)]
    for i in range(16):
        assert np.array_equal(np.frombuffer(out[i], "<i2"), refs[i % 2]), i


@needs_stream
def test_queue_full_429_and_disconnect_frees_slots(model, tmp_path):
    s = start(model, tmp_path / "v", max_queue=0)  # admission limit = the model's decode slots
    slots = model.engine_stats()["max_batch"]
    st = s.server.config.app.state.chatterbox
    try:
        tokens_before = model.engine_stats()["tokens_generated"]
        checked = threading.Event()
        firsts = []

        def hold(i):  # stream, take the first audio, wait for the 429 check, then go away mid-stream
            with httpx.stream("POST", s.url + "/v1/audio/speech", timeout=300,
                              json=dict(model="nano", voice="default", input="Hold a slot. " * 20,
                                        response_format="pcm", stream_format="audio", max_new_tokens=400,
                                        seed=i)) as r:
                firsts.append((r.status_code, len(next(r.iter_bytes()))))
                checked.wait(300)

        threads = [threading.Thread(target=hold, args=(i,)) for i in range(slots)]
        [t.start() for t in threads]
        end = time.monotonic() + 60
        while st.admission.in_flight < slots and time.monotonic() < end:
            time.sleep(0.02)
        r = httpx.post(s.url + "/v1/audio/speech", json=dict(model="nano", voice="default", input="x"), timeout=10)
        assert r.status_code == 429 and r.headers["retry-after"] and r.json()["error"]["code"] == "queue_full"
        end = time.monotonic() + 300
        while len(firsts) < slots and time.monotonic() < end:
            time.sleep(0.05)
        checked.set()
        [t.join(60) for t in threads]
        assert [f[0] for f in firsts] == [200] * slots and all(f[1] > 0 for f in firsts)
        end = time.monotonic() + 60
        while (st.admission.in_flight or model.engine_stats()["active"]) and time.monotonic() < end:
            time.sleep(0.05)
        stats = model.engine_stats()
        assert st.admission.in_flight == 0 and stats["active"] == 0 and stats["queue_depth"] == 0
        assert stats["tokens_generated"] - tokens_before < 400 * slots // 2  # cancelled early, not run to the end
        metrics = httpx.get(s.url + "/metrics").text
        assert f'chatterbox_requests_cancelled_total{{reason="disconnect"}} {float(slots)}' in metrics
    finally:
        s.stop()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_cli_demo_weights_sigterm_drains(ckpt, tmp_path):
    """`chatterbox serve --demo-weights`: loud warning, ready, then SIGTERM mid-request drains and exits 0."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "det-nano").symlink_to(ckpt)  # the demo's checkpoint cache, already written
    port = _free_port()
    env = dict(os.environ, CHATTERBOX_FAST_CACHE=str(cache))
    proc = subprocess.Popen([sys.executable, "-m", "chatterbox", "serve", "--model", "nano", "--demo-weights",
                             "--port", str(port), "--voices-dir", str(tmp_path / "voices"),
                             "--max-new-tokens", str(TOKENS), "--log-level", "info"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + 180
        while time.monotonic() < end:
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.2)
        else:
            pytest.fail("server never became ready")
        assert "NOT SPEECH" in httpx.get(url + "/v1/models").json()["data"][0]["note"]
        got = {}

        def run():
            got["r"] = httpx.post(url + "/v1/audio/speech", timeout=300,
                                  json=dict(model="nano", voice="default", input="Drain me before you go.",
                                            response_format="pcm", seed=1))

        t = threading.Thread(target=run)
        t.start()
        while "chatterbox_requests_in_flight 1.0" not in httpx.get(url + "/metrics").text:
            assert t.is_alive()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)  # mid-request
        t.join(300)
        rc = proc.wait(120)
        out = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 0, out
    assert got["r"].status_code == 200 and len(got["r"].content) > 2 * SR // 10  # finished, not cut
    assert out.count("NOT SPEECH") >= 3  # the loud warning
