"""OpenAI-compatible routes: /v1/audio/speech, /v1/audio/voices, /v1/models.

`stream_format` omitted: the whole file in one response (model.generate, identical samples for a
seed); `audio`: the encoded bytes chunked as the model makes them; `sse`: `speech.audio.delta` events
(base64 of the same bytes) then `speech.audio.done`. Request bodies are strict: unknown fields and
wrong types are 400s naming the parameter.
"""
from __future__ import annotations

import asyncio
import base64
import json
import logging
import secrets
import time
from pathlib import Path
from typing import Literal, Optional, Union

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, StrictFloat, StrictInt, StrictStr

from .backend import TOP_K_KINDS, SpeechJob
from .codecs import FORMATS, MAX_SPEED, MEDIA_TYPES, MIN_SPEED, AudioEncoder, encode_whole
from .errors import APIError
from .jobs import Job, JobTimeout
from .state import ServerState

logger = logging.getLogger("chatterbox.serve")
router = APIRouter()


def _state(request: Request) -> ServerState:
    return request.app.state.chatterbox


# ------------------------------------------------------------------------------------ request bodies
class VoiceRef(BaseModel):
    """`{"id": "voice_..."}`: the object form of `voice` newer OpenAI clients send."""

    model_config = ConfigDict(extra="forbid")
    id: StrictStr


class SpeechRequest(BaseModel):
    """Body of POST /v1/audio/speech: OpenAI's fields plus Chatterbox's sampling knobs."""

    model_config = ConfigDict(extra="forbid")
    model: StrictStr
    input: StrictStr
    voice: Union[StrictStr, VoiceRef]
    instructions: Optional[StrictStr] = None  # accepted for compatibility; Chatterbox has no instruction input
    response_format: StrictStr = "mp3"
    speed: StrictFloat = 1.0
    stream_format: Optional[Literal["audio", "sse"]] = None
    # Chatterbox extras (None: the model's default)
    exaggeration: Optional[StrictFloat] = None
    cfg_weight: Optional[StrictFloat] = None
    temperature: Optional[StrictFloat] = None
    top_p: Optional[StrictFloat] = None
    min_p: Optional[StrictFloat] = None
    repetition_penalty: Optional[StrictFloat] = None
    top_k: Optional[StrictInt] = None
    seed: Optional[StrictInt] = None
    max_new_tokens: Optional[StrictInt] = None
    language: Optional[StrictStr] = None


# ------------------------------------------------------------------------------------ validation
def _check_model(st: ServerState, name: str) -> None:
    if name not in st.config.model_aliases:
        raise APIError(404, f"the model '{name}' does not exist on this server; it serves '{st.config.model_id}' "
                       "(see GET /v1/models)", param="model", code="model_not_found")


def _build_job(st: ServerState, body: SpeechRequest) -> SpeechJob:
    cfg = st.config
    _check_model(st, body.model)
    if not body.input.strip():
        raise APIError(400, "'input' is empty; send the text to speak", param="input", code="empty_input")
    if len(body.input) > cfg.max_input_chars:
        raise APIError(400, f"'input' is {len(body.input)} characters; the limit is {cfg.max_input_chars}. "
                       "Split the text into several requests.", param="input", code="input_too_long")
    if body.response_format not in FORMATS:
        raise APIError(400, f"response_format '{body.response_format}' is not supported; use one of "
                       f"{', '.join(FORMATS)}", param="response_format", code="unsupported_format")
    if not (MIN_SPEED <= body.speed <= MAX_SPEED):
        raise APIError(400, f"speed must be between {MIN_SPEED} and {MAX_SPEED}, got {body.speed}",
                       param="speed", code="invalid_value")
    voice_id = body.voice if isinstance(body.voice, str) else body.voice.id
    voice = st.voices.get(voice_id)
    if voice is None:
        known = ", ".join(v.id for v in st.voices.list()) or "none yet"
        raise APIError(404, f"voice '{voice_id}' not found (available: {known}); GET /v1/audio/voices lists the "
                       "voices and POST /v1/audio/voices uploads one", param="voice", code="voice_not_found")
    if body.top_k is not None and cfg.model_kind not in TOP_K_KINDS:
        raise APIError(400, f"top_k applies to the turbo and nano models, not '{cfg.model_kind}'", param="top_k",
                       code="invalid_value")
    if body.language is not None and cfg.model_kind != "multilingual" and body.language.lower() not in ("en", "english"):
        raise APIError(400, f"the '{cfg.model_kind}' model speaks English only; 'language' needs the multilingual "
                       "model (chatterbox serve --model multilingual)", param="language", code="invalid_value")
    if body.max_new_tokens is not None and not (1 <= body.max_new_tokens <= cfg.max_new_tokens_limit):
        raise APIError(400, f"max_new_tokens must be between 1 and {cfg.max_new_tokens_limit}",
                       param="max_new_tokens", code="invalid_value")
    if body.seed is not None and not (0 <= body.seed < 2**63):
        raise APIError(400, "seed must be a non-negative 64-bit integer", param="seed", code="invalid_value")
    knobs = {k: getattr(body, k) for k in ("exaggeration", "cfg_weight", "temperature", "top_p", "min_p",
                                           "repetition_penalty", "top_k")}
    return SpeechJob(text=body.input, conds=voice.conds, seed=body.seed,
                     language=body.language if cfg.model_kind == "multilingual" else None,
                     max_new_tokens=body.max_new_tokens if body.max_new_tokens is not None else cfg.default_max_new_tokens,
                     knobs=knobs)


