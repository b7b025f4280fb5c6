"""T3 decoding on a slot KV cache: many requests, per-row positions, one fixed-shape step.

The gpt-fast pattern extended to continuous batching. The decoder owns a KV cache of `slots` rows
x `max_len` positions (one buffer pair per layer, written by index), and per-row state buffers
(last token, position, repetition-penalty mask, sampler settings, noise). A request takes one slot
(two with classifier-free guidance: its conditional and unconditional rows), is prefilled into it,
and then advances one token per `step()` together with every other active request; finished rows
free their slots, which the next request reuses. The step is one pure tensor function of fixed
shape per (active-prefix bucket, attention-length bucket), so a compiled step (CUDA graphs on GPU)
stays valid while requests come and go.

The backbone is run here from the network's own modules (`T3.tfmr`'s layers, norms, projections),
so the checkpoint layout is untouched; only the attention over the slot cache is written out.

Host bookkeeping never syncs per token: generated tokens are recorded in a device ring and copied to
the host every `stop_check_interval` steps (asynchronously, double-buffered, on CUDA), where stop
tokens are found, requests are trimmed exactly and their slots freed. The host therefore runs at
most two intervals ahead of what it has seen (a finished row decodes a few wasted steps).
CUDA-graph rule: every output of the step is copied into the persistent buffers before the next
call; nothing returned by a replay is kept.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.t3.inference import sampling
from ..models.t3.inference.sampling import SamplingParams

__all__ = ["T3Decoder", "DecodeRequest", "SamplingParams", "SlotCache", "PrefixCache", "PackedLinears", "voice_key",
           "llama_request", "gpt_request", "decode_one", "decode_all", "CollectSink"]

logger = logging.getLogger(__name__)

NOISE_BLOCK = 16  # sampling-noise rows drawn per request at a time (a fixed part of the draw order)
LEN_BUCKET = 256  # cache lengths and attention lengths are multiples of this


def round_up(n: int, m: int = LEN_BUCKET) -> int:
    return max(m, -(-n // m) * m)


def default_row_buckets(slots: int) -> tuple[int, ...]:
    """Active-prefix sizes the step runs on: powers of two up to `slots` (and `slots` itself)."""
    out, b = [], 1
    while b < slots:
        out.append(b)
        b *= 2
    return tuple(out + [slots])


# ------------------------------------------------------------------------------------ cache
class SlotCache(nn.Module):
    """Per-layer key/value buffers (slots, kv_heads, max_len, head_dim), written by (row, position)."""

    def __init__(self, n_layers: int, slots: int, kv_heads: int, max_len: int, head_dim: int, dtype, device):
        super().__init__()
        self.slots, self.max_len = slots, max_len
        for i in range(n_layers):
            self.register_buffer(f"k{i}", torch.zeros(slots, kv_heads, max_len, head_dim, dtype=dtype, device=device),
                                 persistent=False)
            self.register_buffer(f"v{i}", torch.zeros(slots, kv_heads, max_len, head_dim, dtype=dtype, device=device),
                                 persistent=False)
        self.n_layers = n_layers
        if torch.device(device).type == "cuda":
            for b in self.buffers():
                torch._dynamo.mark_static_address(b)

    def layer(self, i: int) -> tuple[Tensor, Tensor]:
        return getattr(self, f"k{i}"), getattr(self, f"v{i}")

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())


def _attend(q: Tensor, k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, pos: Tensor, kv_len: int,
            n: int, scale: float) -> Tensor:
    """Write this step's k/v (n, Hkv, 1, Dh) at `pos` (n,) and attend q (n, H, 1, Dh) over [0, kv_len)."""
    rows = torch.arange(n, device=q.device)
    k_cache[rows, :, pos] = k[:, :, 0]
    v_cache[rows, :, pos] = v[:, :, 0]
    keys, values = k_cache[:n, :, :kv_len], v_cache[:n, :, :kv_len]
    mask = (torch.arange(kv_len, device=q.device)[None, :] <= pos[:, None])[:, None, None, :]  # (n, 1, 1, kv_len)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale,
                                          enable_gqa=q.shape[1] != keys.shape[1])


# ------------------------------------------------------------------------------------ CPU weight packing
class PackedLinears:
    """CPU: the backbone's linear weights reordered once for oneDNN, so small-batch matmuls run at memory speed.

    MKL's GEMM re-packs a weight on every call at small batch: a Turbo decode step of 8 rows cost
    3x one row (measured, 2-core CPU); with prepacked weights it costs about one row's weight read,
    which is what batching is for. Costs a second copy of the backbone weights in host memory.
    Built from one network's weights; `valid_for` says whether they are still those.
    """

    def __init__(self, modules: list[nn.Module], dtype: torch.dtype):
        self.dtype = dtype
        self._packed: dict[nn.Module, tuple[Tensor, Tensor, Optional[Tensor], int]] = {}
        for m in modules:
            w = m.weight if isinstance(m, nn.Linear) else m.weight.t().contiguous()  # Conv1D is (in, out)
            self._packed[m] = (m.weight, torch.ops.mkldnn._reorder_linear_weight(w.detach()), m.bias, w.shape[0])

    @staticmethod
    def supported(device: torch.device, dtype: torch.dtype) -> bool:
        return (device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and torch.backends.mkldnn.is_available()
                and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))

    def valid_for(self, modules: list[nn.Module], dtype: torch.dtype) -> bool:
        return dtype == self.dtype and len(modules) == len(self._packed) and all(
            m in self._packed and self._packed[m][0] is m.weight for m in modules)

    def nbytes(self) -> int:
        return sum(w.numel() * w.element_size() for w, *_ in self._packed.values())

    def __call__(self, m: nn.Module, x: Tensor) -> Tensor:
        entry = self._packed.get(m)
        if entry is None:
            return m(x)
        _, packed, bias, out = entry
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), packed, bias, "none", [], "")
        return y.view(*x.shape[:-1], out)


