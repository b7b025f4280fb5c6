"""`chatterbox serve` on a fake model: routing, validation, errors, codecs, voices, SSE, backpressure,
disconnects, timeouts, metrics. The fake implements the public API contract the server calls
(generate / generate_stream / make_conditionals / engine_stats / set_max_batch / close), so these
tests are fast and exact; test_serve_live.py runs the same server on a real Nano checkpoint.
"""
from __future__ import annotations

import base64
import io
import json
import re
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
av = pytest.importorskip("av")
sf = pytest.importorskip("soundfile")

from chatterbox.engine import Conditionals  # noqa: E402
from chatterbox.models.t3.modules.cond_enc import T3Cond  # noqa: E402
from chatterbox.serve import ServeConfig, create_app  # noqa: E402
from chatterbox.serve.codecs import AudioEncoder, encode_whole, to_int16, wav_header  # noqa: E402
from chatterbox.serve.runner import ServerThread  # noqa: E402

SR = 24000


# ------------------------------------------------------------------------------------ the fake model
def _voice_conds(level: float) -> Conditionals:
    """A real (tiny) Conditionals whose speaker embedding encodes `level`: the fake's voice identity."""
    t3 = T3Cond(speaker_emb=torch.full((1, 4), float(level)), emotion_adv=torch.full((1, 1, 1), 0.5))
    return Conditionals(t3, {"level": torch.tensor([float(level)])})


class FakeTTS:
    """Deterministic stand-in for a Chatterbox model: audio depends on text, seed and voice only.

    Streams `chunks` pieces of the same waveform `generate` returns, sleeping `delay` s before each;
    `slots` requests "decode" at once (a semaphore), the rest wait (queue_depth).
    """

    def __init__(self, *, delay: float = 0.0, chunks: int = 4, slots: int = 4, builtin: bool = True,
                 first_delay: float = 0.0):
        self.sr = SR
        self.device = "cpu"
        self.conds = _voice_conds(0.25) if builtin else None
        self.delay, self.first_delay, self.nchunks = delay, first_delay, chunks
        self._slots = threading.BoundedSemaphore(slots)
        self._max_batch = slots
        self._lock = threading.Lock()
        self.waiting = self.active = self.done = self.tokens = 0
        self.closed_early = 0  # streams closed before their last chunk
        self.calls: list[dict] = []
        self.closed = False
        self.made_voices = 0

    # -- contract
    def set_max_batch(self, n: int) -> None:
        self._max_batch = n
        self._slots = threading.BoundedSemaphore(n)

    def engine_stats(self) -> dict:
        return {"queue_depth": self.waiting, "active": self.active, "max_batch": self._max_batch,
                "tokens_generated": self.tokens, "requests_done": self.done,
                "prefix_cache_hits": max(self.done - 1, 0), "prefix_cache_misses": min(self.done, 1),
                "prefix_cache_bytes": 1024 * min(self.done, 1)}

    def close(self) -> None:
        self.closed = True

    def make_conditionals(self, wav_fpath, exaggeration: float = 0.5) -> Conditionals:
        wav, sr = sf.read(str(wav_fpath), dtype="float32", always_2d=True)
        wav = wav.mean(axis=1)
        if len(wav) < sr * 1.0:
            raise ValueError(f"reference audio is {len(wav) / sr:.2f} s long; at least 1.0 s is needed")
        if np.abs(wav).max() < 1e-4:
            raise ValueError("reference audio is silent")
        self.made_voices += 1
        return _voice_conds(round(float(np.abs(wav).max()), 3))

    def _check(self, text, temperature=0.8, **kw):
        if not isinstance(text, str) or not text.strip():
            raise ValueError("text is empty")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")

    def _wave(self, text, conds, seed) -> np.ndarray:
        level = float((conds or self.conds).t3.speaker_emb[0, 0])
        n = SR // 10 * max(1, len(text.split()))
        g = np.random.default_rng(0 if seed is None else seed)
        t = np.arange(n) / SR
        return (level * np.sin(2 * np.pi * 220 * t) + 0.01 * g.standard_normal(n)).astype(np.float32)

    def generate(self, text, *, conds=None, seed=None, max_new_tokens=1000, split_text=False, **kw):
        self._check(text, **kw)
        self.calls.append(dict(text=text, conds=conds, seed=seed, max_new_tokens=max_new_tokens, stream=False, **kw))
        with self._slots:
            time.sleep(self.first_delay + self.delay * self.nchunks)
            w = self._wave(text, conds, seed)
        self.done += 1
        return torch.from_numpy(w)[None]

    def generate_stream(self, text, *, conds=None, seed=None, max_new_tokens=1000, split_text=False,
                        output="float32", chunk_size=None, **kw):
        return self._stream(text, conds=conds, seed=seed, max_new_tokens=max_new_tokens, **kw)

    def _sleep(self, seconds):
        time.sleep(seconds)

    def _stream(self, text, *, conds=None, seed=None, max_new_tokens=1000, **kw):
        self._check(text, **kw)
        self.calls.append(dict(text=text, conds=conds, seed=seed, max_new_tokens=max_new_tokens, stream=True, **kw))
        with self._lock:
            self.waiting += 1
        acquired = False
        sent = 0
        try:
            self._slots.acquire()
            acquired = True
            with self._lock:
                self.waiting -= 1
                self.active += 1
            w = self._wave(text, conds, seed)
            pieces = np.array_split(w, self.nchunks)
            self._sleep(self.first_delay)
            for i, p in enumerate(pieces):
                self._sleep(self.delay)
                self.tokens += 5
                sent += 1
                yield torch.from_numpy(p)[None], {"chunk_count": i + 1}
        finally:
            with self._lock:
                if acquired:
                    self.active -= 1
                    self._slots.release()
                else:
                    self.waiting -= 1
                if sent < self.nchunks:
                    self.closed_early += 1
            self.done += 1


