"""The speech server on Ray Serve: many replicas (one engine each) behind one OpenAI-compatible endpoint.

    serve run chatterbox_serve.yaml                        # the config at the repository root
    chatterbox serve --ray --replicas 2 --demo-weights     # a local Ray instance (run_local)
    serve run chatterbox.serve.ray_app:build_app kind=nano demo_weights=true

Each replica of a `ChatterboxDeployment` loads one model in its constructor and serves it through
the same FastAPI app as `chatterbox serve` (`create_app`), as its `serve.ingress`; T3 decoding of the
replica's concurrent requests is batched by that model's scheduler, Ray routes whole HTTP requests
between replicas and scales them. Several model kinds in one application are separate deployments
behind a `ChatterboxRouter` ingress that picks the deployment from the request's `model` field.

Voices live in a directory every replica of a kind reads and writes (a shared filesystem on a
multi-node cluster); with several kinds each kind keeps its own `<voices_dir>/<kind>`.
Needs the `ray` extra: `pip install 'chatterbox-fast[ray]'`.
"""
from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from types import SimpleNamespace
from typing import Any, AsyncIterator, Callable, Optional

try:
    from ray import serve
    from ray.serve.handle import DeploymentHandle
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("chatterbox.serve.ray_app needs the 'ray' extra (Ray Serve); install it with: "
                      "pip install 'chatterbox-fast[ray]'") from e

from fastapi import FastAPI, Request  # noqa: E402 (the router's annotations must resolve at module level)
from fastapi.responses import JSONResponse, StreamingResponse  # noqa: E402

from .config import MODEL_KINDS, ServeConfig, default_voices_dir  # noqa: E402
from .errors import APIError, install_handlers  # noqa: E402

logger = logging.getLogger("chatterbox.serve")

REPLICA_HEADER = "x-chatterbox-replica"  # names the replica that served a response
MODEL_HEADER = "x-chatterbox-model"
MAX_FORWARD_BODY = 16 * 1024 * 1024  # the router refuses larger request bodies (voice uploads are <= 10 MiB)


