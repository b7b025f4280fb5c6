"""The CFM estimator of S3Gen: a one-level causal 1-D U-Net with transformer blocks.

Parameter names follow upstream's `ConditionalDecoder` exactly (e.g. `down_blocks.0.1.0.attn1.to_q`,
`mid_blocks.3.0.block1.block.2`); attention is plain `scaled_dot_product_attention`, with no diffusers
dependency. The key-padding bias is computed once per call and shared by all 56 transformer blocks.

Shapes: B batch, C channels, T mel frames. Inputs are channels-first (B, C, T).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .utils.intmeanflow import get_intmeanflow_time_mixer


def mask_to_bias(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Bool mask (True = attend) -> additive bias: 0 where True, -1e10 where False."""
    return (1.0 - mask.to(dtype)) * -1.0e10


class Transpose(nn.Module):
    """Swap two dimensions (keeps upstream's Sequential indices)."""

    def __init__(self, dim0: int, dim1: int):
        super().__init__()
        self.dim0, self.dim1 = dim0, dim1

    def forward(self, x: Tensor) -> Tensor:
        return x.transpose(self.dim0, self.dim1)


class CausalConv1d(nn.Conv1d):
    """Conv1d with k-1 zeros of left padding: output t sees inputs t-k+1..t."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 dilation: int = 1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 device=None, dtype=None):
        assert stride == 1
        super().__init__(in_channels, out_channels, kernel_size, stride, padding=0, dilation=dilation,
                         groups=groups, bias=bias, padding_mode=padding_mode, device=device, dtype=dtype)
        self.causal_padding = (dilation * (kernel_size - 1), 0)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(F.pad(x, self.causal_padding))


class CausalBlock1D(nn.Module):
    """y = Mish(LN_C(CausalConv_k3(x * m))) * m, with LN over channels at each frame."""

    def __init__(self, dim: int, dim_out: int):
        super().__init__()
        self.block = nn.Sequential(
            CausalConv1d(dim, dim_out, 3),  # 0
            Transpose(1, 2),  # 1
            nn.LayerNorm(dim_out),  # 2
            Transpose(1, 2),  # 3
            nn.Mish(),  # 4
        )

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """x (B, C, T), mask (B, 1, T) float -> (B, C', T)."""
        return self.block(x * mask) * mask


class CausalResnetBlock1D(nn.Module):
    """h = block1(x) + proj(Mish(temb)); out = block2(h) + res_conv(x * m)."""

    def __init__(self, dim: int, dim_out: int, time_emb_dim: int, groups: int = 8):
        super().__init__()
        self.mlp = nn.Sequential(nn.Mish(), nn.Linear(time_emb_dim, dim_out))
        self.block1 = CausalBlock1D(dim, dim_out)
        self.block2 = CausalBlock1D(dim_out, dim_out)
        self.res_conv = nn.Conv1d(dim, dim_out, 1)

    def forward(self, x: Tensor, mask: Tensor, time_emb: Tensor) -> Tensor:
        """x (B, C, T), mask (B, 1, T), time_emb (B or 1, E) -> (B, C', T)."""
        h = self.block1(x, mask)
        h = h + self.mlp(time_emb)[:, :, None]
        h = self.block2(h, mask)
        return h + self.res_conv(x * mask)


class SinusoidalPosEmb(nn.Module):
    """tau (B,) -> (B, dim): [sin(1000 tau f_i), cos(1000 tau f_i)], f_i = 10000^(-i/(dim/2-1)), in float32."""

    def __init__(self, dim: int):
        super().__init__()
        assert dim % 2 == 0
        self.dim = dim

    def forward(self, x: Tensor, scale: float = 1000) -> Tensor:
        if x.ndim < 1:
            x = x[None]
        half = self.dim // 2
        freqs = torch.exp(torch.arange(half, device=x.device, dtype=torch.float32) * -(math.log(10000) / (half - 1)))
        emb = scale * x[:, None] * freqs[None]
        return torch.cat([emb.sin(), emb.cos()], dim=-1)


class TimestepEmbedding(nn.Module):
    """Linear -> SiLU -> Linear (in -> E -> E)."""

    def __init__(self, in_channels: int, time_embed_dim: int, act_fn: str = "silu"):
        super().__init__()
        if act_fn != "silu":
            raise NotImplementedError(act_fn)
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def forward(self, sample: Tensor) -> Tensor:
        return self.linear_2(self.act(self.linear_1(sample)))


class Attention(nn.Module):
    """Bias-free q/k/v self-attention (heads x dim_head), output Linear; names as diffusers' `Attention`."""

    def __init__(self, query_dim: int, heads: int = 8, dim_head: int = 64, dropout: float = 0.0, bias: bool = False):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.dim_head = dim_head
        self.scale = dim_head ** -0.5
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = nn.Linear(query_dim, inner, bias=bias)
        self.to_v = nn.Linear(query_dim, inner, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim), nn.Dropout(dropout)])

    def forward(self, x: Tensor, attn_bias: Tensor | None = None) -> Tensor:
        """x (B, T, D), attn_bias (B, 1, 1, T) additive or None -> (B, T, D)."""
        b, t, _ = x.shape
        q = self.to_q(x).view(b, t, self.heads, self.dim_head).transpose(1, 2)  # (B, H, T, d)
        k = self.to_k(x).view(b, t, self.heads, self.dim_head).transpose(1, 2)
        v = self.to_v(x).view(b, t, self.heads, self.dim_head).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=self.scale)
        out = out.transpose(1, 2).reshape(b, t, self.heads * self.dim_head)
        return self.to_out[1](self.to_out[0](out))


