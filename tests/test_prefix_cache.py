"""Voice-prefix KV cache: requests with the same voice reuse the conditioning prefix's keys/values,
decode exactly what they decode without it, and a changed voice or exaggeration is never served stale.
Also the CPU decoder's prepacked linear weights (same tokens as the modules, reused, off on request)."""
from __future__ import annotations

import pytest
import torch

from chatterbox.models.t3 import T3Cond
from chatterbox.runtime import t3_decoder as dec_mod
from chatterbox.testing import tiny_t3

TEXT = torch.tensor([[255, 11, 12, 13, 14, 0]])
OTHER_TEXT = torch.tensor([[255] + list(range(30, 45)) + [0]])


def cond(seed=0, prompt=40, exaggeration=0.5):
    g = torch.Generator().manual_seed(seed)
    return T3Cond(speaker_emb=torch.randn(1, 256, generator=g),
                  cond_prompt_speech_tokens=torch.randint(0, 6561, (1, prompt), generator=g),
                  emotion_adv=torch.full((1, 1, 1), exaggeration))


def request(t3, kind, c, text=TEXT, seed=1, n=12):
    g = torch.Generator().manual_seed(seed)
    if kind == "english":
        return dec_mod.llama_request(t3, c, text, dec_mod.SamplingParams(cfg_weight=0.5), n, g)
    return dec_mod.gpt_request(t3, c, text, dec_mod.SamplingParams(top_k=50), n, g)


@pytest.fixture(scope="module", params=["english", "nano"])
def setup(request):
    return request.param, tiny_t3(request.param)


def counting(dec):
    """Record (rows, positions, start) of every backbone prefill call."""
    calls, inner = [], dec.backbone.prefill
    dec.backbone.prefill = lambda x, rows, cache, lengths=None, start=0: (
        calls.append((x.shape[0], x.shape[1], start)) or inner(x, rows, cache, lengths, start))
    return calls


def test_requests_mark_their_voice_prefix(setup):
    kind, t3 = setup
    req = request(t3, kind, cond())
    expect = 1 + (32 if kind == "english" else 40) + (1 if kind == "english" else 0)  # speaker | prompt | emotion
    assert req.prefix_len == expect and req.prompt_len == expect + TEXT.shape[1] + (2 if kind == "english" else 1)
    assert req.prefix_key is not None


def test_cache_hit_decodes_the_same_tokens_as_no_cache(setup):
    kind, t3 = setup
    c = cond(3)
    plain = dec_mod.decode_all(dec_mod.T3Decoder(t3, slots=2, max_len=256), [request(t3, kind, c)])[0].tokens
    cache = dec_mod.PrefixCache()
    dec = dec_mod.T3Decoder(t3, slots=4, max_len=256, prefix_cache=cache)
    calls = counting(dec)
    first = dec_mod.decode_all(dec, [request(t3, kind, c)])[0].tokens
    assert (cache.hits, cache.misses, len(cache)) == (0, 1, 1)
    second = dec_mod.decode_all(dec, [request(t3, kind, c)])[0].tokens
    assert (cache.hits, cache.misses) == (1, 1)
    assert plain == first == second and len(plain) >= 3
    # the prefix was prefilled once (alone); each request prefilled only its text after it
    P = request(t3, kind, c).prefix_len
    assert [call for call in calls if call[2] == 0] == [(1, P, 0)]
    assert sum(1 for call in calls if call[2] == P) == 2


def test_prefix_split_prefill_matches_the_full_prefill(setup):
    """Logits of the first token: prefix then text (cached keys) = one prefill over everything."""
    kind, t3 = setup
    req = request(t3, kind, cond(4))
    dec = dec_mod.T3Decoder(t3, slots=4, max_len=256)
    rows = torch.tensor([0] * req.rows) + torch.arange(req.rows)
    full = t3.speech_head(dec.backbone.prefill(req.prefill, rows, dec.cache))
    P = req.prefix_len
    dec.backbone.prefill(req.prefill[:, :P], rows + 2, dec.cache)
    split = t3.speech_head(dec.backbone.prefill(req.prefill[:, P:], rows + 2, dec.cache, start=P))
    assert torch.allclose(full, split, atol=1e-4, rtol=1e-4) and full.abs().max() > 0.1
    k_full, _ = dec.cache.layer(1)
    L = req.prompt_len
    assert torch.allclose(k_full[rows, :, :L], k_full[rows + 2, :, :L], atol=1e-4, rtol=1e-4)


