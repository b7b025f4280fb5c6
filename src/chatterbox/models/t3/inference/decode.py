"""Host-side helpers for T3's decode loop: length buckets and stop detection without per-token syncs."""
from __future__ import annotations

import torch
from torch import Tensor

CACHE_BUCKET = 256  # KV caches are allocated in multiples of this many positions


def cache_bucket(needed: int, bucket: int = CACHE_BUCKET) -> int:
    """Round a required cache length up to its bucket so one compiled graph serves many requests."""
    return max(bucket, -(-needed // bucket) * bucket)


class StopWatcher:
    """Learns that a device-side `done` flag became true without blocking the decode loop.

    On CUDA the flag is copied to pinned host memory asynchronously behind an event; the host
    looks at the copy only once the event has completed, so the loop never waits on the GPU and
    notices the stop token a few steps late (the extra tokens are trimmed exactly afterwards).
    On the CPU reading the flag costs nothing, so it is read directly.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._host = torch.zeros(1, dtype=torch.bool, pin_memory=True) if self.cuda else None
        self._event = None

    def poll(self, done: Tensor) -> bool:
        """True once `done` (1,) bool has been seen true; call every few steps."""
        if not self.cuda:
            return bool(done)
        if self._event is not None:
            if not self._event.query():
                return False
            if bool(self._host):
                return True
        self._host.copy_(done, non_blocking=True)
        self._event = torch.cuda.Event()
        self._event.record()
        return False


def trim_after_stop(tokens: Tensor, stop_token: int, keep_stop: bool) -> Tensor:
    """(N,) generated ids -> (1, n): cut after the first stop token (kept or dropped), one host copy."""
    host = tokens.cpu()
    hits = (host == stop_token).nonzero()
    if hits.numel() == 0:
        return tokens[None]
    end = int(hits[0, 0]) + (1 if keep_stop else 0)
    return tokens[None, :end]
