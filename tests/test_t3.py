"""T3: state-dict inventories, parity with upstream fixtures, StaticCache decoding, compile cleanliness."""
from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from conftest import load_fixture, read_inventory, rel_err
from chatterbox.models.t3 import T3, T3Cond, T3Config
from chatterbox.models.t3.inference import sampling
from chatterbox.models.t3.llama_configs import LLAMA_CONFIGS
from chatterbox.testing import det_state_dict

VARIANTS = {
    "t3_english": T3Config.english_only,
    "t3_multilingual": T3Config.multilingual,
    "t3_turbo": T3Config.turbo,
    "t3_nano": T3Config.nano,
}


def det_t3(hp: T3Config) -> T3:
    """A T3 filled by the deterministic-weight rule, built without random init."""
    with torch.device("meta"):
        shell = T3(hp)
    sd = det_state_dict(shell)
    return T3.from_state_dict(sd, hp)


@pytest.fixture(scope="module")
def english() -> T3:
    return det_t3(T3Config.english_only())


@pytest.fixture(scope="module")
def turbo() -> T3:
    hp = T3Config.turbo()
    with torch.device("meta"):
        shell = T3(hp)
    sd = det_state_dict(shell)  # includes tfmr.wte.weight, as real checkpoints do
    return T3.from_state_dict(sd, hp)


@pytest.fixture()
def tiny_llama(monkeypatch) -> T3:
    cfg = dict(LLAMA_CONFIGS["Llama_520M"], num_hidden_layers=2, intermediate_size=256,
               num_attention_heads=4, num_key_value_heads=4, head_dim=256)
    monkeypatch.setitem(LLAMA_CONFIGS, "tiny_llama", cfg)
    hp = T3Config.english_only()
    hp.llama_config_name = "tiny_llama"
    return det_t3(hp)


@pytest.fixture()
def tiny_gpt(monkeypatch) -> T3:
    cfg = dict(LLAMA_CONFIGS["GPT2_small"], n_layer=2)
    monkeypatch.setitem(LLAMA_CONFIGS, "tiny_gpt", cfg)
    hp = T3Config.nano()
    hp.llama_config_name = "tiny_gpt"
    return det_t3(hp)


def tiny_cond(hp: T3Config, seed: int = 0) -> T3Cond:
    g = torch.Generator().manual_seed(seed)
    return T3Cond(
        speaker_emb=torch.randn(1, 256, generator=g),
        cond_prompt_speech_tokens=torch.randint(0, 6561, (1, 40), generator=g),
        emotion_adv=0.5 * torch.ones(1, 1, 1) if hp.emotion_adv else None,
    )


# ---------------------------------------------------------------- state dicts
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_state_dict_matches_inventory(variant):
    hp = VARIANTS[variant]()
    with torch.device("meta"):
        model = T3(hp)
    if model.is_gpt:
        del model.tfmr.wte  # as upstream's loader does after its strict load
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == read_inventory(variant)
    assert list(ours) == list(read_inventory(variant))  # same order too


def test_state_dict_has_no_aliases_after_inference(tiny_llama):
    keys = set(tiny_llama.state_dict())
    tiny_llama.inference(t3_cond=tiny_cond(tiny_llama.hp), text_tokens=torch.tensor([[255, 3, 4, 0]]),
                         max_new_tokens=3)
    assert set(tiny_llama.state_dict()) == keys