def _generation_error(e: BaseException) -> APIError:
    """A library exception -> the client's error (bad input is a 400 with the library's message)."""
    if isinstance(e, (ValueError, TypeError)):
        return APIError(400, str(e) or type(e).__name__, code="invalid_value")
    logger.error("generation failed: %s: %s", type(e).__name__, e, exc_info=e)
    return APIError(500, f"generation failed ({type(e).__name__}: {e})", type="server_error", code="generation_failed")


def _timeout_error(st: ServerState) -> APIError:
    return APIError(504, f"the request did not finish within {st.config.request_timeout:g} s "
                    "(chatterbox serve --request-timeout)", type="server_error", code="request_timeout")


def _admit(st: ServerState) -> None:
    if not st.admission.try_enter():
        st.metrics.rejected.inc()
        raise APIError(429, f"the server is busy ({st.admission.limit} requests in flight: decode slots + "
                       f"--max-queue {st.config.max_queue}); retry after {st.config.retry_after_s} s",
                       type="rate_limit_exceeded", code="queue_full",
                       headers={"Retry-After": str(st.config.retry_after_s)})


# ------------------------------------------------------------------------------------ worker functions
def _work_file(backend, spec: SpeechJob, fmt: str, speed: float, job: Job) -> None:
    audio = backend.generate(spec)
    if job.cancelled:
        return
    job.put("file", (encode_whole(audio, fmt, backend.sr, speed=speed), audio.size))


def _work_stream(backend, spec: SpeechJob, fmt: str, speed: float, job: Job) -> None:
    enc = AudioEncoder(fmt, backend.sr, speed=speed, stream=True)
    it = backend.stream(spec)
    job.on_cancel(it.cancel)
    try:
        for audio, _metrics in it:
            if job.cancelled:
                return
            job.put("audio", (enc.push(audio), audio.size))
        if job.cancelled:
            return
        job.put("audio", (enc.finish(), 0))
        job.put("done", None)
    finally:
        it.close()  # on cancel: the library stops decoding this request at its next step
        enc.close()


class JobStreamingResponse(StreamingResponse):
    """Streams a job's bytes; a client that goes away cancels the job at once (not at the next write)."""

    def __init__(self, content, job: Job, **kw):
        super().__init__(content, **kw)
        self._job = job

    async def __call__(self, scope, receive, send) -> None:
        completed = False
        try:
            async with anyio.create_task_group() as tg:
                async def stream() -> None:
                    nonlocal completed
                    try:
                        await self.stream_response(send)
                        completed = True
                    except OSError:  # the socket went away while writing
                        pass
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                await self.listen_for_disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            if not completed:
                self._job.cancel("client disconnected")
            await self.body_iterator.aclose()


