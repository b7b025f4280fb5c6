"""T3 decode speed: upstream-style eager loop vs chatterbox-fast eager vs compiled.

Runs on deterministic weights (no checkpoint needed):

    python benchmarks/t3_decode.py --config small --tokens 64
    python benchmarks/t3_decode.py --config full --tokens 32 --device cuda --dtype bfloat16

"upstream-style" re-creates the structure of upstream's `T3.inference` loop for comparison: a
growing DynamicCache, transformers' logits processors, `torch.multinomial`, and a host sync on
every token to test for the stop token. Prints tokens/s per mode and one JSON line.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import DynamicCache
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TopPLogitsWarper,
)

from chatterbox.models.t3 import T3, T3Cond, T3Config
from chatterbox.models.t3.llama_configs import LLAMA_CONFIGS
from chatterbox.runtime.t3_decoder import SamplingParams, T3Decoder, decode_all, llama_request
from chatterbox.testing import det_state_dict

SMALL = dict(LLAMA_CONFIGS["Llama_520M"], num_hidden_layers=4, intermediate_size=1024)


def build(config: str, device: str, dtype: torch.dtype) -> T3:
    hp = T3Config.english_only()
    if config == "small":
        LLAMA_CONFIGS.setdefault("bench_small", SMALL)
        hp.llama_config_name = "bench_small"
    with torch.device("meta"):
        shell = T3(hp)
    return T3.from_state_dict(det_state_dict(shell), hp).to(device=device, dtype=dtype)


def make_inputs(model: T3, device: str):
    g = torch.Generator().manual_seed(0)
    cond = T3Cond(speaker_emb=torch.randn(1, 256, generator=g),
                  cond_prompt_speech_tokens=torch.randint(0, 6561, (1, 150), generator=g),
                  emotion_adv=0.5 * torch.ones(1, 1, 1)).to(device=device)
    text = torch.randint(1, 700, (1, 40), generator=g)
    text[0, 0], text[0, -1] = 255, 0
    return cond, text.to(device)


def cache_kw(backbone, cache) -> dict:
    """The KV-cache keyword the installed transformers expects (`cache` from 5.24, `past_key_values` before)."""
    import inspect

    name = "cache" if "cache" in inspect.signature(backbone.forward).parameters else "past_key_values"
    return {name: cache}


@torch.inference_mode()
def upstream_style(model: T3, cond: T3Cond, text: torch.Tensor, n: int) -> int:
    """Upstream's decode structure: DynamicCache, per-step processors, multinomial, host sync per token."""
    prefill = model.prefill_embeds(cond, text, cfg_weight=0.5)
    hp, dev = model.hp, prefill.device
    rep, min_p, top_p = RepetitionPenaltyLogitsProcessor(1.2), MinPLogitsWarper(0.05), TopPLogitsWarper(1.0)
    cache = DynamicCache(config=model.cfg)
    out = model.tfmr(inputs_embeds=prefill, **cache_kw(model.tfmr, cache), use_cache=True)
    logits = model.speech_head(out.last_hidden_state)[:, -1].float()
    ids = torch.tensor([[hp.start_speech_token]], device=dev)
    for i in range(n):
        x = logits[0:1] + 0.5 * (logits[0:1] - logits[1:2])
        x = top_p(ids, min_p(ids, rep(ids, x) / 0.8))
        nxt = torch.multinomial(torch.softmax(x, -1), 1)
        ids = torch.cat([ids, nxt], dim=1)
        if nxt.view(-1) == hp.stop_speech_token:  # the per-token host sync
            return i + 1
        emb = model.speech_emb(nxt) + model.speech_pos_emb.get_fixed_embedding(i + 1)
        out = model.tfmr(inputs_embeds=torch.cat([emb, emb]), **cache_kw(model.tfmr, cache), use_cache=True)
        logits = model.speech_head(out.last_hidden_state)[:, -1].float()
    return n


@torch.inference_mode()
def upstream_style_turbo(model: T3, cond: T3Cond, text: torch.Tensor, n: int) -> int:
    """Upstream's Turbo loop structure: DynamicCache, processors per step, multinomial, two host syncs per token."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper

    prefill = model.prefill_embeds(cond, text)
    procs = [TemperatureLogitsWarper(0.8), TopKLogitsWarper(1000), TopPLogitsWarper(0.95),
             RepetitionPenaltyLogitsProcessor(1.2)]
    cache = DynamicCache(config=model.cfg)
    out = model.tfmr(inputs_embeds=prefill, **cache_kw(model.tfmr, cache), use_cache=True)
    ids = torch.full((1, 1), model.hp.start_speech_token, device=prefill.device)
    generated = []
    for i in range(n):
        x = model.speech_head(out.last_hidden_state[:, -1]).float()
        hist = ids if not generated else torch.cat(generated, dim=1)
        for p in procs:
            x = p(hist, x)
        if torch.all(x == -float("inf")):  # host sync 1
            return i
        nxt = torch.multinomial(torch.softmax(x, -1), 1)
        generated.append(nxt)
        if torch.all(nxt == model.hp.stop_speech_token):  # host sync 2
            return i + 1
        out = model.tfmr(inputs_embeds=model.speech_emb(nxt), **cache_kw(model.tfmr, cache), use_cache=True)
    return n


def ours(decoder: T3Decoder, cond: T3Cond, text: torch.Tensor, n: int) -> int:
    """One CFG request through chatterbox-fast's slot decoder (the path generate() takes); tokens generated."""
    req = llama_request(decoder.t3, cond, text, SamplingParams(top_p=1.0, cfg_weight=0.5), n,
                        torch.Generator(device=text.device).manual_seed(0))
    out = decode_all(decoder, [req])[0]
    return len(out.tokens) + out.stopped


def timed(fn, device: str, repeats: int) -> tuple[float, int]:
    best, count = float("inf"), 0
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        count = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best, count


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=["small", "full"], default="small")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-compile", action="store_true")
    a = ap.parse_args(argv)
    dtype = getattr(torch, a.dtype)
    model = build(a.config, a.device, dtype)
    cond, text = make_inputs(model, a.device)
    res = dict(config=a.config, device=a.device, dtype=a.dtype, torch=torch.__version__, tokens=a.tokens)
    decoder = T3Decoder(model, slots=2, max_len=model.prefill_embeds(cond, text, cfg_weight=0.5).shape[1] + a.tokens)
    modes = [("upstream_style_eager", lambda: upstream_style(model, cond, text, a.tokens)),
             ("ours_eager", lambda: ours(decoder, cond, text, a.tokens))]
    for name, fn in modes:
        fn()  # warm-up
        dt, n = timed(fn, a.device, a.repeats)
        res[name] = round(n / dt, 2)
        print(f"{name:>24}: {n / dt:9.2f} tokens/s  ({n} tokens in {dt:.3f} s)")
    if not a.no_compile:
        mode = "reduce-overhead" if a.device == "cuda" else "default"
        decoder.step_fn = torch.compile(decoder._step, fullgraph=True, mode=mode)
        t = time.perf_counter()
        ours(decoder, cond, text, a.tokens)
        res["compile_s"] = round(time.perf_counter() - t, 1)
        dt, n = timed(lambda: ours(decoder, cond, text, a.tokens), a.device, a.repeats)
        res["ours_compiled"] = round(n / dt, 2)
        print(f"{'ours_compiled':>24}: {n / dt:9.2f} tokens/s  ({n} tokens in {dt:.3f} s; compile+first run {res['compile_s']} s)")
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
