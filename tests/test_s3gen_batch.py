"""Batched S3Gen (`synthesize`, `synthesize_mels`, `vocode`): each row equals its request alone.

Full-size S3Gen modules on deterministic weights, short sequences: rows of different token counts
and different voices (prompt token counts, odd and even prompt mels, x-vectors), CFM and meanflow,
length buckets, `finalize=False`, the padding leak of the pre-lookahead convolution, emulated
CUDA graphs, and float32 front ends under a half-precision flow.
"""
from __future__ import annotations

import pytest
import torch

from conftest import rel_err
from chatterbox.models.s3gen import S3Gen
from chatterbox.models.s3gen.transformer.upsample_encoder import PreLookaheadLayer
from chatterbox.runtime.noise import PositionalNoise
from chatterbox.runtime.s3gen_buckets import bucketed_inference, compile_s3gen
from chatterbox.testing import CudaGraphEmulator, apply_det_weights, test_wav

STEPS = 2  # Euler steps for CFM rows (the point is batching exactness, not quality)


def _det_fill(model: S3Gen, frontends: bool) -> S3Gen:
    """Deterministic flow and HiFT (names as in S3Gen's state dict); the front ends too when asked."""
    parts = ["flow", "mel2wav"] + (["tokenizer", "speaker_encoder"] if frontends else [])
    for name in parts:
        apply_det_weights(getattr(model, name), prefix=name + ".")
    return model.eval()


@pytest.fixture(scope="module")
def cfm() -> S3Gen:
    return _det_fill(S3Gen(meanflow=False), frontends=True)


@pytest.fixture(scope="module")
def voices(cfm) -> list[dict]:
    """Two voices: 0.6 s (P = 15, M = 30) and 1.0 s made odd (P = 25, M = 51) references."""
    a = cfm.embed_ref(test_wav(24000, 0.6, seed=1), 24000)
    b = cfm.embed_ref(test_wav(24000, 1.0, seed=2), 24000)
    # an odd prompt mel (M = 2P + 1), as embed_ref produces for some reference lengths
    b = dict(b, prompt_feat=torch.cat([b["prompt_feat"], b["prompt_feat"][:, -1:]], dim=1))
    assert a["prompt_token"].shape[1] != b["prompt_token"].shape[1]
    return [a, b]


@pytest.fixture(scope="module")
def meanflow(cfm) -> S3Gen:
    m = S3Gen(meanflow=True)
    m.tokenizer, m.speaker_encoder = cfm.tokenizer, cfm.speaker_encoder  # share the front ends
    return _det_fill(m, frontends=False)


def speech(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 6561, (n,), generator=torch.Generator().manual_seed(seed))


def sources(seeds):
    """Per-row (flow noise, HiFT generator) from seeds, as the runtime builds them per request."""
    return ([PositionalNoise(torch.Generator().manual_seed(100 + s), 80, "cpu") for s in seeds],
            [torch.Generator().manual_seed(200 + s) for s in seeds])


def run(model, toks, refs, seeds, **kw):
    noise, gens = sources(seeds)
    return model.synthesize(toks, refs, flow_noise=noise, hift_generators=gens, n_cfm_timesteps=kw.pop("steps", None),
                            **kw)


class Emulator(CudaGraphEmulator):
    """The emulator, also poisoning outputs made under inference mode (S3Gen runs in it)."""

    def _poison(self) -> None:
        with torch.inference_mode():
            super()._poison()


def mels(model, toks, refs, seeds, **kw):
    noise, _ = sources(seeds)
    return model.synthesize_mels(toks, refs, noise, **kw)