# ------------------------------------------------------------------------------------ routes
@router.post("/v1/audio/speech")
async def create_speech(body: SpeechRequest, request: Request):
    """Text to speech in any OpenAI format, whole or streamed."""
    st = _state(request)
    st.require_ready()
    spec = _build_job(st, body)
    fmt, speed, mode = body.response_format, float(body.speed), body.stream_format or "file"
    _admit(st)
    job = Job(asyncio.get_running_loop(), timeout=st.config.request_timeout)
    work = _work_file if mode == "file" else _work_stream
    job.start(lambda j: work(st.backend, spec, fmt, speed, j), st.admission.leave)
    sr = st.backend.sr
    m = st.metrics

    # Wait for the first audio (or the error): bad input still gets a proper status code.
    pending: list[bytes] = []
    samples = 0
    try:
        while True:
            kind, val = await job.get()
            if kind == "error":
                raise _generation_error(val)
            if kind == "end":
                raise APIError(500, "generation ended without audio", type="server_error", code="generation_failed")
            if kind == "file":
                data, samples = val
                elapsed = time.perf_counter() - job.started
                m.ttfa.labels(mode).observe(elapsed)
                m.latency.labels(mode).observe(elapsed)
                m.audio_seconds.inc(samples / sr)
                return Response(content=data, media_type=MEDIA_TYPES[fmt])
            if kind == "done":
                break
            data, n = val  # "audio"
            samples += n
            if data:
                pending.append(data)
                break
    except JobTimeout:
        m.cancelled.labels("timeout").inc()
        raise _timeout_error(st) from None
    except asyncio.CancelledError:
        job.cancel("client disconnected")
        raise
    m.ttfa.labels(mode).observe(time.perf_counter() - job.started)

    async def body_bytes():
        nonlocal samples
        finished = False
        done = kind == "done"
        try:
            for data in pending:
                yield _sse_delta(data) if mode == "sse" else data
            while not done:
                kind2, val2 = await job.get()
                if kind2 == "audio":
                    data2, n2 = val2
                    samples += n2
                    if data2:
                        yield _sse_delta(data2) if mode == "sse" else data2
                elif kind2 == "done":
                    done = True
                elif kind2 == "error":
                    err = _generation_error(val2)
                    logger.error("stream %d failed after its first audio: %s", job.id, err.message)
                    if mode == "sse":
                        yield _sse({"type": "error", "error": err.body()["error"]})
                    finished = True
                    return
                elif kind2 == "end":
                    break
            if mode == "sse":
                yield _sse({"type": "speech.audio.done",
                            "usage": {"input_tokens": len(body.input), "output_tokens": round(samples / sr * 25),
                                      "total_tokens": len(body.input) + round(samples / sr * 25)}})
            finished = True
            m.latency.labels(mode).observe(time.perf_counter() - job.started)
            m.audio_seconds.inc(samples / sr)
        except JobTimeout:
            m.cancelled.labels("timeout").inc()
            logger.warning("stream %d cut at the %.0f s request timeout", job.id, st.config.request_timeout)
            if mode == "sse":
                yield _sse({"type": "error", "error": _timeout_error(st).body()["error"]})
            finished = True
        finally:
            if not finished:
                m.cancelled.labels("disconnect").inc()
                job.cancel("client disconnected")

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    media = "text/event-stream" if mode == "sse" else MEDIA_TYPES[fmt]
    return JobStreamingResponse(body_bytes(), job, media_type=media, headers=headers)


def _sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def _sse_delta(data: bytes) -> bytes:
    return _sse({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode("ascii")})


# ------------------------------------------------------------------------------------ voices
async def _read_form_limited(request: Request, limit: int):
    """Parse a multipart body, refusing (413) more than `limit` bytes while it arrives."""
    from starlette.requests import Request as StarletteRequest

    too_large = APIError(413, f"audio_sample is larger than {limit // (1024 * 1024)} MiB; send a shorter clip",
                         param="audio_sample", code="file_too_large")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit + 64 * 1024:
        raise too_large
    received = 0

    async def receive():
        nonlocal received
        message = await request.receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit + 64 * 1024:
                raise too_large
        return message

    try:
        return await StarletteRequest(request.scope, receive).form(max_files=1, max_fields=16)
    except APIError:
        raise
    except Exception as e:  # malformed multipart
        raise APIError(400, f"could not parse the multipart form ({type(e).__name__}: {e})",
                       code="invalid_multipart") from None


