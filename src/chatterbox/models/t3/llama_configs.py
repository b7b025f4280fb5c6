"""Backbone hyper-parameters for T3 (Llama for English/multilingual, GPT-2 for Turbo/Nano).

The dicts are passed to transformers' `LlamaConfig` / `GPT2Config`; their values fix the
checkpoint layout, so they must match upstream exactly.
"""

Llama_520M = dict(
    vocab_size=8,  # the backbone's token embedding is never used (inputs are embeddings)
    max_position_embeddings=131072,
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=30,
    num_attention_heads=16,
    num_key_value_heads=16,
    head_dim=64,
    attn_implementation="sdpa",
    tie_word_embeddings=False,
    hidden_act="silu",
    attention_bias=False,
    attention_dropout=0.0,
    mlp_bias=False,
    initializer_range=0.02,
    model_type="llama",
    pretraining_tp=1,
    rms_norm_eps=1e-05,
    rope_theta=500000.0,
    rope_scaling=dict(
        rope_type="llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    ),
    torch_dtype="bfloat16",  # informational only: parameters are created in the default dtype
    use_cache=True,
)


def _gpt2(n_embd: int, n_head: int, n_layer: int) -> dict:
    return dict(
        model_type="gpt2",
        architectures=["GPT2LMHeadModel"],
        activation_function="gelu_new",
        n_embd=n_embd,
        hidden_size=n_embd,
        n_head=n_head,
        n_layer=n_layer,
        n_ctx=8196,
        n_positions=8196,
        vocab_size=50276,
        layer_norm_epsilon=1e-05,
        attn_pdrop=0.1,
        embd_pdrop=0.1,
        resid_pdrop=0.1,
        bos_token_id=50256,
        eos_token_id=50256,
        initializer_range=0.02,
        n_special=0,
        predict_special_tokens=True,
    )


GPT2_medium = _gpt2(n_embd=1024, n_head=16, n_layer=24)
GPT2_small = _gpt2(n_embd=768, n_head=12, n_layer=12)

LLAMA_CONFIGS = {
    "Llama_520M": Llama_520M,
    "GPT2_medium": GPT2_medium,
    "GPT2_small": GPT2_small,
}
