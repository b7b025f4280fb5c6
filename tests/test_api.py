"""Public API end to end: checkpoint directories with upstream's file names -> from_local -> generate.

Every model kind is loaded from a directory written by `chatterbox.testing.write_checkpoint`
(deterministic weights, small real tokenizers, a conds.pt voice) through the same code users hit.
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import load_fixture, rel_err
from chatterbox.engine import Conditionals
from chatterbox.testing import load_checkpoint, test_wav

pytestmark = pytest.mark.slow

KINDS = ["english", "turbo", "nano", "multilingual"]
TOKENS = 8  # speech tokens per request: keeps CI fast


def speak(model, kind, text, **kw):
    kw.setdefault("max_new_tokens", TOKENS)
    if kind == "multilingual":
        return model.generate(text, "en", **kw)
    return model.generate(text, **kw)


def ref_seconds(kind: str) -> float:
    """Short references keep S3Gen's prompt (and CI time) small; Turbo/Nano need more than 5 s."""
    return 5.5 if kind in ("turbo", "nano") else 2.0


@pytest.fixture(scope="module")
def ckpt_dirs(checkpoint_dir):
    """kind -> checkpoint directory (shared with the other test files of the session)."""
    return checkpoint_dir


@pytest.fixture(scope="module", params=KINDS)
def loaded(request, ckpt_dirs):
    kind = request.param
    d = ckpt_dirs(kind)
    return kind, d, load_checkpoint(kind, d, "cpu", watermark=False)


@pytest.fixture()
def ref_path(loaded, tmp_path):
    p = tmp_path / "voice.wav"
    sf.write(str(p), test_wav(44100, ref_seconds(loaded[0]), seed=7).numpy(), 44100)  # an odd rate on purpose
    return str(p)


def test_generate_with_builtin_voice_and_prompt(loaded, ref_path):
    kind, d, model = loaded
    assert model.sr == 24000 and model.conds is not None  # conds.pt loaded as the built-in voice
    wav = speak(model, kind, "Hello there, this is a test.", seed=1)
    assert wav.dtype == torch.float32 and wav.dim() == 2 and wav.shape[0] == 1
    assert wav.device.type == "cpu" and torch.isfinite(wav).all()
    assert 0 < wav.shape[1] <= (TOKENS + 4) * 960
    assert wav.abs().max() > 1e-3  # not silence

    before = model.conds.t3.speaker_emb.clone()
    wav2 = speak(model, kind, "Hello there, this is a test.", seed=1, audio_prompt_path=ref_path)
    assert wav2.shape[0] == 1 and wav2.shape[1] > 0 and torch.isfinite(wav2).all()
    assert not torch.equal(model.conds.t3.speaker_emb, before)  # the prompt became the current voice


def test_same_seed_same_audio(loaded):
    kind, _, model = loaded
    a = speak(model, kind, "Same seed, same audio.", seed=123)
    g = torch.Generator().manual_seed(123)  # a second run, seeded the other way: the same audio again
    c = speak(model, kind, "Same seed, same audio.", generator=g)
    assert torch.equal(a, c) and a.abs().max() > 1e-3


def test_conditionals_round_trip(loaded, tmp_path):
    kind, _, model = loaded
    p = tmp_path / "conds.pt"
    model.conds.save(p)
    back = Conditionals.load(p)
    assert torch.equal(back.t3.speaker_emb, model.conds.t3.speaker_emb)
    assert torch.equal(back.gen["prompt_token"], model.conds.gen["prompt_token"])


# ------------------------------------------------------------------ English-only checks
@pytest.fixture(scope="module")
def english(ckpt_dirs):
    d = ckpt_dirs("english")
    return d, load_checkpoint("english", d, "cpu", watermark=False)


def test_cfg_weight_zero_works(english):
    _, model = english
    wav = model.generate("No guidance.", cfg_weight=0.0, seed=0, max_new_tokens=TOKENS)
    assert wav.shape[1] > 0


def test_bad_text(english):
    _, model = english
    for text in ["", "   \n\t"]:
        with pytest.raises(ValueError, match="empty"):
            model.generate(text)
    with pytest.raises(ValueError, match="limit"):
        model.generate("word " * 5000)
    with pytest.raises(TypeError):
        model.generate(None)


def test_bad_reference_audio(english, tmp_path):
    _, model = english
    with pytest.raises(FileNotFoundError):
        model.generate("Hi.", audio_prompt_path=str(tmp_path / "missing.wav"))
    bogus = tmp_path / "not_audio.wav"
    bogus.write_text("this is not audio")
    with pytest.raises(ValueError, match="not_audio.wav"):
        model.generate("Hi.", audio_prompt_path=str(bogus))
    silent = tmp_path / "silent.wav"
    sf.write(str(silent), np.zeros(48000, dtype=np.float32), 24000)
    with pytest.raises(ValueError, match="silent"):
        model.generate("Hi.", audio_prompt_path=str(silent))
    short = tmp_path / "short.wav"
    sf.write(str(short), test_wav(24000, 0.5, seed=1).numpy(), 24000)
    with pytest.raises(ValueError, match="0.50 s"):
        model.generate("Hi.", audio_prompt_path=str(short))