# ---------------------------------------------------------------- parity with upstream (full size)
@pytest.mark.slow
def test_english_parity(english):
    fx, info = load_fixture("t3_english")
    cond = T3Cond(speaker_emb=fx["speaker_emb"], cond_prompt_speech_tokens=fx["cond_prompt_speech_tokens"],
                  emotion_adv=info["emotion_adv"] * torch.ones(1, 1, 1))
    embeds, len_cond = english.prepare_input_embeds(
        t3_cond=cond, text_tokens=fx["text_tokens"].expand(2, -1), speech_tokens=fx["speech_tokens"].expand(2, -1),
        cfg_weight=0.5)
    assert len_cond == info["len_cond"] == 34
    assert rel_err(embeds, fx["embeds"]) <= 1e-4
    hidden = english.tfmr(inputs_embeds=fx["embeds"], use_cache=False).last_hidden_state
    logits = english.speech_head(hidden[:, -fx["speech_tokens"].shape[1]:])
    assert rel_err(logits, fx["speech_logits"]) <= 1e-4

    s = info["sampler"]
    spec = sampling.SamplerSpec.llama(cfg=True, temperature=s["temperature"], min_p=s["min_p"], top_p=s["top_p"],
                                      repetition_penalty=s["repetition_penalty"])
    assert spec.order == ("rep", "temp", "min_p", "top_p")
    params = sampling.make_params(cfg_weight=s["cfg_weight"], repetition_penalty=s["repetition_penalty"],
                                  temperature=s["temperature"], min_p=s["min_p"], top_p=s["top_p"])
    seen = torch.zeros(1, 8194, dtype=torch.bool)
    seen[0, fx["speech_tokens"][0]] = True
    probs = torch.softmax(sampling.process_logits(fx["speech_logits"][:, -1], seen, params, spec), dim=-1)
    assert (probs - fx["sampler_probs"]).abs().max() <= 1e-5


@pytest.mark.slow
def test_turbo_parity(turbo):
    fx, info = load_fixture("t3_turbo")
    cond = T3Cond(speaker_emb=fx["speaker_emb"], cond_prompt_speech_tokens=fx["cond_prompt_speech_tokens"],
                  emotion_adv=None)
    embeds, len_cond = turbo.prepare_input_embeds(t3_cond=cond, text_tokens=fx["text_tokens"],
                                                  speech_tokens=fx["speech_tokens"])
    assert len_cond == info["len_cond"] == 376
    assert rel_err(embeds, fx["embeds"]) <= 1e-4
    hidden = turbo.tfmr(inputs_embeds=fx["embeds"], use_cache=False).last_hidden_state
    logits = turbo.speech_head(hidden[:, -fx["speech_tokens"].shape[1]:])
    assert rel_err(logits, fx["speech_logits"]) <= 1e-4


def _decode_cond(model: T3, fx, emotion):
    return T3Cond(speaker_emb=fx["speaker_emb"], cond_prompt_speech_tokens=fx["cond_prompt_speech_tokens"],
                  emotion_adv=None if emotion is None else emotion * torch.ones(1, 1, 1))


def _check_step_logits(model: T3, fx, cond, step, *, cfg_weight: float):
    """Prefill + one static-cache step per fixture token; compare every backbone call's logits."""
    prefill = model.prefill_embeds(cond, fx["text_tokens"], cfg_weight=cfg_weight)
    assert rel_err(prefill, fx["prefill_embeds"]) <= 1e-4
    B, L0, _ = prefill.shape
    ref = fx["step_logits"]  # (calls, B, V)
    model._activate_cache(B, L0 + ref.shape[0], None)
    logits = model._backend(prefill, model._cache, torch.arange(L0))
    assert rel_err(logits, ref[0]) <= 1e-4
    for k in range(1, ref.shape[0]):
        tok = fx["tokens"][0, k - 1]
        emb = model.speech_emb.weight[tok]
        if model.speech_pos_emb is not None:
            emb = emb + model.speech_pos_emb.emb.weight[k]
        logits = step(emb.view(1, 1, -1).expand(B, 1, -1), torch.tensor([L0 + k - 1]))
        assert rel_err(logits, ref[k]) <= 1e-4, f"step {k}"


@pytest.mark.slow
def test_english_decode_parity_eager_and_compiled(english):
    fx, info = load_fixture("t3_english_decode")
    cond = _decode_cond(english, fx, info["emotion_adv"])
    kw = dict(max_new_tokens=fx["tokens"].shape[1], temperature=0.8, cfg_weight=0.5, repetition_penalty=1.2,
              min_p=0.05, top_p=1.0, do_sample=False)
    _check_step_logits(english, fx, cond, english._step_compilation_target, cfg_weight=0.5)
    assert torch.equal(english.inference(t3_cond=cond, text_tokens=fx["text_tokens"], **kw), fx["tokens"])

    torch._dynamo.reset()
    counters.clear()
    english.decode_step = torch.compile(english._decode_one_token, fullgraph=True)
    try:
        out = english.inference(t3_cond=cond, text_tokens=fx["text_tokens"], **kw)
    finally:
        english.decode_step = english._decode_one_token
    assert torch.equal(out, fx["tokens"])
    assert sum(counters["graph_break"].values()) == 0


