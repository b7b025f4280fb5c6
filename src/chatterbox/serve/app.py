"""The app factory: `create_app(model, config=ServeConfig(...))` -> a FastAPI app (serve it with uvicorn).

Routes: the OpenAI ones (openai_routes), `GET /health` (liveness), `GET /ready` (readiness),
`GET /metrics` (Prometheus), `GET /` (the playground page).
"""
from __future__ import annotations

import asyncio
import html
import logging
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Callable, Optional

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from .config import ServeConfig
from .errors import install_handlers
from .metrics import StatusCounterMiddleware
from .openai_routes import router
from .state import ServerState

logger = logging.getLogger("chatterbox.serve")
PLAYGROUND = Path(__file__).parent / "static" / "playground.html"


def create_app(model=None, *, config: Optional[ServeConfig] = None, loader: Optional[Callable[[], object]] = None,
               owns_model: Optional[bool] = None, on_fatal: Optional[Callable[[BaseException], None]] = None,
               drain_timeout: Optional[float] = None) -> FastAPI:
    """An app serving `model` (already loaded) or the model `loader()` returns (loaded in a background thread).

    owns_model (default: True with a loader) closes the model at shutdown; on_fatal is called when
    loading fails (the CLI stops the server); drain_timeout bounds the wait for in-flight work at shutdown.
    """
    config = config or ServeConfig()
    state = ServerState(config, model, loader=loader, owns_model=owns_model, on_fatal=on_fatal)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        import threading

        threading.Thread(target=state.prepare, name="chatterbox-load", daemon=True).start()
        yield
        # uvicorn has stopped accepting and waited for open responses; finish model work, close the model
        await asyncio.to_thread(state.shutdown, drain_timeout)

    app = FastAPI(title="Chatterbox speech server", version="1", lifespan=lifespan,
                  description="OpenAI-compatible text-to-speech on Chatterbox (chatterbox-fast)")
    app.state.chatterbox = state
    install_handlers(app)
    app.include_router(router)
    app.add_middleware(StatusCounterMiddleware, metrics_of=lambda: state.metrics)
    page = PLAYGROUND.read_text(encoding="utf-8") if PLAYGROUND.is_file() else None

    @app.get("/health")
    async def health():
        """Liveness: the process answers (the model may still be loading)."""
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        """Readiness: 200 once the model is loaded (and warmed up) and voices are read; 503 before and while draining."""
        if state.ready.is_set() and not state.draining:
            return {"status": "ready", "model": config.model_id}
        status = "draining" if state.draining else "failed" if state.load_error else "loading"
        body = {"status": status, "model": config.model_id}
        if state.load_error:
            body["error"] = state.load_error
        return JSONResponse(body, status_code=503)

    @app.get("/metrics")
    def metrics():  # sync: runs in the threadpool (engine_stats may take the model's lock)
        data, ctype = state.metrics.render()
        return Response(content=data, media_type=ctype)

    @app.get("/", response_class=HTMLResponse)
    async def playground(request: Request):
        if page is None:
            return HTMLResponse("<p>playground.html is missing from this installation</p>", status_code=500)
        note = html.escape(config.weights_note or "")
        return HTMLResponse(page.replace("{{MODEL_ID}}", config.model_id).replace("{{WEIGHTS_NOTE}}", note))

    return app
