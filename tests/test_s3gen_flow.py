"""S3Gen flow (token -> mel): inventories, parity on deterministic weights, exact padding, compile cleanliness.

Full-size inductor compiles of the estimator take minutes on a 2-core CPU, so CI checks compile
numerics on a reduced-depth flow built from the same module classes, and checks the full-size
modules for graph breaks with dynamo alone (backend "eager"). Set CHATTERBOX_FULL_COMPILE_TESTS=1
to run the full-size inductor comparison as well.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from conftest import FIXTURES, load_fixture, rel_err
from chatterbox.models.s3gen.decoder import ConditionalDecoder
from chatterbox.models.s3gen.flow import CausalMaskedDiffWithXvec
from chatterbox.models.s3gen.flow_matching import CausalConditionalCFM, draw_noise, time_span
from chatterbox.models.s3gen.transformer.attention import rel_shift
from chatterbox.models.s3gen.transformer.embedding import EspnetRelPositionalEncoding
from chatterbox.models.s3gen.transformer.upsample_encoder import UpsampleConformerEncoder
from chatterbox.models.s3gen.utils.mask import add_optional_chunk_mask, make_pad_mask
from chatterbox.testing import apply_det_weights, det_tensor

S3GEN_DIR = Path(__file__).resolve().parents[1] / "src" / "chatterbox" / "models" / "s3gen"


def inventory(name: str, prefix: str = "") -> dict[str, tuple[int, ...]]:
    """Entries of tests/fixtures/<name>.tsv under `prefix` (prefix stripped), in file order."""
    out = {}
    for line in (FIXTURES / f"{name}.tsv").read_text().splitlines()[1:]:
        key, shape, _dtype, _kind = line.split("\t")
        if key.startswith(prefix):
            out[key[len(prefix):]] = tuple(int(s) for s in shape.split("x")) if shape not in ("", "scalar") else ()
    return out


def build_flow(meanflow: bool = False, tiny: bool = False) -> CausalMaskedDiffWithXvec:
    """S3Gen's flow (as `S3Gen` builds it), or a reduced-depth one with the same module classes."""
    if tiny:
        enc = UpsampleConformerEncoder(input_size=64, output_size=64, attention_heads=2, linear_units=128,
                                       num_blocks=1, num_up_blocks=1)
        est = ConditionalDecoder(channels=[32], attention_head_dim=16, n_blocks=1, num_mid_blocks=1,
                                 num_heads=2, meanflow=meanflow)
        flow = CausalMaskedDiffWithXvec(input_size=64, encoder=enc,
                                        decoder=CausalConditionalCFM(spk_emb_dim=80, estimator=est))
        return apply_det_weights(flow).eval()
    enc = UpsampleConformerEncoder(output_size=512, attention_heads=8, linear_units=2048, num_blocks=6,
                                   input_size=512)
    est = ConditionalDecoder(in_channels=320, out_channels=80, causal=True, channels=[256], dropout=0.0,
                             attention_head_dim=64, n_blocks=4, num_mid_blocks=12, num_heads=8, act_fn="gelu",
                             meanflow=meanflow)
    flow = CausalMaskedDiffWithXvec(encoder=enc, decoder=CausalConditionalCFM(spk_emb_dim=80, estimator=est))
    # weights keyed by the names in S3Gen's state dict ("flow." + ...), as the fixtures were made
    flow.load_state_dict({k: det_tensor("flow." + k, v.shape) for k, v in flow.state_dict().items()}, strict=True)
    return flow.eval()


@pytest.fixture(scope="module")
def flows() -> dict[str, CausalMaskedDiffWithXvec]:
    return {"s3gen": build_flow(False), "s3gen_meanflow": build_flow(True)}


def fixture_noise(t: dict, meanflow: bool) -> torch.Tensor:
    """Upstream's effective initial CFM sample: meanflow's draw overwrites the frames after the prompt."""
    z = t["cfm_noise"]
    if meanflow:
        g = t["meanflow_noise"].size(-1)
        z = torch.cat([z[..., : z.size(-1) - g], t["meanflow_noise"]], dim=-1)
    return z


