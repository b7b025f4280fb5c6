"""Streaming benchmark: time to first chunk and RTF of `generate_stream` next to `generate` of the same request.

    python benchmarks/stream.py                                  # full-size Turbo and English, ~10 s utterances
    python benchmarks/stream.py --models turbo --chunk-sizes 15,20,25
    python benchmarks/stream.py --config tiny --tokens 40        # smoke run (2-layer T3)

For every model and first-chunk size it runs, in one process and with the same seed: the offline
`generate` (wall time, audio seconds) and `generate_stream` (time to first chunk, wall time, RTF,
chunk count), and compares the two waveforms (same speech tokens): relative log-mel distance and
the largest sample jump within +-5 ms of a chunk boundary against the largest elsewhere. JSON out.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

from run import build, sync  # noqa: E402

TEXT = ("The quick brown fox jumps over the lazy dog while the band plays on, and everyone in the "
        "square stops to listen for a moment before going back to their afternoon.")


def kwargs(model: str) -> dict:
    return dict(temperature=0.8, top_p=1.0, min_p=0.05, cfg_weight=0.5) if model == "original" else \
        dict(temperature=0.8, top_p=0.95)


def log_mel(wav: torch.Tensor) -> torch.Tensor:
    from chatterbox.models.s3gen.utils.mel import mel_spectrogram

    return mel_spectrogram(wav.reshape(1, -1).float())[0]


def quality(stream: list[torch.Tensor], offline: torch.Tensor) -> dict:
    audio = torch.cat(stream, dim=1)
    n = min(audio.shape[1], offline.shape[1])
    a, b = log_mel(audio[:, :n]), log_mel(offline[:, :n])
    dist = float((a - b).abs().mean() / (b - b.mean()).abs().mean())
    x = audio.reshape(-1).numpy()
    edges = np.cumsum([c.shape[1] for c in stream])[:-1]
    inside = max(float(np.abs(np.diff(c.reshape(-1).numpy())).max()) for c in stream if c.shape[1] > 1)
    at = max([float(np.abs(np.diff(x[max(0, e - 120):e + 120])).max()) for e in edges] or [0.0])
    return dict(logmel_rel_dist=round(dist, 3), boundary_jump_over_inside=round(at / max(inside, 1e-12), 3),
                same_length=audio.shape[1] == offline.shape[1])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=["full", "tiny"], default="full")
    ap.add_argument("--models", default="turbo,original")
    ap.add_argument("--chunk-sizes", default="20", help="first-chunk sizes in tokens (default schedule: 20, 30, 60)")
    ap.add_argument("--tokens", type=int, default=250, help="max speech tokens (250 = 10 s)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="bench_out/stream.json")
    a = ap.parse_args(argv)
    res = dict(device=a.device, torch=torch.__version__, config=a.config, tokens=a.tokens, rows=[],
               gpu=torch.cuda.get_device_name() if a.device.startswith("cuda") else None)
    with tempfile.TemporaryDirectory() as td:
        for model in [m for m in a.models.split(",") if m]:
            tts = build(model, a.config, a.device, Path(td))
            tts.generate("Warm up.", seed=0, max_new_tokens=8, **kwargs(model))
            sync(a.device)
            t = time.perf_counter()
            offline = tts.generate(TEXT, seed=a.seed, max_new_tokens=a.tokens, **kwargs(model))
            sync(a.device)
            offline_s = time.perf_counter() - t
            audio_s = offline.shape[1] / 24000
            for cs in [int(x) for x in a.chunk_sizes.split(",") if x]:
                chunks, m = [], None
                for c, m in tts.generate_stream(TEXT, seed=a.seed, max_new_tokens=a.tokens, chunk_size=cs,
                                                **kwargs(model)):
                    chunks.append(c)
                row = dict(model=model, chunk_size=cs, audio_s=round(audio_s, 2), offline_s=round(offline_s, 2),
                           offline_rtf=round(offline_s / max(audio_s, 1e-9), 3),
                           first_chunk_s=round(m.latency_to_first_chunk, 3),
                           first_chunk_vs_offline=round(m.latency_to_first_chunk / offline_s, 3),
                           stream_s=round(m.elapsed, 2), stream_rtf=round(m.rtf, 3), chunks=m.chunk_count,
                           **quality(chunks, offline))
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