def _plain(m: nn.Module, x: Tensor) -> Tensor:
    return m(x)


# ------------------------------------------------------------------------------------ backbones
def _prefill_attend(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, rows: Tensor, start: int,
                    pos: Tensor, scale: float) -> Tensor:
    """Write a prefill's k/v (R, Hkv, L, Dh) at positions `pos` = start..start+L-1 of cache rows `rows`, and
    attend q (R, H, L, Dh) causally over those rows' keys [0, start + L) (the cached prefix included)."""
    length = q.shape[2]
    k_cache[rows, :, start:start + length] = k
    v_cache[rows, :, start:start + length] = v
    gqa = q.shape[1] != k.shape[1]
    if start == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    keys, values = k_cache[rows, :, :start + length], v_cache[rows, :, :start + length]
    mask = torch.arange(start + length, device=q.device)[None, :] <= pos[:, None]  # (L, start + L)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale, enable_gqa=gqa)


class Backbone(Protocol):
    def prefill(self, x: Tensor, rows: Tensor, cache: SlotCache, lengths: Optional[Tensor] = None,
                start: int = 0) -> Tensor: ...
    def step(self, x: Tensor, pos: Tensor, cache: SlotCache, n: int, kv_len: int) -> Tensor: ...


def _last(x: Tensor, lengths: Optional[Tensor]) -> Tensor:
    """Each row's hidden state at its last real position: (R, L, D) -> (R, D)."""
    if lengths is None:
        return x[:, -1]
    return x[torch.arange(x.shape[0], device=x.device), lengths - 1]


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (B, H, T, Dh) by cos/sin (B, 1, T, Dh) (transformers' rotate-half convention)."""
    h = x.shape[-1] // 2
    rot = torch.cat([-x[..., h:], x[..., :h]], dim=-1)
    return x * cos + rot * sin


class LlamaBackbone:
    """The Llama layers of `tfmr` (a transformers LlamaModel) run over a slot cache. RoPE stays float32."""

    def __init__(self, tfmr: nn.Module, cfg):
        self.layers, self.norm = tfmr.layers, tfmr.norm
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scale = self.head_dim ** -0.5
        rope = type(tfmr.rotary_emb)(config=cfg)  # float32 tables from the config, whatever the model dtype
        self.inv_freq = rope.inv_freq.float().to(tfmr.norm.weight.device)
        self.rope_scaling = float(rope.attention_scaling)
        self.n_layers = len(self.layers)
        self.lin: Callable[[nn.Module, Tensor], Tensor] = _plain  # or a PackedLinears (CPU)

    def linears(self) -> list[nn.Module]:
        return [m for layer in self.layers for m in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                                                     layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj,
                                                     layer.mlp.down_proj)]

    def _mlp(self, mlp, x: Tensor) -> Tensor:
        return self.lin(mlp.down_proj, mlp.act_fn(self.lin(mlp.gate_proj, x)) * self.lin(mlp.up_proj, x))

    def _cos_sin(self, pos: Tensor, dtype) -> tuple[Tensor, Tensor]:
        freqs = pos[..., None].float() * self.inv_freq  # (B, T, Dh/2) float32
        emb = torch.cat([freqs, freqs], dim=-1)
        return (emb.cos() * self.rope_scaling).to(dtype)[:, None], (emb.sin() * self.rope_scaling).to(dtype)[:, None]

    def _qkv(self, attn, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, t, _ = h.shape
        q = self.lin(attn.q_proj, h).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.lin(attn.k_proj, h).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.lin(attn.v_proj, h).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        return q, k, v

    def prefill(self, x: Tensor, rows: Tensor, cache: SlotCache, lengths: Optional[Tensor] = None,
                start: int = 0) -> Tensor:
        """x (R, L, D) at positions start..start+L-1 into cache rows `rows` (R,) -> last hidden state (R, D).

        `start`: positions [0, start) of those rows already hold keys/values (a cached voice prefix),
        which the new positions attend to. `lengths` (R,): rows padded at the end (several requests
        prefilled together); padded keys are never attended: real queries see only earlier keys
        (causal), each row's decode steps mask keys past its own position and overwrite the padded
        cache entries as they go.
        """
        r, length, _ = x.shape
        pos = start + torch.arange(length, device=x.device)
        cos, sin = self._cos_sin(pos[None].expand(r, -1), x.dtype)
        for i, layer in enumerate(self.layers):
            h = layer.input_layernorm(x)
            q, k, v = self._qkv(layer.self_attn, h)
            q, k = _rope(q, cos, sin), _rope(k, cos, sin)
            kc, vc = cache.layer(i)
            a = _prefill_attend(q, k, v, kc, vc, rows, start, pos, self.scale)
            x = x + self.lin(layer.self_attn.o_proj, a.transpose(1, 2).reshape(r, length, -1))
            x = x + self._mlp(layer.mlp, layer.post_attention_layernorm(x))
        return self.norm(_last(x, lengths))

    def step(self, x: Tensor, pos: Tensor, cache: SlotCache, n: int, kv_len: int) -> Tensor:
        """x (n, 1, D) at per-row positions `pos` (n,) -> hidden state (n, D)."""
        cos, sin = self._cos_sin(pos[:, None], x.dtype)
        for i, layer in enumerate(self.layers):
            h = layer.input_layernorm(x)
            q, k, v = self._qkv(layer.self_attn, h)
            q, k = _rope(q, cos, sin), _rope(k, cos, sin)
            kc, vc = cache.layer(i)
            a = _attend(q, kc, vc, k, v, pos, kv_len, n, self.scale)
            x = x + self.lin(layer.self_attn.o_proj, a.transpose(1, 2).reshape(n, 1, -1))
            x = x + self._mlp(layer.mlp, layer.post_attention_layernorm(x))
        return self.norm(x[:, -1])


class GPT2Backbone:
    """The GPT-2 blocks of `tfmr` (a transformers GPT2Model) run over a slot cache (learned positions `wpe`)."""

    def __init__(self, tfmr: nn.Module, cfg):
        self.blocks, self.wpe, self.ln_f = tfmr.h, tfmr.wpe, tfmr.ln_f
        self.n_heads = cfg.n_head
        self.n_kv = cfg.n_head
        self.dim = cfg.n_embd
        self.head_dim = cfg.n_embd // cfg.n_head
        self.scale = self.head_dim ** -0.5 if getattr(cfg, "scale_attn_weights", True) else 1.0
        if getattr(cfg, "scale_attn_by_inverse_layer_idx", False) or getattr(cfg, "reorder_and_upcast_attn", False):
            raise NotImplementedError("GPT-2 attention variants other than the standard one are not supported")
        self.n_layers = len(self.blocks)
        self.lin: Callable[[nn.Module, Tensor], Tensor] = _plain  # or a PackedLinears (CPU)

    def linears(self) -> list[nn.Module]:
        return [m for b in self.blocks for m in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj)]

    def _mlp(self, mlp, x: Tensor) -> Tensor:
        return self.lin(mlp.c_proj, mlp.act(self.lin(mlp.c_fc, x)))  # dropout: identity in eval

    def _qkv(self, attn, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, t, _ = h.shape
        q, k, v = self.lin(attn.c_attn, h).split(self.dim, dim=2)
        shape = (b, t, self.n_heads, self.head_dim)
        return q.view(shape).transpose(1, 2), k.view(shape).transpose(1, 2), v.view(shape).transpose(1, 2)

    def prefill(self, x: Tensor, rows: Tensor, cache: SlotCache, lengths: Optional[Tensor] = None,
                start: int = 0) -> Tensor:
        """As `LlamaBackbone.prefill`, with GPT-2's learned positions."""
        r, length, _ = x.shape
        pos = start + torch.arange(length, device=x.device)
        x = x + self.wpe(pos)[None]
        for i, block in enumerate(self.blocks):
            q, k, v = self._qkv(block.attn, block.ln_1(x))
            kc, vc = cache.layer(i)
            a = _prefill_attend(q, k, v, kc, vc, rows, start, pos, self.scale)
            x = x + self.lin(block.attn.c_proj, a.transpose(1, 2).reshape(r, length, -1))
            x = x + self._mlp(block.mlp, block.ln_2(x))
        return self.ln_f(_last(x, lengths))

    def step(self, x: Tensor, pos: Tensor, cache: SlotCache, n: int, kv_len: int) -> Tensor:
        x = x + self.wpe(pos)[:, None]
        for i, block in enumerate(self.blocks):
            q, k, v = self._qkv(block.attn, block.ln_1(x))
            kc, vc = cache.layer(i)
            a = _attend(q, kc, vc, k, v, pos, kv_len, n, self.scale)
            x = x + self.lin(block.attn.c_proj, a.transpose(1, 2).reshape(n, 1, -1))
            x = x + self._mlp(block.mlp, block.ln_2(x))
        return self.ln_f(x[:, -1])


def make_backbone(t3) -> Backbone:
    return GPT2Backbone(t3.tfmr, t3.cfg) if t3.is_gpt else LlamaBackbone(t3.tfmr, t3.cfg)


# ------------------------------------------------------------------------------------ voice prefix cache
def voice_key(t3_cond) -> tuple:
    """What a voice's conditioning prefix depends on (besides the network): one key per voice and exaggeration.

    Small CPU tensors (the exaggeration) count by value; other tensors by identity and version (an
    in-place change makes a new key; inference-mode tensors have no version: replace, don't mutate,
    a voice's tensors). The key holds the tensors, so their ids cannot be reused while it is cached.
    """
    parts = []
    for name in ("speaker_emb", "clap_emb", "cond_prompt_speech_tokens", "cond_prompt_speech_emb", "emotion_adv"):
        v = getattr(t3_cond, name, None)
        if torch.is_tensor(v) and v.device.type == "cpu" and v.numel() <= 16:
            parts.append((name, "value", str(v.dtype), tuple(v.shape), tuple(v.reshape(-1).tolist())))
        elif torch.is_tensor(v):
            parts.append((name, "tensor", v, None if v.is_inference() else v._version))
        else:
            parts.append((name, "value", v))
    return tuple(parts)


def _same_key(a: tuple, b: tuple) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if len(x) != len(y) or x[1] != y[1]:
            return False
        if x[1] == "tensor":
            if x[2] is not y[2] or x[3] != y[3]:
                return False
        elif x != y:
            return False
    return True


@dataclass(eq=False)
class PrefixEntry:
    """A voice prefix's keys/values: per layer (kv_heads, P, head_dim)."""

    key: tuple
    length: int
    dtype: torch.dtype
    device: torch.device
    k: list[Tensor]
    v: list[Tensor]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))


