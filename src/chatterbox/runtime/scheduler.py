"""Continuous batching for T3: one worker thread owns the decoder; requests come and go at step boundaries.

Any thread (or an asyncio task) submits a `DecodeRequest` and gets a `RequestHandle`: a per-request
token stream (new tokens arrive as the decoder delivers them), a blocking `result()`, an async
iterator, and `cancel()`. The worker admits waiting requests into free decode slots before each step,
steps every active request together, frees the slots of finished or cancelled ones and reuses them.
All T3 decoding (and therefore every compiled / CUDA-graph T3 call) happens on the worker thread.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import weakref
from collections import deque
from typing import AsyncIterator, Callable, Iterator, Optional

import torch

from .t3_decoder import LEN_BUCKET, DecodeRequest, PackedLinears, PrefixCache, T3Decoder, backbone_positions, round_up

logger = logging.getLogger(__name__)

MIN_CACHE_LEN = 1024  # the decoder's first cache length; it grows (when idle) for longer requests
EAGER_KV_GRANULARITY = 32  # attention-length rounding of an uncompiled step (no shapes to keep stable)


class RequestCancelled(RuntimeError):
    """The request was cancelled before it finished."""


class RequestHandle:
    """One request's token stream. Written by the worker thread, read by the submitter.

    Iterate it (`for new_tokens in handle:`) for tokens as they are decoded, `async for` the same from
    asyncio, or call `result()` for all of them. `cancel()` frees the request's slot at the next step.
    """

    def __init__(self, scheduler: "Scheduler", req: DecodeRequest, loop: Optional[asyncio.AbstractEventLoop] = None):
        self._scheduler = scheduler
        self.request = req
        self.tokens: list[int] = []
        self.stopped = False  # True when the model sampled its stop token (else max_new_tokens was reached)
        self.error: Optional[BaseException] = None
        self.cancelled = False
        self.submitted_at = time.perf_counter()
        self.first_token_at: Optional[float] = None
        self.finished_at: Optional[float] = None
        self._done = threading.Event()
        self._q: "queue.Queue[tuple[str, object]]" = queue.Queue()
        self._loop = loop
        self._aq: Optional[asyncio.Queue] = asyncio.Queue() if loop is not None else None

    # ---------------------------------------------------------------- sink side (worker thread)
    def _emit(self, item: tuple[str, object]) -> None:
        self._q.put(item)
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._aq.put_nowait, item)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass

    def put(self, tokens: list[int]) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.tokens.extend(tokens)
        self._scheduler.tokens_generated += len(tokens)
        self._emit(("tokens", list(tokens)))

    def finish(self, stopped: bool) -> None:
        self.stopped = stopped
        self._end(("done", stopped))

    def fail(self, error: BaseException) -> None:
        self.error = error
        self._end(("error", error))

    def _end(self, item) -> None:
        self.finished_at = time.perf_counter()
        self._scheduler.requests_done += 1
        self._done.set()
        self._emit(item)

    # ---------------------------------------------------------------- consumer side
    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Stop decoding this request (its slot is freed at the next step); consumers get RequestCancelled."""
        if not self.done:
            self.cancelled = True
            self._scheduler._cancel(self)

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            kind, value = self._q.get()
            if kind == "tokens":
                yield value  # type: ignore[misc]
            elif kind == "done":
                return
            else:
                raise value  # type: ignore[misc]

    async def __aiter__(self) -> AsyncIterator[list[int]]:
        if self._aq is None:
            raise RuntimeError("submit with loop=asyncio.get_running_loop() (or use Scheduler.submit_async) to iterate from asyncio")
        while True:
            kind, value = await self._aq.get()
            if kind == "tokens":
                yield value  # type: ignore[misc]
            elif kind == "done":
                return
            else:
                raise value  # type: ignore[misc]

    def result(self, timeout: Optional[float] = None) -> list[int]:
        """All tokens (without the stop token), blocking until the request ends; raises its error."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"T3 request not finished after {timeout} s")
        if self.error is not None:
            raise self.error
        return list(self.tokens)


class Scheduler:
    """Owns a `T3Decoder` and a worker thread that decodes every submitted request in shared steps."""

    def __init__(self, t3, *, max_batch: int = 4, max_len: Optional[int] = None,
                 row_buckets: Optional[tuple[int, ...]] = None, kv_buckets: Optional[tuple[int, ...]] = None,
                 name: str = "chatterbox-t3", prefix_cache_bytes: int = 256 * 2 ** 20, cpu_prepack: bool = True):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.t3 = t3
        self.name = name
        self.max_batch = max_batch
        self.row_buckets, self.kv_buckets = row_buckets, kv_buckets
        self._max_len = max_len
        self.step_fn_factory: Optional[Callable[[T3Decoder], Callable]] = None  # compile policy hook (runtime.compile)
        self.decoder: Optional[T3Decoder] = None
        # voice prefixes' keys/values, kept across decoder rebuilds (0 bytes: computed per request)
        self.prefix_cache = PrefixCache(prefix_cache_bytes)
        # CPU eager decoding: linear weights prepacked for oneDNN (a second copy in host memory), kept across rebuilds
        self.cpu_prepack = cpu_prepack
        self._packed: Optional[PackedLinears] = None
        self._cv = threading.Condition()
        self._waiting: deque[RequestHandle] = deque()
        self._cancels: list[RequestHandle] = []
        self._calls: list = []  # (fn, result box, event) to run on the worker between steps
        self._closing = False
        self._thread: Optional[threading.Thread] = None
        self.fixed_len = False  # compiled decoders keep their shape: longer requests are refused, not grown into
        self.requests_done = 0
        self.tokens_generated = 0
        self.steps = 0

    # ---------------------------------------------------------------- configuration
    @property
    def slots(self) -> int:
        """Decode rows: a Llama request may use two (classifier-free guidance)."""
        return self.max_batch * (1 if self.t3.is_gpt else 2)

    def configure(self, *, max_batch: Optional[int] = None, max_len: Optional[int] = None,
                  row_buckets: Optional[tuple[int, ...]] = None, kv_buckets: Optional[tuple[int, ...]] = None) -> None:
        """Change the decoder's shape (only while nothing is decoding); the decoder is rebuilt on next use."""
        with self._cv:
            if self.decoder is not None and not self.decoder.idle():
                raise RuntimeError("cannot reconfigure the scheduler while requests are decoding")
            if max_batch is not None:
                if max_batch < 1:
                    raise ValueError(f"max_batch must be >= 1, got {max_batch}")
                self.max_batch = max_batch
            if max_len is not None:
                self._max_len = max_len
            if row_buckets is not None:
                self.row_buckets = row_buckets
            if kv_buckets is not None:
                self.kv_buckets = kv_buckets
            self.decoder = None

    def _build_decoder(self, need: int) -> T3Decoder:
        max_len = max(self._max_len or 0, round_up(need), MIN_CACHE_LEN if self._max_len is None else 0)
        max_len = min(max_len, backbone_positions(self.t3))
        dec = T3Decoder(self.t3, slots=self.slots, max_len=max_len, row_buckets=self.row_buckets,
                        kv_buckets=self.kv_buckets, prefix_cache=self.prefix_cache,
                        # a compiled step brings its own kernels: packing is for the eager CPU step
                        prepack=(self._packed or True) if self.cpu_prepack and self.step_fn_factory is None else None,
                        kv_granularity=EAGER_KV_GRANULARITY if self.step_fn_factory is None else LEN_BUCKET)
        if dec.packed is not None and dec.packed is not self._packed:
            self._packed = dec.packed
            logger.info("T3 linear weights prepacked for oneDNN (%.0f MiB of host memory)", dec.packed.nbytes() / 2 ** 20)
        if self.step_fn_factory is not None:
            dec.step_fn = self.step_fn_factory(dec)
        logger.info("T3 decoder: %d slots x %d positions (%.0f MiB; voice prefix cache up to %.0f MiB)", dec.slots,
                    dec.max_len, dec.memory_bytes() / 2 ** 20, self.prefix_cache.max_bytes / 2 ** 20)
        return dec

    def stats(self) -> dict:
        dec = self.decoder
        return dict(queue_depth=len(self._waiting), active=0 if dec is None else dec.active, max_batch=self.max_batch,
                    tokens_generated=self.tokens_generated, requests_done=self.requests_done, steps=self.steps,
                    prefix_cache_hits=self.prefix_cache.hits, prefix_cache_misses=self.prefix_cache.misses,
                    prefix_cache_bytes=self.prefix_cache.nbytes())

    # ---------------------------------------------------------------- submission (any thread)
    def check(self, req: DecodeRequest) -> None:
        """Raise ValueError now (in the caller's thread) for a request this scheduler can never run."""
        need = req.prompt_len + req.max_new_tokens
        limit = backbone_positions(self.t3)
        if self.fixed_len and self._max_len:
            limit = min(limit, self._max_len)
        if need > limit:
            hint = " or compile with a larger max_len / max_text_tokens" if self.fixed_len else ""
            raise ValueError(f"this request needs {need} cache positions (prompt {req.prompt_len} + max_new_tokens "
                             f"{req.max_new_tokens}) but at most {limit} are available; shorten the text "
                             f"(split_text=True) or lower max_new_tokens{hint}")
        if req.rows == 2 and self.t3.is_gpt or req.rows not in (1, 2):
            raise ValueError(f"bad request rows: {req.rows}")

    def submit(self, req: DecodeRequest, *, loop: Optional[asyncio.AbstractEventLoop] = None) -> RequestHandle:
        """Queue `req`; returns at once. Thread-safe. With `loop`, the handle can also be iterated from asyncio."""
        self.check(req)
        handle = RequestHandle(self, req, loop)
        with self._cv:
            if self._closing:
                raise RuntimeError("the scheduler is shut down")
            self._waiting.append(handle)
            self._ensure_thread()
            self._cv.notify()
        return handle

    async def submit_async(self, req: DecodeRequest) -> RequestHandle:
        """`submit` from a coroutine: the handle supports `async for new_tokens in handle`."""
        return self.submit(req, loop=asyncio.get_running_loop())

    def _cancel(self, handle: RequestHandle) -> None:
        with self._cv:
            self._cancels.append(handle)
            self._cv.notify()

    def close(self, timeout: Optional[float] = None) -> None:
        """Finish the requests already submitted, then stop the worker thread (idempotent)."""
        with self._cv:
            self._closing = True
            self._cv.notify()
            t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout)

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            # the thread holds the scheduler only weakly while idle: a dropped model is freed, its thread ends
            self._thread = threading.Thread(target=_worker, args=(weakref.ref(self),), name=self.name, daemon=True)
            self._thread.start()

    def warm_steps(self, timeout: Optional[float] = None) -> int:
        """Compile every step shape of the decoder on the worker thread (before traffic); returns how many."""
        def go():
            if self.decoder is None:
                self.decoder = self._build_decoder(0)
            return self.decoder.warm()

        return self.run_on_worker(go, timeout)

    # ---------------------------------------------------------------- worker
    def run_on_worker(self, fn: Callable[[], object], timeout: Optional[float] = None):
        """Run `fn()` on the worker thread between steps and return its result (warm-up of compiled steps)."""
        box: dict = {}
        done = threading.Event()
        with self._cv:
            self._calls.append((fn, box, done))
            self._ensure_thread()
            self._cv.notify()
        if not done.wait(timeout):
            raise TimeoutError("worker call timed out")
        if "error" in box:
            raise box["error"]
        return box.get("value")

    def _take_work(self, timeout: float) -> Optional[tuple[list[RequestHandle], list[RequestHandle], list]]:
        """Under the lock: wait (up to `timeout`) for something to do; return (to admit, to cancel, calls),
        None when there was nothing, ([], [], [None]) when closing."""
        with self._cv:
            dec = self.decoder
            busy = dec is not None and not dec.idle()
            if not (self._waiting or self._cancels or self._calls or busy):
                if self._closing:
                    return [], [], [None]
                self._cv.wait(timeout)
                dec = self.decoder
                busy = dec is not None and not dec.idle()
                if not (self._waiting or self._cancels or self._calls or busy):
                    return ([], [], [None]) if self._closing else None
            cancels, self._cancels = self._cancels, []
            calls, self._calls = self._calls, []
            for h in cancels:
                if h in self._waiting:
                    self._waiting.remove(h)
                    h.fail(RequestCancelled("request cancelled before it started"))
            admit: list[RequestHandle] = []
            if self.decoder is None and self._waiting:
                self.decoder = self._build_decoder(self._need(self._waiting[0]))
            dec = self.decoder
            free = dec.free_slots if dec is not None else 0
            while self._waiting:
                h = self._waiting[0]
                need = self._need(h)
                if need > dec.max_len:  # grow the cache once nothing is decoding (FIFO: others wait too)
                    if dec.idle() and not admit:
                        self.decoder = dec = self._build_decoder(need)
                        free = dec.free_slots
                    else:
                        break
                if h.request.rows > free:
                    break
                free -= h.request.rows
                admit.append(self._waiting.popleft())
            return admit, [h for h in cancels if h.cancelled], calls

    @staticmethod
    def _need(h: RequestHandle) -> int:
        return h.request.prompt_len + h.request.max_new_tokens

    def _work_once(self) -> bool:
        """One round of the worker: admit, cancel, run queued calls, one decode step. False: shut down."""
        work = self._take_work(timeout=1.0)
        if work is None:
            return True
        admit, cancels, calls = work
        if calls == [None]:
            return False
        for fn, box, done in calls:
            try:
                box["value"] = fn()
            except BaseException as e:  # handed back to the caller
                box["error"] = e
            done.set()
        dec = self.decoder
        if dec is None:
            return True
        for h in cancels:
            if dec.cancel(h):
                h.fail(RequestCancelled("request cancelled"))
        good = []
        for h in admit:  # a request the decoder refuses fails alone
            try:
                dec.check(h.request)
                good.append(h)
            except BaseException as e:
                h.fail(e)
        if good:
            try:
                dec.admit_many([(h.request, h) for h in good])  # one prefill call for every newcomer
            except BaseException as e:
                logger.exception("T3 prefill failed")
                for h in good:
                    h.fail(e)
        if dec.idle():
            return True
        try:
            dec.step()
            self.steps += 1
            if dec.active == 0:
                dec.drain()
        except BaseException as e:
            logger.exception("T3 decode step failed; failing the active requests")
            dec.fail_all(e)
        return True


def _worker(ref: "weakref.ReferenceType[Scheduler]") -> None:
    """The scheduler's thread: rounds of work while the scheduler exists and is not closed."""
    torch.set_grad_enabled(False)
    while True:
        sched = ref()
        if sched is None or not sched._work_once():
            return
        del sched
