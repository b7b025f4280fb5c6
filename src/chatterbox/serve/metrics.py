"""Prometheus metrics on a per-app CollectorRegistry (no global state: tests build several apps).

Server-side series are updated as requests finish; engine series (queue depth, active decode slots,
tokens) are read from `model.engine_stats()` at scrape time by a custom collector.
"""
from __future__ import annotations

import threading
import time
from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, float("inf"))


def endpoint_label(path: str) -> str:
    """A low-cardinality label for a request path (voice ids collapsed)."""
    if path.startswith("/v1/audio/voices/"):
        return "/v1/audio/voices/{id}"
    if path in ("/v1/audio/speech", "/v1/audio/voices", "/v1/models", "/health", "/ready", "/metrics", "/"):
        return path
    return "other"


class _EngineCollector:
    """Gauges from engine_stats() and the admission counter, plus a decode tokens/s rate between scrapes."""

    def __init__(self, stats: Callable[[], dict], in_flight: Callable[[], int], limit: Callable[[], int]):
        self._stats, self._in_flight, self._limit = stats, in_flight, limit
        self._lock = threading.Lock()
        self._t0 = time.monotonic()
        self._last = (self._t0, 0)  # (time, tokens) of the previous scrape, >= 1 s ago
        self._rate = 0.0

    def _tokens_per_second(self, tokens: int) -> float:
        with self._lock:
            now = time.monotonic()
            t_prev, n_prev = self._last
            if now - t_prev >= 1.0:
                self._rate = max(tokens - n_prev, 0) / (now - t_prev)
                self._last = (now, tokens)
            return self._rate

    def collect(self):
        try:
            s = self._stats() or {}
        except Exception:  # model not loaded yet, or closing
            s = {}
        yield GaugeMetricFamily("chatterbox_queue_depth", "Requests submitted to the model, waiting for a decode slot",
                                value=float(s.get("queue_depth", 0)))
        yield GaugeMetricFamily("chatterbox_active_slots", "Requests decoding now (scheduler slots in use)",
                                value=float(s.get("active", 0)))
        yield GaugeMetricFamily("chatterbox_max_batch", "Decode slots (requests decoded together)",
                                value=float(s.get("max_batch", 0)))
        yield GaugeMetricFamily("chatterbox_requests_in_flight", "Admitted requests holding model work",
                                value=float(self._in_flight()))
        yield GaugeMetricFamily("chatterbox_admission_limit", "In-flight requests before 429 (slots + queue)",
                                value=float(self._limit()))
        tokens = int(s.get("tokens_generated", 0))
        yield CounterMetricFamily("chatterbox_tokens_generated", "Speech tokens decoded since start", value=tokens)
        yield CounterMetricFamily("chatterbox_engine_requests_done", "Requests the model's scheduler finished",
                                  value=int(s.get("requests_done", 0)))
        yield GaugeMetricFamily("chatterbox_tokens_per_second", "Speech tokens decoded per second (between scrapes)",
                                value=self._tokens_per_second(tokens))
        yield CounterMetricFamily("chatterbox_voice_prefix_cache_hits",
                                  "Requests whose voice prefix keys/values came from the cache",
                                  value=int(s.get("prefix_cache_hits", 0)))
        yield CounterMetricFamily("chatterbox_voice_prefix_cache_misses",
                                  "Requests whose voice prefix was prefilled (then cached)",
                                  value=int(s.get("prefix_cache_misses", 0)))
        yield GaugeMetricFamily("chatterbox_voice_prefix_cache_bytes", "Device memory held by cached voice prefixes",
                                value=float(s.get("prefix_cache_bytes", 0)))


class ServeMetrics:
    """All series of one app, on its own registry."""

    def __init__(self, stats: Callable[[], dict], in_flight: Callable[[], int], limit: Callable[[], int]):
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("chatterbox_requests", "HTTP responses by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.rejected = Counter("chatterbox_requests_rejected", "Speech requests refused with 429 (queue full)",
                                registry=r)
        self.cancelled = Counter("chatterbox_requests_cancelled", "Speech requests stopped early, by reason",
                                 ["reason"], registry=r)
        self.ttfa = Histogram("chatterbox_time_to_first_audio_seconds",
                              "Admission to the first audio bytes handed to the client", ["mode"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("chatterbox_request_latency_seconds", "Admission to the last audio byte", ["mode"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.audio_seconds = Counter("chatterbox_generated_audio_seconds", "Seconds of audio the model generated",
                                     registry=r)
        r.register(_EngineCollector(stats, in_flight, limit))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class StatusCounterMiddleware:
    """ASGI middleware: count every HTTP response by endpoint and status (streaming-safe, no buffering)."""

    def __init__(self, app, metrics_of: Callable[[], "ServeMetrics"]):
        self.app, self._metrics_of = app, metrics_of

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        label = endpoint_label(scope.get("path", ""))

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self._metrics_of().requests.labels(label, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)
