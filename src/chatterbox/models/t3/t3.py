"""T3: the text-to-speech-token transformer (Llama for English/multilingual, GPT-2 for Turbo/Nano).

The network only: weights (upstream's state-dict names), embeddings, the conditioning prefix and
the teacher-forced forward. Decoding (slot KV cache, per-row sampling, continuous batching) lives in
`chatterbox.runtime.t3_decoder`; `inference` / `inference_turbo` are upstream-compatible entry
points that decode one request synchronously through it.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import Tensor, nn
from transformers import GPT2Config, GPT2Model, LlamaConfig, LlamaModel

from ..utils import AttrDict
from .llama_configs import LLAMA_CONFIGS
from .modules.cond_enc import T3Cond, T3CondEnc
from .modules.learned_pos_emb import LearnedPositionEmbeddings
from .modules.t3_config import T3Config

logger = logging.getLogger(__name__)


class T3(nn.Module):
    """Token-to-token TTS model: [conditioning | text | speech] embeddings through a causal backbone."""

    def __init__(self, hp: Optional[T3Config] = None):
        super().__init__()
        hp = hp if hp is not None else T3Config.english_only()
        self.hp = hp
        cfg_dict = LLAMA_CONFIGS[hp.llama_config_name]
        self.is_gpt = cfg_dict["model_type"] == "gpt2"
        if self.is_gpt:
            self.cfg = GPT2Config(**cfg_dict)
            self.tfmr = GPT2Model(self.cfg)
        else:
            self.cfg = LlamaConfig(**cfg_dict)
            self.tfmr = LlamaModel(self.cfg)
        self.dim = self.cfg.hidden_size

        self.cond_enc = T3CondEnc(hp)
        self.text_emb = nn.Embedding(hp.text_tokens_dict_size, self.dim)
        self.speech_emb = nn.Embedding(hp.speech_tokens_dict_size, self.dim)
        self.text_pos_emb = None
        self.speech_pos_emb = None
        if hp.input_pos_emb == "learned":
            self.text_pos_emb = LearnedPositionEmbeddings(hp.max_text_tokens + 2, self.dim)
            self.speech_pos_emb = LearnedPositionEmbeddings(hp.max_speech_tokens + 2 + 2, self.dim)
        self.text_head = nn.Linear(self.dim, hp.text_tokens_dict_size, bias=False)
        self.speech_head = nn.Linear(self.dim, hp.speech_tokens_dict_size, bias=self.is_gpt)


    @classmethod
    def from_state_dict(cls, state_dict: dict, hp: Optional[T3Config] = None, *, strict: bool = True) -> "T3":
        """Build a T3 directly from a checkpoint dict: no random init, weights assigned (fast loading).

        Turbo/Nano checkpoints carry the unused GPT-2 token embedding `tfmr.wte.weight`; it is
        accepted and dropped, as upstream's loader does after its strict load.
        """
        hp = hp if hp is not None else T3Config.english_only()
        with torch.device("meta"):
            model = cls(hp)
        if "model" in state_dict and not torch.is_tensor(state_dict["model"]):  # legacy wrapping
            state_dict = state_dict["model"][0]
        own = model.state_dict()
        wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state_dict.items()
                 if k in own and torch.is_tensor(v) and tuple(v.shape) != tuple(own[k].shape)]
        if wrong:
            raise ValueError(f"T3 checkpoint does not fit the {hp.llama_config_name} T3 layout (wrong variant?): "
                             + "; ".join(wrong[:4]))
        dtype = torch.get_default_dtype()  # upstream copies every checkpoint into float32 parameters
        state_dict = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in state_dict.items()}
        model.load_state_dict(state_dict, strict=strict, assign=True)
        if model.is_gpt and hasattr(model.tfmr, "wte"):
            del model.tfmr.wte
        model._rebuild_rope()
        leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if leftover:
            raise ValueError(f"checkpoint is missing tensors: {leftover[:5]}{' ...' if len(leftover) > 5 else ''}")
        return model.eval()

    def _rebuild_rope(self) -> None:
        """Recompute the non-persistent RoPE tables in float32 on the model's device (from the config)."""
        rope = getattr(self.tfmr, "rotary_emb", None)
        if rope is None:
            return
        fresh = type(rope)(config=self.cfg)
        dev = self.speech_head.weight.device
        rope.inv_freq = fresh.inv_freq.to(dev)
        rope.original_inv_freq = fresh.original_inv_freq.to(dev)

    def _apply(self, fn, recurse=True):
        # `.to(bfloat16)` & co. would round RoPE's inverse frequencies (0.3 % error, ~0.5 rad at 500
        # positions); keep them float32 after any dtype/device change, as transformers computes them.
        out = super()._apply(fn, recurse)
        rope = getattr(self.tfmr, "rotary_emb", None)
        if rope is not None and not rope.inv_freq.is_meta and rope.inv_freq.dtype != torch.float32:
            self._rebuild_rope()
        return out

    @property
    def device(self) -> torch.device:
        return self.speech_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.speech_head.weight.dtype

    # ------------------------------------------------------------------ embeddings
    def prepare_conditioning(self, t3_cond: T3Cond) -> Tensor:
        """Conditioning prefix (B, len_cond, D). Embeds the prompt tokens once and caches them on `t3_cond`, as upstream."""
        if t3_cond.cond_prompt_speech_tokens is not None and t3_cond.cond_prompt_speech_emb is None:
            t3_cond.cond_prompt_speech_emb = self.embed_prompt_tokens(t3_cond.cond_prompt_speech_tokens)
        cond = T3Cond(
            speaker_emb=t3_cond.speaker_emb.to(self.device, self.dtype),
            clap_emb=t3_cond.clap_emb,
            cond_prompt_speech_tokens=t3_cond.cond_prompt_speech_tokens,
            cond_prompt_speech_emb=None if t3_cond.cond_prompt_speech_emb is None
            else t3_cond.cond_prompt_speech_emb.to(self.device, self.dtype),
            emotion_adv=t3_cond.emotion_adv.to(self.device, self.dtype) if torch.is_tensor(t3_cond.emotion_adv)
            else t3_cond.emotion_adv,
        )
        return self.cond_enc(cond)

    def embed_prompt_tokens(self, tokens: Tensor) -> Tensor:
        """Speech-prompt tokens (1, P) -> embeddings (1, P, D) (plus learned positions for Llama variants)."""
        tokens = tokens.to(self.device)
        emb = self.speech_emb(tokens)
        return emb + self.speech_pos_emb(tokens) if not self.is_gpt else emb

    def prepare_input_embeds(self, *, t3_cond: T3Cond, text_tokens: Tensor, speech_tokens: Tensor,
                             cfg_weight: float = 0.0) -> tuple[Tensor, int]:
        """[cond | text | speech] -> (B, len_cond + T + S, D), len_cond. With CFG, row 1 is unconditional (text zeroed)."""
        cond_emb = self.prepare_conditioning(t3_cond)  # (1 or B, len_cond, D)
        text_emb = self.text_emb(text_tokens)  # (B, T, D)
        if cfg_weight > 0.0 and not self.is_gpt:
            if text_emb.shape[0] < 2:
                raise ValueError("cfg_weight > 0 needs the text batch as [cond, uncond] rows (batch >= 2)")
            text_emb = torch.cat([text_emb[:1], torch.zeros_like(text_emb[1:2]), text_emb[2:]])
        speech_emb = self.speech_emb(speech_tokens)  # (B, S, D)
        if self.hp.input_pos_emb == "learned":
            text_emb = text_emb + self.text_pos_emb(text_tokens)
            speech_emb = speech_emb + self.speech_pos_emb(speech_tokens)
        len_cond = cond_emb.shape[1]
        cond_emb = cond_emb.expand(text_emb.shape[0], -1, -1)
        return torch.cat([cond_emb, text_emb, speech_emb], dim=1), len_cond

    def forward(self, *, t3_cond: T3Cond, text_tokens: Tensor, text_token_lens: Tensor, speech_tokens: Tensor,
                speech_token_lens: Tensor, training: bool = False) -> AttrDict:
        """Teacher-forced pass: logits for every text and speech position (zeroed past each row's length)."""
        self.check_text_tokens(text_tokens)
        embeds, len_cond = self.prepare_input_embeds(t3_cond=t3_cond, text_tokens=text_tokens, speech_tokens=speech_tokens)
        hidden = self.tfmr(inputs_embeds=embeds, use_cache=False).last_hidden_state  # (B, L, D)
        T, S = text_tokens.shape[1], speech_tokens.shape[1]
        ar_t = torch.arange(T, device=hidden.device)
        ar_s = torch.arange(S, device=hidden.device)
        text_latents = hidden[:, len_cond:len_cond + T] * (ar_t[None] < text_token_lens[:, None])[..., None]
        speech_latents = hidden[:, len_cond + T:len_cond + T + S] * (ar_s[None] < speech_token_lens[:, None])[..., None]
        return AttrDict(
            text_logits=self.text_head(text_latents),
            text_latents=text_latents,
            speech_logits=self.speech_head(speech_latents),
            speech_latents=speech_latents,
            hidden_states=hidden,
        )

    # ------------------------------------------------------------------ decoding
    def check_text_tokens(self, text_tokens: Tensor, check_bot_eot: bool = True) -> None:
        """Raise TypeError/ValueError for non-integer, over-long or (Llama) start/stop-less text tokens."""
        if not torch.is_tensor(text_tokens) or text_tokens.is_floating_point() or text_tokens.is_complex():
            raise TypeError(f"text_tokens must be an integer tensor, got {getattr(text_tokens, 'dtype', type(text_tokens))}")
        if text_tokens.shape[-1] > self.hp.max_text_tokens + 2:
            raise ValueError(f"text is {text_tokens.shape[-1]} tokens long; this model takes at most "
                             f"{self.hp.max_text_tokens} (plus start/stop). Split the text into shorter chunks.")
        if check_bot_eot:
            rows = torch.atleast_2d(text_tokens).cpu()
            if not bool((rows == self.hp.start_text_token).any(dim=1).all()):
                raise ValueError(f"text_tokens rows must contain the start-of-text token {self.hp.start_text_token}")
            if not bool((rows == self.hp.stop_text_token).any(dim=1).all()):
                raise ValueError(f"text_tokens rows must contain the stop-of-text token {self.hp.stop_text_token}")

    def prefill_embeds(self, t3_cond: T3Cond, text_tokens: Tensor, *, cfg_weight: float = 0.0,
                       initial_speech_tokens: Optional[Tensor] = None) -> Tensor:
        """The backbone's first input as upstream's loops build it: (B, L0, D), B = 2 with CFG.

        Llama: [cond | text | start-of-speech] plus the start token appended again (both at speech
        position 0). GPT-2: [cond | text | start-of-speech].
        """
        return self.prefill_parts(t3_cond, text_tokens, cfg_weight=cfg_weight,
                                  initial_speech_tokens=initial_speech_tokens)[0]

    def prefill_parts(self, t3_cond: T3Cond, text_tokens: Tensor, *, cfg_weight: float = 0.0,
                      initial_speech_tokens: Optional[Tensor] = None) -> tuple[Tensor, int]:
        """`prefill_embeds` and the length of its conditioning prefix (the same in every row, per voice)."""
        device = self.device
        text = torch.atleast_2d(text_tokens).to(device=device, dtype=torch.long)[:1]
        B = 2 if (cfg_weight > 0.0 and not self.is_gpt) else 1
        text = text.expand(B, -1)
        if initial_speech_tokens is None:
            speech = torch.full((B, 1), self.hp.start_speech_token, dtype=torch.long, device=device)
        else:
            speech = torch.atleast_2d(initial_speech_tokens).to(device=device, dtype=torch.long)[:1].expand(B, -1)
        embeds, len_cond = self.prepare_input_embeds(t3_cond=t3_cond, text_tokens=text, speech_tokens=speech,
                                                     cfg_weight=cfg_weight if not self.is_gpt else 0.0)
        if self.is_gpt:
            return embeds, len_cond
        bos_emb = self.speech_emb.weight[self.hp.start_speech_token] + self.speech_pos_emb.emb.weight[0]
        return torch.cat([embeds, bos_emb.view(1, 1, -1).expand(B, 1, -1)], dim=1), len_cond

    # ------------------------------------------------------------------ upstream-compatible decoding
    @torch.inference_mode()
    def inference(self, *, t3_cond: T3Cond, text_tokens: Tensor, initial_speech_tokens: Optional[Tensor] = None,
                  prepend_prompt_speech_tokens: Optional[Tensor] = None, num_return_sequences: int = 1,
                  max_new_tokens: Optional[int] = None, stop_on_eos: bool = True, do_sample: bool = True,
                  temperature: float = 0.8, top_p: float = 0.95, min_p: float = 0.05, length_penalty: float = 1.0,
                  repetition_penalty: float = 1.2, cfg_weight: float = 0.5,
                  generator: Optional[torch.Generator] = None, max_cache_len: Optional[int] = None) -> Tensor:
        """English/multilingual decoding of one request (upstream's semantics, including its doubled start token).

        text_tokens: (T,) or (B, T) with start/stop text tokens; row 0 is used. Returns (1, N) speech
        ids ending with the stop token if one was sampled. `do_sample=False` decodes greedily;
        `generator` makes sampling reproducible; `max_cache_len` caps the cache (error if too small).
        Upstream-compatibility arguments accepted and not used (as upstream): `num_return_sequences`,
        `stop_on_eos`, `length_penalty`.
        """
        from ...runtime import t3_decoder as dec

        if prepend_prompt_speech_tokens is not None:
            raise NotImplementedError("prepend_prompt_speech_tokens is not supported (upstream neither)")
        req = dec.llama_request(self, t3_cond, text_tokens, dec.SamplingParams(
            temperature=temperature, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty,
            cfg_weight=cfg_weight, greedy=not do_sample), 1000 if max_new_tokens is None else max_new_tokens,
            generator, initial_speech_tokens=initial_speech_tokens)
        tokens, stopped = dec.decode_one(self, req, max_cache_len=max_cache_len)
        ids = tokens + ([self.hp.stop_speech_token] if stopped else [])
        return torch.tensor(ids, dtype=torch.long, device=self.device)[None]

    @torch.inference_mode()
    def inference_turbo(self, t3_cond: T3Cond, text_tokens: Tensor, temperature: float = 0.8, top_k: int = 1000,
                        top_p: float = 0.95, repetition_penalty: float = 1.2, max_gen_len: int = 1000, *,
                        do_sample: bool = True, generator: Optional[torch.Generator] = None,
                        max_cache_len: Optional[int] = None) -> Tensor:
        """Turbo/Nano decoding of one request (GPT-2, no CFG). Returns (1, N) ids, N <= 1 + max_gen_len, stop token dropped."""
        from ...runtime import t3_decoder as dec

        req = dec.gpt_request(self, t3_cond, text_tokens, dec.SamplingParams(
            temperature=temperature, top_k=top_k, top_p=top_p, min_p=0.0, repetition_penalty=repetition_penalty,
            greedy=not do_sample), int(max_gen_len) + 1, generator)
        tokens, _ = dec.decode_one(self, req, max_cache_len=max_cache_len)
        return torch.tensor(tokens, dtype=torch.long, device=self.device)[None]