@pytest.mark.slow
def test_turbo_decode_parity_eager_and_compiled(turbo):
    fx, _ = load_fixture("t3_turbo_decode")
    cond = _decode_cond(turbo, fx, None)
    kw = dict(temperature=0.8, top_k=1000, top_p=0.95, repetition_penalty=1.2, max_gen_len=fx["tokens"].shape[1] - 1,
              do_sample=False)
    _check_step_logits(turbo, fx, cond, turbo._step_compilation_target, cfg_weight=0.0)
    assert torch.equal(turbo.inference_turbo(cond, fx["text_tokens"], **kw), fx["tokens"])

    torch._dynamo.reset()
    counters.clear()
    turbo.decode_step = torch.compile(turbo._decode_one_token, fullgraph=True)
    try:
        out = turbo.inference_turbo(cond, fx["text_tokens"], **kw)
    finally:
        turbo.decode_step = turbo._decode_one_token
    assert torch.equal(out, fx["tokens"])
    assert sum(counters["graph_break"].values()) == 0


# ---------------------------------------------------------------- compile cleanliness (small configs)
def test_step_compiles_fullgraph_zero_breaks(tiny_llama):
    model = tiny_llama
    torch._dynamo.reset()
    counters.clear()
    step = torch.compile(model._step_compilation_target, fullgraph=True)
    model._activate_cache(2, 64, None)
    prefill = torch.randn(2, 10, model.dim)
    model._backend(prefill, model._cache, torch.arange(10))
    eager_model_out = []
    for pos in range(10, 14):
        x = torch.randn(2, 1, model.dim, generator=torch.Generator().manual_seed(pos))
        eager_model_out.append(step(x, torch.tensor([pos])))
    assert sum(counters["graph_break"].values()) == 0
    assert counters["stats"]["unique_graphs"] == 1  # one graph serves every position
    assert eager_model_out[-1].shape == (2, model.hp.speech_tokens_dict_size)


@pytest.mark.parametrize("which", ["llama", "gpt"])
def test_eager_and_compiled_decode_give_identical_tokens(which, tiny_llama, tiny_gpt):
    model = tiny_llama if which == "llama" else tiny_gpt
    cond = tiny_cond(model.hp)
    text = torch.tensor([[255, 11, 12, 13, 14, 0]])

    def run():
        g = torch.Generator().manual_seed(1234)
        if which == "llama":
            return model.inference(t3_cond=cond, text_tokens=text, max_new_tokens=24, generator=g, top_p=0.9)
        return model.inference_turbo(cond, text, max_gen_len=24, generator=g)

    eager = run()
    torch._dynamo.reset()
    counters.clear()
    model.decode_step = torch.compile(model._decode_one_token, fullgraph=True)
    compiled = run()
    assert sum(counters["graph_break"].values()) == 0
    assert torch.equal(eager, compiled)
    assert eager.shape[1] >= 20  # random weights rarely stop early: the test compares real sequences
    # a different seed gives a different sequence (the generator is honoured)
    g = torch.Generator().manual_seed(99)
    other = (model.inference(t3_cond=cond, text_tokens=text, max_new_tokens=24, generator=g) if which == "llama"
             else model.inference_turbo(cond, text, max_gen_len=24, generator=g))
    assert not torch.equal(other[:, :5], eager[:, :5])


