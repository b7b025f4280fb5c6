"""Many requests on one model: row = request, mixed voices and stop times, cancellation, threads,
asyncio submission, long-text splitting, and batches under emulated CUDA graphs."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest
import soundfile as sf
import torch

from conftest import rel_err
from chatterbox.runtime import compile as rt_compile
from chatterbox.runtime.noise import RequestRandomness
from chatterbox.runtime.scheduler import RequestCancelled
from chatterbox.testing import CudaGraphEmulator, test_wav, tiny_model

pytestmark = pytest.mark.slow

TEXTS = ["Hello there.", "A much longer sentence with many more words than the first one has.", "Mid-sized text here."]


@pytest.fixture(scope="module")
def models(tiny_models):
    return tiny_models  # shared across the test session (conftest)


@pytest.fixture(scope="module")
def second_voice(tmp_path_factory):
    """A 6 s reference: a longer prompt than the built-in 2 s / 5.5 s voices."""
    p = tmp_path_factory.mktemp("voice") / "v.wav"
    sf.write(str(p), test_wav(24000, 6.0, seed=123).numpy(), 24000, subtype="FLOAT")
    return str(p)


def jobs_for(model, kind, rows):
    """Scheduler jobs for (text, voice, params, max_new_tokens, seed) rows."""
    out = []
    for text, voice, kw, n, seed in rows:
        out.append(model._job(text, voice=voice, params=model._params(**kw), exaggeration=0.5 if kind == "english" else 0.0,
                              max_new_tokens=n, rnd=RequestRandomness.create("cpu", seed=seed)))
    return out


def knobs(kind, **kw):
    base = dict(temperature=0.8, top_p=1.0, min_p=0.05, repetition_penalty=1.2, cfg_weight=0.5) if kind == "english" \
        else dict(temperature=0.8, top_p=0.95, min_p=0.0, repetition_penalty=1.2, cfg_weight=0.0, top_k=1000)
    base.update(kw)
    return base


@pytest.mark.parametrize("kind", ["english", "nano"])
def test_t3_tokens_of_a_row_equal_the_request_alone(kind, models, second_voice):
    model = models(kind)
    other = model.make_conditionals(second_voice)
    assert other.gen["prompt_token"].shape[-1] != model.conds.gen["prompt_token"].shape[-1]  # different prompt lengths
    rows = [(TEXTS[0], model.conds, knobs(kind), 3, 1),  # stops (by count) long before the others
            (TEXTS[1], other, knobs(kind, temperature=1.1, top_p=0.9), 40, 2),
            (TEXTS[2], model.conds, knobs(kind, repetition_penalty=1.0, **({"cfg_weight": 0.0} if kind == "english" else {})), 25, 3),
            (TEXTS[0], other, knobs(kind), 12, 4)]
    alone = [model._decode_jobs([j])[0] for j in jobs_for(model, kind, rows)]
    steps = model.scheduler.steps
    together = model._decode_jobs(jobs_for(model, kind, rows))
    assert model.scheduler.steps - steps <= max(r[3] for r in rows) + 2  # one shared step per token, not one per row
    for a, b in zip(alone, together):
        assert torch.equal(a, b)
    assert len(alone[0]) <= 3 + (kind != "english") and max(len(a) for a in alone) > 10  # Turbo: max_gen_len + 1


def test_stop_token_rows_end_while_others_continue(models):
    """A row that samples its stop token early is trimmed there; the rows beside it are unaffected."""
    model = models("nano")
    t3 = model.t3
    stop = t3.hp.stop_speech_token
    rows = [(TEXTS[1], model.conds, knobs("nano"), 30, 7), (TEXTS[2], model.conds, knobs("nano"), 30, 8)]
    alone = [model._decode_jobs([j])[0] for j in jobs_for(model, "nano", rows)]
    jobs = jobs_for(model, "nano", [(TEXTS[0], model.conds, knobs("nano"), 30, 9)] + rows)
    calls = {"n": 0}
    first_slot = 0

    def hook(_m, _i, out):  # the first request (slot 0) samples the stop token from its 4th token on
        calls["n"] += 1
        if calls["n"] >= 4 and out.shape[0] >= 1:
            out = out.clone()
            out[first_slot, stop] = 1e4
        return out

    h = t3.speech_head.register_forward_hook(hook)
    try:
        handles = [model.scheduler.submit(j.request) for j in jobs]
        res = [hh.result(timeout=120) for hh in handles]
    finally:
        h.remove()
    assert handles[0].stopped and 1 <= len(res[0]) <= 4
    # prefill calls of the other rows also count, so only check the two full rows for equality
    for a, b in zip(alone, res[1:]):
        assert torch.equal(a, model._valid_speech(b))


@pytest.mark.parametrize("kind", ["english", pytest.param("nano", marks=pytest.mark.extended)])
def test_generate_batch_rows_equal_generate(kind, models, second_voice):
    model = models(kind)
    other = model.make_conditionals(second_voice)
    kw = dict(max_new_tokens=[6, 20, 12], seed=[1, 2, 3], conds=[model.conds, other, model.conds],
              temperature=[0.8, 1.0, 0.7])
    if kind == "english":
        kw["cfg_weight"] = [0.5, 0.0, 0.3]
    outs = model.generate_batch(TEXTS, **kw)
    assert len(outs) == 3
    for i, text in enumerate(TEXTS):
        one = {k: v[i] for k, v in kw.items()}
        ref = model.generate(text, **one)
        assert outs[i].shape == ref.shape and ref.shape[1] > 0 and outs[i].dtype == torch.float32
        assert rel_err(outs[i], ref) <= 1e-3


def test_generate_batch_argument_errors(models):
    model = models("nano")
    with pytest.raises(ValueError, match="seed has 2 values for 3 texts"):
        model.generate_batch(TEXTS, seed=[1, 2])
    with pytest.raises(TypeError):
        model.generate_batch("not a list")
    with pytest.raises(ValueError, match="top_p"):
        model.generate_batch(TEXTS, top_p=[0.9, 1.5, 0.9], max_new_tokens=4)
    assert model.generate_batch([]) == []


def test_audio_prompt_path_per_row(models, second_voice):
    model = models("english")
    before = model.conds
    outs = model.generate_batch(TEXTS[:2], audio_prompt_path=[None, second_voice], seed=[5, 6], max_new_tokens=8)
    ref = model.generate(TEXTS[1], conds=model.make_conditionals(second_voice), seed=6, max_new_tokens=8)
    assert rel_err(outs[1], ref) <= 1e-3
    assert model.conds is before  # generate_batch never changes the current voice


def test_multilingual_language_per_row(tmp_path):
    model = tiny_model("multilingual", tmp_path, cfm_steps=2)
    outs = model.generate_batch(["Hello there.", "Bonjour à tous."], ["en", "fr"], seed=[1, 2], max_new_tokens=8)
    ref = model.generate("Bonjour à tous.", "fr", seed=2, max_new_tokens=8)
    assert rel_err(outs[1], ref) <= 1e-3
    with pytest.raises(ValueError, match="Unsupported language"):
        model.generate_batch(["a", "b"], ["en", "xx"])
    model.close()


# ---------------------------------------------------------------- cancellation
def test_cancel_frees_the_slot_at_the_next_step(models):
    model = models("nano")
    sched = model.scheduler
    job = jobs_for(model, "nano", [(TEXTS[1], model.conds, knobs("nano"), 400, 1)])[0]
    h = sched.submit(job.request)
    it = iter(h)
    first = next(it)  # decoding has started
    assert first
    h.cancel()
    with pytest.raises(RequestCancelled):
        h.result(timeout=30)
    deadline = time.time() + 30
    while sched.stats()["active"] and time.time() < deadline:
        time.sleep(0.01)
    assert sched.stats()["active"] == 0
    assert len(h.tokens) < 400
    # the freed slot serves the next request normally
    assert model._decode_jobs(jobs_for(model, "nano", [(TEXTS[0], model.conds, knobs("nano"), 5, 2)]))[0].numel() >= 1


def test_cancel_a_waiting_request(models):
    model = models("nano")
    sched = model.scheduler
    n = sched.max_batch
    jobs = jobs_for(model, "nano", [(TEXTS[1], model.conds, knobs("nano"), 60, i) for i in range(n + 1)])
    handles = [sched.submit(j.request) for j in jobs]
    handles[-1].cancel()  # it is still queued behind a full batch
    with pytest.raises(RequestCancelled):
        handles[-1].result(timeout=60)
    for hh in handles[:-1]:
        assert len(hh.result(timeout=300)) >= 1


# ---------------------------------------------------------------- threads and asyncio
def test_concurrent_generate_from_8_threads(models):
    model = models("nano")
    model.set_max_batch(8)
    texts = [f"Thread {i} says something of length {i}." for i in range(8)]
    expected = [model.generate(t, seed=i, max_new_tokens=6 + i) for i, t in enumerate(texts)]
    got, errors = {}, []
    steps0 = model.scheduler.steps

    def work(i):
        try:
            got[i] = model.generate(texts[i], seed=i, max_new_tokens=6 + i)
        except Exception as e:  # reported below
            errors.append(e)

    ts = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(300)
    assert not errors and len(got) == 8
    for i in range(8):
        assert got[i].shape == expected[i].shape and rel_err(got[i], expected[i]) <= 1e-3
    # they shared decode steps: far fewer steps than the 8 requests' tokens one after another
    assert model.scheduler.steps - steps0 < sum(6 + i for i in range(8))


def test_asyncio_submission_streams_tokens(models):
    model = models("nano")
    jobs = jobs_for(model, "nano", [(TEXTS[i], model.conds, knobs("nano"), 10 + i, i) for i in range(3)])
    expected = [model._decode_jobs([j])[0].tolist() for j in jobs_for(
        model, "nano", [(TEXTS[i], model.conds, knobs("nano"), 10 + i, i) for i in range(3)])]

    async def main():
        handles = [await model.scheduler.submit_async(j.request) for j in jobs]

        async def collect(h):
            out = []
            async for toks in h:
                out.extend(toks)
            return out
        return await asyncio.gather(*(collect(h) for h in handles))

    got = asyncio.run(main())
    assert [[t for t in g if t < 6561] for g in got] == expected


# ---------------------------------------------------------------- long text
def test_long_text_is_split_batched_and_joined(models):
    from chatterbox.text import split_text

    model = models("nano")
    text = " ".join(["This is sentence number %d, and it carries a few more words to be long enough." % i
                     for i in range(6)])
    pieces = split_text(text)
    assert len(pieces) >= 3
    steps0 = model.scheduler.steps
    out = model.generate(text, seed=3, max_new_tokens=8, split_text=True)
    assert model.scheduler.steps - steps0 < 8 * len(pieces)  # the pieces were decoded as one batch
    singles = model.generate_batch(pieces, seed=0, max_new_tokens=8)
    total = sum(s.shape[1] for s in singles)
    assert total - 480 * (len(pieces) - 1) <= out.shape[1] <= total  # joined with short (<= 20 ms) crossfades
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------- compiled = eager under emulated CUDA graphs
def test_batch_under_emulated_cuda_graphs_equals_eager(tmp_path, monkeypatch, second_voice):
    model = tiny_model("english", tmp_path, cfm_steps=2)
    other = model.make_conditionals(second_voice)
    kw = dict(seed=[1, 2, 3], max_new_tokens=[5, 18, 11], cfg_weight=[0.5, 0.0, 0.5], conds=[model.conds, other, other])
    eager = model.generate_batch(TEXTS, **kw)
    em = CudaGraphEmulator()
    monkeypatch.setattr(rt_compile, "torch_compile", em.compile_hook(rt_compile.torch_compile))
    model.compile(mode="reduce-overhead", s3gen=False, max_batch=3, max_text_tokens=96, max_new_tokens=24)
    emulated = model.generate_batch(TEXTS, **kw)
    assert em.calls > 10
    for e, c in zip(eager, emulated):
        assert e.shape == c.shape and rel_err(c, e) <= 1e-5
    model.close()
