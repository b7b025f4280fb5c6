"""Optional Perth watermarker: pass-through and one warning when missing, never a crash."""
from __future__ import annotations

import logging
import sys
import types

import numpy as np
import pytest

from chatterbox import watermark


@pytest.fixture(autouse=True)
def fresh():
    watermark._reset_for_tests()
    yield
    watermark._reset_for_tests()


def test_disabled_is_silent_pass_through(caplog):
    with caplog.at_level(logging.WARNING):
        wm = watermark.get_watermarker(False)
    x = np.ones(100, np.float32)
    assert wm.apply_watermark(x, sample_rate=24000) is x
    assert caplog.text == ""


def test_missing_perth_warns_once(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "perth", None)  # import fails
    with caplog.at_level(logging.WARNING):
        a = watermark.get_watermarker(True)
        b = watermark.get_watermarker(True)
    x = np.zeros(10, np.float32)
    assert a.apply_watermark(x, 24000) is x and b.apply_watermark(x, 24000) is x
    assert caplog.text.count("watermarking unavailable") == 1
    assert "chatterbox-fast[watermark]" in caplog.text


def test_broken_perth_does_not_crash(monkeypatch, caplog):
    fake = types.ModuleType("perth")

    def boom():
        raise RuntimeError("checkpoint missing")

    fake.PerthImplicitWatermarker = boom
    monkeypatch.setitem(sys.modules, "perth", fake)
    with caplog.at_level(logging.WARNING):
        wm = watermark.get_watermarker(True)
    assert isinstance(wm, watermark.NoWatermark) and "checkpoint missing" in caplog.text


def test_perth_used_when_available(monkeypatch):
    class Fake:
        def apply_watermark(self, wav, sample_rate):
            return wav * 0.5

    fake = types.ModuleType("perth")
    fake.PerthImplicitWatermarker = Fake
    monkeypatch.setitem(sys.modules, "perth", fake)
    wm = watermark.get_watermarker(True)
    assert isinstance(wm, Fake) and watermark.get_watermarker(True) is wm  # loaded once
    np.testing.assert_allclose(wm.apply_watermark(np.ones(4), 24000), 0.5)
