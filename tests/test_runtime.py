"""Runtime: bucketed S3Gen exactness, compiled == eager generation, no recompiles inside warmed
buckets, thread safety, and the end-to-end benchmark's smoke run."""
from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest
import soundfile as sf
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from conftest import rel_err
from chatterbox.models.s3gen import S3Gen
from chatterbox.models.t3 import T3, T3Config
from chatterbox.models.t3.llama_configs import LLAMA_CONFIGS
from chatterbox.models.tokenizers import EnTokenizer
from chatterbox.models.voice_encoder import VoiceEncoder
from chatterbox.runtime.compile import compile_model
from chatterbox.runtime.s3gen_buckets import bucket_for, bucketed_inference
from chatterbox.testing import apply_det_weights, det_state_dict, test_wav
from chatterbox.testing_tokenizers import write_en_tokenizer
from chatterbox.tts import ChatterboxTTS

pytestmark = pytest.mark.slow

TINY = dict(LLAMA_CONFIGS["Llama_520M"], num_hidden_layers=2, intermediate_size=256, num_attention_heads=4,
            num_key_value_heads=4, head_dim=256)


def tiny_tts(tmp: Path) -> ChatterboxTTS:
    """ChatterboxTTS with a 2-layer T3 and the real (deterministic-weight) S3Gen and VoiceEncoder."""
    LLAMA_CONFIGS.setdefault("runtime_tiny", TINY)
    hp = T3Config.english_only()
    hp.llama_config_name = "runtime_tiny"
    with torch.device("meta"):
        shell = T3(hp)
    t3 = T3.from_state_dict(det_state_dict(shell), hp)
    write_en_tokenizer(tmp)
    tts = ChatterboxTTS(t3, apply_det_weights(S3Gen().eval()), apply_det_weights(VoiceEncoder().eval()),
                        EnTokenizer(str(tmp / "tokenizer.json")), "cpu", watermark=False)
    ref = tmp / "ref.wav"
    sf.write(str(ref), test_wav(24000, 1.5, seed=3).numpy(), 24000, subtype="FLOAT")
    tts.prepare_conditionals(str(ref))
    return tts


@pytest.fixture(scope="module")
def tts(tmp_path_factory):
    return tiny_tts(tmp_path_factory.mktemp("rt"))


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
    tts = tiny_tts(tmp_path)
    texts = ["Short one.", "A somewhat longer sentence to speak here."]
    eager = [tts.generate(t, seed=i, max_new_tokens=10 + 12 * i) for i, t in enumerate(texts)]

    torch._dynamo.reset()
    counters.clear()
    p = tts.conds.gen["prompt_token"].shape[-1]
    # T3 with inductor (tiny); S3Gen traced by dynamo only ("eager" backend) to keep CPU compile time small
    compile_model(tts, buckets=(p + 16, p + 48), backend="inductor", s3gen=True, s3gen_backend="eager")
    tts.warmup(texts=["Warm up."], max_new_tokens=24, hift_frames=(4, 8, 16, 32, 64, 128))
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


def test_concurrent_generate_calls_are_serialised(tts):
    texts = {1: "One thread speaks.", 2: "Another thread speaks too."}
    expected = {s: tts.generate(t, seed=s, max_new_tokens=8) for s, t in texts.items()}
    got, errors = {}, []

    def work(seed):
        try:
            got[seed] = tts.generate(texts[seed], seed=seed, max_new_tokens=8)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s,)) for s in texts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors
    for s in texts:
        assert torch.equal(got[s], expected[s])


def test_benchmark_smoke(tmp_path):
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    import run as bench

    out = tmp_path / "bench.json"
    res = bench.main(["--config", "tiny", "--models", "original,turbo", "--seconds", "0.3", "--backend", "eager",
                      "--modes", "upstream_eager,ours_eager,ours_compiled_fp32", "--device", "cpu", "--json", str(out)])
    assert out.is_file()
    rows = res["rows"]
    assert [(r["model"], r["mode"]) for r in rows] == [
        (m, mode) for m in ("original", "turbo") for mode in ("upstream_eager", "ours_eager", "ours_compiled_fp32")]
    for r in rows:
        assert r["t3_tokens_per_s"] > 0 and r["s3gen_ms_per_audio_s"] > 0 and r["rtf"] > 0 and r["peak_mb"] > 0
        if r["mode"] == "ours_compiled_fp32":
            assert r["wav_rel_diff_vs_eager"] <= 1e-3
