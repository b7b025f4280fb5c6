"""The speech server on Ray Serve (chatterbox.serve.ray_app) on a local Ray instance (127.0.0.1, no dashboard):
2 replicas of a deterministic Nano checkpoint behind Ray's HTTP proxy: the official `openai` client gets the
library's samples, streams and SSE pass the proxy, 16 concurrent requests use both replicas, a voice uploaded
through one replica speaks through the other, a killed replica is replaced (in-flight requests end in a 5xx,
never a hang; none fails afterwards), and one application serves two kinds routed by `model`.

Skipped when Ray (or the server stack) is missing or cannot start here. Bounded for CI: few speech tokens.
"""
from __future__ import annotations

import base64
import concurrent.futures as cf
import io
import json
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
sf = pytest.importorskip("soundfile")
ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
yaml = pytest.importorskip("yaml")

from chatterbox.serve import ray_app  # noqa: E402
from chatterbox.serve.ray_app import MODEL_HEADER, REPLICA_HEADER, ModelSpec, build_app, route_model  # noqa: E402
from chatterbox.testing import test_wav  # noqa: E402

pytestmark = pytest.mark.slow
TOKENS = 12  # speech tokens per request (~0.5 s of audio)
SR = 24000
TEXTS = ["Hello through the Ray proxy.", "A second replica says this."]
ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------ no cluster needed
def test_route_model_and_specs():
    kinds = ("nano", "turbo")
    assert route_model("chatterbox-turbo", kinds, "nano") == "turbo" and route_model("nano", kinds, "turbo") == "nano"
    assert route_model("tts-1", kinds, "turbo") == "turbo" and route_model("chatterbox", kinds, "nano") == "nano"
    assert route_model("chatterbox-original", kinds, "nano") is None and route_model("whisper-1", kinds, "nano") is None
    with pytest.raises(ValueError, match="kind must be one of"):
        ModelSpec(kind="large")
    with pytest.raises(ValueError, match="unknown model option"):
        ModelSpec.from_dict({"kind": "nano", "replicas": 2})
    spec = ModelSpec.from_dict({"kind": "turbo", "demo_weights": "true", "max_queue": "8", "max_batch": "null",
                                "request_timeout": "30", "factory_kwargs": '{"a": 1}'})  # serve run ... k=v
    assert (spec.demo_weights, spec.max_queue, spec.max_batch, spec.request_timeout) == (True, 8, None, 30.0)
    assert spec.factory_kwargs == {"a": 1}
    with pytest.raises(ValueError, match="max_queue='many'"):
        ModelSpec.from_dict({"max_queue": "many"})
    with pytest.raises(ValueError, match="package.module:function"):
        ModelSpec(factory="no_colon")
    with pytest.raises(ValueError, match="once"):
        build_app({"models": [{"kind": "nano"}, {"kind": "nano"}]})
    with pytest.raises(ValueError, match="default_model"):
        build_app({"models": [{"kind": "nano"}, {"kind": "turbo"}], "default_model": "original"})


def test_health_check_reports_load_failure_readiness_and_a_stuck_engine():
    import threading as th
    from types import SimpleNamespace as NS

    stats = {"queue_depth": 0, "active": 0, "tokens_generated": 0, "requests_done": 0}
    st = NS(load_error=None, draining=False, ready=th.Event(), backend=NS(stats=lambda: dict(stats)))
    r = ray_app._Replica()
    r.spec, r.asgi, r._progress = ModelSpec(stall_timeout=0.2), NS(state=st), (-1, -1, time.monotonic())
    with pytest.raises(RuntimeError, match="not ready"):
        r.check_health()
    st.ready.set()
    r.check_health()
    stats.update(active=2)
    r.check_health()  # work arrived: the clock starts
    time.sleep(0.3)
    with pytest.raises(RuntimeError, match="decoded nothing"):
        r.check_health()
    stats.update(tokens_generated=5)
    r.check_health()  # progress again
    st.draining = True
    time.sleep(0.3)
    r.check_health()  # stopping replicas are not reported
    st.load_error = "OSError: no weights"
    with pytest.raises(RuntimeError, match="failed to load"):
        r.check_health()


