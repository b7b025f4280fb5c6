"""`chatterbox serve`: an OpenAI-compatible speech server (FastAPI + uvicorn) above the public model API.

Needs the `server` extra: `pip install 'chatterbox-fast[server]'` (fastapi, uvicorn, python-multipart,
prometheus-client, av). `create_app(model, config=ServeConfig(...))` builds the ASGI app;
`chatterbox.serve.cli.main(argv)` is the command line.
"""
from __future__ import annotations

_EXTRA = {"fastapi": "fastapi", "uvicorn": "uvicorn", "python_multipart": "python-multipart",
          "prometheus_client": "prometheus-client", "av": "av"}


def _require_extra() -> None:
    import importlib

    missing = []
    for module, package in _EXTRA.items():
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(package)
    if missing:
        raise ImportError(f"chatterbox.serve needs the 'server' extra (missing: {', '.join(missing)}); "
                          "install it with: pip install 'chatterbox-fast[server]'")


_require_extra()

from .app import create_app  # noqa: E402,I001
from .config import ServeConfig  # noqa: E402

__all__ = ["create_app", "ServeConfig"]