@dataclass
class ModelSpec:
    """What one replica loads and how its server behaves (the `args` of a serve config, per model kind).

    The model comes from `factory` ("package.module:function", called with `factory_kwargs`, returning
    a loaded model) when given, else `ckpt_dir`, else the Hugging Face Hub (deterministic demo weights
    when unreachable or with `demo_weights`, as `chatterbox serve` does).
    """

    kind: str = "nano"
    ckpt_dir: Optional[str] = None
    demo_weights: bool = False
    factory: Optional[str] = None
    factory_kwargs: dict = field(default_factory=dict)
    device: Optional[str] = None  # None: cuda when the replica has a GPU, else cpu
    compile: bool = False
    watermark: bool = True
    torch_threads: Optional[int] = None  # None: the CPUs Ray gave the replica (ray_actor_options.num_cpus)
    pin_cpus: bool = False  # pin the replica's process to its own cores (by its rank on the node; CPU serving)
    voices_dir: Optional[str] = None  # shared by every replica of this kind; None: ~/.cache/chatterbox-fast/voices
    max_batch: Optional[int] = None
    max_queue: int = 32
    request_timeout: float = 300.0
    default_max_new_tokens: Optional[int] = None
    drain_timeout: Optional[float] = None  # after Ray's own drain, bound the wait for model work
    stall_timeout: float = 120.0  # unhealthy when the engine holds work but decodes nothing this long; 0 disables

    def __post_init__(self) -> None:
        if self.kind not in MODEL_KINDS:
            raise ValueError(f"kind must be one of {MODEL_KINDS}, got {self.kind!r}")
        if self.factory is not None and ":" not in self.factory:
            raise ValueError(f"factory must look like 'package.module:function', got {self.factory!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        """From a serve config's args; strings (`serve run ... kind=nano max_queue=8`) become the fields' types."""
        types = {f.name: str(f.type) for f in fields(cls)}
        unknown = sorted(set(d) - set(types))
        if unknown:
            raise ValueError(f"unknown model option(s) {unknown}; known: {sorted(types)}")
        return cls(**{k: _from_text(k, v, types[k]) if isinstance(v, str) else v for k, v in d.items()})

    def serve_config(self) -> ServeConfig:
        return ServeConfig(model_kind=self.kind, voices_dir=Path(self.voices_dir) if self.voices_dir else None,
                           max_batch=self.max_batch, max_queue=self.max_queue, request_timeout=self.request_timeout,
                           default_max_new_tokens=self.default_max_new_tokens)


def _from_text(name: str, text: str, type_name: str):
    """A command-line value for a field annotated `type_name` ("bool", "Optional[int]", ...)."""
    if "Optional" in type_name and text.lower() in ("none", "null", ""):
        return None
    try:
        if "bool" in type_name:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return text.lower() in ("true", "1", "yes")
        if "int" in type_name:
            return int(text)
        if "float" in type_name:
            return float(text)
        if "dict" in type_name:
            return dict(json.loads(text))
    except (ValueError, TypeError):
        raise ValueError(f"{name}={text!r} is not a valid {type_name}") from None
    return text


def deployment_name(kind: str) -> str:
    """The Ray Serve deployment serving `kind` (the name a serve config's `deployments:` entry uses)."""
    return f"chatterbox-{kind}"


def _import_factory(path: str) -> Callable[..., Any]:
    module, _, name = path.partition(":")
    fn = getattr(importlib.import_module(module), name, None)
    if not callable(fn):
        raise ValueError(f"factory {path!r}: {module} has no callable {name!r}")
    return fn


def _assigned(resource: str) -> float:
    import ray

    try:
        return float(ray.get_runtime_context().get_assigned_resources().get(resource, 0.0))
    except Exception:  # not inside a Ray worker (tests calling load_model directly)
        return 0.0


def pin_to_own_cores(n: int, local_rank: int) -> list[int]:
    """Restrict this process to `n` cores, the `local_rank`-th group of the cores it may use; returns them.

    Threads alone do not bound a replica: its request threads and scheduler thread run torch ops side
    by side, so without pinning one replica spreads over every core and a second adds little.
    """
    cores = sorted(os.sched_getaffinity(0))
    n = max(1, min(n, len(cores)))
    start = (local_rank * n) % len(cores)
    mine = [cores[(start + i) % len(cores)] for i in range(n)]
    os.sched_setaffinity(0, mine)
    return mine


def load_model(spec: ModelSpec, config: ServeConfig, local_rank: int = 0):
    """Load the replica's model as `spec` says (pins cores and sets torch's thread count first); returns it."""
    import torch

    cpus = _assigned("CPU")
    threads = spec.torch_threads or (max(1, int(cpus)) if cpus > 0 else 0)
    if spec.pin_cpus and hasattr(os, "sched_setaffinity"):
        mine = pin_to_own_cores(threads or 1, local_rank)
        logger.info("replica pinned to core(s) %s", mine)
    if threads > 0:
        torch.set_num_threads(threads)  # the replica's own cores: replicas on one node do not fight over threads
    t0 = time.perf_counter()
    if spec.factory:
        model = _import_factory(spec.factory)(**spec.factory_kwargs)
    else:
        from .cli import make_loader

        device = spec.device or ("cuda" if _assigned("GPU") > 0 and torch.cuda.is_available() else None)
        a = SimpleNamespace(model=spec.kind, ckpt_dir=spec.ckpt_dir, demo_weights=spec.demo_weights, device=device,
                            no_watermark=not spec.watermark, compile=spec.compile)
        loader = make_loader(a, config)
        if spec.ckpt_dir:
            model = loader()
        else:  # replicas on one node share the Hub cache and the demo checkpoint cache: one writer at a time
            with _node_lock(f"load-{spec.kind}"):
                model = loader()
    logger.info("replica loaded %s in %.1f s (%d torch threads)", spec.kind, time.perf_counter() - t0,
                torch.get_num_threads())
    return model


class _node_lock:
    """An exclusive file lock in the cache directory (serialises first-time downloads/writes on one node)."""

    def __init__(self, name: str):
        root = Path(os.environ.get("CHATTERBOX_FAST_CACHE", Path.home() / ".cache" / "chatterbox-fast"))
        root.mkdir(parents=True, exist_ok=True)
        self.path = root / f".{name}.lock"

    def __enter__(self):
        import fcntl

        self._f = open(self.path, "w")
        fcntl.flock(self._f, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        import fcntl

        fcntl.flock(self._f, fcntl.LOCK_UN)
        self._f.close()


class ReplicaASGI:
    """The server app as a replica runs it: lifespan startup completes once the server is ready (model and
    voices in), so Ray routes nothing to a replica still preparing; every response names the replica."""

    def __init__(self, app, replica_id: str, model_id: str):
        self.app = app
        self.state = app.state.chatterbox
        self._headers = [(REPLICA_HEADER.encode(), replica_id.encode()), (MODEL_HEADER.encode(), model_id.encode())]

    def add_exception_handler(self, exc, handler) -> None:  # Ray registers its back-pressure errors here
        self.app.add_exception_handler(exc, handler)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            return await self.app(scope, receive, self._lifespan_send(send))
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def named_send(message):
            if message["type"] == "http.response.start":
                message = dict(message, headers=list(message.get("headers", ())) + self._headers)
            await send(message)

        await self.app(scope, receive, named_send)

    def _lifespan_send(self, send):
        async def wait_ready_then_send(message):
            if message["type"] == "lifespan.startup.complete":
                while not self.state.ready.is_set() and self.state.load_error is None:
                    await asyncio.sleep(0.05)
                if self.state.load_error is not None:
                    message = {"type": "lifespan.startup.failed", "message": self.state.load_error}
            await send(message)

        return wait_ready_then_send


async def serve_forwarded(app, req: dict) -> AsyncIterator[Any]:
    """Run one HTTP request (forwarded as a dict by the router) through `app`; yields the response start
    ({"status", "headers"}) and then the body chunks. Closing the generator is a client disconnect."""
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": req["method"], "scheme": "http", "path": req["path"], "raw_path": req["path"].encode(),
             "root_path": "", "query_string": req.get("query_string", b""), "headers": req.get("headers", []),
             "client": tuple(req.get("client") or ("router", 0)), "server": ("chatterbox", 80), "state": {}}
    messages: asyncio.Queue = asyncio.Queue()
    gone = asyncio.Event()
    body_sent = False

    async def receive():
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": req.get("body", b""), "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        await messages.put(message)

    task = asyncio.ensure_future(app(scope, receive, send))
    task.add_done_callback(lambda _t: messages.put_nowait(None))
    try:
        while True:
            message = await messages.get()
            if message is None:
                break
            if message["type"] == "http.response.start":
                yield {"status": message["status"],
                       "headers": [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message.get("headers", ())]}
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield bytes(message["body"])
                if not message.get("more_body", False):
                    break
        await task
    finally:
        gone.set()  # the app sees the disconnect and cancels its model work
        if not task.done():
            try:
                await asyncio.wait_for(asyncio.shield(task), 5.0)
            except (asyncio.TimeoutError, Exception):
                task.cancel()


class _Replica:
    """What both replica classes do: load the model, build the server app around it, report health."""

    def _setup(self, spec: dict) -> None:
        self.spec = ModelSpec.from_dict(spec)
        self.config = self.spec.serve_config()
        ctx = serve.get_replica_context()
        self.replica_id = ctx.replica_tag
        rank = getattr(ctx, "rank", None)
        self.model = load_model(self.spec, self.config, getattr(rank, "local_rank", 0) or 0)
        self._closed = False
        self._progress = (-1, -1, time.monotonic())  # (tokens, requests done, when they last moved)

    def _build(self) -> ReplicaASGI:
        from .app import create_app

        app = create_app(self.model, config=self.config, owns_model=True, drain_timeout=self.spec.drain_timeout)
        self.asgi = ReplicaASGI(app, self.replica_id, self.config.model_id)  # (`app` is Ray's property)
        return self.asgi

    def check_health(self) -> None:
        """Raise (Ray restarts the replica) when the model failed, is not ready, or its engine is stuck."""
        st = self.asgi.state
        if st.load_error:
            raise RuntimeError(f"the model failed to load: {st.load_error}")
        if st.draining:
            return  # stopping: Ray is replacing this replica already
        if not st.ready.is_set():
            raise RuntimeError("the server is not ready")
        stats = st.backend.stats()
        work = int(stats.get("queue_depth", 0)) + int(stats.get("active", 0))
        now = time.monotonic()
        moved = (int(stats.get("tokens_generated", 0)), int(stats.get("requests_done", 0)))
        if moved != self._progress[:2] or not work:
            self._progress = (*moved, now)
        elif self.spec.stall_timeout and now - self._progress[2] > self.spec.stall_timeout:
            raise RuntimeError(f"the engine holds {work} request(s) but decoded nothing for "
                               f"{now - self._progress[2]:.0f} s")

    def info(self) -> dict:
        """This replica at a glance (a handle call): id, model, torch threads, readiness, engine counters."""
        import torch

        st = self.asgi.state
        cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        return {"replica": self.replica_id, "model": self.config.model_id, "torch_threads": torch.get_num_threads(),
                "cores": cores, "ready": st.ready.is_set(), "draining": st.draining, "engine": st.backend.stats() if st.backend else {}}

    def _close_model(self) -> None:
        # After Ray's drain and the app's shutdown (which closes the model already); idempotent.
        model = getattr(self, "model", None)
        if model is not None and not getattr(self, "_closed", True):
            self._closed = True
            close = getattr(model, "close", None)
            if close is not None:
                close()


@serve.deployment(name="chatterbox", max_ongoing_requests=44, graceful_shutdown_timeout_s=120,
                  graceful_shutdown_wait_loop_s=1, health_check_period_s=10, health_check_timeout_s=30)
@serve.ingress()
class ChatterboxDeployment(_Replica):
    """One replica: one model (and its continuous-batching scheduler) behind the OpenAI-compatible app,
    Ray's HTTP proxy in front (the application's ingress when it serves one kind).

    Ray drains a stopping replica (waits for its ongoing requests), then the app's shutdown waits for
    model work and closes the model; `check_health` reports the engine's readiness and progress.
    """

    def __init__(self, spec: dict):
        self._setup(spec)

    def __serve_build_asgi_app__(self):
        return self._build()

    def __del__(self):
        self._close_model()


@serve.deployment(name="chatterbox-backend", max_ongoing_requests=44, graceful_shutdown_timeout_s=120,
                  graceful_shutdown_wait_loop_s=1, health_check_period_s=10, health_check_timeout_s=30)
class ChatterboxBackend(_Replica):
    """A kind's replica behind the router (Ray allows one ingress per application): the same app, with
    its lifespan run here as Ray runs an ingress's, serving requests the router forwards to `handle_http`."""

    async def __init__(self, spec: dict):
        from uvicorn import Config
        from uvicorn.lifespan.on import LifespanOn

        self._setup(spec)
        self._lifespan = LifespanOn(Config(self._build(), lifespan="on", log_config=None, access_log=False))
        await self._lifespan.startup()
        if self._lifespan.should_exit:
            raise RuntimeError(f"the server did not start: {self.asgi.state.load_error or 'see the replica log'}")

    async def handle_http(self, req: dict) -> AsyncIterator[Any]:
        """One HTTP request forwarded by the router: response start, then body chunks (see serve_forwarded)."""
        async for item in serve_forwarded(self.asgi, req):
            yield item

    async def __del__(self):
        lifespan = getattr(self, "_lifespan", None)
        if lifespan is not None:
            await lifespan.shutdown()  # the app waits for model work, then closes the model
        self._close_model()


# ------------------------------------------------------------------------------------ several kinds
def route_model(name: str, kinds: tuple[str, ...], default: str) -> Optional[str]:
    """The kind serving the `model` name: "chatterbox-<kind>" or "<kind>"; OpenAI's names -> `default`."""
    for kind in kinds:
        if name in (f"chatterbox-{kind}", kind):
            return kind
    generic = ServeConfig(model_kind=default, voices_dir=".").model_aliases[2:]
    return default if name in generic else None


@serve.deployment(name="chatterbox-router", max_ongoing_requests=1024, ray_actor_options={"num_cpus": 0},
                  graceful_shutdown_timeout_s=120)
@serve.ingress()
class ChatterboxRouter:
    """Ingress of a several-kinds application: forwards each HTTP request to the deployment of its model.

    `POST /v1/audio/speech` goes by the body's `model`; `/v1/models` and `/ready` cover every kind;
    voice routes and everything else go to `?model=<kind>` (default: `default`), since a voice
    upload names no model and each kind keeps its own voices.
    """

    def __init__(self, backends: dict, default: str):
        self.handles: dict[str, DeploymentHandle] = {k: h.options(stream=True) for k, h in backends.items()}
        self.kinds = tuple(backends)
        self.default = default if default in backends else self.kinds[0]

    def __serve_build_asgi_app__(self):
        return build_router_app(self)

    async def forward(self, kind: str, req: dict):
        """(start, body iterator) of `req` served by `kind`'s deployment; raises when no replica answered."""
        gen = self.handles[kind].handle_http.remote(req)
        try:
            start = await gen.__anext__()
        except BaseException:
            gen.cancel()
            raise

        async def body():
            done = False
            try:
                async for chunk in gen:
                    yield chunk
                done = True
            finally:
                if not done:
                    gen.cancel()  # client gone (or failure): the replica's generator sees a disconnect

        return start, body()

    async def call(self, kind: str, method: str, path: str) -> tuple[int, bytes]:
        start, body = await self.forward(kind, {"method": method, "path": path, "headers": [], "body": b""})
        return start["status"], b"".join([c async for c in body])


def build_router_app(router: ChatterboxRouter):
    """The router's FastAPI app (OpenAI-shaped errors as the server's own)."""
    app = FastAPI(title="Chatterbox speech server (Ray Serve router)", version="1")
    install_handlers(app)

    def unknown_model(name: str) -> APIError:
        served = ", ".join(f"chatterbox-{k}" for k in router.kinds)
        return APIError(404, f"the model '{name}' does not exist on this server; it serves {served} "
                        "(see GET /v1/models)", param="model", code="model_not_found")

    def kind_of_query(request: Request) -> str:
        name = request.query_params.get("model")
        if name is None:
            return router.default
        kind = route_model(name, router.kinds, router.default)
        if kind is None:
            raise unknown_model(name)
        return kind

    async def relay(kind: str, request: Request, body: bytes):
        req = {"method": request.method, "path": request.url.path, "query_string": request.scope["query_string"],
               "headers": [(k, v) for k, v in request.scope["headers"] if k.lower() != b"content-length"]
               + [(b"content-length", str(len(body)).encode())], "body": body,
               "client": list(request.scope.get("client") or ("router", 0))}
        try:
            start, chunks = await router.forward(kind, req)
        except Exception as e:
            logger.error("no replica of %s answered: %s: %s", kind, type(e).__name__, e)
            raise APIError(503, f"the chatterbox-{kind} replica failed ({type(e).__name__}); retry", type="server_error",
                           code="replica_unavailable", headers={"Retry-After": "1"}) from None
        sse = any(k.lower() == "content-type" and v.startswith("text/event-stream") for k, v in start["headers"])

        async def body_iter():
            try:
                async for chunk in chunks:
                    yield chunk
            except Exception as e:  # the replica died mid-response: end SSE with an error event, else cut
                logger.error("chatterbox-%s replica failed mid-response: %s: %s", kind, type(e).__name__, e)
                if not sse:
                    raise
                err = APIError(500, f"the replica failed mid-stream ({type(e).__name__})", type="server_error",
                               code="replica_failed").body()
                yield b"data: " + json.dumps({"type": "error", **err}).encode() + b"\n\n"

        resp = StreamingResponse(body_iter(), status_code=start["status"])
        resp.raw_headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in start["headers"]]
        return resp

    async def read_body(request: Request) -> bytes:
        size = int(request.headers.get("content-length") or 0)
        if size > MAX_FORWARD_BODY:
            raise APIError(413, f"the request body is larger than {MAX_FORWARD_BODY // 2 ** 20} MiB",
                           code="file_too_large")
        parts, n = [], 0
        async for chunk in request.stream():
            n += len(chunk)
            if n > MAX_FORWARD_BODY:
                raise APIError(413, f"the request body is larger than {MAX_FORWARD_BODY // 2 ** 20} MiB",
                               code="file_too_large")
            parts.append(chunk)
        return b"".join(parts)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        status = {}
        for kind in router.kinds:
            try:
                code, body = await router.call(kind, "GET", "/ready")
                status[kind] = json.loads(body).get("status", str(code)) if code == 200 or body else str(code)
            except Exception as e:
                status[kind] = f"unavailable ({type(e).__name__})"
        ok = all(s == "ready" for s in status.values())
        return JSONResponse({"status": "ready" if ok else "not ready", "models": status}, status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models():
        data = []
        for kind in router.kinds:
            code, body = await router.call(kind, "GET", "/v1/models")
            if code == 200:
                data.extend(json.loads(body)["data"])
        return {"object": "list", "data": data}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str, request: Request):
        kind = route_model(model_id, router.kinds, router.default)
        if kind is None:
            raise unknown_model(model_id)
        return await relay(kind, request, b"")

    @app.post("/v1/audio/speech")
    async def speech(request: Request):
        body = await read_body(request)
        kind = router.default  # a body the router cannot read: the server gives the precise 400
        try:
            name = json.loads(body).get("model")
        except (ValueError, AttributeError):
            name = None
        if isinstance(name, str):
            kind = route_model(name, router.kinds, router.default)
            if kind is None:
                raise unknown_model(name)
        return await relay(kind, request, body)

    @app.api_route("/{path:path}", methods=["GET", "POST", "DELETE", "PUT", "PATCH"])
    async def other(path: str, request: Request):
        return await relay(kind_of_query(request), request, await read_body(request))

    return app


# ------------------------------------------------------------------------------------ building apps
def default_deployment_options(spec: ModelSpec, replicas: int = 1, max_replicas: Optional[int] = None,
                               gpu: Optional[bool] = None) -> dict:
    """Ray options for a kind's deployment: `replicas` (autoscaling up to `max_replicas` when larger), one GPU
    per replica when `gpu` (default: the spec asks for CUDA), else one CPU; in-flight cap = decode slots + queue
    (+ headroom for voices/models/health), autoscaling target = the decode slots."""
    slots = spec.max_batch or 4
    opts: dict = {"name": deployment_name(spec.kind), "max_ongoing_requests": slots + spec.max_queue + 8}
    gpu = (spec.device or "").startswith("cuda") if gpu is None else gpu
    opts["ray_actor_options"] = {"num_gpus": 1, "num_cpus": 1} if gpu else {"num_cpus": 1}
    if max_replicas and max_replicas > replicas:
        opts["autoscaling_config"] = {"min_replicas": replicas, "initial_replicas": replicas,
                                      "max_replicas": max_replicas, "target_ongoing_requests": slots}
        opts["num_replicas"] = "auto"
    else:
        opts["num_replicas"] = replicas
    return opts


def build_app(args: Optional[dict] = None):
    """The application a serve config's `import_path` names: `args` is one model's options (`ModelSpec`
    fields) or `{"models": [...], "default_model": kind}` for several kinds. Per-deployment Ray options
    (`num_replicas`, `autoscaling_config`, `ray_actor_options`, ...) come from the config's `deployments:`
    list by name (`chatterbox-<kind>`, `chatterbox-router`), or `deployment` inside a model's args."""
    args = dict(args or {})
    entries = args.pop("models", None)
    default = args.pop("default_model", None)
    if entries is None:
        entries = [args]
    elif args:
        raise ValueError(f"with 'models', the only other key is 'default_model' (got {sorted(args)})")
    if not entries:
        raise ValueError("'models' is empty")
    specs, overrides = [], []
    for entry in entries:
        entry = dict(entry)
        overrides.append(dict(entry.pop("deployment", None) or {}))
        specs.append(ModelSpec.from_dict(entry))
    kinds = [s.kind for s in specs]
    if len(set(kinds)) != len(kinds):
        raise ValueError(f"each model kind may appear once, got {kinds}")
    several = len(specs) > 1
    bound = {}
    for spec, extra in zip(specs, overrides):
        if several and spec.voices_dir is None:  # kinds keep separate voices (conditionals are per kind)
            spec.voices_dir = str(default_voices_dir() / spec.kind)
        elif several:
            spec.voices_dir = str(Path(spec.voices_dir) / spec.kind)
        opts = {**default_deployment_options(spec), **extra}
        if "autoscaling_config" in extra:
            opts["num_replicas"] = extra.get("num_replicas", "auto")
        cls = ChatterboxBackend if several else ChatterboxDeployment
        bound[spec.kind] = cls.options(**opts).bind(asdict(spec))
    if not several:
        return next(iter(bound.values()))
    if default is not None and default not in bound:
        raise ValueError(f"default_model {default!r} is not one of the served kinds {kinds}")
    return ChatterboxRouter.bind(bound, default or kinds[0])


# ------------------------------------------------------------------------------------ local start
def spec_from_cli(a: argparse.Namespace) -> ModelSpec:
    """A ModelSpec from `chatterbox serve` options."""
    return ModelSpec(kind=a.model, ckpt_dir=a.ckpt_dir, demo_weights=a.demo_weights, device=a.device,
                     compile=a.compile, watermark=not a.no_watermark, voices_dir=a.voices_dir, max_batch=a.max_batch,
                     max_queue=a.max_queue, request_timeout=a.request_timeout,
                     default_max_new_tokens=a.max_new_tokens, drain_timeout=a.drain_timeout)


def run_local(a: argparse.Namespace) -> int:
    """`chatterbox serve --ray`: start a local Ray instance (no dashboard; or join RAY_ADDRESS), serve until
    SIGINT/SIGTERM, then shut down gracefully (Ray drains each replica, the app closes its model)."""
    import ray
    import torch

    if a.replicas < 1 or (a.max_replicas is not None and a.max_replicas < a.replicas):
        print("chatterbox serve: --replicas must be >= 1 and --max-replicas >= --replicas", file=sys.stderr)
        return 2
    spec = spec_from_cli(a)
    if not a.ckpt_dir and a.demo_weights:  # write the demo checkpoint once, before the replicas start
        from ..demo import det_checkpoint

        spec.ckpt_dir = str(det_checkpoint({"original": "english"}.get(a.model, a.model)))
        spec.demo_weights = False
        logger.warning("NOT SPEECH: serving deterministic demo weights from %s", spec.ckpt_dir)
    gpu = (spec.device or "").startswith("cuda") or (spec.device is None and torch.cuda.is_available())
    opts = default_deployment_options(spec, a.replicas, a.max_replicas, gpu=gpu)
    if not gpu:
        opts["ray_actor_options"] = {"num_cpus": a.cpus_per_replica}
    if not ray.is_initialized():
        ray.init(include_dashboard=False, configure_logging=False)
    serve.start(http_options={"host": a.host, "port": a.port})
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.run(ChatterboxDeployment.options(**opts).bind(asdict(spec)), name="chatterbox", route_prefix="/")
        logger.info("serving chatterbox-%s on http://%s:%d with %s replica(s) on Ray Serve (%s each)", a.model,
                    a.host, a.port, a.replicas if not a.max_replicas else f"{a.replicas}-{a.max_replicas}",
                    "1 GPU" if gpu else f"{a.cpus_per_replica:g} CPU")
        while not stop.wait(1.0):
            pass
    finally:
        logger.info("shutting down: Ray drains the replicas, then each closes its model")
        try:
            serve.delete("chatterbox")  # first, while the proxy still carries the in-flight responses
        finally:
            serve.shutdown()
            ray.shutdown()
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """`python -m chatterbox.serve.ray_app [chatterbox serve options]`: the same as `chatterbox serve --ray`."""
    from .cli import build_parser

    a = build_parser().parse_args(argv)
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_local(a)


if __name__ == "__main__":
    sys.exit(main())