class GELU(nn.Module):
    """Linear followed by exact (erf) GELU; the Linear is named `proj`."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.proj(x))


class FeedForward(nn.Module):
    """net = [GELU(dim -> mult*dim), Dropout, Linear(mult*dim -> dim)]."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.net = nn.ModuleList([GELU(dim, dim * mult), nn.Dropout(dropout), nn.Linear(dim * mult, dim)])

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    """h <- h + Attn(LN1(h), bias); h <- h + FF(LN3(h)). No cross-attention, no ada-norm."""

    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int, dropout: float = 0.0,
                 activation_fn: str = "gelu"):
        super().__init__()
        if activation_fn != "gelu":
            raise NotImplementedError(activation_fn)
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, num_attention_heads, attention_head_dim, dropout)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, dropout=dropout)

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None, timestep: Tensor | None = None) -> Tensor:
        """hidden_states (B, T, D), attention_mask: additive bias (B, 1, 1, T) -> (B, T, D)."""
        h = hidden_states + self.attn1(self.norm1(hidden_states), attention_mask)
        return h + self.ff(self.norm3(h))


class ConditionalDecoder(nn.Module):
    """Velocity estimator v(x, mask, mu, t, spks, cond[, r]) -> (B, 80, T) (upstream's U-Net, causal)."""

    def __init__(self, in_channels: int = 320, out_channels: int = 80, causal: bool = True,
                 channels: list[int] | tuple[int, ...] = (256,), dropout: float = 0.0,
                 attention_head_dim: int = 64, n_blocks: int = 4, num_mid_blocks: int = 12,
                 num_heads: int = 8, act_fn: str = "gelu", meanflow: bool = False):
        super().__init__()
        channels = tuple(channels)
        if not causal or len(channels) != 1:
            raise NotImplementedError("only S3Gen's causal one-level estimator is implemented")
        ch = channels[0]
        self.meanflow = meanflow
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.causal = causal
        self.static_chunk_size = 0
        self.time_embeddings = SinusoidalPosEmb(in_channels)
        time_embed_dim = ch * 4
        self.time_mlp = TimestepEmbedding(in_channels, time_embed_dim, act_fn="silu")

        def transformers() -> nn.ModuleList:
            return nn.ModuleList(
                BasicTransformerBlock(ch, num_heads, attention_head_dim, dropout, act_fn) for _ in range(n_blocks)
            )

        # One resolution level: the "down"/"up" samplers are plain causal convs (no resampling).
        self.down_blocks = nn.ModuleList([
            nn.ModuleList([CausalResnetBlock1D(in_channels, ch, time_embed_dim), transformers(), CausalConv1d(ch, ch, 3)])
        ])
        self.mid_blocks = nn.ModuleList([
            nn.ModuleList([CausalResnetBlock1D(ch, ch, time_embed_dim), transformers()]) for _ in range(num_mid_blocks)
        ])
        self.up_blocks = nn.ModuleList([
            nn.ModuleList([CausalResnetBlock1D(2 * ch, ch, time_embed_dim), transformers(), CausalConv1d(ch, ch, 3)])
        ])
        self.final_block = CausalBlock1D(ch, ch)
        self.final_proj = nn.Conv1d(ch, out_channels, 1)
        self.time_embed_mixer = get_intmeanflow_time_mixer(time_embed_dim) if meanflow else None

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the estimator's weights."""
        return self.final_proj.weight.dtype

    def time_embedding(self, t: Tensor, r: Tensor | None = None) -> Tensor:
        """t (B,) or (1,) [and r for meanflow] -> temb (B or 1, 4*C)."""
        temb = self.time_mlp(self.time_embeddings(t).to(t.dtype))
        if self.meanflow:
            remb = self.time_mlp(self.time_embeddings(r).to(t.dtype))
            temb = self.time_embed_mixer(torch.cat([temb, remb], dim=1))
        return temb

    @staticmethod
    def _run_transformers(blocks: nn.ModuleList, x: Tensor, bias: Tensor) -> Tensor:
        x = x.transpose(1, 2)  # (B, T, C)
        for block in blocks:
            x = block(x, bias)
        return x.transpose(1, 2)  # (B, C, T)

    def forward(self, x: Tensor, mask: Tensor, mu: Tensor, t: Tensor, spks: Tensor | None = None,
                cond: Tensor | None = None, r: Tensor | None = None) -> Tensor:
        """x, mu, cond (B, 80, T); mask (B, 1, T) float; t (B,) or (1,); spks (B, 80); r like t (meanflow)."""
        temb = self.time_embedding(t, r)  # (B or 1, 1024)
        feats = [x, mu]
        if spks is not None:
            feats.append(spks[:, :, None].expand(-1, -1, x.size(-1)))
        if cond is not None:
            feats.append(cond)
        h = torch.cat(feats, dim=1)  # (B, 320, T)
        bias = mask_to_bias(mask > 0, h.dtype)[:, None]  # (B, 1, 1, T), shared by every block

        resnet, blocks, down = self.down_blocks[0]
        h = resnet(h, mask, temb)
        skip = self._run_transformers(blocks, h, bias)
        h = down(skip * mask)

        for resnet, blocks in self.mid_blocks:
            h = self._run_transformers(blocks, resnet(h, mask, temb), bias)

        resnet, blocks, up = self.up_blocks[0]
        h = torch.cat([h[:, :, : skip.size(-1)], skip], dim=1)  # (B, 2C, T)
        h = self._run_transformers(blocks, resnet(h, mask, temb), bias)
        h = up(h * mask)

        h = self.final_block(h, mask)
        return self.final_proj(h * mask) * mask
