"""Worker threads and their hand-off to the event loop: admission (backpressure), cancellation, timeouts.

Each admitted request gets one thread that runs the model call (and the audio encoder) and sends
events to an asyncio.Queue through `loop.call_soon_threadsafe`; the event loop only moves bytes.
Cancelling (client gone, timeout) sets a flag the thread checks after every chunk; it then closes the
library's iterator, which frees the decode slot at the scheduler's next step.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from typing import Any, Callable, Optional

logger = logging.getLogger("chatterbox.serve")


class Admission:
    """Counts requests that hold model work; refuses new ones past `limit` (decode slots + queue)."""

    def __init__(self, limit: int):
        self.limit = int(limit)
        self._n = 0
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)

    def try_enter(self) -> bool:
        with self._lock:
            if self._n >= self.limit:
                return False
            self._n += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self._n -= 1
            self._idle.notify_all()

    @property
    def in_flight(self) -> int:
        return self._n

    def wait_idle(self, timeout: Optional[float]) -> bool:
        """Block until no request holds work (shutdown drain); False if `timeout` passed first."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._n > 0:
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._idle.wait(left)
            return True


class JobTimeout(Exception):
    """The request ran past its deadline."""


class Job:
    """One request's model work in a dedicated thread; events come back in order on an asyncio queue.

    Events are (kind, value) pairs chosen by the work function, then ("error", exc) if it raised,
    and always a final ("end", None).
    """

    _ids = itertools.count(1)

    def __init__(self, loop: asyncio.AbstractEventLoop, *, timeout: float = 0.0):
        self.id = next(self._ids)
        self._loop = loop
        self._queue: asyncio.Queue = asyncio.Queue()
        self._cancel = threading.Event()
        self.cancel_reason: Optional[str] = None
        self.started = time.perf_counter()
        self.deadline = self.started + timeout if timeout and timeout > 0 else None
        self.finished = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._on_cancel: Optional[Callable[[], None]] = None

    # ---------------------------------------------------------------- worker side
    def put(self, kind: str, value: Any = None) -> None:
        """Hand an event to the event loop (thread-safe; dropped if the loop is gone)."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, (kind, value))
        except RuntimeError:  # loop closed (server shut down under us)
            pass

    def on_cancel(self, fn: Callable[[], None]) -> None:
        """Also call `fn` (thread-safe, e.g. the library stream's cancel) when the job is cancelled."""
        self._on_cancel = fn
        if self._cancel.is_set():
            fn()

    @property
    def cancelled(self) -> bool:
        if self.deadline is not None and time.perf_counter() > self.deadline and not self._cancel.is_set():
            self.cancel("timeout")
        return self._cancel.is_set()

    def start(self, work: Callable[["Job"], None], on_exit: Callable[[], None]) -> None:
        def run():
            try:
                work(self)
            except BaseException as e:  # reported to the request; the server keeps running
                self.put("error", e)
            finally:
                self.finished.set()
                try:
                    on_exit()
                finally:
                    self.put("end", None)

        self._thread = threading.Thread(target=run, name=f"chatterbox-request-{self.id}", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- event-loop side
    def cancel(self, reason: str = "cancelled") -> None:
        if not self._cancel.is_set() and not self.finished.is_set():
            self.cancel_reason = reason
            logger.info("request %d cancelled (%s)", self.id, reason)
        already = self._cancel.is_set()
        self._cancel.set()
        if not already and self._on_cancel is not None and not self.finished.is_set():
            try:
                self._on_cancel()
            except Exception as e:  # cancelling must never take the server down
                logger.warning("request %d: cancel hook failed: %s", self.id, e)

    async def get(self) -> tuple[str, Any]:
        """The next event; raises JobTimeout (after cancelling the work) when the deadline passes."""
        try:
            return self._queue.get_nowait()
        except asyncio.QueueEmpty:
            pass
        if self.deadline is None:
            return await self._queue.get()
        left = self.deadline - time.perf_counter()
        try:
            return await asyncio.wait_for(self._queue.get(), timeout=max(left, 0.0))
        except asyncio.TimeoutError:
            self.cancel("timeout")
            raise JobTimeout() from None