# ------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("variant", ["cfm", "meanflow"])
def test_rows_equal_requests_alone(request, voices, variant):
    """Rows of different lengths and voices: batch row == the request alone (mel and waveform)."""
    model = request.getfixturevalue(variant)
    steps = STEPS if variant == "cfm" else None
    toks = [speech(7, 1), speech(12, 2), speech(4, 3)]
    refs = [voices[0], voices[1], voices[1]]
    seeds = [1, 2, 3]
    batch_mel = mels(model, toks, refs, seeds, n_cfm_timesteps=steps)
    batch_wav = model.vocode(batch_mel, sources(seeds)[1])
    for i in range(3):
        alone_mel = mels(model, toks[i:i + 1], refs[i:i + 1], seeds[i:i + 1], n_cfm_timesteps=steps)[0]
        alone_wav = model.vocode([alone_mel], sources(seeds[i:i + 1])[1])[0]
        p, m = refs[i]["prompt_token"].shape[1], refs[i]["prompt_feat"].shape[1]
        frames = 2 * (p + toks[i].numel()) - m
        assert batch_mel[i].shape == alone_mel.shape == (1, 80, frames)
        assert batch_wav[i].shape == alone_wav.shape == (1, 480 * frames)
        e_mel, e_wav = rel_err(batch_mel[i], alone_mel), rel_err(batch_wav[i], alone_wav)
        print(f"{variant} row {i}: mel {e_mel:.1e}, wav {e_wav:.1e}")
        assert e_mel <= 1e-5 and e_wav <= 1e-4
        assert torch.isfinite(batch_wav[i]).all() and batch_wav[i].abs().max() > 1e-3


@pytest.mark.parametrize("variant", ["cfm", "meanflow"])
def test_single_row_equals_upstream_inference_with_the_same_noise(request, voices, variant):
    """A list of one is `inference` with noise = window(0, 2(P+N)) and HiFT's generator (meanflow: no 2nd draw)."""
    model = request.getfixturevalue(variant)
    steps = STEPS if variant == "cfm" else None
    tok, ref = speech(9, 4), voices[0]
    noise, gens = sources([4])
    z = PositionalNoise(torch.Generator().manual_seed(104), 80, "cpu").window(0, model.noise_frames(ref, 9))
    ours = model.synthesize([tok], [ref], flow_noise=noise, hift_generators=gens, n_cfm_timesteps=steps)[0]
    up, _ = model.inference(tok[None], ref_dict=ref, noise=z, generator=torch.Generator().manual_seed(204),
                            n_cfm_timesteps=steps)
    assert rel_err(ours, up) <= 1e-5


def test_padding_to_a_bucket_is_exact(cfm, voices):
    toks, refs, seeds = [speech(6, 5), speech(10, 6)], voices, [5, 6]
    plain = mels(cfm, toks, refs, seeds, n_cfm_timesteps=STEPS)
    cfm.set_length_buckets((48, 96))
    try:
        assert cfm.length_buckets == (48, 96) and cfm.padded_length(40) == 48 and cfm.padded_length(50) == 96
        bucketed = mels(cfm, toks, refs, seeds, n_cfm_timesteps=STEPS)
    finally:
        cfm.set_length_buckets(None)
    assert cfm.length_buckets is None and cfm.padded_length(40) == 40
    wide = mels(cfm, toks, refs, seeds, n_cfm_timesteps=STEPS, pad_to=80)
    for a, b, c in zip(plain, bucketed, wide):
        assert a.shape == b.shape == c.shape
        assert rel_err(b, a) <= 1e-5 and rel_err(c, a) <= 1e-5
    with pytest.raises(ValueError, match="pad_to"):
        mels(cfm, toks, refs, seeds, n_cfm_timesteps=STEPS, pad_to=20)


def test_pre_lookahead_padding_leak_is_masked(cfm, voices, monkeypatch):
    """The input projection bias + LayerNorm turn zero padding into a constant; unmasked, the 3-token
    look-ahead leaks it into a short row's last frames. The mask keeps the row exact."""
    toks, refs, seeds = [speech(5, 7), speech(12, 8)], [voices[0], voices[0]], [7, 8]
    alone = mels(cfm, toks[:1], refs[:1], seeds[:1], n_cfm_timesteps=1)[0]
    batch = mels(cfm, toks, refs, seeds, n_cfm_timesteps=1)[0]
    assert rel_err(batch, alone) <= 1e-5

    forward = PreLookaheadLayer.forward
    monkeypatch.setattr(PreLookaheadLayer, "forward", lambda self, x, mask=None: forward(self, x, None))
    leaky = mels(cfm, toks, refs, seeds, n_cfm_timesteps=1)[0]
    err = rel_err(leaky, alone)
    print(f"unmasked padding: short row rel err {err:.2e}")
    assert err > 1e-3