def test_cli_ray_options_are_checked_before_ray_starts(capsys):
    from chatterbox.serve.cli import main

    assert main(["--ray", "--replicas", "0"]) == 2
    assert main(["--ray", "--replicas", "2", "--max-replicas", "1"]) == 2
    assert "--max-replicas >= --replicas" in capsys.readouterr().err and not ray.is_initialized()


def test_serve_config_file_is_valid():
    """chatterbox_serve.yaml passes Ray's schema and its `deployments:` names exist in the app it builds."""
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load((ROOT / "chatterbox_serve.yaml").read_text())
    schema = getattr(ServeDeploySchema, "model_validate", ServeDeploySchema.parse_obj)(config)
    assert schema.applications
    for app in config["applications"]:
        assert app["import_path"] == "chatterbox.serve.ray_app:build_app"
        built = build_app(app.get("args"))
        args = app.get("args") or {}
        kinds = [m["kind"] for m in args.get("models", [args])]
        names = {ray_app.deployment_name(k) for k in kinds} | ({"chatterbox-router"} if len(kinds) > 1 else set())
        assert built is not None and {d["name"] for d in app.get("deployments", [])} <= names


# ------------------------------------------------------------------------------------ cluster fixtures
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class one_thread:
    """torch on one thread (as each replica runs): the same float sums, so samples compare exactly."""

    def __enter__(self):
        import torch

        self.n = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        import torch

        torch.set_num_threads(self.n)


@pytest.fixture(scope="module")
def ckpt(checkpoint_dir):
    return checkpoint_dir("nano")


@pytest.fixture(scope="module")
def refs(ckpt):
    """int16 samples of TEXTS[k] with seed k from the library itself, made before Ray starts (model freed)."""
    from chatterbox.registry import load_model
    from chatterbox.serve.codecs import to_int16

    m = load_model("nano", ckpt, "cpu", watermark=False)
    try:
        with one_thread():
            return [to_int16(m.generate(t, seed=k, max_new_tokens=TOKENS, split_text=True).numpy().reshape(-1))
                    for k, t in enumerate(TEXTS)]
    finally:
        m.close()


@pytest.fixture(scope="module")
def cluster():
    """A local Ray instance (2 CPUs, no dashboard) and Serve's proxy on a free 127.0.0.1 port; shut down after."""
    port = _free_port()
    try:
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2 ** 20, log_to_driver=False,
                 configure_logging=False)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
    except Exception as e:  # no shared memory, no sockets, ... in this sandbox
        if ray.is_initialized():
            ray.shutdown()
        pytest.skip(f"Ray cannot start here: {type(e).__name__}: {e}")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


def _deploy(app, name: str, timeout: float = 240.0) -> None:
    done = {}

    def go():
        try:
            serve.run(app, name=name, route_prefix="/")
            done["ok"] = True
        except BaseException as e:
            done["error"] = e

    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(timeout)
    if "ok" not in done:
        pytest.fail(f"application {name} did not start within {timeout:.0f} s: {done.get('error')}")


@pytest.fixture(scope="module")
def voices_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("ray-voices")


@pytest.fixture
def two(cluster, ckpt, refs, voices_dir):
    """Application "tts": 2 replicas of Nano, one CPU and one torch thread each, sharing one voices directory."""
    apps = serve.status().applications
    if "tts" not in apps or apps["tts"].status != "RUNNING":
        _deploy(build_app({"kind": "nano", "ckpt_dir": str(ckpt), "watermark": False, "voices_dir": str(voices_dir),
                           "default_max_new_tokens": TOKENS, "max_queue": 16,
                           "deployment": {"num_replicas": 2, "ray_actor_options": {"num_cpus": 1}}}), "tts")
    return cluster


def client(url):
    return openai.OpenAI(api_key="unused", base_url=url + "/v1", max_retries=0, timeout=300)


def pcm(data: bytes) -> np.ndarray:
    return np.frombuffer(data, "<i2")