def run_flow(flow, tokens, prompt_tokens, prompt_feat, embedding, noise, n_timesteps, meanflow, lens=None):
    lens = torch.full((tokens.size(0),), tokens.size(1)) if lens is None else lens
    mel, _ = flow.inference(tokens, lens, prompt_tokens, torch.tensor([prompt_tokens.size(1)]), prompt_feat, None,
                            embedding, True, n_timesteps=n_timesteps, meanflow=meanflow, noise=noise)
    return mel


# ------------------------------------------------------------------------------------- unit tests
def test_no_host_syncs_or_inplace_in_sources():
    files = ["utils/mask.py", "flow.py", "flow_matching.py", "decoder.py", "s3gen.py",
             *(f"transformer/{p.name}" for p in (S3GEN_DIR / "transformer").glob("*.py"))]
    bad = re.compile(r"\.item\(\)|\.tolist\(\)|inplace\s*=\s*True")
    for f in files:
        src = (S3GEN_DIR / f).read_text()
        assert not bad.search(src), f"{f}: {bad.search(src).group(0)}"


@pytest.mark.parametrize("meanflow", [False, True])
def test_flow_state_dict_matches_inventory(meanflow):
    name = "s3gen_meanflow" if meanflow else "s3gen"
    with torch.device("meta"):
        est = ConditionalDecoder(meanflow=meanflow)
        flow = CausalMaskedDiffWithXvec(encoder=UpsampleConformerEncoder(),
                                        decoder=CausalConditionalCFM(spk_emb_dim=80, estimator=est))
    ours = {k: tuple(v.shape) for k, v in flow.state_dict().items()}
    assert ours == inventory(name, "flow.")
    assert list(ours) == list(inventory(name, "flow."))  # same order as upstream


def test_make_pad_mask_and_chunk_mask():
    lengths = torch.tensor([5, 3, 2])
    m = make_pad_mask(lengths, 6)
    assert m.shape == (3, 6) and m.dtype == torch.bool
    assert m.sum(1).tolist() == [1, 3, 4]
    assert torch.equal(make_pad_mask(lengths), make_pad_mask(lengths, 5))
    keys = ~m[:, None]
    assert add_optional_chunk_mask(torch.zeros(3, 6, 4), keys) is keys  # no chunking at inference
    chunked = add_optional_chunk_mask(torch.zeros(3, 6, 4), keys, static_chunk_size=2)
    assert chunked.shape == (3, 6, 6) and not chunked[0, 0, 2] and chunked[0, 2, 3]


def test_rel_shift_and_position_table():
    t = 7
    x = torch.randn(2, 3, t, 2 * t - 1)
    i, j = torch.meshgrid(torch.arange(t), torch.arange(t), indexing="ij")
    assert torch.equal(rel_shift(x), x[:, :, i, j + t - 1 - i])
    pe = EspnetRelPositionalEncoding(16, max_len=50)
    assert "pe" not in pe.state_dict()  # non-persistent, moved by .to()
    emb = pe.position_encoding(size=t)  # rows r = t-1 ... -(t-1)
    r = (t - 1 - torch.arange(2 * t - 1)).float()[:, None]
    freq = torch.exp(torch.arange(0, 16, 2).float() * -(torch.log(torch.tensor(10000.0)) / 16))
    assert torch.allclose(emb[0, :, 0::2], torch.sin(r * freq), atol=1e-6)
    assert torch.allclose(emb[0, :, 1::2], torch.cos(r * freq), atol=1e-6)
    assert torch.allclose(pe.position_encoding(size=60)[0, 60 - t: 60 + t - 1], emb[0], atol=1e-5)  # beyond table


def test_time_grid():
    cos10 = time_span(10, cosine=True)
    expect = [0, 0.012312, 0.048943, 0.108993, 0.190983, 0.292893, 0.412215, 0.546009, 0.690983, 0.843566, 1.0]
    assert torch.allclose(cos10, torch.tensor(expect), atol=1e-6)
    assert time_span(2, cosine=False).tolist() == [0.0, 0.5, 1.0]


def test_out_of_range_tokens_raise_value_error():
    flow = build_flow(tiny=True)
    feat, emb = torch.zeros(1, 4, 80), torch.randn(1, 192)
    for bad in (6561, -1):
        with pytest.raises(ValueError, match="speech tokens"):
            run_flow(flow, torch.tensor([[1, 2, bad]]), torch.tensor([[1, 2]]), feat, emb, None, 2, False)


