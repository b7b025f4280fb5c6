"""Batching benchmark: B requests at once vs the same B requests one after another, in one run.

    python benchmarks/batch.py                               # full-size English (CFG) and Turbo, B = 1, 2, 4, 8
    python benchmarks/batch.py --models turbo --batches 1,4 --tokens 50
    python benchmarks/batch.py --config tiny --tokens 8      # 2-layer T3 (smoke run)

Per model and B it reports
- T3 aggregate speech tokens/s: B requests decoded together by the scheduler (one shared step per
  token) against the same B requests decoded one at a time;
- end to end audio seconds per wall second: `generate_batch(texts)` against B sequential
  `generate(text)` calls (same seeds, same audio),
and writes JSON (--json). Deterministic weights; no checkpoint needed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from run import build, sync  # noqa: E402

from chatterbox.runtime.noise import RequestRandomness  # noqa: E402

TEXTS = [
    "The quick brown fox jumps over the lazy dog while the band plays on.",
    "Every morning the market opens before sunrise and closes at noon.",
    "She asked whether the train would leave on time, and nobody knew.",
    "Bright lanterns swayed in the wind along the narrow harbour street.",
    "A good recipe needs patience, fresh bread and a little bit of salt.",
    "They counted the stars until the clouds rolled in from the west.",
    "Our neighbour plays the violin every evening at exactly seven.",
    "The library keeps its oldest maps in a cool room under the stairs.",
]


def knobs(model: str) -> dict:
    if model == "original":
        return dict(temperature=0.8, top_p=1.0, min_p=0.05, repetition_penalty=1.2, cfg_weight=0.5)
    return dict(temperature=0.8, top_p=0.95, min_p=0.0, repetition_penalty=1.2, cfg_weight=0.0)


def t3_jobs(tts, model: str, b: int, tokens: int, device: str):
    exag = 0.5 if model == "original" else 0.0
    return [tts._job(TEXTS[i % len(TEXTS)], voice=tts.conds, params=tts._params(**knobs(model)), exaggeration=exag,
                     max_new_tokens=tokens, rnd=RequestRandomness.create(device, seed=i)) for i in range(b)]


@torch.inference_mode()
def t3_rate(tts, model: str, b: int, tokens: int, device: str, together: bool) -> float:
    """Speech tokens per second for B requests, decoded together or one at a time."""
    jobs = t3_jobs(tts, model, b, tokens, device)
    before = tts.scheduler.tokens_generated
    sync(device)
    t = time.perf_counter()
    if together:
        tts._decode_jobs(jobs)
    else:
        for j in jobs:
            tts._decode_jobs([j])
    sync(device)
    return (tts.scheduler.tokens_generated - before) / (time.perf_counter() - t)


def e2e(tts, model: str, b: int, tokens: int, device: str, together: bool) -> tuple[float, list]:
    """Audio seconds per wall second for B texts: one generate_batch call, or B generate calls."""
    texts = [TEXTS[i % len(TEXTS)] for i in range(b)]
    kw = knobs(model)
    if model != "original":
        kw.pop("cfg_weight")
        kw.pop("min_p")
    sync(device)
    t = time.perf_counter()
    if together:
        wavs = tts.generate_batch(texts, seed=list(range(b)), max_new_tokens=tokens, **kw)
    else:
        wavs = [tts.generate(x, seed=i, max_new_tokens=tokens, **kw) for i, x in enumerate(texts)]
    sync(device)
    dt = time.perf_counter() - t
    return sum(w.shape[-1] for w in wavs) / 24000 / dt, wavs


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=["full", "tiny"], default="full")
    ap.add_argument("--models", default="original,turbo")
    ap.add_argument("--batches", default="1,2,4,8")
    ap.add_argument("--tokens", type=int, default=50, help="speech tokens per request (25 per second of audio)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--json", default="bench_out/batch.json")
    a = ap.parse_args(argv)
    batches = [int(x) for x in a.batches.split(",") if x]
    res = dict(device=a.device, torch=torch.__version__, config=a.config, tokens=a.tokens, rows=[],
               gpu=torch.cuda.get_device_name() if a.device.startswith("cuda") else None,
               threads=torch.get_num_threads())
    with tempfile.TemporaryDirectory() as td:
        for model in [m for m in a.models.split(",") if m]:
            tts = build(model, a.config, a.device, Path(td))
            tts.set_max_batch(max(batches))
            t3_rate(tts, model, 1, 4, a.device, True)  # first use: builds the decoder
            base = None
            for b in batches:
                seq = t3_rate(tts, model, b, a.tokens, a.device, together=False)
                bat = t3_rate(tts, model, b, a.tokens, a.device, together=True)
                base = base or bat
                row = dict(model=model, batch=b, t3_tokens_per_s_sequential=round(seq, 2),
                           t3_tokens_per_s_batched=round(bat, 2), t3_batched_vs_b1=round(bat / base, 2))
                if not a.skip_e2e:
                    s_seq, w_seq = e2e(tts, model, b, a.tokens, a.device, together=False)
                    s_bat, w_bat = e2e(tts, model, b, a.tokens, a.device, together=True)
                    diff = max(float((x - y).norm() / max(y.norm(), 1e-9)) if x.shape == y.shape else float("inf")
                               for x, y in zip(w_bat, w_seq))
                    row.update(e2e_audio_s_per_s_sequential=round(s_seq, 3), e2e_audio_s_per_s_batched=round(s_bat, 3),
                               e2e_speedup=round(s_bat / s_seq, 2), max_wav_rel_diff=float(f"{diff:.3g}"))
                res["rows"].append(row)
                print(json.dumps(row), flush=True)
            tts.close()
            del tts
    if a.json:
        os.makedirs(os.path.dirname(a.json) or ".", exist_ok=True)
        Path(a.json).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