class PrefixCache:
    """Least-recently-used voice prefixes, bounded in bytes (device memory). Used from one thread.

    The voice prompt is the leading part of every prefill (251 of 305 positions for Turbo) and the
    same for every request with that voice: computing its keys/values once turns the per-request
    prefill into a short one over the text. Entries are bound to one network's weights and dtype.
    """

    def __init__(self, max_bytes: int = 256 * 2 ** 20):
        self.max_bytes = max_bytes
        self._entries: list[PrefixEntry] = []  # most recently used last
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple, length: int, dtype: torch.dtype, device: torch.device) -> Optional[PrefixEntry]:
        for i, e in enumerate(self._entries):
            if e.length == length and e.dtype == dtype and e.device == device and _same_key(e.key, key):
                self._entries.append(self._entries.pop(i))
                self.hits += 1
                return e
        self.misses += 1
        return None

    def put(self, entry: PrefixEntry) -> None:
        if entry.nbytes() > self.max_bytes:
            return
        self._entries.append(entry)
        while self.nbytes() > self.max_bytes:
            self._entries.pop(0)

    def nbytes(self) -> int:
        return sum(e.nbytes() for e in self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()


# ------------------------------------------------------------------------------------ requests
@dataclass(eq=False)
class DecodeRequest:
    """What one T3 request needs: its prefill embeddings and how to sample.

    prefill: (R, L0, D) on the model device, R = 2 with CFG (row 1 unconditional), else 1.
    prefix_len: the first `prefix_len` positions (speaker, voice prompt, emotion) are prefilled on
    their own, so that requests with the same voice reuse their keys/values (`PrefixCache`).
    seen_first: token ids the repetition penalty applies to in the first draw (upstream: the start token).
    reset_seen_after_first: Turbo forgets `seen_first` after the first draw (upstream's quirk).
    """

    prefill: Tensor
    sampling: SamplingParams
    max_new_tokens: int
    generator: Optional[torch.Generator] = None
    seen_first: tuple[int, ...] = ()
    reset_seen_after_first: bool = False
    prefix_len: int = 0  # leading prefill positions that are the voice's conditioning (identical in every row)
    prefix_key: Optional[tuple] = None  # identifies that prefix (`voice_key`): its keys/values are cached by it

    @property
    def rows(self) -> int:
        return self.prefill.shape[0]

    @property
    def prompt_len(self) -> int:
        return self.prefill.shape[1]


class TokenSink(Protocol):
    """Where a request's tokens go (the scheduler's per-request stream implements it)."""

    def put(self, tokens: list[int]) -> None: ...
    def finish(self, stopped: bool) -> None: ...
    def fail(self, error: BaseException) -> None: ...


@dataclass(eq=False)
class _Row:
    """Host-side state of an admitted request."""

    req: DecodeRequest
    sink: TokenSink
    slots: list[int]  # [cond] or [cond, uncond]
    g0: int  # global step at admission: step g0 + i - 1 produces token i (token 0 comes from the prefill)
    first_host: Tensor  # (1,) the prefill's token, copied to the host asynchronously
    g_end: Optional[int] = None  # global step at which the slots were released (exclusive)
    delivered: int = 0  # tokens handed to the sink
    first_sent: bool = False
    done: bool = False  # finished (stopped, reached max_new_tokens, cancelled or failed)
    cancelled: bool = False

    @property
    def slot(self) -> int:
        return self.slots[0]

    def last_step(self) -> int:
        """The global step that produces this row's final allowed token (max_new_tokens - 1)."""
        return self.g0 + self.req.max_new_tokens - 2


# ------------------------------------------------------------------------------------ decoder
class _DoneEvent:
    """Stand-in for a CUDA event where copies are synchronous (CPU)."""

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class T3Decoder:
    """Slot-cache decoding for one T3 network: admit requests, step all of them, deliver tokens.

    Not thread-safe: one thread (the scheduler's worker, or a caller decoding synchronously) drives it.
    """

    def __init__(self, t3, *, slots: int, max_len: int, row_buckets: Optional[tuple[int, ...]] = None,
                 kv_buckets: Optional[tuple[int, ...]] = None, stop_check_interval: Optional[int] = None,
                 async_delivery: Optional[bool] = None, prefix_cache: Optional[PrefixCache] = None,
                 prepack: "bool | PackedLinears | None" = None, kv_granularity: int = LEN_BUCKET):
        self.t3 = t3
        self.prefix_cache = prefix_cache  # None: voice prefixes are computed per request, not kept
        self.is_gpt = t3.is_gpt
        self.device, self.dtype = t3.device, t3.dtype
        self.vocab = t3.hp.speech_tokens_dict_size
        self.stop_token = t3.hp.stop_speech_token
        self.backbone = make_backbone(t3)
        # CPU: prepacked linear weights (True: pack now; a PackedLinears: reuse it if still valid)
        self.packed: Optional[PackedLinears] = None
        if prepack and PackedLinears.supported(self.device, self.dtype):
            mods = self.backbone.linears()  # the speech head stays a module call (2 % of the weights; hooks work)
            if isinstance(prepack, PackedLinears) and prepack.valid_for(mods, self.dtype):
                self.packed = prepack
            else:
                self.packed = PackedLinears(mods, self.dtype)
            self.backbone.lin = self.packed
        self.step_fn: Callable = self._step  # the runtime may install a compiled version (same signature)
        self.cuda = self.device.type == "cuda"
        self.interval = stop_check_interval or (8 if self.cuda else 1)
        # copy tokens to the host behind an event and read them one interval later (default on CUDA)
        self.async_delivery = self.cuda if async_delivery is None else async_delivery
        self.slots = slots
        self.max_len = round_up(max_len)
        self.row_buckets = tuple(sorted(row_buckets)) if row_buckets else default_row_buckets(slots)
        if self.row_buckets[-1] != slots:
            raise ValueError(f"row_buckets must end at slots={slots}, got {self.row_buckets}")
        self.kv_buckets = tuple(sorted(kv_buckets)) if kv_buckets else None
        # without kv_buckets the attention length is rounded up to this: an eager step has no shape to
        # keep, and reading the cache is a large part of a batched step (memory-bound), so it can be fine
        self.kv_granularity = kv_granularity
        self._allocate()
        self._rows: list[_Row] = []  # admitted, not yet fully delivered
        self._by_slot: dict[int, _Row] = {}
        self._free = list(range(slots))
        self.g = 0  # global step counter
        self._pending: list[tuple[int, Tensor, Optional[object]]] = []  # (block, host copy, event) not yet processed
        self.tokens_generated = 0

    # -------------------------------------------------------------- buffers
    def _allocate(self) -> None:
        S, V, dev = self.slots, self.vocab, self.device
        bb = self.backbone
        self.cache = SlotCache(bb.n_layers, S, bb.n_kv, self.max_len, bb.head_dim, self.dtype, dev)
        self.tokens = torch.zeros(S, dtype=torch.long, device=dev)  # last sampled token, fed to the next step
        self.gen = torch.zeros(S, dtype=torch.long, device=dev)  # index of that token (0 = the prefill's)
        self.base = torch.zeros(S, dtype=torch.long, device=dev)  # prefill length (position of token 0)
        self.seen = torch.zeros(S, V, dtype=torch.bool, device=dev)
        self.params = sampling.params_tensor([SamplingParams(cfg_weight=0.0, min_p=0.0, top_p=1.0,
                                                             repetition_penalty=1.0, temperature=1.0)] * S, dev)
        self.partner = torch.arange(S, device=dev)  # row holding this row's unconditional logits
        self.feed_src = torch.arange(S, device=dev)  # row whose sample this row feeds back (CFG pairs)
        self.noise = torch.zeros(S, 2 * NOISE_BLOCK, V, device=dev)  # Gumbel ring per row
        self.hist = torch.zeros(S, self.interval, dtype=torch.long, device=dev)  # tokens of the current interval
        self._host_bufs = [torch.zeros(S, self.interval, dtype=torch.long, pin_memory=self.cuda) for _ in range(2)]
        if self.cuda:
            for t in (self.tokens, self.gen, self.base, self.seen, self.params, self.partner, self.feed_src, self.noise):
                torch._dynamo.mark_static_address(t)

    def memory_bytes(self) -> int:
        """Device memory held by the cache and the per-row buffers."""
        return self.cache.nbytes() + sum(t.numel() * t.element_size() for t in (
            self.tokens, self.gen, self.base, self.seen, self.params, self.partner, self.feed_src, self.noise, self.hist))

    # -------------------------------------------------------------- the compiled region
    def _step(self, tokens: Tensor, gen: Tensor, base: Tensor, seen: Tensor, params: Tensor, partner: Tensor,
              feed_src: Tensor, noise: Tensor, n: int, kv_len: int) -> tuple[Tensor, Tensor, Tensor]:
        """One decode step for rows [0, n): feed `tokens`, sample the next ones. Pure except the KV-cache writes.

        Returns (next fed token (n,), new seen mask (n, V), next token index (n,)).
        """
        t3 = self.t3
        tok, g = tokens[:n], gen[:n]
        emb = t3.speech_emb.weight[tok]  # (n, D)
        if t3.speech_pos_emb is not None:  # idle rows count up forever: clamp their indices (active rows never reach it)
            table = t3.speech_pos_emb.emb.weight
            emb = emb + table[torch.clamp(g + 1, max=table.shape[0] - 1)]
        pos = torch.clamp(base[:n] + g, max=kv_len - 1)
        hidden = self.backbone.step(emb[:, None], pos, self.cache, n, kv_len)
        logits = t3.speech_head(hidden)
        nxt = self._sample(logits, seen[:n], params[:n], partner[:n],
                           noise[torch.arange(n, device=tok.device), (g + 1) % (2 * NOISE_BLOCK)])
        fed = nxt[feed_src[:n]]
        return fed, seen[:n].scatter(1, fed[:, None], True), g + 1

    def _sample(self, logits: Tensor, seen: Tensor, params: Tensor, partner: Tensor, gumbel: Tensor) -> Tensor:
        if self.is_gpt:
            x = sampling.process_gpt(logits, seen, params)
            nxt = sampling.sample(x, gumbel)
            # upstream stops when every logit was filtered out
            return torch.where(torch.isneginf(x).all(dim=-1), torch.full_like(nxt, self.stop_token), nxt)
        return sampling.sample(sampling.process_llama(logits, seen, params, partner), gumbel)

    def step_shapes(self) -> list[tuple[int, int]]:
        """Every (rows, attention length) the step can run with (kv buckets must be set to enumerate them)."""
        kvs = self.kv_buckets or tuple(range(LEN_BUCKET, self.max_len + 1, LEN_BUCKET))
        return [(n, kv) for n in self.row_buckets for kv in kvs]

    @torch.inference_mode()
    def warm(self) -> int:
        """Run the step once per shape on idle rows (compiles / records every graph); returns the count."""
        if not self.idle():
            raise RuntimeError("warm the decoder before submitting requests")
        shapes = self.step_shapes()
        for n, kv in shapes:
            self.step_fn(self.tokens, self.gen, self.base, self.seen, self.params, self.partner, self.feed_src,
                         self.noise, n, kv)  # outputs dropped: idle rows only wrote position 0 of free slots
        return len(shapes)

    # -------------------------------------------------------------- admission
    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def active(self) -> int:
        """Requests holding slots."""
        return sum(1 for r in self._rows if r.g_end is None)

    def needed_len(self, req: DecodeRequest) -> int:
        return req.prompt_len + req.max_new_tokens

    def check(self, req: DecodeRequest) -> None:
        """Raise ValueError if `req` can never run on this decoder."""
        if req.rows not in (1, 2) or (req.rows == 2 and self.is_gpt):
            raise ValueError(f"a request has 1 row (2 with CFG on Llama T3), got {req.rows}")
        if req.rows > self.slots:
            raise ValueError(f"this decoder has {self.slots} slot(s); a CFG request needs 2")
        if req.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {req.max_new_tokens}")
        if self.needed_len(req) > self.max_len:
            raise ValueError(f"this request needs {self.needed_len(req)} cache positions (prompt {req.prompt_len} + "
                             f"max_new_tokens {req.max_new_tokens}) but the decoder holds {self.max_len} "
                             "(max_cache_len); shorten the text (split_text=True) or lower max_new_tokens")
        if req.prefill.device != self.device or req.prefill.shape[-1] != self.t3.dim:
            raise ValueError("prefill embeddings must be (R, L, D) on the model device")
        if req.prefix_len and not 0 < req.prefix_len < req.prompt_len:
            raise ValueError(f"prefix_len must be in [1, prompt_len), got {req.prefix_len} for a "
                             f"{req.prompt_len}-position prompt")

    def can_admit(self, req: DecodeRequest) -> bool:
        return len(self._free) >= req.rows

    def _fill_noise(self, row: _Row, block: int) -> None:
        """Draw the row's noise block `block` (steps [block*B, (block+1)*B)) into its ring half."""
        half = block % 2
        view = self.noise[row.slot, half * NOISE_BLOCK:(half + 1) * NOISE_BLOCK]
        if row.req.sampling.greedy:
            view.zero_()
        else:
            sampling.fill_gumbel_(view, row.req.generator)

    def admit(self, req: DecodeRequest, sink: TokenSink) -> None:
        """Prefill `req` into free slots and sample its first token (eager; variable length)."""
        self.admit_many([(req, sink)])

    @torch.inference_mode()
    def admit_many(self, items: list[tuple[DecodeRequest, TokenSink]]) -> None:
        """Prefill several requests in one backbone call (rows padded at the end to the longest),
        then sample each one's first token; every request gets its own free slots."""
        if not items:
            return
        for req, _ in items:
            self.check(req)
        if sum(req.rows for req, _ in items) > len(self._free):
            raise RuntimeError("not enough free slots (check can_admit first)")
        rows_all: list[_Row] = []
        free_before = list(self._free)
        try:
            self._prefill(items, rows_all)
        except BaseException:
            for row in rows_all:  # give back the slots of requests that never started
                if row in self._rows:
                    self._rows.remove(row)
                for s in row.slots:
                    self._by_slot.pop(s, None)
            self._free = free_before
            raise

    def _prefill(self, items: list[tuple[DecodeRequest, TokenSink]], rows_all: list["_Row"]) -> None:
        dev = self.device
        for req, sink in items:
            slots = [self._free.pop(0) for _ in range(req.rows)]
            row = _Row(req=req, sink=sink, slots=slots, g0=self.g,
                       first_host=torch.zeros(1, dtype=torch.long, pin_memory=self.cuda))
            self._fill_noise(row, 0)
            self._fill_noise(row, 1)
            rows_all.append(row)
        # the voice prefixes' keys/values go into each request's rows [0, P); the rest is prefilled
        # after them, one padded backbone call per prefix length
        groups: dict[int, list[_Row]] = {}
        for row in rows_all:
            if row.req.prefix_len:
                self._put_prefix(row)
            groups.setdefault(row.req.prefix_len, []).append(row)
        logits_of: dict[int, Tensor] = {}
        for start, rows in groups.items():
            length = max(r.req.prompt_len - start for r in rows)
            x = torch.zeros(sum(r.req.rows for r in rows), length, self.t3.dim, device=dev, dtype=self.dtype)
            lengths, slot_ids, k = [], [], 0
            for row in rows:
                r, n = row.req.rows, row.req.prompt_len - start
                x[k:k + r, :n] = row.req.prefill[:, start:].to(self.dtype)
                lengths += [n] * r
                slot_ids += row.slots
                k += r
            slots_t = torch.tensor(slot_ids, device=dev)
            lengths_t = None if min(lengths) == length else torch.tensor(lengths, device=dev)
            hidden = self.backbone.prefill(x, slots_t, self.cache, lengths_t, start=start)
            logits = self.t3.speech_head(hidden)  # (rows, V)
            k = 0
            for row in rows:
                logits_of[id(row)] = logits[k:k + row.req.rows]
                k += row.req.rows
        for row in rows_all:
            self._start(row, logits_of[id(row)])

    def _put_prefix(self, row: _Row) -> None:
        """Fill the row's slots [0, P) with its voice prefix's keys/values (from the cache, else computed alone)."""
        req, P = row.req, row.req.prefix_len
        cache = self.prefix_cache if req.prefix_key is not None else None
        entry = cache.get(req.prefix_key, P, self.dtype, self.device) if cache is not None else None
        slots_t = torch.tensor(row.slots, device=self.device)
        fill = slots_t
        if entry is None:
            # always computed on its own (batch 1, P positions): the same keys/values whether it was
            # cached or not, and whatever the request is batched with
            self.backbone.prefill(req.prefill[:1, :P].to(self.dtype), slots_t[:1], self.cache, None)
            s = row.slots[0]
            ks = [self.cache.layer(i)[0][s, :, :P].clone() for i in range(self.cache.n_layers)]
            vs = [self.cache.layer(i)[1][s, :, :P].clone() for i in range(self.cache.n_layers)]
            entry = PrefixEntry(req.prefix_key, P, self.dtype, self.device, ks, vs)
            if cache is not None:
                cache.put(entry)
            fill = slots_t[1:]  # the first slot holds it already
        if fill.numel():
            for i in range(self.cache.n_layers):
                kc, vc = self.cache.layer(i)
                kc[fill, :, :P] = entry.k[i]
                vc[fill, :, :P] = entry.v[i]

    def _start(self, row: _Row, logits: Tensor) -> None:
        """Sample a prefilled request's first token from its logits (R, V) and set up its rows' state."""
        req, slots, dev = row.req, row.slots, self.device
        rows_t = torch.tensor(slots, device=dev)
        R = req.rows
        seen0 = torch.zeros(R, self.vocab, dtype=torch.bool, device=dev)
        if req.seen_first:
            seen0[:, list(req.seen_first)] = True
        params = sampling.params_tensor([req.sampling] * R, dev)
        local_partner = torch.tensor([1, 1] if R == 2 else [0], device=dev)
        nxt = self._sample(logits, seen0, params, local_partner, self.noise[rows_t, 0])
        fed = nxt[torch.zeros(R, dtype=torch.long, device=dev)]  # both CFG rows feed the conditional sample
        seen = torch.zeros_like(seen0) if req.reset_seen_after_first else seen0
        seen = seen.scatter(1, fed[:, None], True)
        self.tokens[rows_t] = fed
        self.gen[rows_t] = 0
        self.base[rows_t] = req.prompt_len
        self.seen[rows_t] = seen
        self.params[rows_t] = params
        if R == 2:
            c, u = slots
            self.partner[c], self.partner[u] = u, u
            self.feed_src[c], self.feed_src[u] = c, c
        else:
            self.partner[slots[0]] = slots[0]
            self.feed_src[slots[0]] = slots[0]
        row.first_host.copy_(fed[:1], non_blocking=True)
        self._rows.append(row)
        for s in slots:
            self._by_slot[s] = row
        if req.max_new_tokens == 1:
            self._release(row)

    def _release(self, row: _Row) -> None:
        """Give the row's slots back (at the current step boundary); its recorded tokens stay deliverable."""
        if row.g_end is not None:
            return
        row.g_end = self.g
        for s in row.slots:
            self._by_slot.pop(s, None)
            self._free.append(s)
        self._free.sort()
        rows_t = torch.tensor(row.slots, device=self.device)
        self.base[rows_t] = 0  # idle rows decode harmlessly at position 0 of their own slot
        self.gen[rows_t] = 0
        self.tokens[rows_t] = 0
        self.partner[rows_t] = rows_t
        self.feed_src[rows_t] = rows_t

    def cancel(self, sink: TokenSink) -> bool:
        """Stop the request feeding `sink` at the next step boundary; True if it was still running."""
        for r in self._rows:
            if r.sink is sink and not r.done:
                r.cancelled = r.done = True
                self._release(r)
                return True
        return False

    # -------------------------------------------------------------- stepping
    def _bucket(self, need: int, buckets: Optional[tuple[int, ...]], cap: int) -> int:
        if buckets:
            for b in buckets:
                if need <= b:
                    return b
        return min(round_up(need, self.kv_granularity), cap)

    def shape_for_step(self) -> tuple[int, int]:
        """(active-prefix rows n, attention length) the next step runs with."""
        top = max(self._by_slot) + 1
        n = next(b for b in self.row_buckets if b >= top)
        need = max(r.req.prompt_len + (self.g - r.g0) + 1 for r in self._rows if r.g_end is None)
        return n, self._bucket(need, self.kv_buckets, self.max_len)

    @torch.inference_mode()
    def step(self) -> None:
        """One decode step for every active request, then token delivery at interval boundaries."""
        if self._by_slot:
            n, kv_len = self.shape_for_step()
            fed, seen, gen = self.step_fn(self.tokens, self.gen, self.base, self.seen, self.params, self.partner,
                                          self.feed_src, self.noise, n, kv_len)
            # CUDA-graph rule: copy the replay's outputs into persistent buffers before anything else runs
            self.tokens[:n].copy_(fed)
            self.seen[:n].copy_(seen)
            self.gen[:n].copy_(gen)
            self.hist[:n, self.g % self.interval].copy_(fed)
            self.g += 1
            for r in list(self._rows):
                if r.g_end is not None:
                    continue
                j = self.g - r.g0 + 1  # index of the next token this row will sample
                if j % NOISE_BLOCK == 0:
                    self._fill_noise(r, j // NOISE_BLOCK + 1)
                if self.g > r.last_step():
                    self._release(r)
        else:
            self.g += 1
        if self.g % self.interval == 0:
            self._flush()

    def _record_event(self):
        """An event on the model device's current stream (not the current device's), or a completed stand-in."""
        if not self.cuda:
            return _DoneEvent()
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        return ev

    def _flush(self) -> None:
        """Copy this interval's tokens to the host and deliver the previous interval's (bounded run-ahead).

        With async delivery the copy is queued behind an event and the host carries on; at the next
        flush it waits for that event (normally long complete), so it never runs more than two
        intervals ahead of the tokens it has seen. Without, the tokens are read at once.
        """
        block = self.g // self.interval - 1
        buf = self._host_bufs[block % 2]
        if self.async_delivery:
            buf.copy_(self.hist, non_blocking=True)
            self._pending.append((block, buf, self._record_event()))
            while len(self._pending) > 1:
                b, host, ev = self._pending.pop(0)
                ev.synchronize()
                self._deliver(b, host)
        else:
            buf.copy_(self.hist)
            self._deliver(block, buf)

    def drain(self) -> None:
        """Deliver everything recorded so far (one sync); used when no request holds a slot any more."""
        while self._pending:
            b, host, ev = self._pending.pop(0)
            ev.synchronize()
            self._deliver(b, host)
        self._deliver(self.g // self.interval, self.hist.cpu(), final=True)

    def _deliver(self, block: int, host: Tensor, final: bool = False) -> None:
        """Hand the tokens of steps [block*K, block*K + K) to their requests (`final`: up to the current step)."""
        lo = block * self.interval
        hi = self.g if final else lo + self.interval
        host_list = host.tolist()
        for r in list(self._rows):
            if not r.done:
                toks: list[int] = []
                if not r.first_sent and (r.g0 < hi or final):
                    toks.append(int(r.first_host[0]))
                    r.first_sent = True
                end = min(hi, r.g_end if r.g_end is not None else hi)
                toks.extend(host_list[r.slot][s % self.interval] for s in range(max(lo, r.g0), end))
                self._accept(r, toks)
            if r.done and r.g_end is not None and (r.g_end <= hi or final):
                self._rows.remove(r)

    def _accept(self, r: _Row, toks: list[int]) -> None:
        """Trim at the first stop token / max_new_tokens and pass the tokens on."""
        if not toks:
            return
        room = r.req.max_new_tokens - r.delivered
        toks = toks[:room]
        stopped = False
        if self.stop_token in toks:
            toks = toks[:toks.index(self.stop_token)]
            stopped = True
        r.delivered += len(toks)
        self.tokens_generated += len(toks) + (1 if stopped else 0)
        if toks:
            r.sink.put(toks)
        if stopped or r.delivered >= r.req.max_new_tokens:
            r.done = True
            self._release(r)
            r.sink.finish(stopped)

    def idle(self) -> bool:
        """No request holds a slot and nothing is left to deliver."""
        return not self._rows

    def fail_all(self, error: BaseException) -> None:
        """Fail every admitted request (used when a step raised)."""
        for r in list(self._rows):
            if not r.done:
                r.done = True
                r.sink.fail(error)
            self._release(r)
        self._rows.clear()
        self._pending.clear()


# ------------------------------------------------------------------------------------ synchronous use
@dataclass(eq=False)
class CollectSink:
    """A sink that just collects tokens (synchronous decoding, tests)."""

    tokens: list[int] = field(default_factory=list)
    stopped: bool = False
    finished: bool = False
    error: Optional[BaseException] = None

    def put(self, tokens: list[int]) -> None:
        self.tokens.extend(tokens)

    def finish(self, stopped: bool) -> None:
        self.stopped, self.finished = stopped, True

    def fail(self, error: BaseException) -> None:
        self.error, self.finished = error, True


def decode_all(decoder: T3Decoder, requests: list[DecodeRequest]) -> list[CollectSink]:
    """Run `requests` to completion on `decoder` from this thread (admitting as slots free up)."""
    sinks = [CollectSink() for _ in requests]
    queue = list(zip(requests, sinks))
    for req, _ in queue:
        decoder.check(req)
    while queue or not decoder.idle():
        batch, free = [], decoder.free_slots
        while queue and queue[0][0].rows <= free:
            free -= queue[0][0].rows
            batch.append(queue.pop(0))
        decoder.admit_many(batch)
        decoder.step()
        if decoder.active == 0 and not queue:
            decoder.drain()
    for s in sinks:
        if s.error is not None:
            raise s.error
    return sinks


# ------------------------------------------------------------------------------------ building requests
def _check_max_new(t3, max_new_tokens) -> int:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
        raise TypeError(f"max_new_tokens must be an int, got {max_new_tokens!r}")
    if not 1 <= max_new_tokens <= t3.hp.max_speech_tokens:
        raise ValueError(f"max_new_tokens must be in [1, {t3.hp.max_speech_tokens}], got {max_new_tokens}")
    return max_new_tokens


def llama_request(t3, t3_cond, text_tokens: Tensor, params: SamplingParams, max_new_tokens: int,
                  generator: Optional[torch.Generator], *, initial_speech_tokens: Optional[Tensor] = None) -> DecodeRequest:
    """An English/multilingual request: [cond | text | start] prefill (+ the doubled start), CFG as two rows."""
    t3.check_text_tokens(text_tokens)
    params.validate(gpt=False)
    max_new_tokens = _check_max_new(t3, max_new_tokens)
    prefill, P = t3.prefill_parts(t3_cond, text_tokens, cfg_weight=params.cfg_weight,
                                  initial_speech_tokens=initial_speech_tokens)
    return DecodeRequest(prefill, params, max_new_tokens, generator, seen_first=(t3.hp.start_speech_token,),
                         prefix_len=P, prefix_key=voice_key(t3_cond))


def gpt_request(t3, t3_cond, text_tokens: Tensor, params: SamplingParams, max_new_tokens: int,
                generator: Optional[torch.Generator]) -> DecodeRequest:
    """A Turbo/Nano request: [cond | text | start] prefill, one row; the start token penalised only in the first draw."""
    t3.check_text_tokens(text_tokens, check_bot_eot=False)
    params.validate(gpt=True)
    max_new_tokens = _check_max_new(t3, max_new_tokens)
    prefill, P = t3.prefill_parts(t3_cond, text_tokens)
    return DecodeRequest(prefill, params, max_new_tokens, generator, seen_first=(t3.hp.start_speech_token,),
                         reset_seen_after_first=True, prefix_len=P, prefix_key=voice_key(t3_cond))


def backbone_positions(t3) -> int:
    """How many positions the backbone can address (its position table / configured maximum)."""
    return t3.cfg.n_positions if t3.is_gpt else t3.cfg.max_position_embeddings


def decode_one(t3, req: DecodeRequest, *, max_cache_len: Optional[int] = None) -> tuple[list[int], bool]:
    """Decode one request synchronously on a decoder sized for it; returns (tokens without stop, stopped)."""
    need = req.prompt_len + req.max_new_tokens
    if max_cache_len is not None and need > max_cache_len:
        raise ValueError(f"this request needs {need} cache positions (prompt + max_new_tokens) "
                         f"but max_cache_len={max_cache_len}; raise max_cache_len or lower max_new_tokens")
    if need > backbone_positions(t3):
        raise ValueError(f"prompt + max_new_tokens = {need} exceeds the backbone's {backbone_positions(t3)} positions")
    decoder = T3Decoder(t3, slots=req.rows, max_len=max_cache_len or need)
    sink = decode_all(decoder, [req])[0]
    return sink.tokens, sink.stopped
