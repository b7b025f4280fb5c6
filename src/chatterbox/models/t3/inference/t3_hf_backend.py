"""The thin backbone wrapper T3 decodes through: embeddings + cache position in, logits out.

Built once per T3 (not per call) and held outside the module tree, so `T3.state_dict()` keeps
exactly the checkpoint's keys.
"""
from __future__ import annotations

from torch import Tensor, nn
from transformers.cache_utils import Cache


class T3HuggingfaceBackend(nn.Module):
    """Runs the transformers backbone on input embeddings with a (static) KV cache and applies the speech head."""

    def __init__(self, config, llama: nn.Module, speech_enc: nn.Module, speech_head: nn.Module):
        super().__init__()
        self.config = config
        self.model = llama
        self.speech_enc = speech_enc
        self.speech_head = speech_head

    def forward(self, inputs_embeds: Tensor, past_key_values: Cache, cache_position: Tensor) -> Tensor:
        """(B, T, D) embeddings at positions `cache_position` (T,) -> speech logits of the last position (B, V)."""
        out = self.model(
            inputs_embeds=inputs_embeds,
            past_key_values=past_key_values,
            position_ids=cache_position[None],
            cache_position=cache_position,  # used by transformers < 5.3 static caches, ignored later
            use_cache=True,
        )
        return self.speech_head(out.last_hidden_state[:, -1])