def test_same_generator_seed_same_mel():
    flow = build_flow(tiny=True)
    args = (torch.tensor([[5, 6, 7]]), torch.full((1,), 3), torch.tensor([[1, 2]]), torch.tensor([2]),
            torch.randn(1, 4, 80), None, torch.randn(1, 192), True)
    a, _ = flow.inference(*args, n_timesteps=2, generator=torch.Generator().manual_seed(3))
    b, _ = flow.inference(*args, n_timesteps=2, generator=torch.Generator().manual_seed(3))
    c, _ = flow.inference(*args, n_timesteps=2, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (1, 80, 6)


def test_noise_is_drawn_on_the_generators_device():
    """A generator on another device than the model (CPU generator, "meta" model here): the draw is
    made on the generator's device, in float32, moved to the target, and advances it by exactly the draw."""
    g, ref = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    z = draw_noise((2, 80, 7), g, device="meta", dtype=torch.bfloat16)
    assert z.device.type == "meta" and z.shape == (2, 80, 7) and z.dtype == torch.bfloat16
    torch.randn(2, 80, 7, generator=ref)
    assert torch.equal(g.get_state(), ref.get_state())
    # the values are the generator's float32 draw, whatever the target dtype
    a = draw_noise((1, 80, 3), torch.Generator().manual_seed(1), "cpu", torch.bfloat16)
    b = torch.randn(1, 80, 3, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    assert torch.equal(a, b)


def test_streaming_finalize_false_drops_lookahead_frames():
    """finalize=False: the last 3 tokens' 6 frames wait for look-ahead (upstream fails with a shape error)."""
    flow = build_flow(tiny=True)
    toks = torch.tensor([[5, 6, 7, 8, 9]])
    args = (toks, torch.full((1,), 5), torch.tensor([[1, 2]]), torch.tensor([2]), torch.randn(1, 4, 80), None,
            torch.randn(1, 192))
    mel, _ = flow.inference(*args, False, n_timesteps=2, generator=torch.Generator().manual_seed(0))
    assert mel.shape == (1, 80, 2 * 5 - 6)


# ------------------------------------------------------------------------------ parity (full size)
@pytest.mark.slow
@pytest.mark.parametrize("name", ["s3gen", "s3gen_meanflow"])
def test_flow_mel_parity(flows, name):
    t, info = load_fixture(name)
    meanflow = info["meanflow"]
    p = t["ref_prompt_token"]
    mel = run_flow(flows[name], t["speech_tokens"], p, t["ref_prompt_feat"], t["ref_embedding"],
                   fixture_noise(t, meanflow), 2 if meanflow else 10, meanflow)
    err = rel_err(mel, t["mel"])
    print(f"{name}: flow mel rel err {err:.2e}")
    assert err <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("name", ["s3gen", "s3gen_meanflow"])
def test_padding_to_bucket_is_exact(flows, name):
    """Tokens padded to a bucket length (batched, different lengths) give the unpadded mels, cut back."""
    t, info = load_fixture(name)
    meanflow = info["meanflow"]
    flow, steps = flows[name], 2
    prompt, feat, emb = t["ref_prompt_token"][:, :10], t["ref_prompt_feat"][:, :20], t["ref_embedding"]
    toks = t["speech_tokens"][:, :12]
    g = torch.Generator().manual_seed(0)
    lens, bucket = [7, 12], 16
    singles, noises = [], []
    for n in lens:
        z = torch.randn(1, 80, 2 * (10 + n), generator=g)
        noises.append(torch.nn.functional.pad(z, (0, 2 * (bucket - n))))
        singles.append(run_flow(flow, toks[:, :n], prompt, feat, emb, z, steps, meanflow))
    padded = torch.zeros(2, bucket, dtype=torch.long)
    for row, n in enumerate(lens):
        padded[row, :n] = toks[0, :n]
    out = run_flow(flow, padded, prompt, feat, emb, torch.cat(noises), steps, meanflow, lens=torch.tensor(lens))
    assert out.shape == (2, 80, 2 * bucket)
    for row, n in enumerate(lens):
        err = rel_err(out[row: row + 1, :, : 2 * n], singles[row])
        print(f"{name}: bucket padding, {n} tokens, rel err {err:.2e}")
        assert err <= 1e-5


# ------------------------------------------------------------------------------------- compile
def _graph_breaks() -> int:
    return sum(counters["graph_break"].values())


@pytest.mark.slow
@pytest.mark.extended  # the tiny flows compile fullgraph by default (test_compiled_matches_eager_on_two_lengths)
def test_full_size_flow_traces_without_graph_breaks(flows):
    """Dynamo alone (backend="eager") over the full-size flow: one graph, zero breaks, both variants."""
    t, _ = load_fixture("s3gen")
    for name, flow in flows.items():
        meanflow = name.endswith("meanflow")
        torch._dynamo.reset()
        counters.clear()
        fn = torch.compile(flow.forward_mel, backend="eager", fullgraph=True)
        n, p = 6, 4
        toks, prompt = t["speech_tokens"][:, :n], t["ref_prompt_token"][:, :p]
        noise = torch.randn(1, 80, 2 * (n + p))
        args = (toks, torch.tensor([n]), prompt, torch.tensor([p]), t["ref_prompt_feat"][:, : 2 * p],
                t["ref_embedding"], noise, 2, meanflow)
        out = fn(*args)
        assert _graph_breaks() == 0
        assert rel_err(out, flow.forward_mel(*args)) <= 1e-6
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.parametrize("meanflow", [False, True])
def test_compiled_matches_eager_on_two_lengths(meanflow):
    """Inductor, fullgraph, static shapes: the compiled regions vs eager at two lengths.

    CFM: the encoder and the estimator (the regions the runtime compiles, `S3Gen.compile_regions`)
    on their own at both lengths. Meanflow: the whole flow at one length (its encoder is the same
    code, and its estimator, r input included, is inside that graph). Compile time dominates CI time,
    so each graph is compiled where it adds something.
    """
    full = os.environ.get("CHATTERBOX_FULL_COMPILE_TESTS") == "1"
    flow = build_flow(meanflow, tiny=not full)
    torch._dynamo.reset()
    counters.clear()
    # static shapes: one compile per length bucket, as the runtime does at warm-up
    enc = torch.compile(flow.encoder, fullgraph=True, dynamic=False)
    est = torch.compile(flow.decoder.estimator, fullgraph=True, dynamic=False)
    whole = torch.compile(flow.forward_mel, fullgraph=True, dynamic=False)
    g = torch.Generator().manual_seed(1)
    p = 5
    prompt = torch.randint(0, 6561, (1, p), generator=g)
    feat, emb = torch.randn(1, 2 * p, 80, generator=g), torch.randn(1, 192, generator=g)
    for n in (6,) if meanflow and not full else (6, 11):
        T = 2 * (n + p)
        if full or not meanflow:
            x = torch.randn(1, n + p, flow.input_size, generator=g)
            lens = torch.tensor([n + p])
            err = rel_err(enc(x, lens)[0], flow.encoder(x, lens)[0])
            print(f"meanflow={meanflow} n={n}: compiled vs eager encoder rel err {err:.2e}")
            assert err <= 1e-3

            xs = torch.randn(2, 80, T, generator=g)
            mask = torch.ones(2, 1, T)
            mask[1, :, T - 3:] = 0
            tt, spk = torch.rand(2, generator=g), torch.randn(2, 80, generator=g)
            r = tt + 0.5 if meanflow else None
            err = rel_err(est(xs, mask, xs, tt, spk, xs, r), flow.decoder.estimator(xs, mask, xs, tt, spk, xs, r))
            print(f"meanflow={meanflow} n={n}: compiled vs eager estimator rel err {err:.2e}")
            assert err <= 1e-3

        if full or meanflow:
            toks = torch.randint(0, 6561, (1, n), generator=g)
            noise = torch.randn(1, 80, T, generator=g)
            args = (toks, torch.tensor([n]), prompt, torch.tensor([p]), feat, emb, noise, 2, meanflow)
            err = rel_err(whole(*args), flow.forward_mel(*args))
            print(f"meanflow={meanflow} n={n}: compiled vs eager flow mel rel err {err:.2e}")
            assert err <= 1e-3
    assert _graph_breaks() == 0
    torch._dynamo.reset()
