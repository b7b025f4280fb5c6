"""`chatterbox serve`: load a model and serve the OpenAI-compatible speech API with uvicorn.

Without `--ckpt-dir` the checkpoint comes from the Hugging Face Hub; when that is unreachable (or with
`--demo-weights`) the server still starts, on deterministic weights (the demo's checkpoint), with a
loud warning: the API and playground work, the audio is not speech.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Optional

logger = logging.getLogger("chatterbox.serve")

MODELS = ("original", "turbo", "nano", "multilingual")
DEMO_WARNING = ("NOT SPEECH: serving DETERMINISTIC DEMO WEIGHTS for '{kind}' (no checkpoint was reachable{why}). "
                "The API and playground work; the audio is noise-like babble. Pass --ckpt-dir DIR with a real "
                "checkpoint, or allow the Hugging Face Hub download.")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="chatterbox serve",
                                 description="OpenAI-compatible text-to-speech server (POST /v1/audio/speech).")
    ap.add_argument("--model", choices=MODELS, default="nano", help="model kind to serve (default: nano)")
    ap.add_argument("--ckpt-dir", default=None, help="local checkpoint directory (default: Hugging Face Hub)")
    ap.add_argument("--demo-weights", action="store_true",
                    help="skip the Hub and serve deterministic demo weights (not speech; for trying the API)")
    ap.add_argument("--device", default=None, help="cuda, cuda:N, mps or cpu (default: cuda if available)")
    ap.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; 0.0.0.0 exposes it)")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--compile", action="store_true", help="compile and warm up before accepting requests")
    ap.add_argument("--max-batch", type=int, default=None,
                    help="requests decoded together (scheduler slots; default: the model's setting)")
    ap.add_argument("--max-queue", type=int, default=32,
                    help="requests allowed to wait for a slot; more get 429 with Retry-After (default 32)")
    ap.add_argument("--voices-dir", default=None,
                    help="where uploaded voices are kept (default: ~/.cache/chatterbox-fast/voices)")
    ap.add_argument("--request-timeout", type=float, default=300.0,
                    help="seconds a request may take from admission to its last byte; 0 disables (default 300)")
    ap.add_argument("--drain-timeout", type=float, default=None,
                    help="on SIGTERM, seconds to wait for in-flight requests (default: wait for all)")
    ap.add_argument("--max-new-tokens", type=int, default=None,
                    help="default speech tokens per sentence when a request gives none (25 per second)")
    ap.add_argument("--no-watermark", action="store_true", help="do not apply the Perth watermark")
    ap.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    ray = ap.add_argument_group("Ray Serve (needs the 'ray' extra: pip install 'chatterbox-fast[ray]')")
    ray.add_argument("--ray", action="store_true", help="serve on a local Ray Serve instance: --replicas engines "
                     "behind one endpoint (chatterbox.serve.ray_app; clusters: serve run chatterbox_serve.yaml)")
    ray.add_argument("--replicas", type=int, default=1, help="with --ray: replicas, one engine each (default 1)")
    ray.add_argument("--max-replicas", type=int, default=None,
                     help="with --ray: autoscale between --replicas and this on ongoing requests per replica")
    ray.add_argument("--cpus-per-replica", type=float, default=1.0,
                     help="with --ray on a CPU: cores (and torch threads) per replica (default 1)")
    return ap


def _load(kind: str, ckpt_dir: Optional[str], device: Optional[str], watermark: bool):
    from ..registry import load_model

    return load_model(kind, ckpt_dir, device, watermark=watermark)


def make_loader(a: argparse.Namespace, config) -> "callable":
    """The function the server runs in its loading thread: load (Hub, dir, or demo weights), compile, warm up."""

    def demo(why: str):
        from ..demo import det_checkpoint

        msg = DEMO_WARNING.format(kind=a.model, why=why)
        config.weights_note = msg
        for _ in range(3):
            logger.warning("!" * 20 + " " + msg)
        return _load(a.model, str(det_checkpoint({"original": "english"}.get(a.model, a.model))), a.device,
                     watermark=False)

    def loader():
        t0 = time.perf_counter()
        if a.ckpt_dir:
            model = _load(a.model, a.ckpt_dir, a.device, watermark=not a.no_watermark)
        elif a.demo_weights:
            model = demo(": --demo-weights")
        else:
            try:
                model = _load(a.model, None, a.device, watermark=not a.no_watermark)
            except Exception as e:  # offline, gated, no cache: still start for a newcomer
                logger.warning("could not get the '%s' checkpoint from the Hugging Face Hub (%s: %s)", a.model,
                               type(e).__name__, str(e).splitlines()[0] if str(e) else "")
                model = demo(f"; Hub: {type(e).__name__}")
        logger.info("loaded %s in %.1f s", a.model, time.perf_counter() - t0)
        if a.compile:
            t1 = time.perf_counter()
            model.compile()
            model.warmup()
            logger.info("compiled and warmed up in %.1f s", time.perf_counter() - t1)
        return model

    return loader


def main(argv: Optional[list[str]] = None) -> int:
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if a.ray:
        try:
            from .ray_app import run_local
        except ImportError as e:
            print(f"chatterbox serve: {e}", file=sys.stderr)
            return 2
        return run_local(a)
    try:
        from . import ServeConfig, create_app
    except ImportError as e:
        print(f"chatterbox serve: {e}", file=sys.stderr)
        return 2
    import uvicorn

    try:
        config = ServeConfig(model_kind=a.model, voices_dir=Path(a.voices_dir) if a.voices_dir else None,
                             max_batch=a.max_batch, max_queue=a.max_queue, request_timeout=a.request_timeout,
                             default_max_new_tokens=a.max_new_tokens)
    except ValueError as e:
        print(f"chatterbox serve: {e}", file=sys.stderr)
        return 2
    server: Optional[uvicorn.Server] = None
    failed: list[BaseException] = []

    def on_fatal(e: BaseException) -> None:
        failed.append(e)
        if server is not None:
            server.should_exit = True

    app = create_app(config=config, loader=make_loader(a, config), on_fatal=on_fatal, drain_timeout=a.drain_timeout)
    uv = uvicorn.Config(app, host=a.host, port=a.port, log_level=a.log_level, lifespan="on",
                        timeout_graceful_shutdown=a.drain_timeout)
    server = uvicorn.Server(uv)
    logger.info("serving %s on http://%s:%d (playground at /, API at /v1; ready when GET /ready is 200)",
                config.model_id, a.host, a.port)
    # uvicorn catches SIGINT/SIGTERM (stop accepting, finish open responses, then the app closes the model)
    # and re-raises the signal afterwards; a no-op handler makes that end in a clean exit status 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    server.run()
    if failed:
        print(f"chatterbox serve: the model failed to load: {type(failed[0]).__name__}: {failed[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
