"""The playground page (`GET /`) in headless Chromium: voices listed, a voice uploaded through the page,
Play streams PCM into Web Audio and audio starts before the response ends.

Chromium is driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`: JSON messages
ending in NUL on fds 3/4), so no browser-automation package is needed. Skipped without Chromium
(Debian: `apt-get install -y chromium`).
"""
from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

pytest.importorskip("fastapi")

CHROMIUM = next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)
pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install -y chromium)"),
    pytest.mark.skipif(sys.platform != "linux", reason="the DevTools pipe driver here is POSIX/Linux only"),
]

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--autoplay-policy=no-user-gesture-required", "--remote-debugging-pipe"]


class Browser:
    """Headless Chromium with one page, driven by DevTools-protocol commands over a pipe."""

    def __init__(self, exe: str):
        self.profile = tempfile.mkdtemp(prefix="chatterbox-chromium-")
        to_chrome_r, self._w = os.pipe()
        self._r, from_chrome_w = os.pipe()

        def child_fds():  # Chromium reads commands on fd 3 and writes replies on fd 4
            import fcntl

            r = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD, 10)
            w = fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD, 10)
            os.dup2(r, 3)
            os.dup2(w, 4)

        self._log = open(os.path.join(self.profile, "chromium.log"), "w")
        self.proc = subprocess.Popen([exe, *FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
                                     preexec_fn=child_fds, close_fds=False, stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=self._log)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buf, self._n, self.session = b"", 0, None
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.send("Page.enable")

    def send(self, method: str, params: dict | None = None, timeout: float = 20.0) -> dict:
        self._n += 1
        msg = {"id": self._n, "method": method, "params": params or {}}
        if self.session and not method.startswith("Target."):
            msg["sessionId"] = self.session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        end = time.monotonic() + timeout
        while True:
            while b"\0" in self._buf:
                raw, self._buf = self._buf.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._n:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply["result"]
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"Chromium did not answer {method} in {timeout} s")
            ready, _, _ = select.select([self._r], [], [], left)
            if ready:
                chunk = os.read(self._r, 1 << 16)
                if not chunk:
                    raise RuntimeError("Chromium exited; see " + self._log.name)
                self._buf += chunk

    def js(self, expression: str):
        res = self.send("Runtime.evaluate", {"expression": expression, "awaitPromise": True, "returnByValue": True})
        if "exceptionDetails" in res:
            raise RuntimeError(f"page error: {res['exceptionDetails']}")
        return res["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30.0, what: str = ""):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                value = self.js(expression)
            except RuntimeError:  # the page is still loading
                value = None
            if value:
                return value
            time.sleep(0.05)
        raise TimeoutError(f"page never reached {what or expression}; state: {self.js('JSON.stringify(window.__playground)')}")

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        os.close(self._w)
        os.close(self._r)
        self._log.close()
        shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture
def browser():
    b = Browser(CHROMIUM)
    yield b
    b.close()


def test_playground_streams_audio_into_web_audio(browser, tmp_path):
    from test_serve_app import FakeTTS, serve, write_voice

    fake = FakeTTS(delay=0.3, chunks=6)
    with serve(fake, tmp_path / "voices") as s:
        browser.send("Page.navigate", {"url": s.url + "/?text=" + "word%20" * 12 + "&seed=3"})
        browser.wait_for("document.getElementById('voice').options.length > 0", what="voices listed")
        assert browser.js("document.getElementById('voice').value") == "default"

        # upload a voice through the page's file input
        ref = write_voice(tmp_path / "mine.wav", seconds=2.0, amp=0.6)
        doc = browser.send("DOM.getDocument")["root"]["nodeId"]
        node = browser.send("DOM.querySelector", {"nodeId": doc, "selector": "#voice-file"})["nodeId"]
        browser.send("DOM.setFileInputFiles", {"nodeId": node, "files": [str(ref)]})
        browser.js("document.getElementById('voice-name').value = 'mine'; document.getElementById('upload').click()")
        browser.wait_for("document.getElementById('voice').options.length === 2", what="uploaded voice listed")
        voice_id = browser.js("document.getElementById('voice').value")
        assert voice_id.startswith("voice_") and fake.made_voices == 1

        browser.js("document.getElementById('play').click()")
        browser.wait_for("window.__playground.audioStarted", timeout=20, what="audio started")
        early = browser.js("JSON.stringify(window.__playground)")
        browser.wait_for("window.__playground.phase === 'done'", timeout=20, what="stream done")
        state = json.loads(browser.js("JSON.stringify(window.__playground)"))
        playing = browser.js("ctx.state + ' ' + ctx.currentTime")
        href = browser.js("document.getElementById('download').href")

    assert json.loads(early)["phase"] == "streaming"  # playback began while audio was still arriving
    assert state["error"] is None and state["contextState"] == "running"
    assert playing.split()[0] == "running" and float(playing.split()[1]) > 0  # the AudioContext clock runs
    call = fake.calls[-1]
    assert call["stream"] and call["seed"] == 3 and abs(float(call["conds"].t3.speaker_emb[0, 0]) - 0.6) < 1e-6
    expected = fake.generate("word " * 12, seed=3, conds=call["conds"]).shape[1]
    assert state["bytes"] == 2 * expected and abs(state["scheduledSeconds"] - expected / 24000) < 1e-3
    assert state["chunks"] >= 3 and 0 < state["firstAudioMs"] < 6 * 300
    assert href.startswith("blob:")