def test_same_voice_in_new_cond_objects_hits_and_exaggeration_or_voice_change_misses(setup):
    kind, t3 = setup
    c = cond(5)
    cache = dec_mod.PrefixCache()
    dec = dec_mod.T3Decoder(t3, slots=4, max_len=256, prefix_cache=cache)

    def same_voice(exaggeration):  # what the engine builds per request: the voice's tensors, a new emotion value
        return T3Cond(speaker_emb=c.speaker_emb, cond_prompt_speech_tokens=c.cond_prompt_speech_tokens,
                      cond_prompt_speech_emb=c.cond_prompt_speech_emb, emotion_adv=torch.full((1, 1, 1), exaggeration))

    dec_mod.decode_all(dec, [request(t3, kind, c, n=2)])
    dec_mod.decode_all(dec, [request(t3, kind, same_voice(0.5), n=2)])
    assert (cache.hits, cache.misses) == (1, 1)
    out = dec_mod.decode_all(dec, [request(t3, kind, same_voice(0.9), n=12)])[0].tokens
    assert (cache.hits, cache.misses) == (1, 2)  # exaggeration is part of the key
    fresh = dec_mod.decode_all(dec_mod.T3Decoder(t3, slots=2, max_len=256), [request(t3, kind, same_voice(0.9))])[0]
    assert out == fresh.tokens
    # a voice whose speaker embedding is changed in place is a new voice
    c.speaker_emb.mul_(-1.0)
    changed = dec_mod.decode_all(dec, [request(t3, kind, c, n=12)])[0].tokens
    assert cache.misses == 3
    ref = dec_mod.decode_all(dec_mod.T3Decoder(t3, slots=2, max_len=256), [request(t3, kind, c)])[0].tokens
    assert changed == ref


def test_mixed_voices_and_prefix_lengths_in_one_admission(setup):
    """Voices with different prompt lengths admitted at one step: one text prefill per prefix length, and
    every request decodes what it decodes alone."""
    kind, t3 = setup
    voices = [cond(6, prompt=40), cond(7, prompt=25), cond(6, prompt=40)]
    texts = [TEXT, OTHER_TEXT, OTHER_TEXT]
    alone = [dec_mod.decode_all(dec_mod.T3Decoder(t3, slots=2, max_len=256),
                                [request(t3, kind, v, text=t, seed=i)])[0].tokens
             for i, (v, t) in enumerate(zip(voices, texts))]
    cache = dec_mod.PrefixCache()
    dec = dec_mod.T3Decoder(t3, slots=8, max_len=256, prefix_cache=cache)
    calls = counting(dec)
    together = dec_mod.decode_all(dec, [request(t3, kind, v, text=t, seed=i)
                                        for i, (v, t) in enumerate(zip(voices, texts))])
    assert [s.tokens for s in together] == alone
    P = [request(t3, kind, v).prefix_len for v in voices]
    if kind == "nano":  # GPT-2 prompts are not resampled: two prefix lengths
        assert P[0] != P[1] and sum(1 for c in calls if c[2] > 0) == 2
    else:  # the Perceiver makes every prompt 32 positions: one text prefill
        assert P[0] == P[1] and sum(1 for c in calls if c[2] > 0) == 1
    # voices 0 and 2 are different T3Cond objects with different tensors: two misses, not a stale hit
    assert cache.misses == 3 and cache.hits == 0


def test_cache_is_bounded_in_bytes_least_recently_used_out(setup):
    kind, t3 = setup
    dec = dec_mod.T3Decoder(t3, slots=2, max_len=256)
    voices = [cond(10 + i) for i in range(3)]
    one = None
    for v in voices:  # measure an entry
        cache = dec_mod.PrefixCache()
        dec.prefix_cache = cache
        dec_mod.decode_all(dec, [request(t3, kind, v, n=1)])
        one = cache.nbytes()
    assert one > 0
    cache = dec_mod.PrefixCache(max_bytes=2 * one)
    dec.prefix_cache = cache
    for v in voices + [voices[1]]:
        dec_mod.decode_all(dec, [request(t3, kind, v, n=1)])
    assert len(cache) == 2 and cache.nbytes() <= 2 * one
    assert (cache.hits, cache.misses) == (1, 3)  # voice 1 still cached after voice 2 pushed voice 0 out
    dec_mod.decode_all(dec, [request(t3, kind, voices[0], n=1)])
    assert cache.misses == 4
    off = dec_mod.PrefixCache(max_bytes=0)  # 0 bytes: nothing kept
    dec.prefix_cache = off
    dec_mod.decode_all(dec, [request(t3, kind, voices[0], n=1)])
    assert len(off) == 0 and off.misses == 1


def test_bad_prefix_len_is_a_clear_error(setup):
    kind, t3 = setup
    req = request(t3, kind, cond())
    req.prefix_len = req.prompt_len
    with pytest.raises(ValueError, match="prefix_len"):
        dec_mod.decode_all(dec_mod.T3Decoder(t3, slots=2, max_len=256), [req])