def _idle_after_disconnect(url, deployment: str, app: str, model: str) -> None:
    """Open a stream of many sentences, take its first audio, hang up: the replica stops decoding it at once
    (run to its end it would decode for minutes)."""
    handle = serve.get_deployment_handle(deployment, app_name=app)
    body = dict(model=model, voice="default", input="Hang up on me now. " * 20, response_format="pcm",
                stream_format="audio", max_new_tokens=200)
    with httpx.stream("POST", url + "/v1/audio/speech", json=body, timeout=120) as r:
        assert r.status_code == 200
        replica = r.headers[REPLICA_HEADER]
        assert next(r.iter_bytes())
    end = time.monotonic() + 60
    while time.monotonic() < end:
        info = handle.info.remote().result(timeout_s=30)
        if info["replica"] == replica and info["engine"]["active"] == 0 and info["engine"]["queue_depth"] == 0:
            return
        time.sleep(0.2)
    pytest.fail(f"replica {replica} still decoding after the client went away")


def speak(url, i: int, **kw):
    """(status, replica, samples) of TEXTS[i % 2] with seed i % 2, as a whole file."""
    body = dict(model="nano", voice="default", input=TEXTS[i % 2], response_format="pcm", seed=i % 2, **kw)
    r = httpx.post(url + "/v1/audio/speech", json=body, timeout=180)
    return r.status_code, r.headers.get(REPLICA_HEADER), pcm(r.content) if r.status_code == 200 else r.text


# ------------------------------------------------------------------------------------ 2 replicas
def test_openai_client_through_the_proxy_gets_the_library_samples(two, refs):
    raw = client(two).audio.speech.with_raw_response.create(model="chatterbox-nano", voice="default", input=TEXTS[0],
                                                            response_format="wav", extra_body={"seed": 0})
    assert raw.headers[REPLICA_HEADER] and raw.headers[MODEL_HEADER] == "chatterbox-nano"
    y, rate = sf.read(io.BytesIO(raw.content), dtype="int16")
    assert rate == SR and len(y) > SR // 10
    assert np.array_equal(y, refs[0])


def test_streaming_audio_and_sse_through_the_proxy(two):
    body = dict(model="nano", voice="default", input="Streaming through the proxy, piece by piece.",
                response_format="pcm", seed=5, max_new_tokens=45)
    t0 = time.perf_counter()
    arrivals, parts = [], []
    with httpx.stream("POST", two + "/v1/audio/speech", json=dict(body, stream_format="audio"), timeout=300) as r:
        assert r.status_code == 200 and r.headers["content-type"] == "audio/pcm"
        for b in r.iter_bytes():
            arrivals.append(time.perf_counter() - t0)
            parts.append(b)
    total = time.perf_counter() - t0
    audio = pcm(b"".join(parts))
    assert len(audio) > SR // 2
    assert arrivals[0] < 0.8 * total, (arrivals[0], total)  # streamed through the proxy, not buffered
    r = httpx.post(two + "/v1/audio/speech", json=dict(body, stream_format="sse"), timeout=300)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [json.loads(line[6:]) for line in r.text.split("\n\n") if line.startswith("data: ")]
    assert events[-1]["type"] == "speech.audio.done" and {e["type"] for e in events[:-1]} == {"speech.audio.delta"}
    assert np.array_equal(pcm(b"".join(base64.b64decode(e["audio"]) for e in events[:-1])), audio)
    _idle_after_disconnect(two, "chatterbox-nano", "tts", "nano")  # Ray's proxy passes the disconnect on


def test_16_concurrent_requests_use_both_replicas(two, refs):
    c = client(two)

    def one(i):
        raw = c.audio.speech.with_raw_response.create(model="nano", voice="default", input=TEXTS[i % 2],
                                                      response_format="pcm", extra_body={"seed": i % 2})
        return raw.headers[REPLICA_HEADER], pcm(raw.content)

    with cf.ThreadPoolExecutor(16) as ex:
        out = list(ex.map(one, range(16)))
    replicas = [r for r, _ in out]
    assert len(set(replicas)) == 2, replicas  # spread over both
    assert min(replicas.count(r) for r in set(replicas)) >= 3, replicas
    for i, (_, audio) in enumerate(out):
        assert np.array_equal(audio, refs[i % 2]), i
    handle = serve.get_deployment_handle("chatterbox-nano", app_name="tts")
    infos = {i["replica"]: i for i in (handle.info.remote().result(timeout_s=60) for _ in range(8))}
    assert set(infos) <= set(replicas)
    for info in infos.values():  # one core each: one torch thread, all requests finished
        assert info["torch_threads"] == 1 and info["ready"] and info["engine"]["active"] == 0, info


