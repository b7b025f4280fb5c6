"""Run an app under uvicorn in a background thread on a free localhost port (tests, benchmarks, embedding)."""
from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Optional

import uvicorn


class ServerThread:
    """`with ServerThread(app) as s: ... s.url ...`: uvicorn on `host`:`port` (0 = a free port) in a thread."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                 graceful_timeout: Optional[float] = None):
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.host, self.port = self._sock.getsockname()[:2]
        cfg = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=graceful_timeout, lifespan="on")
        self.server = uvicorn.Server(cfg)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]},
                                        name="chatterbox-uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "ServerThread":
        if self._thread.ident is not None:  # already started (idempotent, so `with` works on a started one)
            return self
        self._thread.start()
        end = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > end:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def wait_ready(self, timeout: float = 120.0) -> dict:
        """Poll GET /ready until 200; raises with the server's answer on timeout or load failure."""
        end = time.monotonic() + timeout
        last = None
        while time.monotonic() < end:
            try:
                with urllib.request.urlopen(self.url + "/ready", timeout=5) as r:
                    return json.loads(r.read())
            except urllib.error.HTTPError as e:
                last = json.loads(e.read() or b"{}")
                if last.get("status") == "failed":
                    raise RuntimeError(f"server failed to load: {last.get('error')}")
            except OSError as e:
                last = str(e)
            time.sleep(0.05)
        raise TimeoutError(f"server not ready after {timeout} s (last answer: {last})")

    def stop(self, timeout: float = 60.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout)
        self._sock.close()

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