def test_finalize_false_holds_back_each_rows_own_last_frames(cfm, voices):
    toks, refs, seeds = [speech(8, 9), speech(14, 10)], voices, [9, 10]
    batch = mels(cfm, toks, refs, seeds, n_cfm_timesteps=STEPS, finalize=False)
    for i in range(2):
        alone = mels(cfm, toks[i:i + 1], refs[i:i + 1], seeds[i:i + 1], n_cfm_timesteps=STEPS, finalize=False)[0]
        p, m = refs[i]["prompt_token"].shape[1], refs[i]["prompt_feat"].shape[1]
        assert batch[i].shape == alone.shape == (1, 80, 2 * (p + toks[i].numel()) - 6 - m)
        assert rel_err(batch[i], alone) <= 1e-5


def test_same_noise_sources_same_audio(cfm, voices):
    toks = [speech(6, 11), speech(6, 12)]
    a = run(cfm, toks, voices, [1, 2], steps=STEPS)
    b = run(cfm, toks, voices, [1, 2], steps=STEPS)
    c = run(cfm, toks, voices, [1, 3], steps=STEPS)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert torch.equal(a[0], c[0]) and not torch.equal(a[1], c[1])  # rows never share randomness


def test_bad_inputs_and_empty_rows(cfm, voices):
    noise, gens = sources([1, 2])
    with pytest.raises(ValueError, match="one entry per request"):
        cfm.synthesize([speech(3, 1)], voices, flow_noise=noise, hift_generators=gens)
    with pytest.raises(TypeError, match="integer tensor"):
        cfm.synthesize_mels([torch.zeros(3)], voices[:1], noise[:1])
    with pytest.raises(ValueError, match="speech tokens"):
        cfm.synthesize_mels([torch.tensor([1, 6561])], voices[:1], noise[:1])
    with pytest.raises(ValueError, match="noise"):
        cfm.synthesize_mels([speech(3, 1)], voices[:1], [torch.zeros(1, 80, 5)])
    out = cfm.synthesize([torch.zeros(0, dtype=torch.long), speech(3, 2)], voices, flow_noise=noise,
                         hift_generators=gens, n_cfm_timesteps=1)
    assert out[0].shape == (1, 0) and out[1].shape[1] > 0


