"""T3 hyper-parameters (upstream's `T3Config`, as a dataclass with the same fields and presets)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..llama_configs import LLAMA_CONFIGS

ENGLISH_TEXT_VOCAB = 704
MULTILINGUAL_TEXT_VOCAB = 2454
GPT2_TEXT_VOCAB = 50276


@dataclass
class T3Config:
    text_tokens_dict_size: int = ENGLISH_TEXT_VOCAB
    start_text_token: int = 255
    stop_text_token: int = 0
    max_text_tokens: int = 2048

    start_speech_token: int = 6561
    stop_speech_token: int = 6562
    speech_tokens_dict_size: int = 8194
    max_speech_tokens: int = 4096

    llama_config_name: str = "Llama_520M"
    input_pos_emb: Optional[str] = "learned"
    speech_cond_prompt_len: int = 150

    encoder_type: str = "voice_encoder"
    speaker_embed_size: int = 256
    use_perceiver_resampler: bool = True
    emotion_adv: bool = True

    @property
    def n_channels(self) -> int:
        return LLAMA_CONFIGS[self.llama_config_name]["hidden_size"]

    @property
    def is_multilingual(self) -> bool:
        return self.text_tokens_dict_size == MULTILINGUAL_TEXT_VOCAB

    @property
    def is_gpt(self) -> bool:
        return LLAMA_CONFIGS[self.llama_config_name]["model_type"] == "gpt2"

    @classmethod
    def english_only(cls) -> "T3Config":
        return cls(text_tokens_dict_size=ENGLISH_TEXT_VOCAB)

    @classmethod
    def multilingual(cls) -> "T3Config":
        return cls(text_tokens_dict_size=MULTILINGUAL_TEXT_VOCAB)

    @classmethod
    def turbo(cls) -> "T3Config":
        """Chatterbox-Turbo: GPT-2 medium, no learned positions, no Perceiver, no emotion input."""
        return cls(
            text_tokens_dict_size=GPT2_TEXT_VOCAB,
            speech_tokens_dict_size=6563,
            llama_config_name="GPT2_medium",
            input_pos_emb=None,
            speech_cond_prompt_len=375,
            use_perceiver_resampler=False,
            emotion_adv=False,
        )

    @classmethod
    def nano(cls) -> "T3Config":
        """Chatterbox-Nano: the Turbo layout on a GPT-2 small backbone."""
        hp = cls.turbo()
        hp.llama_config_name = "GPT2_small"
        return hp
