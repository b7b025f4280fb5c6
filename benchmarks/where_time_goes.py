"""Where a request's time goes on this machine: T3 prefill and decode step per batch size, and T3 vs S3Gen.

    python benchmarks/where_time_goes.py --model turbo --rows 1,4,8          # step timing, packed vs plain weights
    python benchmarks/where_time_goes.py --model nano --rows "" --split --tokens 40   # one request: T3, generate, stream

Step timing: a fresh `T3Decoder` per batch size, the B requests admitted together (one voice, so one
voice-prefix miss then cached copies), then the mean of 10 decode steps after 3. With --plain the
same without prepacked CPU weights. --split times one request's T3 decode alone, `generate` and
`generate_stream` (S3Gen is the difference). Deterministic full-size weights; prints JSON lines.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from batch import TEXTS, knobs, t3_jobs  # noqa: E402
from run import build  # noqa: E402

from chatterbox.runtime import t3_decoder as D  # noqa: E402


@torch.inference_mode()
def step_timing(tts, model: str, rows: list[int], prepack: bool, device: str) -> list[dict]:
    out = []
    for n in rows:
        dec = D.T3Decoder(tts.t3, slots=n * (1 if tts.t3.is_gpt else 2), max_len=1024, prefix_cache=D.PrefixCache(),
                          prepack=prepack)
        reqs = [j.request for j in t3_jobs(tts, model, n, 50, device)]
        t = time.perf_counter()
        dec.admit_many([(r, D.CollectSink()) for r in reqs])
        prefill = time.perf_counter() - t
        for _ in range(3):
            dec.step()
        t = time.perf_counter()
        for _ in range(10):
            dec.step()
        step = (time.perf_counter() - t) / 10
        out.append(dict(model=model, requests=n, decode_rows=dec.shape_for_step()[0], attention_len=dec.shape_for_step()[1],
                        prepacked=dec.packed is not None, prefill_s=round(prefill, 3), step_s=round(step, 4),
                        prompt_len=reqs[0].prompt_len, prefix_len=reqs[0].prefix_len))
        print(json.dumps(out[-1]), flush=True)
    return out


@torch.inference_mode()
def split(tts, model: str, tokens: int, device: str) -> dict:
    kw = knobs(model)
    if model != "original":
        kw.pop("cfg_weight")
        kw.pop("min_p")
    text = TEXTS[1]
    tts.generate(text, seed=0, max_new_tokens=tokens, **kw)  # warm: the voice prefix is cached from here on
    t = time.perf_counter()
    speech = tts._decode_jobs(t3_jobs(tts, model, 1, tokens, device))
    t3_s = time.perf_counter() - t
    t = time.perf_counter()
    wav = tts.generate(text, seed=0, max_new_tokens=tokens, **kw)
    gen_s = time.perf_counter() - t
    t, first, chunks = time.perf_counter(), None, 0
    for _chunk, _m in tts.generate_stream(text, seed=0, max_new_tokens=tokens, **kw):
        chunks += 1
        first = first if first is not None else time.perf_counter() - t
    stream_s = time.perf_counter() - t
    row = dict(model=model, tokens=len(speech[0]), audio_s=round(wav.shape[-1] / 24000, 2), t3_only_s=round(t3_s, 2),
               generate_s=round(gen_s, 2), s3gen_share_of_generate=round(1 - t3_s / gen_s, 2),
               stream_s=round(stream_s, 2), stream_chunks=chunks, stream_first_chunk_s=round(first or 0.0, 2),
               s3gen_share_of_stream=round(1 - t3_s / stream_s, 2))
    print(json.dumps(row), flush=True)
    return row


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="turbo", choices=["original", "turbo", "nano", "multilingual"])
    ap.add_argument("--config", choices=["full", "tiny"], default="full")
    ap.add_argument("--rows", default="1,4,8", help="requests decoded together (step timing; empty: none)")
    ap.add_argument("--plain", action="store_true", help="also time without prepacked CPU weights")
    ap.add_argument("--split", action="store_true", help="time one request's T3 against generate and generate_stream")
    ap.add_argument("--tokens", type=int, default=40)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    tts = build(args.model, args.config, args.device, Path(tempfile.mkdtemp()))
    res: dict = {}
    if args.rows:
        rows = [int(x) for x in args.rows.split(",")]
        res["packed"] = step_timing(tts, args.model, rows, True, args.device)
        if args.plain:
            res["plain"] = step_timing(tts, args.model, rows, False, args.device)
    if args.split:
        res["split"] = split(tts, args.model, args.tokens, args.device)
    tts.close()
    return res


if __name__ == "__main__":
    main()
