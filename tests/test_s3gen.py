"""Assembled S3Gen: inventories, end-to-end parity on deterministic weights, API behaviour, randomness."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import load_fixture, read_inventory, rel_err
from chatterbox.models.s3gen import S3GEN_SIL, S3GEN_SR, S3Gen, S3Token2Mel, S3Token2Wav
from chatterbox.models.s3gen.s3gen import S3_SR, SPEECH_VOCAB_SIZE, drop_invalid_tokens
from chatterbox.testing import apply_det_weights

NAMES = ["s3gen", "s3gen_meanflow"]


def fixture_ref(t: dict) -> dict:
    return dict(prompt_token=t["ref_prompt_token"], prompt_token_len=torch.tensor([t["ref_prompt_token"].size(1)]),
                prompt_feat=t["ref_prompt_feat"], prompt_feat_len=None, embedding=t["ref_embedding"])


def fixture_noise(t: dict, meanflow: bool) -> torch.Tensor:
    """Upstream's effective initial CFM sample: meanflow's draw overwrites the frames after the prompt."""
    z = t["cfm_noise"]
    if meanflow:
        g = t["meanflow_noise"].size(-1)
        z = torch.cat([z[..., : z.size(-1) - g], t["meanflow_noise"]], dim=-1)
    return z


@pytest.fixture(scope="module")
def runs() -> dict:
    """Per variant: the model, its embed_ref output, and one `inference` call (its mel captured)."""
    out = {}
    for name in NAMES:
        t, info = load_fixture(name)
        model = apply_det_weights(S3Gen(meanflow=info["meanflow"])).eval()
        ref = model.embed_ref(t["wav24"], 24000)
        mels = []
        flow_inference = model.flow_inference

        def spy(*args, **kwargs):
            mels.append(flow_inference(*args, **kwargs))
            return mels[-1]

        model.flow_inference = spy
        wav, source = model.inference(t["speech_tokens"], ref_dict=fixture_ref(t), noise=fixture_noise(t, info["meanflow"]),
                                      deterministic_vocoder=True)
        del model.flow_inference
        out[name] = dict(model=model, t=t, ref=ref, mel=mels[0], wav=wav, source=source)
    return out


@pytest.fixture(scope="module")
def small_ref(runs) -> dict:
    """A short reference (10 prompt tokens) for quick calls."""
    t = runs["s3gen_meanflow"]["t"]
    return dict(prompt_token=t["ref_prompt_token"][:, :10], prompt_token_len=torch.tensor([10]),
                prompt_feat=t["ref_prompt_feat"][:, :20], prompt_feat_len=None, embedding=t["ref_embedding"])


# ------------------------------------------------------------------------------------- structure
@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_state_dict_matches_inventory(runs, name):
    model = runs[name]["model"]
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    inv = read_inventory(name)
    assert ours == inv
    assert list(ours) == list(inv)
    assert "trim_fade" not in ours and "flow.encoder.embed.pos_enc.pe" not in ours  # non-persistent


def test_exports_and_class_structure():
    assert S3Gen is S3Token2Wav and issubclass(S3Token2Wav, S3Token2Mel)
    assert (S3GEN_SR, S3GEN_SIL, S3_SR, SPEECH_VOCAB_SIZE) == (24000, 4299, 16000, 6561)
    x = torch.tensor([[1, 6561, 5, 6562, 7]])
    assert drop_invalid_tokens(x).tolist() == [1, 5, 7]


@pytest.mark.slow
def test_attributes_and_trim_fade(runs):
    m = runs["s3gen"]["model"]
    assert m.meanflow is False and runs["s3gen_meanflow"]["model"].meanflow is True
    assert m.device == torch.device("cpu") and m.dtype == torch.float32
    assert callable(m.mel_extractor) and m.resamplers == {}
    fade = m.trim_fade
    assert fade.shape == (960,) and torch.all(fade[:480] == 0) and fade[480] == 0 and fade[959] == 1
    assert torch.all(fade[481:] >= fade[480:-1])
    short = torch.ones(1, 700)  # shorter than the fade: still works, out of place
    faded = m.apply_trim_fade(short)
    assert torch.equal(faded, fade[:700][None]) and torch.all(short == 1)


# ------------------------------------------------------------------------------------- parity
@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_embed_ref_parity(runs, name):
    ref, t = runs[name]["ref"], runs[name]["t"]
    assert torch.equal(ref["prompt_token"], t["ref_prompt_token"])
    assert ref["prompt_token_len"].tolist() == [t["ref_prompt_token"].size(1)]
    assert ref["prompt_feat_len"] is None
    e_feat, e_emb = rel_err(ref["prompt_feat"], t["ref_prompt_feat"]), rel_err(ref["embedding"], t["ref_embedding"])
    print(f"{name}: embed_ref prompt_feat {e_feat:.2e}, embedding {e_emb:.2e}")
    assert e_feat <= 1e-4 and e_emb <= 1e-4
    assert not ref["embedding"].requires_grad


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_flow_mel_and_waveform_parity(runs, name):
    r, t = runs[name], runs[name]["t"]
    e_mel, e_wav = rel_err(r["mel"], t["mel"]), rel_err(r["wav"], t["wav"])
    e_src = rel_err(r["source"], t["hift_source"])
    print(f"{name}: flow mel {e_mel:.2e}, waveform {e_wav:.2e}, source {e_src:.2e}")
    assert e_mel <= 1e-4 and e_wav <= 1e-4 and e_src <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_hift_inference_parity(runs, name):
    r, t = runs[name], runs[name]["t"]
    wav, source = r["model"].hift_inference(t["mel"], deterministic=True)
    assert rel_err(wav, t["hift_wav"]) <= 1e-4 and rel_err(source, t["hift_source"]) <= 1e-4


# ------------------------------------------------------------------------------------- API
@pytest.mark.slow
def test_ref_dict_is_not_mutated_and_numpy_accepted(runs, small_ref):
    m = runs["s3gen_meanflow"]["model"]
    toks = runs["s3gen_meanflow"]["t"]["speech_tokens"][:, :5]
    ref = dict(small_ref)
    before = {k: v for k, v in ref.items()}
    z = torch.randn(1, 80, 30, generator=torch.Generator().manual_seed(0))
    a = m.flow_inference(toks, ref_dict=ref, noise=z, finalize=True)
    assert all(ref[k] is before[k] for k in ref) and ref["prompt_token"].dtype == torch.long
    as_numpy = {k: (v.numpy() if torch.is_tensor(v) else v) for k, v in ref.items()}
    b = m.flow_inference(toks[0], ref_dict=as_numpy, noise=z, finalize=True)  # 1-D tokens too
    assert a.shape == (1, 80, 10) and torch.equal(a, b)


@pytest.mark.slow
def test_bad_inputs_raise(runs, small_ref):
    m = runs["s3gen_meanflow"]["model"]
    toks = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="speech tokens"):
        m.inference(torch.tensor([[1, SPEECH_VOCAB_SIZE, 3]]), ref_dict=small_ref)
    with pytest.raises(ValueError, match="n_cfm_timesteps"):
        m.inference(toks, ref_dict=small_ref, n_cfm_timesteps=0)
    with pytest.raises(ValueError, match="exactly one"):
        m.inference(toks, ref_wav=torch.zeros(24000), ref_sr=24000, ref_dict=small_ref)
    with pytest.raises(ValueError, match="exactly one"):
        m.inference(toks)


@pytest.mark.slow
def test_same_seed_same_audio_and_upstream_draw_order(runs, small_ref):
    m = runs["s3gen_meanflow"]["model"]
    toks = runs["s3gen_meanflow"]["t"]["speech_tokens"][:, :5]

    def run(seed):
        return m.inference(toks, ref_dict=small_ref, generator=torch.Generator().manual_seed(seed))[0]

    a, b, c = run(7), run(7), run(8)
    assert a.shape == (1, 960 * 5) and torch.equal(a, b) and not torch.equal(a, c)

    # Without a generator the global RNG is used in upstream's order: the (1, 80, 2N) meanflow draw,
    # then the CFM's draw shaped like mu (its generated part overwritten), then HiFT's draws.
    torch.manual_seed(11)
    implicit = m.inference(toks, ref_dict=small_ref)[0]
    torch.manual_seed(11)
    mf = torch.randn(1, 80, 10)
    z = torch.randn(1, 80, 30)
    z = torch.cat([z[..., :20], mf], dim=-1)
    explicit = m.inference(toks, ref_dict=small_ref, noise=z)[0]
    assert torch.equal(implicit, explicit)


@pytest.mark.slow
def test_ref_wav_path_equals_ref_dict_path(runs):
    m = runs["s3gen_meanflow"]["model"]
    t = runs["s3gen_meanflow"]["t"]
    wav24 = t["wav24"][: 24000 * 1]  # 1 s reference
    toks = t["speech_tokens"][:, :4]
    ref = m.embed_ref(wav24, 24000)
    z = torch.randn(1, 80, ref["prompt_feat"].size(1) + 8, generator=torch.Generator().manual_seed(2))
    a = m.flow_inference(toks, ref_dict=ref, noise=z, finalize=True)
    b = m.flow_inference(toks, ref_wav=wav24, ref_sr=24000, noise=z, finalize=True)
    assert torch.equal(a, b)
    # a 16 kHz numpy reference goes through the same resamplers
    ref16 = m.embed_ref(np.asarray(t["wav16"][:16000]), 16000)
    assert ref16["prompt_feat"].shape[1] == 2 * ref16["prompt_token"].shape[1]