def test_voice_uploaded_through_one_replica_speaks_through_the_other(two, tmp_path):
    ref = tmp_path / "ref.wav"
    sf.write(str(ref), test_wav(24000, 5.5, seed=77).numpy(), 24000)
    c = client(two)
    with open(ref, "rb") as f:
        raw = c.audio.voices.with_raw_response.create(name="Cluster voice", audio_sample=f, consent="cons_1")
    uploader, vid = raw.headers[REPLICA_HEADER], raw.parse().id
    assert vid.startswith("voice_")
    by_replica: dict = {}
    body = dict(model="nano", voice=vid, input="Spoken by any replica.", response_format="pcm", seed=3)
    with cf.ThreadPoolExecutor(4) as ex:
        for _ in range(4):  # concurrent rounds until both replicas answered (each round reaches both in practice)
            rs = list(ex.map(lambda _: httpx.post(two + "/v1/audio/speech", json=body, timeout=180), range(4)))
            assert [r.status_code for r in rs] == [200] * 4, [r.text[:200] for r in rs]
            for r in rs:
                by_replica.setdefault(r.headers[REPLICA_HEADER], set()).add(r.content)
            if len(by_replica) == 2:
                break
    assert uploader in by_replica and len(by_replica) == 2, by_replica.keys()
    assert all(len(v) == 1 for v in by_replica.values()) and len(set.union(*by_replica.values())) == 1  # same audio
    builtin = httpx.post(two + "/v1/audio/speech", json=dict(body, voice="default"), timeout=180).content
    assert builtin not in by_replica[uploader]

    seen = {r.headers[REPLICA_HEADER]: [v["id"] for v in r.json()["data"]]
            for r in (httpx.get(two + "/v1/audio/voices") for _ in range(12))}
    assert all(vid in ids for ids in seen.values()) and len(seen) == 2  # both list it
    assert c.audio.voices.delete(vid).deleted
    gone = [httpx.post(two + "/v1/audio/speech", json=body, timeout=60) for _ in range(6)]
    assert {r.status_code for r in gone} == {404} and len({r.headers[REPLICA_HEADER] for r in gone}) == 2


def _replica_actor(uid: str):
    for a in ray.util.list_named_actors(all_namespaces=True):
        if a["name"].endswith("#" + uid):
            return ray.get_actor(a["name"], namespace=a["namespace"])
    raise LookupError(uid)


def _running_replicas(app: str, deployment: str) -> int:
    d = serve.status().applications[app].deployments[deployment]
    return d.replica_states.get("RUNNING", 0) if d.status == "HEALTHY" else 0


@pytest.mark.extended
def test_killed_replica_is_replaced_in_flight_requests_get_5xx_never_hang(two, refs):
    victim = speak(two, 0)[1]
    with cf.ThreadPoolExecutor(8) as ex:
        futures = [ex.submit(speak, two, i) for i in range(8)]
        time.sleep(1.5)  # both replicas are decoding
        ray.kill(_replica_actor(victim), no_restart=True)
        t0 = time.monotonic()
        during = [f.result(timeout=180) for f in futures]  # no hang: each ends
    assert time.monotonic() - t0 < 150
    for i, (status, replica, audio) in enumerate(during):
        assert status == 200 or 500 <= status < 600, (i, status, audio)
        if status == 200:
            assert np.array_equal(audio, refs[i % 2]), i
        else:
            assert "Traceback" not in audio
    assert any(s == 200 for s, _, _ in during)  # the surviving replica kept serving

    end = time.monotonic() + 180
    while time.monotonic() < end:
        if _running_replicas("tts", "chatterbox-nano") == 2:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"the killed replica was not replaced: {serve.status().applications['tts']}")
    survivor = {r for s, r, _ in during if s == 200}
    with cf.ThreadPoolExecutor(8) as ex:
        after = list(ex.map(lambda i: speak(two, i), range(8)))
    assert [s for s, _, _ in after] == [200] * 8, after
    for i, (_, replica, audio) in enumerate(after):
        assert replica != victim and np.array_equal(audio, refs[i % 2]), i
    seen = {r for _, r, _ in after}
    end = time.monotonic() + 60
    while not seen - survivor and time.monotonic() < end:  # the proxy learns of the new replica and uses it
        status, replica, audio = speak(two, 0)
        assert status == 200 and np.array_equal(audio, refs[0])
        seen.add(replica)
    assert seen - survivor - {victim}, seen
    print("kill test:", [(s, r) for s, r, _ in during], survivor, seen)