# ------------------------------------------------------------------------------------- CUDA graphs
def test_emulated_cuda_graphs_equal_eager(cfm, voices, monkeypatch):
    """compile_s3gen(mode="reduce-overhead") under the CUDA-graph emulator: bucketed rows == eager.

    Without the output clones, HiFT's first row is overwritten by the second row's replay."""
    from chatterbox.runtime import compile as rc
    from chatterbox.runtime import s3gen_buckets

    toks, seeds = [speech(6, 13), speech(9, 14)], [1, 2]
    eager = run(cfm, toks, voices, seeds, steps=STEPS, trim_fade=False)
    eager_bucketed = bucketed_inference(cfm, toks[0], voices[0], generator=torch.Generator().manual_seed(0),
                                        n_cfm_timesteps=STEPS, buckets=(64,))
    emu = Emulator()
    monkeypatch.setattr(rc, "torch_compile", emu.compile_hook(rc.torch_compile))
    keys = list(cfm.state_dict())
    try:
        compile_s3gen(cfm, buckets=(64,), mode="reduce-overhead")
        assert list(cfm.state_dict()) == keys and cfm.length_buckets == (64,)
        graphs = run(cfm, toks, voices, seeds, steps=STEPS, trim_fade=False)
        assert emu.calls == 1 + STEPS + 2  # encoder, estimator per step (CFG stacked), HiFT per row
        for e, g in zip(eager, graphs):
            assert rel_err(g, e) <= 1e-5  # bucket padding vs none: float rounding only
        single = bucketed_inference(cfm, toks[0], voices[0], generator=torch.Generator().manual_seed(0),
                                    n_cfm_timesteps=STEPS)
        assert rel_err(single, eager_bucketed) <= 1e-6

        monkeypatch.setattr(s3gen_buckets, "_cloning", lambda fn: fn)  # negative control: no clones
        compile_s3gen(cfm, buckets=(64,), mode="reduce-overhead")
        broken = run(cfm, toks, voices, seeds, steps=STEPS, trim_fade=False)
        assert torch.isnan(broken[0]).all() and not torch.isnan(broken[1]).any()
    finally:
        cfm.compile_regions(None)
        cfm.set_length_buckets(None)
    assert "forward" not in vars(cfm.flow.encoder) and "decode" not in vars(cfm.mel2wav)  # eager again
    calls = emu.calls
    assert rel_err(run(cfm, toks[:1], voices[:1], seeds[:1], steps=STEPS, trim_fade=False)[0], eager[0]) <= 1e-5
    assert emu.calls == calls


# ------------------------------------------------------------------------------------- dtypes
REF_WAV = test_wav(24000, 0.8, seed=3)


@pytest.fixture(scope="module")
def ref32(cfm) -> dict:
    return cfm.embed_ref(REF_WAV, 24000)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_front_ends_stay_float32_under_a_half_precision_flow(cfm, ref32, dtype):
    wav = REF_WAV
    saved = {k: v.clone() for k, v in cfm.flow.state_dict().items()}
    try:
        cfm.flow.to(dtype)  # what compile(s3gen_dtype=...) does
        assert cfm.dtype == dtype and cfm.vocoder_dtype == torch.float32
        ref = cfm.embed_ref(wav, 24000)
        assert torch.equal(ref["prompt_token"], ref32["prompt_token"])
        assert ref["prompt_feat"].dtype == ref["embedding"].dtype == torch.float32
        assert torch.equal(ref["prompt_feat"], ref32["prompt_feat"]) and torch.equal(ref["embedding"], ref32["embedding"])
        wav_out, _ = cfm.inference(speech(5, 1)[None], ref_dict=ref, n_cfm_timesteps=1,
                                   generator=torch.Generator().manual_seed(0))
        assert wav_out.dtype == torch.float32 and wav_out.shape[1] > 0 and torch.isfinite(wav_out).all()
    finally:
        cfm.flow.float().load_state_dict(saved)
    assert cfm.dtype == torch.float32


def test_front_ends_compute_in_float32_when_cast_down(cfm, ref32):
    """Front-end weights cast to bf16 (e.g. the whole model cast): FFTs and networks still run in float32."""
    wav = REF_WAV
    saved = {n: {k: v.clone() for k, v in getattr(cfm, n).state_dict().items()} for n in ("tokenizer", "speaker_encoder")}
    try:
        cfm.tokenizer.to(torch.bfloat16)
        cfm.speaker_encoder.to(torch.bfloat16)
        ref = cfm.embed_ref(wav, 24000)
    finally:
        for n, sd in saved.items():
            getattr(cfm, n).float().load_state_dict(sd)
    assert ref["embedding"].dtype == torch.float32 and torch.isfinite(ref["embedding"]).all()
    assert torch.equal(ref["prompt_feat"], ref32["prompt_feat"])  # no weights in the 24 kHz mel
    e = rel_err(ref["embedding"], ref32["embedding"])
    same = (ref["prompt_token"] == ref32["prompt_token"]).float().mean().item()
    print(f"bf16 front-end weights: x-vector rel err {e:.1e}, tokens equal {same:.0%}")
    assert e <= 0.05 and same >= 0.5