# ------------------------------------------------------------------------------------ helpers
@pytest.fixture
def voices_dir(tmp_path):
    return tmp_path / "voices"


def serve(model, voices_dir, **cfg):
    cfg.setdefault("request_timeout", 30.0)
    config = ServeConfig(model_kind=cfg.pop("model_kind", "nano"), voices_dir=voices_dir, **cfg)
    s = ServerThread(create_app(model, config=config)).start()
    s.wait_ready(10)
    return s


@pytest.fixture
def fake():
    return FakeTTS()


@pytest.fixture
def server(fake, voices_dir):
    s = serve(fake, voices_dir, max_queue=4)
    yield s
    s.stop()


def client(s, **kw) -> "openai.OpenAI":
    return openai.OpenAI(api_key="unused", base_url=s.url + "/v1", max_retries=0, **kw)


def decode(data: bytes) -> tuple[np.ndarray, int]:
    """Any container/codec -> (float32 mono samples, sample rate) through PyAV."""
    with av.open(io.BytesIO(data)) as c:
        frames = [f for f in c.decode(c.streams.audio[0])]
    out = np.concatenate([f.to_ndarray().reshape(-1) for f in frames])
    scale = {np.dtype(np.int16): 32768.0, np.dtype(np.int32): 2.0 ** 31}.get(out.dtype, 1.0)
    return out.astype(np.float32) / np.float32(scale), frames[0].sample_rate


def write_voice(path: Path, seconds=2.0, amp=0.5, sr=16000) -> Path:
    t = np.arange(int(seconds * sr)) / sr
    sf.write(str(path), (amp * np.sin(2 * np.pi * 180 * t)).astype(np.float32), sr)
    return path


def err(r) -> dict:
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def speech(s, timeout=30, **body) -> httpx.Response:
    body.setdefault("model", "chatterbox-nano")
    body.setdefault("voice", "default")
    return httpx.post(s.url + "/v1/audio/speech", json=body, timeout=timeout)


# ------------------------------------------------------------------------------------ codecs
@pytest.mark.parametrize("fmt", ["wav", "flac", "mp3", "opus", "aac"])
def test_codecs_whole_and_streamed_decode(fmt):
    t = np.arange(SR) / SR
    x = (0.4 * np.sin(2 * np.pi * 300 * t)).astype(np.float32)
    whole = encode_whole(x, fmt)
    enc = AudioEncoder(fmt, SR, stream=True)
    streamed = b"".join([enc.push(x[i:i + 2400]) for i in range(0, SR, 2400)] + [enc.finish()])
    for data in (whole, streamed):
        y, rate = decode(data)
        assert rate == (48000 if fmt == "opus" else SR)  # Opus decoders always output 48 kHz
        n = len(y) * SR // rate
        assert SR - 10 <= n <= SR + 2400, (fmt, n)  # lossy codecs pad to their frame size
        if fmt in ("wav", "flac"):  # lossless: exact int16 samples
            assert np.array_equal(np.round(y[:SR] * 32768).astype(np.int16), to_int16(x))
        else:  # lossy: same tone, about the same energy
            assert abs(np.sqrt(np.mean(y ** 2)) - 0.4 / np.sqrt(2)) < 0.05
    if fmt == "wav":
        assert whole[:44] == wav_header(SR, SR) and streamed[:44] == wav_header(SR, None)
        assert whole[44:] == streamed[44:]


