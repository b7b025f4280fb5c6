"""T3: the text-to-speech-token transformer (Llama for English/multilingual, GPT-2 for Turbo/Nano).

Decoding runs on a transformers `StaticCache` allocated per length bucket. One decode step is a
pure tensor program (`_decode_one_token` -> `_step_compilation_target`) that `torch.compile`
captures whole; sampling happens on the device with noise drawn beforehand, the stop token is
noticed without a host sync on every token, and tokens are trimmed exactly afterwards.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Callable, Optional

import torch
import torch._dynamo
from torch import Tensor, nn
from transformers import GPT2Config, GPT2Model, LlamaConfig, LlamaModel
from transformers.cache_utils import StaticCache

from ..utils import AttrDict
from .inference import sampling
from .inference.decode import StopWatcher, cache_bucket, trim_after_stop
from .inference.t3_hf_backend import T3HuggingfaceBackend
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

        # Decode-time state lives outside the module tree so state_dict() keeps the checkpoint's keys.
        object.__setattr__(self, "_backend", T3HuggingfaceBackend(self.cfg, self.tfmr, self.speech_emb, self.speech_head))
        self._caches: "OrderedDict[tuple, StaticCache]" = OrderedDict()
        self._cache: Optional[StaticCache] = None
        self._noise_buf: Optional[Tensor] = None
        self.cache_pool_size = 2  # static caches kept alive (one per batch size / bucket / dtype / device)
        self.stop_check_interval = 8  # steps between looks at the device-side stop flag
        # The runtime may replace this with a compiled version of `_decode_one_token` (same signature).
        self.decode_step: Callable = self._decode_one_token

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
        if hasattr(model.tfmr, "rotary_emb"):  # non-persistent RoPE tables: recompute from the config
            model.tfmr.rotary_emb = type(model.tfmr.rotary_emb)(config=model.cfg)
        leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if leftover:
            raise ValueError(f"checkpoint is missing tensors: {leftover[:5]}{' ...' if len(leftover) > 5 else ''}")
        return model.eval()

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
        self._check_text_tokens(text_tokens)
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

    # ------------------------------------------------------------------ decode step (compiled region)
    def _step_compilation_target(self, token_embeds: Tensor, cache_position: Tensor) -> Tensor:
        """One backbone step on the active static cache: (B, 1, D) embeddings at `cache_position` (1,) -> logits (B, V)."""
        return self._backend(token_embeds, self._cache, cache_position)

    def _decode_one_token(self, token: Tensor, seen: Tensor, done: Tensor, step: Tensor, base: Tensor,
                          params: Tensor, gumbel: Tensor, spec: sampling.SamplerSpec, batch: int):
        """Feed the last token (1,) and sample the next one, all on the device.

        step (1,): index s of this step (the fed token is generated token s+1); base (1,): prefill length.
        Returns (next token (1,), seen (1, V), done (1,)).
        """
        emb = self.speech_emb.weight[token]  # (1, D)
        if self.speech_pos_emb is not None:
            emb = emb + self.speech_pos_emb.emb.weight[step + 1]
        emb = emb[:, None].expand(batch, 1, -1)  # (B, 1, D)
        logits = self._step_compilation_target(emb, base + step)
        x = sampling.process_logits(logits, seen, params, spec)
        nxt = sampling.sample(x, gumbel[step + 1])
        if self.is_gpt:  # upstream stops when every logit was filtered out
            nxt = torch.where(torch.isneginf(x).all(dim=-1), torch.full_like(nxt, self.hp.stop_speech_token), nxt)
        seen = seen.scatter(1, nxt[:, None], True)
        done = done | (nxt == self.hp.stop_speech_token)
        return nxt, seen, done

    # ------------------------------------------------------------------ decoding
    def _check_text_tokens(self, text_tokens: Tensor, check_bot_eot: bool = True) -> None:
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

    def _activate_cache(self, batch: int, needed: int, max_cache_len: Optional[int]) -> int:
        """Select (or allocate) the static cache for this request and rewind it; returns its length."""
        if max_cache_len is None:
            max_cache_len = cache_bucket(needed)
        elif needed > max_cache_len:
            raise ValueError(f"this request needs {needed} cache positions (prompt + max_new_tokens) "
                             f"but max_cache_len={max_cache_len}; raise max_cache_len or lower max_new_tokens")
        limit = self.cfg.max_position_embeddings if not self.is_gpt else self.cfg.n_positions
        if needed > limit:
            raise ValueError(f"prompt + max_new_tokens = {needed} exceeds the backbone's {limit} positions")
        key = (batch, max_cache_len, self.dtype, self.device)
        cache = self._caches.pop(key, None)
        if cache is None:
            cache = StaticCache(config=self.cfg, max_cache_len=max_cache_len)
            while len(self._caches) >= max(self.cache_pool_size, 1):
                self._caches.popitem(last=False)
        else:
            cache.reset()
        self._caches[key] = cache
        self._cache = cache
        return max_cache_len

    def _sampling_noise(self, rows: int, generator: Optional[torch.Generator], greedy: bool) -> Tensor:
        """Gumbel noise for `rows` draws in a persistent buffer (a fixed address keeps CUDA graphs valid)."""
        buf = self._noise_buf
        if buf is None or buf.shape[0] < rows or buf.device != self.device:
            buf = torch.empty(cache_bucket(rows), self.hp.speech_tokens_dict_size, device=self.device)
            if self.device.type == "cuda":
                torch._dynamo.mark_static_address(buf)
            self._noise_buf = buf
        if greedy:
            buf[:rows].zero_()
        else:
            sampling.fill_gumbel_(buf[:rows], generator)
        return buf

    def _decode(self, prefill: Tensor, *, seen: Tensor, spec: sampling.SamplerSpec, params: Tensor,
                max_new_tokens: int, generator: Optional[torch.Generator], greedy: bool,
                max_cache_len: Optional[int], reset_seen_after_first: bool, keep_stop: bool,
                on_step: Optional[Callable[[int], None]] = None) -> Tensor:
        """Prefill, then sample up to `max_new_tokens` tokens; returns (1, N) ids trimmed at the first stop token."""
        device, B, L0 = prefill.device, prefill.shape[0], prefill.shape[1]
        self._activate_cache(B, L0 + max_new_tokens, max_cache_len)
        gumbel = self._sampling_noise(max_new_tokens + 1, generator, greedy)
        steps = torch.arange(max_new_tokens, device=device)
        base = torch.full((1,), L0, dtype=torch.long, device=device)

        logits = self._backend(prefill, self._cache, torch.arange(L0, device=device))
        x = sampling.process_logits(logits, seen, params, spec)
        token = sampling.sample(x, gumbel[0])
        if reset_seen_after_first:
            seen = torch.zeros_like(seen)
        seen = seen.scatter(1, token[:, None], True)
        done = token == self.hp.stop_speech_token
        out = torch.empty(max_new_tokens, dtype=torch.long, device=device)  # generated ids, written by index
        out[:1] = token
        n = 1
        watcher = StopWatcher(device)
        for s in range(max_new_tokens - 1):
            if s % self.stop_check_interval == 0 and watcher.poll(done):
                break
            token, seen, done = self.decode_step(token, seen, done, steps[s:s + 1], base, params, gumbel, spec, B)
            out[s + 1:s + 2] = token  # a copy: under CUDA graphs the step's outputs are overwritten by the next replay
            n = s + 2
            if on_step is not None:
                on_step(s + 2)
        return trim_after_stop(out[:n], self.hp.stop_speech_token, keep_stop)

    def prefill_embeds(self, t3_cond: T3Cond, text_tokens: Tensor, *, cfg_weight: float = 0.0,
                       initial_speech_tokens: Optional[Tensor] = None) -> Tensor:
        """The backbone's first input as upstream's loops build it: (B, L0, D), B = 2 with CFG.

        Llama: [cond | text | start-of-speech] plus the start token appended again (both at speech
        position 0). GPT-2: [cond | text | start-of-speech].
        """
        device = self.device
        text = torch.atleast_2d(text_tokens).to(device=device, dtype=torch.long)[:1]
        B = 2 if (cfg_weight > 0.0 and not self.is_gpt) else 1
        text = text.expand(B, -1)
        if initial_speech_tokens is None:
            speech = torch.full((B, 1), self.hp.start_speech_token, dtype=torch.long, device=device)
        else:
            speech = torch.atleast_2d(initial_speech_tokens).to(device=device, dtype=torch.long)[:1].expand(B, -1)
        embeds, _ = self.prepare_input_embeds(t3_cond=t3_cond, text_tokens=text, speech_tokens=speech,
                                              cfg_weight=cfg_weight if not self.is_gpt else 0.0)
        if self.is_gpt:
            return embeds
        bos_emb = self.speech_emb.weight[self.hp.start_speech_token] + self.speech_pos_emb.emb.weight[0]
        return torch.cat([embeds, bos_emb.view(1, 1, -1).expand(B, 1, -1)], dim=1)

    @torch.inference_mode()
    def inference(self, *, t3_cond: T3Cond, text_tokens: Tensor, initial_speech_tokens: Optional[Tensor] = None,
                  prepend_prompt_speech_tokens: Optional[Tensor] = None, num_return_sequences: int = 1,
                  max_new_tokens: Optional[int] = None, stop_on_eos: bool = True, do_sample: bool = True,
                  temperature: float = 0.8, top_p: float = 0.95, min_p: float = 0.05, length_penalty: float = 1.0,
                  repetition_penalty: float = 1.2, cfg_weight: float = 0.5,
                  generator: Optional[torch.Generator] = None, max_cache_len: Optional[int] = None,
                  on_step: Optional[Callable[[int], None]] = None) -> Tensor:
        """English/multilingual decoding (upstream's semantics, including its doubled start token).

        text_tokens: (T,) or (B, T) with start/stop text tokens; with cfg_weight > 0 row 0 is used
        for both CFG rows. Returns (1, N) speech ids ending with the stop token if one was sampled.
        `do_sample=False` decodes greedily; `generator` makes sampling reproducible.
        """
        if prepend_prompt_speech_tokens is not None:
            raise NotImplementedError("prepend_prompt_speech_tokens is not supported (upstream neither)")
        self._check_text_tokens(text_tokens)
        max_new_tokens = 1000 if max_new_tokens is None else int(max_new_tokens)
        if not 1 <= max_new_tokens <= self.hp.max_speech_tokens:
            raise ValueError(f"max_new_tokens must be in [1, {self.hp.max_speech_tokens}], got {max_new_tokens}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        device = self.device
        use_cfg = cfg_weight > 0.0
        prefill = self.prefill_embeds(t3_cond, text_tokens, cfg_weight=cfg_weight, initial_speech_tokens=initial_speech_tokens)
        spec = sampling.SamplerSpec.llama(cfg=use_cfg, temperature=temperature, min_p=min_p, top_p=top_p,
                                          repetition_penalty=repetition_penalty)
        params = sampling.make_params(cfg_weight=cfg_weight, repetition_penalty=float(repetition_penalty),
                                      temperature=temperature, min_p=min_p, top_p=top_p, device=device)
        seen = torch.zeros(1, self.hp.speech_tokens_dict_size, dtype=torch.bool, device=device)
        seen[0, self.hp.start_speech_token] = True
        return self._decode(prefill, seen=seen, spec=spec, params=params, max_new_tokens=max_new_tokens,
                            generator=generator, greedy=not do_sample, max_cache_len=max_cache_len,
                            reset_seen_after_first=False, keep_stop=True, on_step=on_step)

    @torch.inference_mode()
    def inference_turbo(self, t3_cond: T3Cond, text_tokens: Tensor, temperature: float = 0.8, top_k: int = 1000,
                        top_p: float = 0.95, repetition_penalty: float = 1.2, max_gen_len: int = 1000, *,
                        do_sample: bool = True, generator: Optional[torch.Generator] = None,
                        max_cache_len: Optional[int] = None, on_step: Optional[Callable[[int], None]] = None) -> Tensor:
        """Turbo/Nano decoding (GPT-2, no CFG, no start/stop text tokens). Returns (1, N) ids, N <= 1 + max_gen_len, stop token dropped."""
        self._check_text_tokens(text_tokens, check_bot_eot=False)
        max_gen_len = int(max_gen_len)
        if max_gen_len < 0:
            raise ValueError(f"max_gen_len must be >= 0, got {max_gen_len}")
        device = self.device
        prefill = self.prefill_embeds(t3_cond, text_tokens)
        spec = sampling.SamplerSpec.gpt(temperature=temperature, top_k=top_k, top_p=top_p,
                                        repetition_penalty=repetition_penalty)
        params = sampling.make_params(repetition_penalty=float(repetition_penalty), temperature=temperature,
                                      top_p=top_p, device=device)
        seen = torch.zeros(1, self.hp.speech_tokens_dict_size, dtype=torch.bool, device=device)
        seen[0, self.hp.start_speech_token] = True  # only the first draw is penalised on the start token
        return self._decode(prefill, seen=seen, spec=spec, params=params, max_new_tokens=max_gen_len + 1,
                            generator=generator, greedy=not do_sample, max_cache_len=max_cache_len,
                            reset_seen_after_first=True, keep_stop=False, on_step=on_step)