def test_engine_reuses_a_voice_and_keys_exaggeration(tiny_models):
    """Through the public API: the second request with a voice hits, gives the audio of the first (same
    seed), and another exaggeration of the same voice is a miss with its own prefix."""
    model = tiny_models("english")
    voice = model.conds
    s0 = model.engine_stats()
    a = model.generate("Hello there.", conds=voice, seed=3, max_new_tokens=12)
    s1 = model.engine_stats()
    b = model.generate("Hello there.", conds=voice, seed=3, max_new_tokens=12)
    s2 = model.engine_stats()
    assert torch.equal(a, b) and a.numel() > 0
    assert s2["prefix_cache_hits"] == s1["prefix_cache_hits"] + 1 and s2["prefix_cache_misses"] == s1["prefix_cache_misses"]
    assert s1["prefix_cache_bytes"] > 0 and s1["prefix_cache_misses"] >= s0.get("prefix_cache_misses", 0)
    assert s1["prefix_cache_hits"] + s1["prefix_cache_misses"] == s0.get("prefix_cache_hits", 0) + s0.get(
        "prefix_cache_misses", 0) + 1  # one lookup per request
    model.generate("Hello there.", conds=voice, seed=3, max_new_tokens=4, exaggeration=0.9)
    s3 = model.engine_stats()
    assert s3["prefix_cache_misses"] == s2["prefix_cache_misses"] + 1
    model.generate("Hello there.", conds=voice, seed=3, max_new_tokens=4, exaggeration=0.9)
    assert model.engine_stats()["prefix_cache_hits"] == s3["prefix_cache_hits"] + 1


# ---------------------------------------------------------------- CPU prepacked weights
def test_packed_weights_decode_what_the_modules_decode(setup):
    kind, t3 = setup
    if not dec_mod.PackedLinears.supported(t3.device, t3.dtype):
        pytest.skip("oneDNN is not available in this torch build")

    def reqs():
        return [request(t3, kind, cond(20 + i), text=[TEXT, OTHER_TEXT][i % 2], seed=i, n=16) for i in range(3)]

    plain = dec_mod.T3Decoder(t3, slots=8, max_len=256, prepack=False)
    assert plain.packed is None
    dec = dec_mod.T3Decoder(t3, slots=8, max_len=256, prepack=True)
    linears = dec.backbone.linears()
    assert dec.packed is not None and dec.packed.nbytes() == sum(m.weight.numel() * 4 for m in linears)
    assert [s.tokens for s in dec_mod.decode_all(dec, reqs())] == [s.tokens for s in dec_mod.decode_all(plain, reqs())]
    for m in linears[:7]:  # one layer's attention and MLP projections
        x = torch.randn(3, 5, m.in_features if isinstance(m, torch.nn.Linear) else m.weight.shape[0])
        assert torch.allclose(dec.packed(m, x), m(x), atol=1e-5, rtol=1e-5)
    assert dec_mod.T3Decoder(t3, slots=2, max_len=256, prepack=dec.packed).packed is dec.packed  # reused
    other = tiny_t3(kind, salt=1)  # other weights: the packing is not valid for them and is redone
    assert not dec.packed.valid_for(dec_mod.T3Decoder(other, slots=2, max_len=256).backbone.linears(), other.dtype)
    assert dec_mod.T3Decoder(other, slots=2, max_len=256, prepack=dec.packed).packed is not dec.packed


def test_scheduler_packs_once_and_can_be_told_not_to(setup):
    from chatterbox.runtime.scheduler import Scheduler

    kind, t3 = setup
    if not dec_mod.PackedLinears.supported(t3.device, t3.dtype):
        pytest.skip("oneDNN is not available in this torch build")
    sched = Scheduler(t3, max_batch=2)
    try:
        first = sched.submit(request(t3, kind, cond(30), n=3)).result(timeout=60)
        packed = sched.decoder.packed
        assert packed is not None and len(first) >= 1
        assert sched.decoder.kv_granularity == 32  # eager: attention over just what the rows need
        sched.configure(max_batch=3)  # rebuilds the decoder: the packing is kept
        sched.submit(request(t3, kind, cond(30), n=3)).result(timeout=60)
        assert sched.decoder.packed is packed and sched.decoder.slots == 3 * (1 if t3.is_gpt else 2)
    finally:
        sched.close()
    off = Scheduler(t3, max_batch=2, cpu_prepack=False)
    try:
        assert off.submit(request(t3, kind, cond(30), n=3)).result(timeout=60) == first
        assert off.decoder.packed is None
    finally:
        off.close()
