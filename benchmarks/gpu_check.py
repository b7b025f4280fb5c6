"""One command that checks and measures the GPU path (and, with --device cpu --tiny, keeps itself from rotting in CI).

    python benchmarks/gpu_check.py --out gpu_check.json                  # any CUDA machine, deterministic weights
    python benchmarks/gpu_check.py --ckpt-dir original=/ckpt/chatterbox --ckpt-dir turbo=/ckpt/turbo
    python benchmarks/gpu_check.py --device cpu --tiny --out /tmp/gc.json  # the same code on 2-layer T3s (CI)

Per model kind (English with CFG, Turbo, Nano) it records
- correctness: compiled generation (reduce-overhead on CUDA, bf16) runs twice in a row; eager vs
  compiled fp32 speech tokens identical and waveform relative error <= 1e-3; CUDA-graph skips 0
  (no "skipping cudagraphs" reasons); graph breaks 0; recompiles after warm-up 0 (requests varying
  the sampling knobs, text length and seed);
- speed: T3 tokens/s for upstream-style eager decoding (the baseline, same run), ours fp32 eager,
  ours bf16 compiled; S3Gen milliseconds per audio second (CFM 10 steps / meanflow 2 steps);
  end-to-end real-time factor for ~10 s of audio; warm-up seconds; peak device memory (bf16);
  Turbo/Nano aggregate T3 tokens/s with B concurrent requests (--batch); streaming time to first
  audio, and N concurrent streams (--streams) with their p95 time to first audio and worst RTF;
  tf32: the float32 S3Gen time with TF32 allowed, next to the default.
It prints one table and writes JSON (--out). Targets for an H100/H200 are listed in BENCHMARKS.md;
figures belong there only when measured on such a device.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch._dynamo
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).parent))

from t3_decode import upstream_style, upstream_style_turbo  # noqa: E402

from chatterbox.runtime.noise import RequestRandomness  # noqa: E402

TEXT = ("The quick brown fox jumps over the lazy dog while the band plays on, and everyone in the "
        "square stops to listen for a moment before going back to their afternoon.")
VARIED = [  # recompile check: other knobs, lengths and seeds after warm-up
    ("Short.", dict(temperature=1.0, top_p=0.9, repetition_penalty=1.0, seed=3)),
    ("A rather longer sentence, with a clause or two, to change the prompt length.",
     dict(temperature=0.6, top_p=1.0, repetition_penalty=1.5, seed=4)),
]
KINDS = ("original", "turbo", "nano")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def load(kind: str, a, workdir: Path):
    """A public model object: from --ckpt-dir when given, else deterministic weights (tiny T3 with --tiny)."""
    from chatterbox.registry import load_model
    from chatterbox.testing import tiny_model

    ckpt = dict(x.split("=", 1) for x in a.ckpt_dir).get(kind)
    if ckpt:
        model = load_model(kind, ckpt, a.device, watermark=False)
        if model.conds is None:
            raise SystemExit(f"{ckpt} has no conds.pt voice")
        return model
    if a.tiny:
        return tiny_model(kind, workdir / kind, device=a.device, ref_seconds=6.0)
    sys.path.insert(0, str(Path(__file__).parent))
    from run import build

    return build(kind, "full", a.device, workdir)


def knobs(kind: str) -> dict:
    if kind == "original":
        return dict(temperature=0.8, top_p=1.0, min_p=0.05, repetition_penalty=1.2, cfg_weight=0.5)
    return dict(temperature=0.8, top_p=0.95, min_p=0.0, repetition_penalty=1.2, cfg_weight=0.0)


def gen_kwargs(kind: str, **over) -> dict:
    kw = knobs(kind)
    if kind != "original":
        kw.pop("cfg_weight"), kw.pop("min_p")
    kw.update(over)
    return kw


@torch.inference_mode()
def t3_tokens(model, kind: str, n: int, seed: int, device: str) -> tuple[list[int], float]:
    """One request through the scheduler (the generate path): (speech tokens, seconds)."""
    job = model._job(TEXT, voice=model.conds, params=model._params(**knobs(kind)),
                     exaggeration=0.5 if kind == "original" else 0.0, max_new_tokens=n,
                     rnd=RequestRandomness.create(device, seed=seed))
    sync(device)
    t = time.perf_counter()
    handle = model.scheduler.submit(job.request)
    toks = handle.result(timeout=600)
    sync(device)
    return toks, time.perf_counter() - t


@torch.inference_mode()
def t3_batch_rate(model, kind: str, b: int, n: int, device: str) -> float:
    jobs = [model._job(TEXT, voice=model.conds, params=model._params(**knobs(kind)), exaggeration=0.0,
                       max_new_tokens=n, rnd=RequestRandomness.create(device, seed=i)) for i in range(b)]
    before = model.scheduler.tokens_generated
    sync(device)
    t = time.perf_counter()
    for h in [model.scheduler.submit(j.request) for j in jobs]:
        h.result(timeout=600)
    sync(device)
    return (model.scheduler.tokens_generated - before) / (time.perf_counter() - t)


@torch.inference_mode()
def upstream_rate(model, kind: str, n: int, device: str) -> float:
    t3 = model.t3
    cond = model._t3_cond(model.conds, 0.5 if kind == "original" else 0.0)
    torch.manual_seed(0)
    sync(device)
    t = time.perf_counter()
    if kind == "original":
        ids = model.tokenizer.text_to_tokens(TEXT).long()
        ids = torch.cat([torch.tensor([[255]]), ids, torch.tensor([[0]])], 1).to(device)
        got = upstream_style(t3, cond, ids, n)
    else:
        ids = model.tokenizer(TEXT, return_tensors="pt").input_ids.to(device)
        got = upstream_style_turbo(t3, cond, ids, n)
    sync(device)
    return got / (time.perf_counter() - t)


@torch.inference_mode()
def s3gen_ms_per_audio_s(model, n: int, device: str, seed: int = 0) -> tuple[float, torch.Tensor]:
    fixed = torch.randint(0, 6561, (n,), generator=torch.Generator().manual_seed(seed)).to(device)
    model._s3gen_wavs([fixed], [model.conds.gen], [RequestRandomness.create(device, seed=seed)])  # warm
    sync(device)
    t = time.perf_counter()
    wav = model._s3gen_wavs([fixed], [model.conds.gen], [RequestRandomness.create(device, seed=seed)])[0]
    sync(device)
    return 1000 * (time.perf_counter() - t) / (wav.shape[-1] / 24000), wav.float().cpu()


def stream_once(model, kind: str, seed: int, tokens: int):
    """One generate_stream call consumed to the end: (samples, final metrics)."""
    n, m = 0, None
    for chunk, m in model.generate_stream(TEXT, max_new_tokens=tokens, **gen_kwargs(kind, seed=seed)):
        n += chunk.shape[-1]
    return n, m


def concurrent_streams(model, kind: str, n: int, tokens: int) -> list[tuple[float, float]]:
    """n streams from n threads at once: (time to first audio, RTF) of each."""
    import threading

    out, errors = [], []

    def work(i):
        try:
            _, m = stream_once(model, kind, i, tokens)
            out.append((m.latency_to_first_chunk, m.rtf))
        except Exception as e:  # reported as a failed check
            errors.append(e)

    ts = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(900)
    if errors:
        raise errors[0]
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    return float((a - b).norm() / max(float(b.norm()), 1e-12))


def batch_for(kind: str, a) -> int:
    return 1 if kind == "original" else max(a.batch, 1)


def compile_opts(a, kind: str, model, dtype: str) -> dict:
    p = model.conds.gen["prompt_token"].shape[-1]
    cuda = a.device.startswith("cuda")
    # English is checked one request at a time (its VRAM target is for a single stream); Turbo/Nano
    # decode --batch requests together for the aggregate figure
    opts = dict(dtype=dtype, max_batch=batch_for(kind, a), max_text_tokens=128, max_new_tokens=a.tokens,
                s3gen=cuda, buckets=(p + a.tokens + 8,))
    if not cuda:
        opts.update(backend=a.cpu_backend, s3gen=False)
    return opts


def check_kind(kind: str, a, workdir: Path) -> dict:
    dev = a.device
    cuda = dev.startswith("cuda")
    row: dict = dict(model=kind)
    # ---------------------------------------------------------------- eager fp32 + baseline
    model = load(kind, a, workdir)
    model.set_max_batch(batch_for(kind, a))
    t3_tokens(model, kind, 4, 0, dev)  # first use: builds the decoder
    eager_toks, dt = t3_tokens(model, kind, a.tokens, 0, dev)
    row["t3_tokens_per_s_fp32_eager"] = round(len(eager_toks) / dt, 1)
    upstream_rate(model, kind, 4, dev)
    row["t3_tokens_per_s_upstream_style"] = round(upstream_rate(model, kind, a.tokens, dev), 1)
    ms, eager_wav = s3gen_ms_per_audio_s(model, a.tokens, dev)
    row["s3gen_ms_per_audio_s_fp32_eager"] = round(ms, 1)
    if cuda:
        before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        ms_tf32, wav_tf32 = s3gen_ms_per_audio_s(model, a.tokens, dev)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
        row["s3gen_ms_per_audio_s_fp32_tf32"] = round(ms_tf32, 1)
        row["s3gen_tf32_wav_rel_err"] = float(f"{rel(wav_tf32, eager_wav):.3g}")
    # ---------------------------------------------------------------- compiled fp32: equality + recompiles
    torch._dynamo.reset()
    counters.clear()
    model.compile(**compile_opts(a, kind, model, "float32"))
    t = time.perf_counter()
    model.warmup(max_new_tokens=8)
    row["warmup_s_fp32"] = round(time.perf_counter() - t, 1)
    graphs = counters["stats"]["unique_graphs"]
    comp_toks, _ = t3_tokens(model, kind, a.tokens, 0, dev)
    _, comp_wav = s3gen_ms_per_audio_s(model, a.tokens, dev)
    row["fp32_tokens_equal_eager"] = comp_toks == eager_toks
    row["fp32_wav_rel_err_vs_eager"] = float(f"{rel(comp_wav, eager_wav):.3g}")
    for text, kw in VARIED:
        model.generate(text, max_new_tokens=max(4, a.tokens // 4), **gen_kwargs(kind, **kw))
    row["recompiles_after_warmup"] = counters["stats"]["unique_graphs"] - graphs
    row["graph_breaks"] = sum(counters["graph_break"].values())
    row["cudagraph_skips"] = int(counters["inductor"].get("cudagraph_skips", 0))
    model.close()
    del model
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    # ---------------------------------------------------------------- compiled bf16: speed, memory, twice in a row
    torch._dynamo.reset()
    model = load(kind, a, workdir)
    model.set_max_batch(batch_for(kind, a))
    model.compile(**compile_opts(a, kind, model, "bfloat16"))
    t = time.perf_counter()
    model.warmup(max_new_tokens=8)
    row["warmup_s_bf16"] = round(time.perf_counter() - t, 1)
    runs = []
    for i in range(2):
        sync(dev)
        t = time.perf_counter()
        wav = model.generate(TEXT, max_new_tokens=a.tokens, **gen_kwargs(kind, seed=i))
        sync(dev)
        runs.append((time.perf_counter() - t, wav.shape[-1] / 24000))
    row["bf16_runs_twice"] = all(s > 0 for _, s in runs)
    e2e_s, audio_s = runs[-1]
    row["e2e_rtf_bf16"] = round(e2e_s / max(audio_s, 1e-9), 4)
    row["audio_s"] = round(audio_s, 2)
    toks, dt = t3_tokens(model, kind, a.tokens, 0, dev)
    row["t3_tokens_per_s_bf16_compiled"] = round(len(toks) / dt, 1)
    if kind != "original" and a.batch > 1:
        row[f"t3_aggregate_tokens_per_s_b{a.batch}"] = round(t3_batch_rate(model, kind, a.batch, a.tokens, dev), 1)
    ms, _ = s3gen_ms_per_audio_s(model, a.tokens, dev)
    row["s3gen_ms_per_audio_s_compiled"] = round(ms, 1)
    # streaming: time to first audio of one stream, then N concurrent streams (all faster than real time?)
    _, m = stream_once(model, kind, 0, a.tokens)
    row["stream_ttfa_s"] = round(m.latency_to_first_chunk, 3)
    n = a.streams if kind != "original" else min(a.streams, 16)
    if n > 1:
        rows = concurrent_streams(model, kind, n, a.tokens)
        ttfa = sorted(r[0] for r in rows)
        row[f"streams{n}_p95_ttfa_s"] = round(ttfa[min(len(ttfa) - 1, int(0.95 * len(ttfa)))], 3)
        row[f"streams{n}_all_realtime"] = all(r[1] < 1.0 for r in rows)
        row[f"streams{n}_worst_rtf"] = round(max(r[1] for r in rows), 3)
    row["peak_mem_mb_bf16"] = round(torch.cuda.max_memory_allocated() / 2 ** 20) if cuda else None
    model.close()
    del model
    if cuda:
        torch.cuda.empty_cache()
    return row


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="2-layer T3s (CPU smoke run; numbers are meaningless)")
    ap.add_argument("--models", default=",".join(KINDS))
    ap.add_argument("--ckpt-dir", action="append", default=[], metavar="KIND=DIR")
    ap.add_argument("--tokens", type=int, default=250, help="speech tokens per request (250 = 10 s of audio)")
    ap.add_argument("--batch", type=int, default=64, help="concurrent requests for the Turbo/Nano aggregate figure")
    ap.add_argument("--streams", type=int, default=16, help="concurrent streams (English at most 16)")
    ap.add_argument("--cpu-backend", default="eager", help="torch.compile backend off CUDA (eager: dynamo only)")
    ap.add_argument("--out", default="gpu_check.json")
    a = ap.parse_args(argv)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here; run with --device cpu --tiny for the smoke run")
    logging.basicConfig(level=logging.WARNING)
    t0 = time.perf_counter()
    res = dict(device=torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu", torch=torch.__version__,
               tiny=a.tiny, tokens=a.tokens, batch=a.batch, date=time.strftime("%Y-%m-%d"), rows=[])
    with tempfile.TemporaryDirectory() as td:
        for kind in [k for k in a.models.split(",") if k]:
            row = check_kind(kind, a, Path(td))
            res["rows"].append(row)
            print(json.dumps(row), flush=True)
    res["total_s"] = round(time.perf_counter() - t0, 1)
    keys = sorted({k for r in res["rows"] for k in r} - {"model"})
    print("\n| check | " + " | ".join(r["model"] for r in res["rows"]) + " |\n|---|" + "---|" * len(res["rows"]))
    for k in keys:
        print(f"| {k} | " + " | ".join(str(r.get(k, "")) for r in res["rows"]) + " |")
    print(f"\ntotal {res['total_s']} s on {res['device']}")
    if a.out:
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
