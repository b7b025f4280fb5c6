"""CAM++ speaker encoder: state-dict layout, parity on deterministic weights, batching, no in-place ops."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from chatterbox.models.s3gen.xvector import CAMPPlus, extract_feature
from chatterbox.testing import apply_det_weights
from conftest import load_fixture, rel_err
from test_hift import inventory


@pytest.fixture(scope="module")
def campplus() -> CAMPPlus:
    model = CAMPPlus().eval()
    apply_det_weights(nn.ModuleDict({"speaker_encoder": model}))  # names as inside S3Gen
    return model


def test_state_dict_matches_inventory():
    sd = {k: tuple(v.shape) for k, v in CAMPPlus().state_dict().items()}
    inv = inventory("speaker_encoder.")
    assert len(inv) == 937
    assert sd == inv
    assert "xvector.dense.nonlinear.batchnorm.num_batches_tracked" in sd
    assert "xvector.dense.nonlinear.batchnorm.weight" not in sd  # affine-free


def test_no_inplace_modules():
    assert not any(getattr(m, "inplace", False) for m in CAMPPlus().modules())


@pytest.mark.parametrize("fixture", ["s3gen", pytest.param("s3gen_meanflow", marks=pytest.mark.slow)])
def test_parity_with_fixture(campplus, fixture):
    t = load_fixture(fixture)[0]
    emb = campplus.inference(t["wav16"][None])
    assert emb.shape == (1, 192) and emb.dtype == torch.float32
    assert rel_err(emb, t["xvector"]) <= 1e-4  # measured 2.0e-7
    # the ref dict's embedding is the same network on the same 16 kHz signal
    assert rel_err(emb, t["ref_embedding"]) <= 1e-4


def test_batch_and_list_inputs(campplus):
    wav = load_fixture("s3gen")[0]["wav16"][:16000]
    one = campplus.inference(wav[None])
    assert torch.allclose(campplus.inference([wav]), one, atol=1e-6)
    both = campplus.inference(torch.stack([wav, 0.5 * wav]))
    assert both.shape == (2, 192)
    assert torch.allclose(both[0], one[0], atol=1e-4)
    feats, lens, times = extract_feature([wav, wav[:8000]])
    assert feats.shape == (2, 98, 80) and lens == [98, 48] and times == [16000, 8000]
    assert torch.all(feats[1, 48:] == 0)  # zero padding after mean normalisation
    assert feats[0].mean(0).abs().max() < 1e-4  # per-utterance mean normalisation
