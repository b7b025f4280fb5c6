"""Load test of `chatterbox serve` on localhost: N concurrent clients vs the same requests one at a time.

    python benchmarks/serve_load.py                         # Nano, deterministic weights, 8 clients, 16 requests
    python benchmarks/serve_load.py --clients 8 --requests 24 --max-new-tokens 40 --json serve.json
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --model-id chatterbox-nano   # a running server

Without --url it loads the model (--ckpt-dir, else the cached deterministic checkpoint of the demo),
starts the server in-process on a free 127.0.0.1 port and runs, in one process and with the same
requests (text i, seed i): a warm-up request, a sequential pass (one request at a time), then a
concurrent pass (--clients threads taking requests from one list). Requests stream
(`stream_format=audio`, pcm; --whole: whole files) and time to first audio is measured client-side.
Reports throughput (requests/s, audio seconds per wall second), p50/p95 time to first audio and
total latency, failures, and the concurrent/sequential throughput ratio.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import httpx

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Streaming speech arrives while the rest is still being made.",
    "Every request here shares the same decode steps with the others.",
    "A small model answers quickly, even on a modest processor.",
    "Please hold the line; your call is important to us.",
    "Batching keeps the arithmetic units busy between short requests.",
    "The weather tomorrow will be mild, with a light breeze from the west.",
    "Numbers like three, seventeen and forty two are read out in words.",
]


def one_request(client: httpx.Client, url: str, model_id: str, i: int, max_new_tokens: int, stream: bool) -> dict:
    body = dict(model=model_id, voice="default", input=TEXTS[i % len(TEXTS)], response_format="pcm", seed=i,
                max_new_tokens=max_new_tokens)
    if stream:
        body["stream_format"] = "audio"
    t0 = time.perf_counter()
    ttfa, n = None, 0
    try:
        with client.stream("POST", url + "/v1/audio/speech", json=body) as r:
            if r.status_code != 200:
                r.read()
                return dict(i=i, ok=False, status=r.status_code, error=r.text[:200], latency=time.perf_counter() - t0)
            for chunk in r.iter_bytes():
                if chunk and ttfa is None:
                    ttfa = time.perf_counter() - t0
                n += len(chunk)
    except httpx.HTTPError as e:
        return dict(i=i, ok=False, status=None, error=f"{type(e).__name__}: {e}", latency=time.perf_counter() - t0)
    ok = n > 0
    return dict(i=i, ok=ok, status=200, ttfa=ttfa, latency=time.perf_counter() - t0, audio_s=n / 2 / 24000,
                error=None if ok else "empty audio")


def run_pass(url: str, model_id: str, ids: list[int], clients: int, max_new_tokens: int, timeout: float,
             stream: bool = True) -> dict:
    """Send requests `ids` with `clients` concurrent workers; returns the results and the wall time."""
    todo = list(ids)
    lock = threading.Lock()
    results: list[dict] = []

    def worker():
        with httpx.Client(timeout=timeout) as client:
            while True:
                with lock:
                    if not todo:
                        return
                    i = todo.pop(0)
                res = one_request(client, url, model_id, i, max_new_tokens, stream)
                with lock:
                    results.append(res)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return dict(results=sorted(results, key=lambda r: r["i"]), wall=time.perf_counter() - t0)


def pct(values: list[float], q: float) -> Optional[float]:
    if not values:
        return None
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def summarize(name: str, p: dict, clients: int) -> dict:
    ok = [r for r in p["results"] if r["ok"]]
    ttfa = [r["ttfa"] for r in ok if r.get("ttfa") is not None]
    lat = [r["latency"] for r in ok]
    audio = sum(r["audio_s"] for r in ok)
    return dict(name=name, clients=clients, requests=len(p["results"]), ok=len(ok),
                failed=len(p["results"]) - len(ok), wall_s=p["wall"], req_per_s=len(ok) / p["wall"],
                audio_s_per_s=audio / p["wall"], audio_s=audio,
                ttfa_p50=pct(ttfa, 0.5), ttfa_p95=pct(ttfa, 0.95), latency_p50=pct(lat, 0.5),
                latency_p95=pct(lat, 0.95), errors=[r["error"] for r in p["results"] if not r["ok"]][:5])


def start_server(a):
    """Load the model and serve it in this process; returns (ServerThread, model)."""
    from chatterbox.registry import load_model
    from chatterbox.serve import ServeConfig, create_app
    from chatterbox.serve.runner import ServerThread

    if a.ckpt_dir:
        ckpt = a.ckpt_dir
    else:
        from chatterbox.demo import det_checkpoint

        ckpt = str(det_checkpoint({"original": "english"}.get(a.model, a.model)))
    t0 = time.perf_counter()
    model = load_model(a.model, ckpt, a.device, watermark=False)
    if a.compile:
        model.compile()
        model.warmup()
    print(f"loaded {a.model} from {ckpt} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    import tempfile

    config = ServeConfig(model_kind=a.model, voices_dir=Path(tempfile.mkdtemp(prefix="serve-load-voices-")),
                         max_batch=a.max_batch, max_queue=max(a.clients, 1) * 2, request_timeout=a.timeout)
    server = ServerThread(create_app(model, config=config)).start()
    server.wait_ready(600)
    return server, model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default=None, help="a running server (default: start one in this process)")
    ap.add_argument("--model", default="nano", choices=("original", "turbo", "nano", "multilingual"))
    ap.add_argument("--model-id", default=None, help="the `model` field to send (default: chatterbox-<model>)")
    ap.add_argument("--ckpt-dir", default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=40, help="speech tokens per request (25 per second)")
    ap.add_argument("--max-batch", type=int, default=None, help="decode slots (default: the model's)")
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--skip-sequential", action="store_true")
    ap.add_argument("--whole", action="store_true",
                    help="request whole files (no stream_format): time to first audio = total latency")
    ap.add_argument("--json", default=None, help="write the summary here")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    server = model = None
    url = a.url
    if url is None:
        server, model = start_server(a)
        url = server.url
    model_id = a.model_id or f"chatterbox-{a.model}"
    ids = list(range(a.requests))
    try:
        stream = not a.whole
        warm = run_pass(url, model_id, [0], 1, a.max_new_tokens, a.timeout, stream)
        if not warm["results"][0]["ok"]:
            print(f"warm-up request failed: {warm['results'][0]}", file=sys.stderr)
            return 1
        rows = []
        if not a.skip_sequential:
            rows.append(summarize("one at a time", run_pass(url, model_id, ids, 1, a.max_new_tokens, a.timeout,
                                                            stream), 1))
        rows.append(summarize(f"{a.clients} concurrent", run_pass(url, model_id, ids, a.clients, a.max_new_tokens,
                                                                   a.timeout, stream), a.clients))
        stats = model.engine_stats() if model is not None else None
    finally:
        if server is not None:
            server.stop()
        if model is not None:
            model.close()

    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    print(f"\n{a.requests} requests, {a.max_new_tokens} max new tokens each, model {model_id}, "
          f"{'whole files' if a.whole else 'streamed'}\n")
    print("| run | clients | ok | failed | wall s | req/s | audio s/s | TTFA p50 | TTFA p95 | latency p50 | latency p95 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['name']} | {r['clients']} | {r['ok']} | {r['failed']} | {fmt(r['wall_s'])} | {fmt(r['req_per_s'])} "
              f"| {fmt(r['audio_s_per_s'])} | {fmt(r['ttfa_p50'])} | {fmt(r['ttfa_p95'])} | {fmt(r['latency_p50'])} "
              f"| {fmt(r['latency_p95'])} |")
    summary = dict(model=model_id, requests=a.requests, max_new_tokens=a.max_new_tokens, streamed=not a.whole,
                   runs=rows, engine_stats=stats)
    if len(rows) == 2 and rows[0]["req_per_s"]:
        summary["speedup"] = rows[1]["req_per_s"] / rows[0]["req_per_s"]
        print(f"\nconcurrent / sequential throughput: {summary['speedup']:.2f}x")
    return finish(rows, summary, a.json)


def finish(rows: list, summary: dict, json_path: Optional[str]) -> int:
    """Print each run's errors, write the JSON summary; exit status 0 only when no request failed."""
    for r in rows:
        for e in r["errors"]:
            print(f"  {r['name']} error: {e}")
    if json_path:
        Path(json_path).write_text(json.dumps(summary, indent=1))
    return 0 if all(r["failed"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