def test_same_seed_same_tokens_and_cfg_zero_path(tiny_llama):
    model, cond = tiny_llama, tiny_cond(tiny_llama.hp)
    text = torch.tensor([[255, 7, 8, 0]])
    a = model.inference(t3_cond=cond, text_tokens=text, max_new_tokens=16, generator=torch.Generator().manual_seed(5))
    b = model.inference(t3_cond=cond, text_tokens=text, max_new_tokens=16, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    # cfg_weight=0 runs one row (upstream crashes here); equals the conditional row of a CFG batch
    c = model.inference(t3_cond=cond, text_tokens=text, max_new_tokens=16, cfg_weight=0.0, do_sample=False)
    prefill = model.prefill_embeds(cond, text, cfg_weight=0.0)
    assert prefill.shape[0] == 1 and c.shape[0] == 1


# ---------------------------------------------------------------- stop handling
def test_stops_exactly_after_first_stop_token(tiny_llama):
    model, cond = tiny_llama, tiny_cond(tiny_llama.hp)
    text = torch.tensor([[255, 7, 8, 0]])
    stop = model.hp.stop_speech_token
    with torch.no_grad():  # make the stop token win from the 6th step on
        bias = torch.zeros(model.hp.speech_tokens_dict_size)
        bias[stop] = 1e4
        calls = {"n": 0}
        orig = model._step_compilation_target

        def step(emb, pos):
            calls["n"] += 1
            logits = orig(emb, pos)
            return logits + bias if calls["n"] >= 5 else logits

        model._step_compilation_target = step
        try:
            out = model.inference(t3_cond=cond, text_tokens=text, max_new_tokens=100, do_sample=False,
                                  repetition_penalty=1.0)
        finally:
            del model._step_compilation_target
    assert out.shape == (1, 6) and out[0, -1] == stop and (out[0, :-1] != stop).all()
    assert calls["n"] < 5 + 2 * model.stop_check_interval  # stopped within one check interval


def test_cache_buckets_are_reused(tiny_llama):
    model, cond = tiny_llama, tiny_cond(tiny_llama.hp)
    text = torch.tensor([[255, 7, 8, 0]])
    model.inference(t3_cond=cond, text_tokens=text, max_new_tokens=10)
    first = model._cache
    model.inference(t3_cond=cond, text_tokens=text, max_new_tokens=20)
    assert model._cache is first  # same bucket -> same static cache object (no reallocation)
    assert first.layers[0].max_cache_len == 256


# ---------------------------------------------------------------- clear errors
def test_bad_inputs_raise_clear_errors(tiny_llama):
    model, cond = tiny_llama, tiny_cond(tiny_llama.hp)
    with pytest.raises(ValueError, match="start-of-text"):
        model.inference(t3_cond=cond, text_tokens=torch.tensor([[7, 8, 0]]), max_new_tokens=4)
    with pytest.raises(ValueError, match="stop-of-text"):
        model.inference(t3_cond=cond, text_tokens=torch.tensor([[255, 7, 8]]), max_new_tokens=4)
    with pytest.raises(TypeError, match="integer"):
        model.inference(t3_cond=cond, text_tokens=torch.tensor([[255.0, 7.0, 0.0]]), max_new_tokens=4)
    too_long = torch.full((1, model.hp.max_text_tokens + 3), 5)
    too_long[0, 0], too_long[0, -1] = 255, 0
    with pytest.raises(ValueError, match="at most"):
        model.inference(t3_cond=cond, text_tokens=too_long, max_new_tokens=4)
    with pytest.raises(ValueError, match="max_cache_len"):
        model.inference(t3_cond=cond, text_tokens=torch.tensor([[255, 7, 0]]), max_new_tokens=200, max_cache_len=128)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.inference(t3_cond=cond, text_tokens=torch.tensor([[255, 7, 0]]), max_new_tokens=5000)


# ---------------------------------------------------------------- bf16
def test_bfloat16_decoding_matches_float32_prefix(tiny_llama):
    model, cond = tiny_llama, tiny_cond(tiny_llama.hp)
    text = torch.tensor([[255, 7, 8, 9, 0]])
    ref = model.inference(t3_cond=cond, text_tokens=text, max_new_tokens=8, do_sample=False)
    model.to(torch.bfloat16)
    try:
        out = model.inference(t3_cond=tiny_cond(model.hp), text_tokens=text, max_new_tokens=8, do_sample=False)
    finally:
        model.to(torch.float32)
    assert out.dtype == torch.long and out.shape == ref.shape
    assert torch.equal(out[:, :2], ref[:, :2])  # greedy bf16 agrees with fp32 on the first tokens