# ------------------------------------------------------------------------------------ several kinds
@pytest.mark.extended
def test_two_kinds_routed_by_model_and_drained_on_delete(cluster, ckpt, refs, tmp_path):
    """Deployments chatterbox-nano and chatterbox-turbo behind the router. (The test loads the same Nano weights
    for "turbo" through the factory option: what is tested is the routing, not Turbo.)"""
    if "tts" in serve.status().applications:
        serve.delete("tts")  # free the 2 replicas' memory first
    url = cluster
    common = dict(watermark=False, default_max_new_tokens=TOKENS, voices_dir=str(tmp_path / "voices"),
                  deployment={"ray_actor_options": {"num_cpus": 1}})
    turbo = dict(kind="turbo", factory="chatterbox.registry:load_model",
                 factory_kwargs={"kind": "nano", "ckpt_dir": str(ckpt), "device": "cpu", "watermark": False}, **common)
    _deploy(build_app({"models": [dict(kind="nano", ckpt_dir=str(ckpt), **common), turbo], "default_model": "nano"}),
            "multi")

    assert httpx.get(url + "/ready").json() == {"status": "ready", "models": {"nano": "ready", "turbo": "ready"}}
    assert [m.id for m in client(url).models.list().data] == ["chatterbox-nano", "chatterbox-turbo"]
    c = client(url)
    names = {"chatterbox-turbo": "chatterbox-turbo", "nano": "chatterbox-nano", "tts-1": "chatterbox-nano"}

    def one(name):
        return c.audio.speech.with_raw_response.create(model=name, voice="default", input=TEXTS[1],
                                                       response_format="pcm", extra_body={"seed": 1})

    with cf.ThreadPoolExecutor(3) as ex:
        for name, raw in zip(names, ex.map(one, names)):
            assert raw.headers[MODEL_HEADER] == names[name], name
            assert np.array_equal(pcm(raw.content), refs[1]), name  # same weights, same samples, via the router
    with pytest.raises(openai.NotFoundError) as e:
        c.audio.speech.create(model="chatterbox-original", voice="default", input="x")
    assert e.value.body["code"] == "model_not_found" and "chatterbox-turbo" in e.value.body["message"]
    r = httpx.post(url + "/v1/audio/speech", content=b"not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"  # the server's own answer
    r = httpx.get(url + "/v1/audio/voices", params={"model": "turbo"})
    assert r.headers[MODEL_HEADER] == "chatterbox-turbo" and [v["id"] for v in r.json()["data"]] == ["default"]

    r = httpx.post(url + "/v1/audio/speech", timeout=120,
                   json=dict(model="turbo", voice="default", input="Streamed through the router.", response_format="pcm",
                             stream_format="sse", seed=2, max_new_tokens=30))
    events = [json.loads(line[6:]) for line in r.text.split("\n\n") if line.startswith("data: ")]
    assert r.headers[MODEL_HEADER] == "chatterbox-turbo" and events[-1]["type"] == "speech.audio.done"
    assert sum(len(base64.b64decode(e["audio"])) for e in events[:-1]) > SR // 2

    _idle_after_disconnect(url, "chatterbox-turbo", "multi", "turbo")  # and the router passes it on
    got = {}

    def slow():  # in flight while the application is deleted: Ray drains it, then the app closes the model
        got["r"] = httpx.post(url + "/v1/audio/speech", timeout=180,
                              json=dict(model="nano", voice="default", input=TEXTS[0], response_format="pcm", seed=0))

    t = threading.Thread(target=slow)
    t.start()
    time.sleep(1.0)
    serve.delete("multi")
    t.join(180)
    assert got["r"].status_code == 200 and np.array_equal(pcm(got["r"].content), refs[0])
