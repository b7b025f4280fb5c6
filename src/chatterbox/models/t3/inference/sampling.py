"""On-device token sampling with upstream's semantics, as pure tensor functions.

All functions take float32 logits (B, V) and return new tensors (no in-place edits), so they can
live inside a compiled, CUDA-graph-captured decode step. Sampling uses the exponential race that
`torch.multinomial` itself uses: argmax(p / E), E ~ Exp(1), written as argmax(logits + G) with
G = -log E (Gumbel). The noise is drawn outside the compiled region from the caller's generator.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

NEG_INF = float("-inf")


def cfg_combine(logits: Tensor, cfg_weight: Tensor) -> Tensor:
    """(2, V) [cond; uncond] -> (1, V): cond + w * (cond - uncond)."""
    cond, uncond = logits[0:1], logits[1:2]
    return cond + cfg_weight * (cond - uncond)


def repetition_penalty(logits: Tensor, seen: Tensor, penalty: Tensor) -> Tensor:
    """Penalise every token id in `seen` (bool (B, V)) once: negative logits x penalty, others / penalty."""
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def min_p_filter(logits: Tensor, min_p: Tensor) -> Tensor:
    """Drop tokens whose probability is below min_p x the top probability (the top token always stays)."""
    probs = torch.softmax(logits, dim=-1)
    remove = probs < min_p * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(remove, NEG_INF)


def top_p_filter(logits: Tensor, top_p: Tensor) -> Tensor:
    """Nucleus filter: drop the low tail whose cumulative probability is <= 1 - top_p (top token stays)."""
    sorted_logits, order = torch.sort(logits, dim=-1)  # ascending
    cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
    remove_sorted = cum <= (1 - top_p)
    keep_top = torch.zeros_like(remove_sorted)
    keep_top[..., -1] = True
    remove_sorted = remove_sorted & ~keep_top
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, NEG_INF)


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep the k largest logits (ties at the threshold kept); `k` is a Python int, clamped to [1, V]."""
    k = max(1, min(int(k), logits.shape[-1]))
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, NEG_INF)


@dataclass(frozen=True)
class SamplerSpec:
    """The static structure of a sampler: which processors run, in which order.

    Numeric values live in a `params` tensor (see `make_params`) so changing them never
    recompiles; only the structure (what this dataclass holds) is baked into a compiled graph.
    """

    order: tuple[str, ...]  # names from: "rep", "temp", "min_p", "top_p", "top_k"
    top_k: int = 0
    cfg: bool = False

    @classmethod
    def llama(cls, *, cfg: bool, temperature: float, min_p: float, top_p: float, repetition_penalty: float) -> "SamplerSpec":
        """English/multilingual order: CFG -> repetition penalty -> temperature -> min_p -> top_p."""
        order = []
        if repetition_penalty != 1.0:
            order.append("rep")
        if temperature != 1.0:
            order.append("temp")
        if min_p > 0.0:
            order.append("min_p")
        if top_p < 1.0:  # top_p == 1 only re-removes zero-probability tokens: no effect on sampling
            order.append("top_p")
        return cls(order=tuple(order), cfg=cfg)

    @classmethod
    def gpt(cls, *, temperature: float, top_k: int, top_p: float, repetition_penalty: float) -> "SamplerSpec":
        """Turbo/Nano order: temperature -> top_k -> top_p -> repetition penalty (after truncation)."""
        order = []
        if temperature > 0 and temperature != 1.0:
            order.append("temp")
        if top_k > 0:
            order.append("top_k")
        if top_p < 1.0:
            order.append("top_p")
        if repetition_penalty != 1.0:
            order.append("rep")
        return cls(order=tuple(order), top_k=int(top_k), cfg=False)


# index of each number in the params vector
P_CFG, P_REP, P_TEMP, P_MIN_P, P_TOP_P = range(5)


def make_params(*, cfg_weight=0.0, repetition_penalty=1.0, temperature=1.0, min_p=0.0, top_p=1.0,
                device=None) -> Tensor:
    """The numeric sampler settings as one float32 vector on `device` (built once per request)."""
    return torch.tensor([cfg_weight, repetition_penalty, temperature, min_p, top_p], dtype=torch.float32, device=device)


def process_logits(logits: Tensor, seen: Tensor, params: Tensor, spec: SamplerSpec) -> Tensor:
    """Raw backbone logits (B, V) -> filtered float32 logits (1, V), following `spec`."""
    x = logits.float()
    if spec.cfg:
        x = cfg_combine(x, params[P_CFG])
    for name in spec.order:
        if name == "rep":
            x = repetition_penalty(x, seen, params[P_REP])
        elif name == "temp":
            x = x / params[P_TEMP]
        elif name == "min_p":
            x = min_p_filter(x, params[P_MIN_P])
        elif name == "top_p":
            x = top_p_filter(x, params[P_TOP_P])
        elif name == "top_k":
            x = top_k_filter(x, spec.top_k)
        else:
            raise ValueError(f"unknown sampler step {name!r}")
    return x


def sample(logits: Tensor, gumbel: Tensor) -> Tensor:
    """Draw one token per row: argmax(logits + gumbel); zero noise gives greedy decoding. -> (B,) int64."""
    return torch.argmax(logits + gumbel, dim=-1)


def fill_gumbel_(buf: Tensor, generator: torch.Generator | None) -> Tensor:
    """Fill `buf` (n, V) in place with Gumbel noise -log(E), E ~ Exp(1), from `generator` (outside compiled code)."""
    return buf.exponential_(generator=generator).log_().neg_()
