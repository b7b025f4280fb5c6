"""Optional Perth watermarking of generated audio (package `resemble-perth`, extra `watermark`).

`get_watermarker(True)` returns Perth's implicit watermarker when the package imports and loads;
otherwise (and for `enabled=False`) a pass-through with the same `apply_watermark` method. A missing
or broken Perth never raises: it logs one warning per process and the audio is returned unchanged
(Perth itself would also trim the length to a multiple of 10 ms; the pass-through does not).
"""
from __future__ import annotations

import logging
import threading

import numpy as np

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_perth = None  # the one Perth watermarker of this process, once loaded
_warned = False


class NoWatermark:
    """Pass-through with Perth's `apply_watermark` signature."""

    def apply_watermark(self, wav: np.ndarray, sample_rate: int) -> np.ndarray:
        """Return `wav` unchanged."""
        return wav

    def __repr__(self) -> str:
        return "NoWatermark()"


def _load_perth():
    import perth  # resemble-perth

    return perth.PerthImplicitWatermarker()


def get_watermarker(enabled: bool = True):
    """Perth's implicit watermarker if `enabled` and available, else a `NoWatermark` pass-through."""
    global _perth, _warned
    if not enabled:
        return NoWatermark()
    with _lock:
        if _perth is None and not _warned:
            try:
                _perth = _load_perth()  # loads PerthNet on the CPU; shared by every model object
            except Exception as e:  # ImportError, or a broken install / missing checkpoint
                _warned = True
                hint = " (pip install 'chatterbox-fast[watermark]')" if isinstance(e, ImportError) else ""
                logger.warning("Perth watermarking unavailable%s: %s; audio will not be watermarked", hint, e)
        return _perth if _perth is not None else NoWatermark()


def _reset_for_tests() -> None:
    global _perth, _warned
    _perth, _warned = None, False
