"""chatterbox-fast end-to-end benchmark: upstream-style eager vs ours eager vs compiled (fp32, bf16).

One process, the same deterministic weights for every mode, for the original model and Turbo:

    python benchmarks/run.py                       # full-size models, CPU or the CUDA device
    python benchmarks/run.py --config tiny         # 2-layer T3s, 2 CFM steps (CI smoke run)
    python benchmarks/run.py --models original --modes ours_eager,ours_compiled_fp32 --seconds 4

Per model and mode it reports T3 tokens/s, S3Gen milliseconds per second of audio, the
end-to-end real-time factor, peak memory, and the largest relative waveform difference of each
mode against ours-eager for the same seed. Prints one table and writes JSON (--json).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from t3_decode import upstream_style, upstream_style_turbo  # noqa: E402

from chatterbox.models.s3gen import S3Gen  # noqa: E402
from chatterbox.models.t3 import T3, T3Config  # noqa: E402
from chatterbox.models.voice_encoder import VoiceEncoder  # noqa: E402
from chatterbox.runtime.noise import RequestRandomness  # noqa: E402
from chatterbox.testing import apply_det_weights, det_state_dict, test_wav  # noqa: E402

MODES = ("upstream_eager", "ours_eager", "ours_compiled_fp32", "ours_compiled_bf16")
TEXT = ("The quick brown fox jumps over the lazy dog while the band plays on, and everyone in the "
        "square stops to listen for a moment before going back to their afternoon.")


def build(model: str, config: str, device: str, workdir: Path):
    """A public model object of kind `model` on deterministic weights (in memory; the classes users load)."""
    import soundfile as sf

    from chatterbox.registry import _load_tokenizer, api_class, get_spec
    from chatterbox.testing import tiny_model
    from chatterbox.testing_tokenizers import write_en_tokenizer, write_turbo_tokenizer

    spec = get_spec(model)
    seconds = 10.0 if config == "full" else (5.5 if spec.meanflow else 2.0)  # the pipelines use up to 10 s
    if config == "tiny":
        # smoke runs: 2-layer T3, and 2 flow steps for CFM models (the same graphs, a fifth of the work)
        return tiny_model(spec.kind, workdir / f"tiny_{spec.kind}", device=device, ref_seconds=seconds,
                          cfm_steps=None if spec.meanflow else 2)
    hp = getattr(T3Config, spec.t3_config)()
    with torch.device("meta"):
        shell = T3(hp)
    t3 = T3.from_state_dict(det_state_dict(shell), hp).to(device)
    s3 = apply_det_weights(S3Gen(meanflow=spec.meanflow)).to(device).eval()
    ve = apply_det_weights(VoiceEncoder()).to(device).eval()
    tdir = workdir / f"tok_{spec.kind}"
    tdir.mkdir(parents=True, exist_ok=True)
    (write_en_tokenizer if spec.text_frontend == "english" else write_turbo_tokenizer)(tdir)
    kw = {"model_label": "Nano" if spec.kind == "nano" else "Turbo"} if spec.text_frontend == "gpt2" else {}
    tts = api_class(spec.kind)(t3, s3, ve, _load_tokenizer(spec, tdir), device, watermark=False, **kw)
    ref = workdir / f"ref_{spec.kind}.wav"
    sf.write(str(ref), test_wav(24000, seconds, seed=11).numpy(), 24000, subtype="FLOAT")
    tts.prepare_conditionals(str(ref))
    return tts


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process high-water mark (CPU)


@torch.inference_mode()
def run_once(tts, model: str, mode: str, tokens: int, device: str, seed: int) -> dict:
    """One end-to-end request; T3 and S3Gen timed separately. Returns timings and the waveform."""
    sync(device)
    t0 = time.perf_counter()
    if mode == "upstream_eager":
        torch.manual_seed(seed)
        if model == "original":
            ids = tts.tokenizer.text_to_tokens(TEXT).long()
            ids = torch.cat([torch.tensor([[255]]), ids, torch.tensor([[0]])], 1).to(device)
            n = upstream_style(tts.t3, tts._t3_cond(tts.conds, 0.5), ids, tokens)
        else:
            ids = tts.tokenizer(TEXT, return_tensors="pt").input_ids.to(device)
            n = upstream_style_turbo(tts.t3, tts._t3_cond(tts.conds, 0.0), ids, tokens)
        speech = None
    else:  # through the model's scheduler: the path generate() takes (compiled step when compiled)
        kw = dict(temperature=0.8, top_p=1.0, min_p=0.05, repetition_penalty=1.2, cfg_weight=0.5)
        if model != "original":
            kw.update(top_p=0.95, min_p=0.0, cfg_weight=0.0)
        job = tts._job(TEXT, voice=tts.conds, params=tts._params(**kw), exaggeration=0.5 if model == "original" else 0.0,
                       max_new_tokens=tokens if model == "original" else tokens - 1,
                       rnd=RequestRandomness.create(device, seed=seed))
        before = tts.scheduler.tokens_generated
        speech = tts._decode_jobs([job])[0]
        n = tts.scheduler.tokens_generated - before
    sync(device)
    t1 = time.perf_counter()
    # S3Gen on a fixed token sequence so every mode vocodes the same input
    fixed = torch.randint(0, 6561, (tokens,), generator=torch.Generator().manual_seed(seed)).to(device)
    wav = tts._s3gen_wavs([fixed], [tts.conds.gen], [RequestRandomness.create(device, seed=seed)])[0]
    sync(device)
    t2 = time.perf_counter()
    del speech
    return dict(t3_s=t1 - t0, t3_tokens=n, s3gen_s=t2 - t1, wav=wav.float().cpu())


def prepare_mode(tts, mode: str, backend: str):
    from chatterbox.runtime.compile import compile_model

    if mode == "ours_compiled_fp32":
        compile_model(tts, dtype=torch.float32, backend=backend)
    elif mode == "ours_compiled_bf16":
        compile_model(tts, dtype=torch.bfloat16, backend=backend)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=["full", "tiny"], default="full")
    ap.add_argument("--models", default="original,turbo")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--seconds", type=float, default=10.0, help="audio length per request (25 tokens per second)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--backend", default="inductor", help="torch.compile backend for the compiled modes")
    ap.add_argument("--json", default="bench_out/results.json")
    a = ap.parse_args(argv)
    tokens = max(2, int(round(a.seconds * 25)))
    modes = [m for m in a.modes.split(",") if m]
    for m in modes:
        if m not in MODES:
            ap.error(f"unknown mode {m!r}; choose from {MODES}")
    modes.sort(key=MODES.index)
    results = dict(device=a.device, torch=torch.__version__, config=a.config, seconds=a.seconds, tokens=tokens,
                   gpu=torch.cuda.get_device_name() if a.device.startswith("cuda") else None, rows=[])
    with tempfile.TemporaryDirectory() as td:
        for model in [m for m in a.models.split(",") if m]:
            eager_wav = None
            tts = build(model, a.config, a.device, Path(td))  # modes run in order: eager first, then compiled in place
            for mode in modes:
                if a.device.startswith("cuda"):
                    torch.cuda.reset_peak_memory_stats()
                t = time.perf_counter()
                prepare_mode(tts, mode, a.backend)
                first = run_once(tts, model, mode, tokens, a.device, seed=0)  # warm-up (compiles)
                warm_s = time.perf_counter() - t
                best = None
                for _ in range(a.repeats):
                    r = run_once(tts, model, mode, tokens, a.device, seed=0)
                    best = r if best is None or r["t3_s"] + r["s3gen_s"] < best["t3_s"] + best["s3gen_s"] else best
                audio_s = best["wav"].shape[-1] / 24000
                row = dict(model=model, mode=mode, t3_tokens_per_s=round(best["t3_tokens"] / best["t3_s"], 2),
                           s3gen_ms_per_audio_s=round(1000 * best["s3gen_s"] / max(audio_s, 1e-9), 1),
                           rtf=round((best["t3_s"] + best["s3gen_s"]) / max(audio_s, 1e-9), 4),
                           audio_s=round(audio_s, 2), warmup_s=round(warm_s, 1), peak_mb=round(peak_mb(a.device)))
                if mode == "ours_eager":
                    eager_wav = best["wav"]
                if eager_wav is not None and mode != "upstream_eager":
                    d = (best["wav"] - eager_wav).norm() / eager_wav.norm()
                    row["wav_rel_diff_vs_eager"] = float(f"{d:.3g}")
                results["rows"].append(row)
                print(json.dumps(row), flush=True)
                del first, best
            del tts
    hdr = ("model", "mode", "t3_tokens_per_s", "s3gen_ms_per_audio_s", "rtf", "audio_s", "warmup_s", "peak_mb",
           "wav_rel_diff_vs_eager")
    print("\n| " + " | ".join(hdr) + " |\n|" + "---|" * len(hdr))
    for row in results["rows"]:
        print("| " + " | ".join(str(row.get(h, "")) for h in hdr) + " |")
    if a.json:
        os.makedirs(os.path.dirname(a.json) or ".", exist_ok=True)
        Path(a.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
