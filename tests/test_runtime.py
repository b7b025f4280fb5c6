"""Runtime: bucketed S3Gen exactness, compiled == eager generation, no recompiles inside warmed
buckets, and the benchmarks' smoke runs (end to end, batching, gpu_check --tiny)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from conftest import rel_err
from chatterbox.runtime.compile import compile_model
from chatterbox.runtime.s3gen_buckets import bucket_for, bucketed_inference
from chatterbox.testing import tiny_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tts(tmp_path_factory):
    m = tiny_model("english", tmp_path_factory.mktemp("rt"), ref_seconds=1.5)
    yield m
    m.close()


def test_bucket_for():
    assert bucket_for(10, (64, 128)) == 64 and bucket_for(64, (64, 128)) == 64 and bucket_for(65, (64, 128)) == 128
    assert bucket_for(300, (64, 128)) == 512


def test_bucketed_s3gen_equals_unpadded(tts):
    s3 = tts.s3gen
    p = tts.conds.gen["prompt_token"].shape[-1]
    buckets = (p + 16, p + 48)
    for n in (9, 30):  # first bucket, second bucket
        speech = torch.randint(0, 6561, (n,), generator=torch.Generator().manual_seed(n))
        ref, _ = s3.inference(speech[None], ref_dict=tts.conds.gen, generator=torch.Generator().manual_seed(0))
        out = bucketed_inference(s3, speech, tts.conds.gen, generator=torch.Generator().manual_seed(0), buckets=buckets)
        assert out.shape == ref.shape and abs(out.shape[1] - 960 * n) <= 480  # 2N or 2N-1 frames (odd prompt mel)
        assert rel_err(out, ref) <= 1e-4


def test_compiled_equals_eager_and_no_recompile_in_warm_buckets(tmp_path):
    tts = tiny_model("english", tmp_path, ref_seconds=1.5, cfm_steps=2)  # CFM graphs as with 10 steps, 5x less work
    texts = ["Short one.", "A somewhat longer sentence to speak here."]
    eager = [tts.generate(t, seed=i, max_new_tokens=10 + 12 * i) for i, t in enumerate(texts)]

    torch._dynamo.reset()
    counters.clear()
    p = tts.conds.gen["prompt_token"].shape[-1]
    # dynamo traces T3 and S3Gen ("eager" backend: the graphs, guards and buckets without CPU codegen time;
    # inductor equality is checked in test_t3 / test_s3gen_flow / test_hift)
    compile_model(tts, buckets=(p + 16, p + 48), backend="eager", s3gen=True, s3gen_backend="eager",
                  max_batch=1, max_text_tokens=64, max_new_tokens=48)
    # the streaming flow shapes are warmed and checked in test_s3gen_stream / test_gpu_path
    tts.warmup(texts=["Warm up."], max_new_tokens=24, hift_frames=(4, 8, 16, 32, 64, 128), stream=False)
    compiled = [tts.generate(t, seed=i, max_new_tokens=10 + 12 * i) for i, t in enumerate(texts)]
    for e, c in zip(eager, compiled):
        assert e.shape == c.shape and e.shape[1] > 0
        assert rel_err(c, e) <= 1e-3
    assert sum(counters["graph_break"].values()) == 0
    graphs = counters["stats"]["unique_graphs"]
    # new lengths inside the warmed buckets: nothing compiles again
    tts.generate("Another length of text, again.", seed=5, max_new_tokens=14)
    tts.generate("Mid.", seed=6, max_new_tokens=30)
    assert counters["stats"]["unique_graphs"] == graphs
    tts.close()


def test_benchmark_smoke(tmp_path):
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    import run as bench

    out = tmp_path / "bench.json"
    res = bench.main(["--config", "tiny", "--models", "turbo", "--seconds", "0.3", "--backend", "eager",
                      "--modes", "upstream_eager,ours_eager,ours_compiled_fp32", "--device", "cpu", "--json", str(out)])
    assert out.is_file()
    rows = res["rows"]
    assert [(r["model"], r["mode"]) for r in rows] == [
        (m, mode) for m in ("turbo",) for mode in ("upstream_eager", "ours_eager", "ours_compiled_fp32")]
    for r in rows:
        assert r["t3_tokens_per_s"] > 0 and r["s3gen_ms_per_audio_s"] > 0 and r["rtf"] > 0 and r["peak_mb"] > 0
        if r["mode"] == "ours_compiled_fp32":
            assert r["wav_rel_diff_vs_eager"] <= 1e-3


def test_batch_benchmark_smoke(tmp_path):
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    import batch as bench

    res = bench.main(["--config", "tiny", "--models", "turbo", "--batches", "1,2", "--tokens", "6", "--device", "cpu",
                      "--json", str(tmp_path / "b.json")])
    rows = res["rows"]
    assert [r["batch"] for r in rows] == [1, 2]
    for r in rows:
        assert r["t3_tokens_per_s_batched"] > 0 and r["t3_tokens_per_s_sequential"] > 0
        assert r["e2e_audio_s_per_s_batched"] > 0 and r["max_wav_rel_diff"] <= 1e-3  # batched rows = requests


def test_where_time_goes_smoke():
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    import where_time_goes as bench

    res = bench.main(["--config", "tiny", "--model", "nano", "--rows", "1,2", "--plain", "--split", "--tokens", "6",
                      "--device", "cpu"])
    assert [r["requests"] for r in res["packed"]] == [1, 2] == [r["requests"] for r in res["plain"]]
    assert all(r["prepacked"] for r in res["packed"]) and not any(r["prepacked"] for r in res["plain"])
    assert all(r["step_s"] > 0 and r["prefill_s"] > 0 and 0 < r["prefix_len"] < r["prompt_len"] for r in res["packed"])
    sp = res["split"]
    assert 0 < sp["t3_only_s"] < sp["generate_s"] and sp["stream_chunks"] >= 1 and sp["tokens"] >= 1


def test_gpu_check_tiny_runs_on_cpu(tmp_path):
    """`gpu_check.py --device cpu --tiny` runs the GPU check's code end to end so the script never rots."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    import gpu_check

    res = gpu_check.main(["--device", "cpu", "--tiny", "--models", "nano", "--tokens", "6", "--batch", "2",
                          "--streams", "2", "--out", str(tmp_path / "gc.json")])
    (row,) = res["rows"]
    assert row["fp32_tokens_equal_eager"] is True and row["fp32_wav_rel_err_vs_eager"] <= 1e-3
    assert row["recompiles_after_warmup"] == 0 and row["graph_breaks"] == 0 and row["cudagraph_skips"] == 0
    assert row["bf16_runs_twice"] is True and row["t3_tokens_per_s_upstream_style"] > 0
    assert row["stream_ttfa_s"] > 0 and "streams2_all_realtime" in row
    assert (tmp_path / "gc.json").is_file()


def test_stream_benchmark_smoke(tmp_path):
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    import stream as bench

    res = bench.main(["--config", "tiny", "--models", "nano", "--tokens", "40", "--device", "cpu",
                      "--json", str(tmp_path / "s.json")])
    (row,) = res["rows"]
    assert row["same_length"] and row["chunks"] >= 2 and 0 < row["first_chunk_s"] < row["stream_s"]
    assert row["boundary_jump_over_inside"] <= 1.0 and row["logmel_rel_dist"] <= 0.35
