"""Everything one app instance owns: config, model backend, voices, metrics, admission, readiness."""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Optional

from .backend import SpeechBackend
from .config import ServeConfig
from .errors import APIError
from .jobs import Admission
from .metrics import ServeMetrics
from .voices import VoiceStore

logger = logging.getLogger("chatterbox.serve")


class ServerState:
    """Per-app state (kept on `app.state.chatterbox`; nothing global).

    Loading runs in a background thread so `/health` answers at once; `/ready` and the API answer
    503 until the model is loaded (and warmed up, when the loader compiles) and the voices are read.
    """

    def __init__(self, config: ServeConfig, model=None, *, loader: Optional[Callable[[], object]] = None,
                 owns_model: Optional[bool] = None, on_fatal: Optional[Callable[[BaseException], None]] = None):
        if model is None and loader is None:
            raise ValueError("create_app needs a loaded model or a loader function")
        self.config = config
        self._model, self._loader, self._on_fatal = model, loader, on_fatal
        self.owns_model = (model is None) if owns_model is None else owns_model
        self.backend: Optional[SpeechBackend] = None
        self.voices: Optional[VoiceStore] = None
        self.admission = Admission(0)
        self.metrics = ServeMetrics(self._stats, lambda: self.admission.in_flight, lambda: self.admission.limit)
        self.ready = threading.Event()
        self.draining = False
        self.load_error: Optional[str] = None
        self.created = int(time.time())
        self._closed = False

    def _stats(self) -> dict:
        return self.backend.stats() if self.backend is not None else {}

    # ---------------------------------------------------------------- lifecycle (worker threads)
    def prepare(self) -> None:
        """Load the model (if needed), apply max_batch, read the voices, then mark ready."""
        try:
            t0 = time.perf_counter()
            model = self._model if self._model is not None else self._loader()
            self._model = model
            backend = SpeechBackend(model, self.config.model_kind)
            if self.config.max_batch is not None:
                backend.set_max_batch(self.config.max_batch)
            slots = self.config.max_batch or backend.max_batch()
            voices = VoiceStore(self.config.voices_dir, backend, max_seconds=self.config.max_voice_seconds)
            voices.load_all()
            self.backend, self.voices = backend, voices
            self.admission.limit = slots + self.config.max_queue
            self.ready.set()
            logger.info("ready: %s, %d decode slot(s), queue %d, voices in %s (%.1f s)", self.config.model_id,
                        slots, self.config.max_queue, self.config.voices_dir, time.perf_counter() - t0)
        except BaseException as e:
            self.load_error = f"{type(e).__name__}: {e}"
            logger.error("could not start the model: %s", self.load_error, exc_info=e)
            if self._on_fatal is not None:
                self._on_fatal(e)

    def shutdown(self, drain_timeout: Optional[float] = None) -> None:
        """Wait for in-flight model work (bounded), then close the model when this app loaded it."""
        self.draining = True
        self.ready.clear()
        if not self.admission.wait_idle(drain_timeout):
            logger.warning("shutdown: %d request(s) still running after %.0f s", self.admission.in_flight,
                           drain_timeout or 0)
        if self.owns_model and self.backend is not None and not self._closed:
            self._closed = True
            self.backend.close()

    # ---------------------------------------------------------------- request helpers (event loop)
    def require_ready(self) -> None:
        if self.ready.is_set():
            return
        if self.draining:
            raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
        if self.load_error:
            raise APIError(503, f"the model failed to load: {self.load_error}", type="server_error",
                           code="model_load_failed")
        raise APIError(503, "the model is still loading; retry shortly (GET /ready turns 200 when it is up)",
                       type="server_error", code="model_loading", headers={"Retry-After": "5"})