def test_stereo_and_odd_rate_reference_are_accepted(english, tmp_path):
    _, model = english
    mono = test_wav(8000, 3.0, seed=3).numpy()
    stereo = tmp_path / "stereo_8k.wav"
    sf.write(str(stereo), np.stack([mono, 0.5 * mono], axis=1), 8000)
    model.prepare_conditionals(str(stereo))
    assert model.conds.t3.speaker_emb.shape == (1, 256)
    assert model.conds.gen["prompt_feat"].shape[-1] == 80


def test_turbo_needs_five_second_reference(tmp_path):
    from chatterbox.tts_turbo import ChatterboxTurboTTS

    short = tmp_path / "four.wav"
    sf.write(str(short), test_wav(24000, 4.0, seed=1).numpy(), 24000)
    model = ChatterboxTurboTTS.__new__(ChatterboxTurboTTS)
    model._init_engine("cpu", watermark=False)
    with pytest.raises(ValueError, match="at least 5 s"):
        model.prepare_conditionals(str(short))


def test_bad_checkpoints(english, tmp_path):
    from chatterbox.tts import ChatterboxTTS

    d, _ = english
    with pytest.raises(FileNotFoundError, match="directory not found"):
        ChatterboxTTS.from_local(tmp_path / "nope", "cpu")
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(d / "tokenizer.json", partial / "tokenizer.json")
    with pytest.raises(FileNotFoundError, match="t3_cfg.safetensors"):
        ChatterboxTTS.from_local(partial, "cpu")
    broken = tmp_path / "broken"
    shutil.copytree(d, broken)
    (broken / "ve.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="ve.safetensors"):
        ChatterboxTTS.from_local(broken, "cpu")
    # a T3 file of another variant: shapes do not fit
    from safetensors.torch import load_file, save_file

    sd = load_file(str(d / "t3_cfg.safetensors"))
    sd["text_emb.weight"] = sd["text_emb.weight"][:100]
    save_file(sd, str(broken / "t3_cfg.safetensors"))
    shutil.copy(d / "ve.safetensors", broken / "ve.safetensors")
    with pytest.raises((ValueError, RuntimeError), match="text_emb"):
        ChatterboxTTS.from_local(broken, "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_wrong_device(english):
    from chatterbox.tts import ChatterboxTTS

    d, _ = english
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        ChatterboxTTS.from_local(d, "cuda")
    with pytest.raises(ValueError, match="unsupported device"):
        ChatterboxTTS.from_local(d, "tpu")


def test_no_voice_is_a_clear_error(english):
    _, model = english
    saved, model.conds = model.conds, None
    try:
        with pytest.raises(RuntimeError, match="no voice"):
            model.generate("Hello.")
    finally:
        model.conds = saved


def test_cli_writes_24k_wav(english, tmp_path):
    from chatterbox.cli import main

    d, _ = english
    out = tmp_path / "out.wav"
    rc = main(["--text", "First sentence. Second one!", "--out", str(out), "--ckpt-dir", str(d), "--device", "cpu",
               "--seed", "0", "--max-new-tokens", str(TOKENS), "--no-watermark", "-q"])
    assert rc == 0
    data, sr = sf.read(str(out))
    assert sr == 24000 and data.ndim == 1 and len(data) > 960 and np.isfinite(data).all()
    rc = main(["--text", "x", "--out", str(out), "--ckpt-dir", str(tmp_path / "missing"), "--device", "cpu", "-q"])
    assert rc == 1


# ------------------------------------------------------------------ conditioning parity with upstream
def test_prepare_conditionals_matches_upstream(tmp_path):
    """ChatterboxTTS.prepare_conditionals end to end vs upstream's (fixture `conds`)."""
    from chatterbox.models.s3gen import S3Gen
    from chatterbox.models.t3 import T3, T3Config
    from chatterbox.models.voice_encoder import VoiceEncoder
    from chatterbox.testing import apply_det_weights
    from chatterbox.tts import ChatterboxTTS

    fx, _ = load_fixture("conds")
    p = tmp_path / "ref.wav"
    sf.write(str(p), fx["ref_wav24"].numpy(), 24000, subtype="FLOAT")
    with torch.device("meta"):
        t3 = T3(T3Config.english_only())  # only its config is used here
    model = ChatterboxTTS(t3, apply_det_weights(S3Gen().eval()), apply_det_weights(VoiceEncoder().eval()),
                          tokenizer=None, device="cpu", watermark=False)
    model.prepare_conditionals(str(p), exaggeration=0.6)
    c = model.conds
    assert rel_err(c.t3.speaker_emb, fx["t3_speaker_emb"]) <= 1e-4
    assert torch.equal(c.t3.cond_prompt_speech_tokens.cpu(), fx["t3_cond_prompt_speech_tokens"])
    assert rel_err(c.t3.emotion_adv, fx["t3_emotion_adv"]) <= 1e-6
    assert torch.equal(c.gen["prompt_token"].cpu(), fx["gen_prompt_token"])
    assert torch.equal(c.gen["prompt_token_len"].cpu(), fx["gen_prompt_token_len"])
    assert rel_err(c.gen["prompt_feat"], fx["gen_prompt_feat"]) <= 1e-4
    assert rel_err(c.gen["embedding"], fx["gen_embedding"]) <= 1e-4
