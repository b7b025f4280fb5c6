"""On-device token sampling with upstream's semantics, batched with per-row settings, as pure tensor functions.

Every row of a batch carries its own numbers in a `params` tensor (S, N_PARAMS), so requests with
different temperatures, top-p, min-p, top-k, repetition penalties and CFG weights share one compiled
graph: the structure of the sampler is fixed per model family and a processor that a row does not
use gets its neutral value (temperature 1, min_p 0, top_p 1, top_k 0 = off, penalty 1, CFG weight 0),
which leaves that row's logits unchanged bit for bit (top_p = 1 only drops tokens whose probability
is exactly zero, which can never be sampled).

Sampling uses the exponential race that `torch.multinomial` itself uses: argmax(p / E), E ~ Exp(1),
written as argmax(logits + G) with G = -log E (Gumbel). The noise is drawn outside compiled code from
the request's generator (`fill_gumbel_`); zero noise is greedy decoding.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

NEG_INF = float("-inf")

# columns of the per-row params tensor
P_CFG, P_REP, P_TEMP, P_MIN_P, P_TOP_P, P_TOP_K = range(6)
N_PARAMS = 6


@dataclass(frozen=True)
class SamplingParams:
    """One request's sampler settings (upstream's knobs). `top_k=0` and `cfg_weight=0` mean off."""

    temperature: float = 0.8
    top_p: float = 1.0
    min_p: float = 0.05
    top_k: int = 0
    repetition_penalty: float = 1.2
    cfg_weight: float = 0.0
    greedy: bool = False

    def validate(self, *, gpt: bool) -> "SamplingParams":
        """Raise ValueError for values that would silently give garbage; returns self."""
        def finite(name, v):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
            return float(v)

        t = finite("temperature", self.temperature)
        if t <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        p = finite("top_p", self.top_p)
        if not 0.0 < p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        m = finite("min_p", self.min_p)
        if not 0.0 <= m <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        r = finite("repetition_penalty", self.repetition_penalty)
        if r <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        c = finite("cfg_weight", self.cfg_weight)
        if c < 0:
            raise ValueError(f"cfg_weight must be >= 0, got {self.cfg_weight}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if gpt and c > 0:
            raise ValueError("GPT-2 T3 (Turbo/Nano) has no classifier-free guidance: use cfg_weight=0")
        return self

    @property
    def uses_cfg(self) -> bool:
        return self.cfg_weight > 0.0

    def row(self) -> list[float]:
        """This request's params row (see the P_* columns)."""
        return [float(self.cfg_weight), float(self.repetition_penalty), float(self.temperature), float(self.min_p),
                float(self.top_p), float(self.top_k)]


def params_tensor(rows: list[SamplingParams], device=None) -> Tensor:
    """(len(rows), N_PARAMS) float32 on `device`."""
    return torch.tensor([r.row() for r in rows], dtype=torch.float32, device=device)


# ---------------------------------------------------------------- processors (B, V) -> (B, V)
def cfg_combine(logits: Tensor, partner: Tensor, weight: Tensor) -> Tensor:
    """cond + w * (cond - uncond) per row, the unconditional logits taken from row `partner[i]` ((B,) long).

    A row whose partner is itself (no CFG) comes out unchanged: x + w * 0 = x.
    """
    return logits + weight[:, None] * (logits - logits[partner])


def repetition_penalty(logits: Tensor, seen: Tensor, penalty: Tensor) -> Tensor:
    """Penalise every token id in `seen` (bool (B, V)) once: negative logits x penalty, others / penalty."""
    p = penalty[:, None]
    penalised = torch.where(logits < 0, logits * p, logits / p)
    return torch.where(seen, penalised, logits)


def temperature(logits: Tensor, temp: Tensor) -> Tensor:
    return logits / temp[:, None]


def min_p_filter(logits: Tensor, min_p: Tensor) -> Tensor:
    """Drop tokens whose probability is below min_p x the top probability (the top token always stays)."""
    probs = torch.softmax(logits, dim=-1)
    remove = probs < min_p[:, None] * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(remove, NEG_INF)


def top_p_filter(logits: Tensor, top_p: Tensor) -> Tensor:
    """Nucleus filter: drop the low tail whose cumulative probability is <= 1 - top_p (top token stays)."""
    sorted_logits, order = torch.sort(logits, dim=-1)  # ascending
    cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
    remove_sorted = cum <= (1 - top_p[:, None])
    last = torch.arange(logits.shape[-1], device=logits.device) == logits.shape[-1] - 1
    remove_sorted = remove_sorted & ~last
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, NEG_INF)


def top_k_filter(logits: Tensor, top_k: Tensor) -> Tensor:
    """Keep each row's k largest logits (ties at the threshold kept); k = 0 (or >= V) keeps everything."""
    v = logits.shape[-1]
    k = top_k.long()
    k = torch.where((k <= 0) | (k > v), torch.full_like(k, v), k)
    desc = torch.sort(logits, dim=-1, descending=True).values
    kth = desc.gather(-1, (k - 1)[:, None])
    return logits.masked_fill(logits < kth, NEG_INF)


def process_llama(logits: Tensor, seen: Tensor, params: Tensor, partner: Tensor) -> Tensor:
    """English/multilingual order: CFG -> repetition penalty -> temperature -> min_p -> top_p. float32 (B, V)."""
    x = cfg_combine(logits.float(), partner, params[:, P_CFG])
    x = repetition_penalty(x, seen, params[:, P_REP])
    x = temperature(x, params[:, P_TEMP])
    x = min_p_filter(x, params[:, P_MIN_P])
    return top_p_filter(x, params[:, P_TOP_P])


def process_gpt(logits: Tensor, seen: Tensor, params: Tensor) -> Tensor:
    """Turbo/Nano order: temperature -> top_k -> top_p -> repetition penalty (after truncation). float32 (B, V)."""
    x = temperature(logits.float(), params[:, P_TEMP])
    x = top_k_filter(x, params[:, P_TOP_K])
    x = top_p_filter(x, params[:, P_TOP_P])
    return repetition_penalty(x, seen, params[:, P_REP])


def sample(logits: Tensor, gumbel: Tensor) -> Tensor:
    """Draw one token per row: argmax(logits + gumbel); zero noise gives greedy decoding. -> (B,) int64."""
    return torch.argmax(logits + gumbel, dim=-1)


def fill_gumbel_(buf: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    """Fill `buf` in place with Gumbel noise -log(E), E ~ Exp(1), from `generator` (outside compiled code).

    The draw happens on the generator's own device and is copied over when that differs from
    `buf`'s (a CPU generator with a CUDA model works).
    """
    if generator is not None and torch.device(generator.device) != buf.device:
        tmp = torch.empty(buf.shape, dtype=buf.dtype, device=generator.device).exponential_(generator=generator)
        buf.copy_(tmp)
    else:
        buf.exponential_(generator=generator)
    return buf.log_().neg_()