@pytest.mark.parametrize("speed", [0.25, 0.5, 2.0, 4.0])
def test_speed_changes_duration(speed):
    x = (0.3 * np.sin(2 * np.pi * 200 * np.arange(2 * SR) / SR)).astype(np.float32)
    y, _ = decode(encode_whole(x, "wav", speed=speed))
    assert abs(len(y) - 2 * SR / speed) < 0.02 * 2 * SR / speed
    enc = AudioEncoder("pcm", SR, speed=speed)
    pcm = b"".join([enc.push(x[i:i + 4800]) for i in range(0, 2 * SR, 4800)] + [enc.finish()])
    assert abs(len(pcm) // 2 - 2 * SR / speed) < 0.02 * 2 * SR / speed


def test_encoder_rejects_bad_arguments():
    with pytest.raises(ValueError, match="response_format"):
        AudioEncoder("ogg")
    with pytest.raises(ValueError, match="speed"):
        AudioEncoder("wav", speed=5.0)


# ------------------------------------------------------------------------------------ speech
def test_openai_client_wav_is_generate_exactly(server, fake):
    wav = client(server).audio.speech.create(model="chatterbox-nano", voice="default", input="Hello there world.",
                                             response_format="wav", extra_body={"seed": 7}).content
    y, rate = sf.read(io.BytesIO(wav), dtype="int16")
    assert rate == SR and y.ndim == 1
    ref = fake.generate("Hello there world.", seed=7).numpy().reshape(-1)
    assert np.array_equal(y, to_int16(ref))
    call = fake.calls[0]
    assert call["seed"] == 7 and call["conds"] is None and call["stream"] is False


@pytest.mark.parametrize("fmt", ["pcm", "flac", "mp3", "opus", "aac"])
def test_openai_client_formats(server, fake, fmt):
    data = client(server).audio.speech.create(model="tts-1", voice="default", input="one two three four",
                                              response_format=fmt, extra_body={"seed": 1}).content
    ref = fake.generate("one two three four", seed=1).numpy().reshape(-1)
    if fmt == "pcm":
        assert np.array_equal(np.frombuffer(data, "<i2"), to_int16(ref))
        return
    y, rate = decode(data)
    n = len(y) * SR // rate
    assert len(ref) - 10 <= n <= len(ref) + 2400
    if fmt == "flac":
        assert np.array_equal(np.round(y[:len(ref)] * 32768).astype(np.int16), to_int16(ref))


def test_knobs_reach_the_model(server, fake):
    r = speech(server, input="hi there", response_format="pcm", exaggeration=0.7, cfg_weight=0.3, temperature=0.5,
               top_p=0.9, min_p=0.1, repetition_penalty=1.3, top_k=50, seed=3, max_new_tokens=40, language="en",
               instructions="ignored")
    assert r.status_code == 200, r.text
    c = fake.calls[-1]
    assert (c["exaggeration"], c["cfg_weight"], c["temperature"], c["top_p"], c["min_p"], c["repetition_penalty"],
            c["top_k"], c["seed"], c["max_new_tokens"]) == (0.7, 0.3, 0.5, 0.9, 0.1, 1.3, 50, 3, 40)
    r = speech(server, input="defaults", response_format="pcm")
    assert r.status_code == 200 and "temperature" not in fake.calls[-1]  # unset knobs: the model's defaults


def test_multilingual_language_is_passed(voices_dir):
    calls = []

    class Mtl(FakeTTS):
        def generate(self, text, language_id, **kw):
            calls.append(language_id)
            return super().generate(text, **kw)

    with serve(Mtl(), voices_dir, model_kind="multilingual") as s:
        assert speech(s, model="chatterbox-multilingual", input="Bonjour", language="fr",
                      response_format="pcm").status_code == 200
        assert speech(s, model="chatterbox-multilingual", input="Hello", response_format="pcm").status_code == 200
    assert calls == ["fr", "en"]


def test_stream_audio_first_bytes_before_the_end(voices_dir):
    fake = FakeTTS(delay=0.25, chunks=6)
    with serve(fake, voices_dir) as s:
        t0 = time.perf_counter()
        arrivals, parts = [], []
        with httpx.stream("POST", s.url + "/v1/audio/speech", timeout=30,
                          json=dict(model="nano", voice="default", input="a b c d e f g h", response_format="pcm",
                                    stream_format="audio", seed=5)) as r:
            assert r.status_code == 200 and r.headers["content-type"] == "audio/pcm"
            for b in r.iter_bytes():
                arrivals.append(time.perf_counter() - t0)
                parts.append(b)
        total = time.perf_counter() - t0
    assert len(arrivals) >= 3 and arrivals[0] < total - 0.7  # first audio ~1 chunk in, of 6
    ref = fake.generate("a b c d e f g h", seed=5).numpy().reshape(-1)
    assert np.array_equal(np.frombuffer(b"".join(parts), "<i2"), to_int16(ref))
    assert fake.calls[0]["stream"] is True


def test_openai_client_streaming_response(server, fake):
    with client(server).audio.speech.with_streaming_response.create(
            model="chatterbox-nano", voice="default", input="streamed words here", response_format="wav",
            stream_format="audio", extra_body={"seed": 2}) as r:
        data = b"".join(r.iter_bytes())
    y, rate = sf.read(io.BytesIO(data), dtype="int16")
    assert rate == SR
    assert np.array_equal(y, to_int16(fake.generate("streamed words here", seed=2).numpy().reshape(-1)))


def test_sse_events(server, fake):
    r = speech(server, input="server sent events", response_format="pcm", stream_format="sse", seed=4)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [json.loads(line[6:]) for line in r.text.split("\n\n") if line.startswith("data: ")]
    assert [e["type"] for e in events[:-1]] == ["speech.audio.delta"] * (len(events) - 1) and len(events) >= 3
    assert events[-1]["type"] == "speech.audio.done" and events[-1]["usage"]["input_tokens"] == 18
    pcm = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
    assert np.array_equal(np.frombuffer(pcm, "<i2"), to_int16(fake.generate("server sent events", seed=4).numpy()[0]))


def test_voice_as_object_and_model_aliases(server):
    for model in ("chatterbox-nano", "nano", "chatterbox", "tts-1", "tts-1-hd", "gpt-4o-mini-tts"):
        r = speech(server, model=model, voice={"id": "default"}, input="ok", response_format="pcm")
        assert r.status_code == 200, (model, r.text)


# ------------------------------------------------------------------------------------ voices
def test_voice_upload_list_speak_delete_and_persist(tmp_path, voices_dir):
    ref = write_voice(tmp_path / "me.wav", amp=0.5)
    fake = FakeTTS()
    with serve(fake, voices_dir) as s:
        c = client(s)
        with open(ref, "rb") as f:
            v = c.audio.voices.create(name="Me", audio_sample=f, consent="cons_123")
        assert v.id.startswith("voice_") and v.name == "Me" and v.object == "audio.voice"
        assert abs(v.created_at - time.time()) < 60
        listed = httpx.get(s.url + "/v1/audio/voices").json()
        assert listed["object"] == "list" and [x["id"] for x in listed["data"]] == ["default", v.id]
        pcm = c.audio.speech.create(model="nano", voice=v.id, input="my voice", response_format="pcm").content
        assert float(fake.calls[-1]["conds"].t3.speaker_emb[0, 0]) == 0.5  # the uploaded voice's conditionals
        assert np.abs(np.frombuffer(pcm, "<i2")).max() > 0.45 * 32767  # louder than the built-in 0.25
        assert fake.made_voices == 1
    folder = voices_dir / v.id
    assert {p.name for p in folder.iterdir()} == {"meta.json", "reference.wav", "conds.pt"}
    assert not list(voices_dir.glob(".tmp-*"))

    fake2 = FakeTTS()  # restart: the voice comes back from disk, conditionals loaded, not rebuilt
    with serve(fake2, voices_dir) as s:
        ids = [x["id"] for x in httpx.get(s.url + "/v1/audio/voices").json()["data"]]
        assert ids == ["default", v.id]
        assert speech(s, voice=v.id, input="again", response_format="pcm").status_code == 200
        assert float(fake2.calls[-1]["conds"].t3.speaker_emb[0, 0]) == 0.5 and fake2.made_voices == 0
        d = client(s).audio.voices.delete(v.id)
        assert d.deleted and d.id == v.id
        assert not folder.exists()
        assert speech(s, voice=v.id, input="gone").status_code == 404
    with serve(FakeTTS(), voices_dir) as s:  # deleted stays deleted
        assert [x["id"] for x in httpx.get(s.url + "/v1/audio/voices").json()["data"]] == ["default"]


def test_no_builtin_voice_is_not_listed(voices_dir):
    with serve(FakeTTS(builtin=False), voices_dir) as s:
        assert httpx.get(s.url + "/v1/audio/voices").json()["data"] == []
        e = err(speech(s, input="x"))
        assert e["code"] == "voice_not_found" and "GET /v1/audio/voices" in e["message"]


def test_voices_rebuilt_for_another_model_kind(tmp_path, voices_dir):
    ref = write_voice(tmp_path / "v.wav", amp=0.4)
    with serve(FakeTTS(), voices_dir) as s:
        with open(ref, "rb") as f:
            vid = httpx.post(s.url + "/v1/audio/voices", data={"name": "v"}, files={"audio_sample": f}).json()["id"]
    fake = FakeTTS()
    with serve(fake, voices_dir, model_kind="turbo") as s:
        assert vid in [x["id"] for x in httpx.get(s.url + "/v1/audio/voices").json()["data"]]
    assert fake.made_voices == 1  # conds.pt was for nano: rebuilt from reference.wav
    assert json.loads((voices_dir / vid / "meta.json").read_text())["model_kind"] == "turbo"


# ------------------------------------------------------------------------------------ errors
BAD_BODIES = [
    ("not json", 400, "invalid_json", None),
    ("[1, 2]", 400, None, None),
    (json.dumps({"model": "nano", "voice": "default"}), 400, "missing_required_parameter", "input"),
    (json.dumps({"model": "nano", "voice": "default", "input": 5}), 400, "invalid_value", "input"),
    (json.dumps({"model": "nano", "voice": "default", "input": "x", "speed": "fast"}), 400, "invalid_value", "speed"),
    (json.dumps({"model": "nano", "voice": "default", "input": "x", "seed": 1.5}), 400, "invalid_value", "seed"),
    (json.dumps({"model": "nano", "voice": "default", "input": "x", "bogus": 1}), 400, "unknown_parameter", "bogus"),
    (json.dumps({"model": "nano", "voice": "default", "input": "x", "stream_format": "ws"}), 400, "invalid_value",
     "stream_format"),
]


@pytest.mark.parametrize("raw,status,code,param", BAD_BODIES)
def test_bad_request_bodies(server, raw, status, code, param):
    r = httpx.post(server.url + "/v1/audio/speech", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == status
    e = err(r)
    assert e["type"] == "invalid_request_error" and e["param"] == param and e["message"]
    if code:
        assert e["code"] == code
    assert "Traceback" not in r.text


@pytest.mark.parametrize("body,status,code,param,needle", [
    (dict(input="   "), 400, "empty_input", "input", "empty"),
    (dict(input="x" * 4097), 400, "input_too_long", "input", "4096"),
    (dict(input="x", response_format="ogg"), 400, "unsupported_format", "response_format", "wav"),
    (dict(input="x", voice="alloy"), 404, "voice_not_found", "voice", "/v1/audio/voices"),
    (dict(input="x", model="whisper-1"), 404, "model_not_found", "model", "/v1/models"),
    (dict(input="x", speed=4.5), 400, "invalid_value", "speed", "0.25"),
    (dict(input="x", speed=0.1), 400, "invalid_value", "speed", "4.0"),
    (dict(input="x", max_new_tokens=0), 400, "invalid_value", "max_new_tokens", "between"),
    (dict(input="x", language="fr"), 400, "invalid_value", "language", "multilingual"),
    (dict(input="x", temperature=0.0), 400, "invalid_value", None, "temperature"),  # the library's ValueError
    (dict(input="x", temperature=0.0, stream_format="audio"), 400, "invalid_value", None, "temperature"),
    (dict(input="x", temperature=0.0, stream_format="sse"), 400, "invalid_value", None, "temperature"),
])
def test_request_errors(server, body, status, code, param, needle):
    r = speech(server, **body)
    assert r.status_code == status, r.text
    e = err(r)
    assert (e["code"], e["param"]) == (code, param) and needle in e["message"]


def test_input_of_4096_characters_is_accepted(server, fake):
    assert speech(server, input="word " * 819 + "x", response_format="pcm").status_code == 200
    assert len(fake.calls[-1]["text"]) == 4096


def test_route_and_method_errors_are_json(server):
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and err(r)["code"] == "not_found"
    r = httpx.get(server.url + "/v1/audio/speech")
    assert r.status_code == 405 and err(r)["code"] == "method_not_allowed"
    r = httpx.delete(server.url + "/v1/audio/voices/voice_nope")
    assert r.status_code == 404 and err(r)["code"] == "voice_not_found"
    r = httpx.delete(server.url + "/v1/audio/voices/default")
    assert r.status_code == 400 and err(r)["code"] == "builtin_voice"
    r = httpx.get(server.url + "/v1/models/whisper-1")
    assert r.status_code == 404 and err(r)["code"] == "model_not_found"


def test_openai_client_raises_typed_errors(server):
    c = client(server)
    with pytest.raises(openai.NotFoundError, match="voice"):
        c.audio.speech.create(model="nano", voice="nobody", input="x")
    with pytest.raises(openai.BadRequestError, match="4096"):
        c.audio.speech.create(model="nano", voice="default", input="y" * 5000)


def test_bad_voice_files(tmp_path, fake):
    with serve(fake, tmp_path / "voices", max_voice_seconds=3.0, max_voice_bytes=200_000) as s:
        def upload(name, data, filename="v.wav", **extra):
            return httpx.post(s.url + "/v1/audio/voices", data={"name": name, **extra},
                              files={"audio_sample": (filename, data, "audio/wav")})

        def wav_bytes(seconds, amp=0.5, sr=16000):
            buf = io.BytesIO()
            sf.write(buf, (amp * np.sin(np.arange(int(seconds * sr)) / 5)).astype(np.float32), sr, format="WAV")
            return buf.getvalue()

        cases = [
            (upload("t", b"this is not audio at all" * 20, "v.txt"), 400, "invalid_audio", "not a readable audio"),
            (upload("t", wav_bytes(0.5)), 400, "invalid_audio", "at least 1.0 s"),  # the model's minimum
            (upload("t", wav_bytes(2.0, amp=0.0)), 400, "invalid_audio", "silent"),
            (upload("t", wav_bytes(3.5, sr=8000)), 400, "invalid_audio", "longer than 3 s"),
            (upload("t", wav_bytes(2.5, sr=48000)), 413, "file_too_large", "larger than"),  # 240 kB > 200 kB
            (upload("t", wav_bytes(3.0, sr=48000)), 413, "file_too_large", "larger than"),  # refused by length
            (upload("", wav_bytes(2.0)), 400, "missing_required_parameter", "name"),
            (httpx.post(s.url + "/v1/audio/voices", data={"name": "x"}), 400, "missing_required_parameter",
             "audio_sample"),
            (upload("t", b""), 400, "invalid_audio", "empty"),
            (upload("t", wav_bytes(2.0), type="prompt"), 400, "invalid_value", "audio_sample"),
            (upload("t", wav_bytes(2.0), extra="1"), 400, "unknown_parameter", "extra"),
        ]
        for i, (r, status, code, needle) in enumerate(cases):
            assert r.status_code == status, (i, r.text)
            e = err(r)
            assert e["code"] == code and needle in e["message"], (i, e)
        assert httpx.get(s.url + "/v1/audio/voices").json()["data"][1:] == []  # nothing half-made
        assert not list((tmp_path / "voices").glob(".tmp-*")) and not list((tmp_path / "voices").glob("voice_*"))
        assert upload("ok", wav_bytes(2.0)).status_code == 200


# ------------------------------------------------------------------------------------ load and faults
def test_16_concurrent_requests_all_correct(voices_dir):
    fake = FakeTTS(delay=0.02, slots=8)
    with serve(fake, voices_dir, max_queue=16) as s:
        c = client(s)
        texts = [f"request number {i} " + "la " * (i % 5) for i in range(16)]
        out = [None] * 16

        def one(i):
            kw = dict(stream_format="audio") if i % 2 else {}
            out[i] = c.audio.speech.create(model="nano", voice="default", input=texts[i], response_format="pcm",
                                           extra_body={"seed": 100 + i, **kw}).content

        threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
        [t.start() for t in threads]
        [t.join(60) for t in threads]
    for i in range(16):
        ref = to_int16(fake.generate(texts[i], seed=100 + i).numpy()[0])
        assert out[i] is not None and np.array_equal(np.frombuffer(out[i], "<i2"), ref), i


def test_queue_full_gets_429_with_retry_after(voices_dir):
    fake = FakeTTS(delay=0.25, chunks=4, slots=1)
    with serve(fake, voices_dir, max_batch=1, max_queue=1) as s:
        results = {}

        def hold(i):
            results[i] = speech(s, input="hold the slot", response_format="pcm", stream_format="audio").status_code

        threads = [threading.Thread(target=hold, args=(i,)) for i in range(2)]
        [t.start() for t in threads]
        end = time.monotonic() + 5
        while s.server.config.app.state.chatterbox.admission.in_flight < 2 and time.monotonic() < end:
            time.sleep(0.01)
        t0 = time.perf_counter()
        r = speech(s, input="one too many")
        assert time.perf_counter() - t0 < 1.0  # refused at once, no hang
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert err(r)["code"] == "queue_full"
        with pytest.raises(openai.RateLimitError):
            client(s).audio.speech.create(model="nano", voice="default", input="x")
        [t.join(30) for t in threads]
        assert results == {0: 200, 1: 200}
        assert speech(s, input="room again", response_format="pcm").status_code == 200
        assert 'chatterbox_requests_rejected_total 2.0' in httpx.get(s.url + "/metrics").text


def test_disconnect_cancels_generation_and_frees_the_slot(voices_dir):
    fake = FakeTTS(delay=0.2, chunks=20, slots=1)
    with serve(fake, voices_dir, max_batch=1, max_queue=0) as s:
        admission = s.server.config.app.state.chatterbox.admission
        with httpx.stream("POST", s.url + "/v1/audio/speech", timeout=30,
                          json=dict(model="nano", voice="default", input="long " * 40, response_format="pcm",
                                    stream_format="audio")) as r:
            assert r.status_code == 200
            next(r.iter_bytes())
        t0 = time.perf_counter()  # the client is gone after ~1 of 20 chunks (4 s of work)
        while (admission.in_flight or fake.active) and time.perf_counter() - t0 < 3:
            time.sleep(0.02)
        assert admission.in_flight == 0 and fake.active == 0 and fake.closed_early == 1
        assert time.perf_counter() - t0 < 1.0  # within a chunk or two, not the remaining ~4 s
        assert speech(s, input="next one", response_format="pcm").status_code == 200  # the slot is free
        assert 'chatterbox_requests_cancelled_total{reason="disconnect"} 1.0' in httpx.get(s.url + "/metrics").text


class CancellableFake(FakeTTS):
    """Its streams have a thread-safe cancel() that interrupts the chunk being made (as a scheduler can)."""

    class Stream:
        def __init__(self, gen, event):
            self._gen, self._event = gen, event

        def __iter__(self):
            return self

        def __next__(self):
            return next(self._gen)

        def close(self):
            self._gen.close()

        def cancel(self):
            self._event.set()

    def generate_stream(self, text, **kw):
        self._event, self._sleeps = threading.Event(), 0
        kw.pop("output", None), kw.pop("split_text", None)
        return self.Stream(self._stream(text, **kw), self._event)

    def _sleep(self, seconds):  # the first chunk at once, each later one after `seconds`
        self._sleeps += 1
        if self._event.wait(seconds if self._sleeps > 2 else 0.0):
            raise RuntimeError("cancelled")


def test_disconnect_uses_the_streams_cancel_at_once(voices_dir):
    fake = CancellableFake(delay=3.0, chunks=3, slots=1)  # first chunk at once, then 3 s per chunk
    with serve(fake, voices_dir, max_batch=1, max_queue=0) as s:
        admission = s.server.config.app.state.chatterbox.admission
        with httpx.stream("POST", s.url + "/v1/audio/speech", timeout=30,
                          json=dict(model="nano", voice="default", input="a b c", response_format="pcm",
                                    stream_format="audio")) as r:
            next(r.iter_bytes())
        t0 = time.perf_counter()
        while admission.in_flight and time.perf_counter() - t0 < 5:
            time.sleep(0.02)
        assert admission.in_flight == 0 and fake.active == 0
        assert time.perf_counter() - t0 < 1.0  # not the 3 s the chunk in progress would take


def test_request_timeout(voices_dir):
    fake = FakeTTS(delay=0.3, chunks=5)
    with serve(fake, voices_dir, request_timeout=0.5) as s:
        r = speech(s, input="too slow", response_format="pcm")
        assert r.status_code == 504 and err(r)["code"] == "request_timeout"
        r = speech(s, input="too slow", response_format="pcm", stream_format="audio")  # cut after ~1 chunk
        assert r.status_code == 200 and 0 < len(r.content) < 2 * len(fake.generate("too slow").numpy()[0])
        r = speech(s, input="too slow", response_format="pcm", stream_format="sse")
        assert json.loads(r.text.strip().split("\n\n")[-1][6:])["error"]["code"] == "request_timeout"
        time.sleep(0.5)
        assert s.server.config.app.state.chatterbox.admission.in_flight == 0


def test_metrics_are_per_app_and_count(server, fake, voices_dir):
    assert speech(server, input="one", response_format="pcm").status_code == 200
    assert speech(server, input="two", response_format="pcm", stream_format="audio").status_code == 200
    assert speech(server, input="", response_format="pcm").status_code == 400
    text = httpx.get(server.url + "/metrics").text
    assert 'chatterbox_requests_total{endpoint="/v1/audio/speech",status="200"} 2.0' in text
    assert 'chatterbox_requests_total{endpoint="/v1/audio/speech",status="400"} 1.0' in text
    assert 'chatterbox_time_to_first_audio_seconds_count{mode="file"} 1.0' in text
    assert 'chatterbox_request_latency_seconds_count{mode="audio"} 1.0' in text
    assert "chatterbox_queue_depth 0.0" in text and "chatterbox_active_slots 0.0" in text
    assert "chatterbox_max_batch 4.0" in text and "chatterbox_tokens_generated_total 20.0" in text
    assert "chatterbox_tokens_per_second" in text
    done = int(float(re.search(r"^chatterbox_engine_requests_done_total (\S+)$", text, re.M).group(1)))
    assert done >= 2 and f"chatterbox_voice_prefix_cache_hits_total {float(done - 1)}" in text
    assert "chatterbox_voice_prefix_cache_misses_total 1.0" in text and "chatterbox_voice_prefix_cache_bytes 1024.0" in text
    secs = float(re.search(r"^chatterbox_generated_audio_seconds_total (\S+)$", text, re.M).group(1))
    assert abs(secs - 0.2) < 1e-6  # two one-word requests of 0.1 s
    with serve(FakeTTS(), voices_dir) as other:  # a second app has its own registry
        assert '"/v1/audio/speech"' not in httpx.get(other.url + "/metrics").text


def test_health_ready_and_loading(voices_dir):
    release = threading.Event()
    made = FakeTTS()

    def loader():
        release.wait(10)
        return made

    app = create_app(config=ServeConfig(voices_dir=voices_dir), loader=loader)
    with ServerThread(app) as s:
        assert httpx.get(s.url + "/health").json() == {"status": "ok"}
        r = httpx.get(s.url + "/ready")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        r = speech(s, input="too early")
        assert r.status_code == 503 and err(r)["code"] == "model_loading" and "retry-after" in r.headers
        assert httpx.get(s.url + "/v1/models").json()["data"][0]["id"] == "chatterbox-nano"
        release.set()
        assert s.wait_ready(10)["status"] == "ready"
        assert speech(s, input="now", response_format="pcm").status_code == 200
    assert made.closed  # the app loaded it, so the app closed it at shutdown


def test_load_failure_is_reported(voices_dir):
    fatal = []

    def loader():
        raise FileNotFoundError("no checkpoint here")

    app = create_app(config=ServeConfig(voices_dir=voices_dir), loader=loader, on_fatal=fatal.append)
    with ServerThread(app) as s:
        with pytest.raises(RuntimeError, match="no checkpoint here"):
            s.wait_ready(5)
        assert err(speech(s, input="x"))["code"] == "model_load_failed"
    assert isinstance(fatal[0], FileNotFoundError)


def test_shutdown_drains_in_flight_requests(voices_dir):
    fake = FakeTTS(delay=0.2, chunks=6)
    app = create_app(fake, config=ServeConfig(voices_dir=voices_dir), owns_model=True)
    s = ServerThread(app).start()
    s.wait_ready(5)
    got = {}

    def run():
        got["r"] = speech(s, input="finish me please", response_format="pcm", stream_format="audio")

    t = threading.Thread(target=run)
    t.start()
    time.sleep(0.4)  # mid-stream
    s.stop()  # what SIGTERM does: uvicorn stops accepting, waits for open responses, then the lifespan closes the model
    t.join(10)
    r = got["r"]
    assert r.status_code == 200
    assert np.array_equal(np.frombuffer(r.content, "<i2"), to_int16(fake.generate("finish me please").numpy()[0]))
    assert fake.closed and fake.closed_early == 0


def test_playground_page(server):
    r = httpx.get(server.url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    for needle in ('id="text"', 'id="voice"', 'id="play"', 'id="download"', 'id="upload"', "/v1/audio/speech",
                   "AudioContext", "chatterbox-nano"):
        assert needle in r.text, needle
    assert "http://" not in r.text and "https://" not in r.text  # no CDN, nothing external


def test_import_without_the_extra_names_it():
    import subprocess
    import sys

    code = "import sys; sys.modules['fastapi'] = None\ntry:\n import chatterbox.serve\nexcept ImportError as e:\n print(e)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    assert "chatterbox-fast[server]" in out and "fastapi" in out


def test_free_port_helper_binds_localhost_only(server):
    assert server.host == "127.0.0.1"
    with socket.create_connection((server.host, server.port), timeout=2):
        pass
