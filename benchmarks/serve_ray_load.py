"""Load test of the speech server on Ray Serve (chatterbox.serve.ray_app): the same requests with 1, then 2
replicas behind Ray's HTTP proxy, each replica pinned to its own core (num_cpus=1, one torch thread, CPU affinity).

    python benchmarks/serve_ray_load.py                               # Nano, deterministic weights, 1 and 2 replicas
    python benchmarks/serve_ray_load.py --replicas 1 2 --clients 8 --requests 24 --max-new-tokens 40 --json ray.json

Starts a local Ray instance (no dashboard, --cpus CPUs) and Serve on a free 127.0.0.1 port; for each
replica count it deploys the application, warms every replica up, then runs benchmarks/serve_load.py's
concurrent pass (--clients threads, requests i = text i, seed i; streamed pcm unless --whole).
Reports throughput per replica count, the ratio to the first, failures, and the machine load (uptime)
before and after each run: the cores are shared, so say what the load was.
"""
from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_load  # noqa: E402  (run_pass, summarize, TEXTS)


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def replica_infos(model: str, n: int, tries: int = 40) -> dict:
    """replica id -> (cores, requests done) from each replica's info() (handle calls reach replicas at random)."""
    from ray import serve

    handle = serve.get_deployment_handle(f"chatterbox-{model}", app_name="bench")
    out: dict = {}
    for _ in range(tries):
        info = handle.info.remote().result(timeout_s=60)
        out[info["replica"]] = {"cores": info["cores"], "requests_done": info["engine"].get("requests_done")}
        if len(out) == n:
            break
    return out



def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="nano", choices=("original", "turbo", "nano", "multilingual"))
    ap.add_argument("--ckpt-dir", default=None, help="default: the demo's cached deterministic checkpoint")
    ap.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--cpus", type=int, default=None, help="CPUs Ray may use (default: all of this machine's)")
    ap.add_argument("--cpus-per-replica", type=float, default=1.0)
    ap.add_argument("--no-pin", action="store_true",
                    help="do not pin each replica to its own cores (then one replica spreads over all of them)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--max-batch", type=int, default=None, help="decode slots per replica (default: the model's)")
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--whole", action="store_true", help="whole-file requests instead of streams")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import ray
    from ray import serve

    from chatterbox.serve.ray_app import build_app

    if a.ckpt_dir:
        ckpt = a.ckpt_dir
    else:
        from chatterbox.demo import det_checkpoint

        ckpt = str(det_checkpoint({"original": "english"}.get(a.model, a.model)))
    import tempfile

    port = free_port()
    ray.init(num_cpus=a.cpus or os.cpu_count(), include_dashboard=False, log_to_driver=False,
             object_store_memory=200 * 2 ** 20, configure_logging=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    model_id = f"chatterbox-{a.model}"
    rows = []
    stream = not a.whole
    try:
        for n in a.replicas:
            args = dict(kind=a.model, ckpt_dir=ckpt, watermark=False, max_batch=a.max_batch, pin_cpus=not a.no_pin,
                        max_queue=max(a.clients, 1) * 2, request_timeout=a.timeout,
                        voices_dir=tempfile.mkdtemp(prefix="serve-ray-load-voices-"),
                        deployment={"num_replicas": n, "ray_actor_options": {"num_cpus": a.cpus_per_replica}})
            t0 = time.perf_counter()
            serve.run(build_app(args), name="bench", route_prefix="/")
            print(f"{n} replica(s) up in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
            warm = serve_load.run_pass(url, model_id, list(range(2 * n)), 2 * n, a.max_new_tokens, a.timeout, stream)
            if not all(r["ok"] for r in warm["results"]):
                print(f"warm-up failed: {warm['results']}", file=sys.stderr)
                return 1
            before = load_average()
            p = serve_load.run_pass(url, model_id, list(range(a.requests)), a.clients, a.max_new_tokens, a.timeout,
                                    stream)
            row = serve_load.summarize(f"{n} replica(s)", p, a.clients)
            row.update(replicas=n, load_before=before, load_after=load_average(), per_replica=replica_infos(a.model, n))
            rows.append(row)
            serve.delete("bench")
    finally:
        serve.shutdown()
        ray.shutdown()

    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    print(f"\n{a.requests} requests, {a.clients} clients, {a.max_new_tokens} max new tokens each, model {model_id}, "
          f"{'whole files' if a.whole else 'streamed'}, {a.cpus_per_replica:g} CPU per replica"
          f"{'' if a.no_pin else ' (pinned)'}\n")
    print("| replicas | ok | failed | wall s | req/s | audio s/s | TTFA p50 | TTFA p95 | latency p50 | latency p95 "
          "| load before | load after |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['replicas']} | {r['ok']} | {r['failed']} | {fmt(r['wall_s'])} | {fmt(r['req_per_s'])} "
              f"| {fmt(r['audio_s_per_s'])} | {fmt(r['ttfa_p50'])} | {fmt(r['ttfa_p95'])} | {fmt(r['latency_p50'])} "
              f"| {fmt(r['latency_p95'])} | {r['load_before']} | {r['load_after']} |")
    summary = dict(model=model_id, requests=a.requests, clients=a.clients, max_new_tokens=a.max_new_tokens,
                   streamed=stream, runs=rows)
    if len(rows) > 1 and rows[0]["req_per_s"]:
        summary["scaling"] = {r["replicas"]: r["req_per_s"] / rows[0]["req_per_s"] for r in rows}
        for r in rows[1:]:
            print(f"\n{r['replicas']} replicas / {rows[0]['replicas']}: "
                  f"{r['req_per_s'] / rows[0]['req_per_s']:.2f}x throughput")
    for r in rows:
        print(f"  {r['replicas']} replica(s): " + ", ".join(f"{k} cores {v['cores']} requests {v['requests_done']}"
                                                        for k, v in r["per_replica"].items()))
    return serve_load.finish(rows, summary, a.json)


if __name__ == "__main__":
    sys.exit(main())
