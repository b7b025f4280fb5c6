"""S3 tokenizer (speech_tokenizer_v2_25hz): layout, token parity, lengths, batching, long inputs."""
from __future__ import annotations

import librosa
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from chatterbox.models.s3tokenizer import (
    EOS, S3_HOP, S3_SR, S3_TOKEN_HOP, S3_TOKEN_RATE, SOS, SPEECH_VOCAB_SIZE, S3Tokenizer, drop_invalid_tokens)
from chatterbox.models.s3tokenizer.model import ModelConfig
from chatterbox.models.s3tokenizer.s3tokenizer import token_length
from chatterbox.testing import apply_det_weights, test_wav
from conftest import load_fixture
from test_hift import inventory


def det_tokenizer(config: ModelConfig | None = None) -> S3Tokenizer:
    tok = S3Tokenizer(config=config).eval()
    apply_det_weights(nn.ModuleDict({"tokenizer": tok}))  # names as inside S3Gen
    return tok


@pytest.fixture(scope="module")
def tokenizer() -> S3Tokenizer:
    return det_tokenizer()


def test_constants():
    assert (S3_SR, S3_HOP, S3_TOKEN_HOP, S3_TOKEN_RATE) == (16000, 160, 640, 25)
    assert (SPEECH_VOCAB_SIZE, SOS, EOS) == (6561, 6561, 6562)


def test_state_dict_matches_inventory(tokenizer):
    tok = tokenizer  # the rule fills parameters only: both buffers keep their computed values
    sd = {k: tuple(v.shape) for k, v in tok.state_dict().items()}
    inv = inventory("tokenizer.")
    assert len(inv) == 104
    assert sd == inv
    mel = librosa.filters.mel(sr=16000, n_fft=400, n_mels=128)
    assert torch.equal(tok._mel_filters, torch.from_numpy(mel).float())
    assert torch.equal(tok.window, torch.hann_window(400))


@pytest.mark.parametrize("fixture", ["s3gen", pytest.param("s3gen_meanflow", marks=pytest.mark.slow)])
def test_token_parity(tokenizer, fixture):
    t = load_fixture(fixture)[0]
    tokens, lens = tokenizer(t["wav16"][None])
    assert tokens.dtype == torch.int64 and lens.dtype == torch.int64
    assert torch.equal(lens, t["tokenizer_token_lens"])
    agree = (tokens == t["tokenizer_tokens"]).float().mean().item()
    assert agree >= 0.99  # measured 1.0
    assert torch.equal(tokens[:, :lens[0]], t["ref_prompt_token"][:, :lens[0]])


def test_lengths_max_len_and_batches(tokenizer):
    wav = load_fixture("s3gen")[0]["wav16"]
    assert [token_length(n) for n in (1, 4, 5, 300)] == [1, 1, 2, 75]
    tokens, lens = tokenizer(wav[:16000], max_len=10)  # 1-D input, truncated to 10 tokens
    assert tokens.shape == (1, 10) and lens.tolist() == [10]
    a, b = wav[:12800], wav[12800:25600]
    ta, _ = tokenizer(a)
    tb, _ = tokenizer([b.numpy()])
    both, lens = tokenizer(torch.stack([a, b]))
    assert lens.tolist() == [20, 20]
    assert torch.equal(both, torch.cat([ta, tb]))
    mixed, lens = tokenizer([a, b[:6400]])  # different lengths: padded batch
    assert lens.tolist() == [20, 10] and torch.equal(mixed[0], ta[0])
    padded = tokenizer.pad([wav[:1000]], S3_SR)[0]
    assert padded.shape == (1, 1280)


def test_long_input_windows_and_merge():
    """> 30 s: windows of 3000 frames every 2600, 50 tokens dropped at each inner edge (tiny encoder)."""
    torch.manual_seed(0)
    tok = det_tokenizer(ModelConfig(n_audio_state=64, n_audio_head=4, n_audio_layer=1))
    wav = test_wav(16000, 61.0, seed=1)  # 6100 frames -> windows at 0, 2600, 5200
    tokens, lens = tok(wav[None])
    mel = tok.log_mel_spectrogram(wav[None])[0]
    n = mel.shape[-1]
    assert n == 6100
    parts = []
    for start in range(0, n, 2600):
        seg = mel[:, start:start + 3000]
        m = seg.shape[-1]
        seg_tok, seg_len = tok.quantize(F.pad(seg, (0, 3000 - m))[None], torch.tensor([m]))
        parts.append(seg_tok[0, :seg_len[0]].long())
    keep = [p[(0 if i == 0 else 50):(len(p) if i == len(parts) - 1 else len(p) - 50)] for i, p in enumerate(parts)]
    ref = torch.cat(keep)
    assert lens.tolist() == [ref.numel()] and torch.equal(tokens[0], ref)
    # a short item in the same batch is padded to one window and matches its own short-path tokens
    short = wav[:32000]
    both, lens2 = tok([wav, short])
    own, own_len = tok(short[None])
    assert lens2.tolist() == [ref.numel(), own_len.item()]
    assert torch.equal(both[1, :own_len.item()], own[0])
    assert torch.all(both[1, own_len.item():] == 0)


def test_drop_invalid_tokens():
    x = torch.tensor([SOS, 1, 2, 3, EOS, 9])
    assert drop_invalid_tokens(x).tolist() == [1, 2, 3]
    assert drop_invalid_tokens(x[None]).tolist() == [[1, 2, 3]]
    assert drop_invalid_tokens(torch.tensor([1, 2, EOS, 4, EOS])).tolist() == [1, 2]
    assert drop_invalid_tokens(torch.tensor([5, SOS, 6])).tolist() == [6]
    assert drop_invalid_tokens(torch.tensor([4, 5])).tolist() == [4, 5]
    with pytest.raises(ValueError):
        drop_invalid_tokens(torch.zeros(2, 3, dtype=torch.long))
