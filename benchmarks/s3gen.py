"""S3Gen speed: eager vs compiled (bucketed) for 2 s and 10 s of speech tokens, deterministic weights.

    python benchmarks/s3gen.py                      # CFM S3Gen (original / multilingual), CPU or CUDA
    python benchmarks/s3gen.py --meanflow           # Turbo/Nano S3Gen (2 steps, no CFG)
    python benchmarks/s3gen.py --seconds 2,10 --backend inductor
    python benchmarks/s3gen.py --batch 1,2,4 [--meanflow]   # batched synthesize: B rows of ~2 s each

Prints milliseconds per request and per second of audio for each mode, and the relative
waveform difference compiled vs eager for the same generator seed; one JSON line at the end.
With --batch, times `S3Gen.synthesize` (eager; its two halves `synthesize_mels` and `vocode`) on
B rows of --batch-seconds of tokens each (one --ref-seconds voice, different tokens and noise per
row): total ms, ms per second of audio, and the flow / HiFT split; CFM runs 10 steps, meanflow 2.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from chatterbox.models.s3gen import S3Gen
from chatterbox.runtime.noise import PositionalNoise
from chatterbox.runtime.s3gen_buckets import bucketed_inference, compile_s3gen, warm_hift
from chatterbox.testing import apply_det_weights, test_wav


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.inference_mode()
def timed(fn, device: str, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best, out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--meanflow", action="store_true")
    ap.add_argument("--seconds", default="2,10")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch", default="", help="comma-separated batch sizes: time batched synthesize instead")
    ap.add_argument("--batch-seconds", type=float, default=2.0)
    ap.add_argument("--ref-seconds", type=float, default=10.0, help="reference (voice prompt) length")
    a = ap.parse_args(argv)
    s3 = apply_det_weights(S3Gen(meanflow=a.meanflow)).to(a.device).eval()
    with torch.inference_mode():
        ref = s3.embed_ref(test_wav(24000, a.ref_seconds, seed=5), 24000)  # 10 s by default, as the pipelines use
    steps = 2 if a.meanflow else None
    if a.batch:
        return batched(s3, ref, a)
    lengths = [int(float(s) * 25) for s in a.seconds.split(",")]
    tokens = {n: torch.randint(0, 6561, (n,), generator=torch.Generator().manual_seed(n)).to(a.device) for n in lengths}
    res = dict(device=a.device, torch=torch.__version__, meanflow=a.meanflow, backend=a.backend, rows=[])
    eager = {}
    for n in lengths:
        dt, (wav, _) = timed(lambda: s3.inference(tokens[n][None], ref_dict=ref, n_cfm_timesteps=steps,
                                                  generator=torch.Generator(device=a.device).manual_seed(0)),
                             a.device, a.repeats)
        eager[n] = wav.float().cpu()
        res["rows"].append(dict(mode="eager", audio_s=n / 25, ms=round(1000 * dt, 1), ms_per_audio_s=round(1000 * dt / (n / 25), 1)))
        print(json.dumps(res["rows"][-1]), flush=True)
    t = time.perf_counter()
    compile_s3gen(s3, backend=a.backend)
    with torch.inference_mode():
        for n in lengths:  # compile the buckets these lengths fall in
            bucketed_inference(s3, tokens[n], ref, n_cfm_timesteps=steps)
        warm_hift(s3)
    res["warmup_s"] = round(time.perf_counter() - t, 1)
    for n in lengths:
        dt, wav = timed(lambda: bucketed_inference(s3, tokens[n], ref, n_cfm_timesteps=steps,
                                                   generator=torch.Generator(device=a.device).manual_seed(0)),
                        a.device, a.repeats)
        diff = float((wav.float().cpu() - eager[n]).norm() / eager[n].norm())
        res["rows"].append(dict(mode="compiled", audio_s=n / 25, ms=round(1000 * dt, 1),
                                ms_per_audio_s=round(1000 * dt / (n / 25), 1), wav_rel_diff_vs_eager=float(f"{diff:.3g}")))
        print(json.dumps(res["rows"][-1]), flush=True)
    print(json.dumps(res))
    return res


def batched(s3, ref: dict, a) -> dict:
    """Eager `synthesize` on B rows of `batch_seconds` each: total, per audio second, flow / HiFT split."""
    n = int(a.batch_seconds * 25)
    steps = 2 if a.meanflow else 10
    res = dict(device=a.device, torch=torch.__version__, meanflow=a.meanflow, steps=steps, tokens_per_row=n,
               threads=torch.get_num_threads(), rows=[])
    for b in [int(x) for x in a.batch.split(",")]:
        toks = [torch.randint(0, 6561, (n,), generator=torch.Generator().manual_seed(i)).to(a.device) for i in range(b)]

        def noise():
            return [PositionalNoise(torch.Generator(device=a.device).manual_seed(i), 80, a.device) for i in range(b)]

        def gens():
            return [torch.Generator(device=a.device).manual_seed(100 + i) for i in range(b)]

        def run():
            t0 = time.perf_counter()
            mels = s3.synthesize_mels(toks, [ref] * b, noise(), n_cfm_timesteps=steps)  # = synthesize, in halves
            sync(a.device)
            t1 = time.perf_counter()
            wavs = s3.vocode(mels, gens())
            sync(a.device)
            return t1 - t0, time.perf_counter() - t1, wavs

        best = None
        with torch.inference_mode():
            for _ in range(a.repeats):
                r = run()
                best = r if best is None or sum(r[:2]) < sum(best[:2]) else best
        t_flow, t_hift, wavs = best
        t_all = t_flow + t_hift
        audio_s = sum(w.shape[-1] for w in wavs) / 24000
        res["rows"].append(dict(batch=b, audio_s=round(audio_s, 2), ms=round(1000 * t_all, 1),
                                ms_per_audio_s=round(1000 * t_all / audio_s, 1),
                                flow_ms=round(1000 * t_flow, 1), hift_ms=round(1000 * t_hift, 1)))
        print(json.dumps(res["rows"][-1]), flush=True)
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