@router.post("/v1/audio/voices")
async def create_voice(request: Request):
    """Upload reference audio (multipart `name`, `audio_sample`); returns the new voice."""
    st = _state(request)
    st.require_ready()
    cfg = st.config
    form = await _read_form_limited(request, cfg.max_voice_bytes)
    try:
        name, sample = form.get("name"), form.get("audio_sample")
        kind, consent = form.get("type"), form.get("consent")
        unknown = sorted(set(form.keys()) - {"name", "audio_sample", "type", "consent"})
        if unknown:
            raise APIError(400, f"unknown parameter '{unknown[0]}'", param=unknown[0], code="unknown_parameter")
        if kind not in (None, "audio_sample"):
            raise APIError(400, "only type 'audio_sample' voices are supported", param="type", code="invalid_value")
        if not isinstance(name, str) or not name.strip():
            raise APIError(400, "missing required parameter 'name' (a form field)", param="name",
                           code="missing_required_parameter")
        if len(name) > 256:
            raise APIError(400, "name is longer than 256 characters", param="name", code="invalid_value")
        if sample is None or isinstance(sample, str):
            raise APIError(400, "missing required parameter 'audio_sample' (a file part)", param="audio_sample",
                           code="missing_required_parameter")
        cfg.voices_dir.mkdir(parents=True, exist_ok=True)
        upload = Path(cfg.voices_dir) / f".tmp-upload-{secrets.token_hex(6)}"
        size = 0
        try:
            with open(upload, "wb") as f:
                while chunk := await sample.read(1 << 20):
                    size += len(chunk)
                    if size > cfg.max_voice_bytes:
                        raise APIError(413, f"audio_sample is larger than {cfg.max_voice_bytes // (1024 * 1024)} MiB",
                                       param="audio_sample", code="file_too_large")
                    f.write(chunk)
            if size == 0:
                raise APIError(400, "audio_sample is empty", param="audio_sample", code="invalid_audio")
            _admit(st)
            try:
                voice = await asyncio.to_thread(st.voices.add, name.strip(), upload,
                                                consent=consent if isinstance(consent, str) else None)
            except (ValueError, FileNotFoundError) as e:
                raise APIError(400, f"unusable audio_sample: {e}", param="audio_sample", code="invalid_audio") from None
            finally:
                st.admission.leave()
        finally:
            upload.unlink(missing_ok=True)
    finally:
        await form.close()
    logger.info("voice %s (%r) created", voice.id, voice.name)
    return voice.public()


@router.get("/v1/audio/voices")
async def list_voices(request: Request):
    st = _state(request)
    st.require_ready()
    return {"object": "list", "data": [v.public() for v in st.voices.list()]}


@router.get("/v1/audio/voices/{voice_id}")
async def get_voice(voice_id: str, request: Request):
    st = _state(request)
    st.require_ready()
    voice = st.voices.get(voice_id)
    if voice is None:
        raise APIError(404, f"voice '{voice_id}' not found; GET /v1/audio/voices lists the voices", param="voice_id",
                       code="voice_not_found")
    return voice.public()


@router.delete("/v1/audio/voices/{voice_id}")
async def delete_voice(voice_id: str, request: Request):
    st = _state(request)
    st.require_ready()
    voice = st.voices.get(voice_id)
    if voice is not None and voice.builtin:
        raise APIError(400, "the checkpoint's built-in voice cannot be deleted", param="voice_id", code="builtin_voice")
    if voice is None or not await asyncio.to_thread(st.voices.delete, voice_id):
        raise APIError(404, f"voice '{voice_id}' not found; GET /v1/audio/voices lists the voices", param="voice_id",
                       code="voice_not_found")
    return {"id": voice_id, "deleted": True, "object": "audio.voice.deleted"}


# ------------------------------------------------------------------------------------ models
def _model_obj(st: ServerState) -> dict:
    obj = {"id": st.config.model_id, "object": "model", "created": st.created, "owned_by": "chatterbox-fast"}
    if st.config.weights_note:
        obj["note"] = st.config.weights_note
    return obj


@router.get("/v1/models")
async def list_models(request: Request):
    return {"object": "list", "data": [_model_obj(_state(request))]}


@router.get("/v1/models/{model_id}")
async def get_model(model_id: str, request: Request):
    st = _state(request)
    _check_model(st, model_id)
    return JSONResponse(_model_obj(st))
