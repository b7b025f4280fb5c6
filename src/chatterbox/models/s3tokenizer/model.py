"""S3 speech tokenizer v2 ("speech_tokenizer_v2_25hz"): FSMN-attention encoder + FSQ codebook.

log-mel (B, 128, T) --conv k3/s2, GELU--> --conv k3/s2, GELU--> (B, T/4, 1280)
    --6 x [x + FSMNAttention(LN(x)), x + MLP(LN(x))]--> --FSQ (8 trits)--> tokens (B, T/4) in [0, 3^8)

Attention uses rotary embeddings (rotate-half layout) on q and k, a key bias of -1e10 on padded
frames, and adds an FSMN memory: a depthwise k31 conv over the un-rotated values.
"""
from __future__ import annotations

from dataclasses import dataclass


import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class ModelConfig:
    """Encoder hyper-parameters of speech_tokenizer_v2_25hz."""

    n_mels: int = 128
    n_audio_ctx: int = 1500
    n_audio_state: int = 1280
    n_audio_head: int = 20
    n_audio_layer: int = 6
    n_codebook_size: int = 3**8
    use_sdpa: bool = False


def rope_tables(head_dim: int, max_len: int, theta: float = 10000.0) -> tuple[Tensor, Tensor]:
    """(cos, sin) of shape (max_len, head_dim), both halves repeated (rotate-half layout), float32."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    angles = torch.outer(torch.arange(max_len), freqs).float()  # (N, D/2)
    rot = torch.view_as_real(torch.polar(torch.ones_like(angles), angles))  # same values as upstream
    cos, sin = rot[..., 0], rot[..., 1]
    return torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, T, H, D) rotated by cos/sin (T, D): x cos + rotate_half(x) sin."""
    d = x.shape[-1] // 2
    rotated = torch.cat([-x[..., d:], x[..., :d]], dim=-1)
    return x * cos[None, :, None] + rotated * sin[None, :, None]


def non_pad_mask(lengths: Tensor, max_len: int) -> Tensor:
    """(B,) lengths -> (B, max_len) bool, True on valid frames (max_len is a host int: no sync)."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32, cast back to the input dtype."""

    def forward(self, x: Tensor) -> Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).type(x.dtype)


class FSMNMultiHeadAttention(nn.Module):
    """Multi-head attention with rotary q/k, bias-free key, and an FSMN memory on v."""

    def __init__(self, n_state: int, n_head: int, kernel_size: int = 31):
        super().__init__()
        self.n_head = n_head
        self.query = nn.Linear(n_state, n_state)
        self.key = nn.Linear(n_state, n_state, bias=False)
        self.value = nn.Linear(n_state, n_state)
        self.out = nn.Linear(n_state, n_state)
        self.fsmn_block = nn.Conv1d(n_state, n_state, kernel_size, stride=1, padding=0, groups=n_state,
                                    bias=False)
        self.left_padding = (kernel_size - 1) // 2
        self.right_padding = kernel_size - 1 - self.left_padding

    def forward_fsmn(self, v: Tensor, mask_pad: Tensor) -> Tensor:
        """v (B, T, H, D), mask_pad (B, T, 1) -> memory (B, T, H*D)."""
        b, t = v.shape[:2]
        u = v.reshape(b, t, -1) * mask_pad
        c = F.pad(u.transpose(1, 2), (self.left_padding, self.right_padding))
        c = self.fsmn_block(c).transpose(1, 2)  # (B, T, C)
        return (c + u) * mask_pad

    def forward(self, x: Tensor, bias: Tensor, mask_pad: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """x (B, T, C), key bias (B, 1, 1, T), mask_pad (B, T, 1), rotary cos/sin (T, D) -> (B, T, C)."""
        b, t, c = x.shape
        scale = (c // self.n_head) ** -0.25
        q = self.query(x).view(b, t, self.n_head, -1)
        k = self.key(x).view(b, t, self.n_head, -1)
        v = self.value(x).view(b, t, self.n_head, -1)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        memory = self.forward_fsmn(v, mask_pad)
        q = q.permute(0, 2, 1, 3) * scale  # (B, H, T, D)
        k = k.permute(0, 2, 3, 1) * scale  # (B, H, D, T)
        v = v.permute(0, 2, 1, 3)
        w = torch.softmax((q @ k + bias).float(), dim=-1).to(q.dtype)  # (B, H, T, T)
        o = (w @ v).permute(0, 2, 1, 3).flatten(start_dim=2)  # (B, T, C)
        return self.out(o) + memory


class ResidualAttentionBlock(nn.Module):
    """Pre-LN block: FSMN attention and a GELU MLP (4x), each with a residual."""

    def __init__(self, n_state: int, n_head: int, kernel_size: int = 31):
        super().__init__()
        self.attn = FSMNMultiHeadAttention(n_state, n_head, kernel_size)
        self.attn_ln = LayerNorm(n_state, eps=1e-5)
        self.mlp = nn.Sequential(nn.Linear(n_state, n_state * 4), nn.GELU(), nn.Linear(n_state * 4, n_state))
        self.mlp_ln = LayerNorm(n_state, eps=1e-5)

    def forward(self, x: Tensor, bias: Tensor, mask_pad: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.attn(self.attn_ln(x), bias, mask_pad, cos, sin)
        return x + self.mlp(self.mlp_ln(x))


def _conv_len(n):
    """Length after a k3, stride 2, pad 1 conv (works on ints and tensors)."""
    return (n - 1) // 2 + 1


class AudioEncoderV2(nn.Module):
    """Two stride-2 convs (4x down: 25 Hz) and 6 FSMN attention blocks."""

    def __init__(self, n_mels: int, n_state: int, n_head: int, n_layer: int, stride: int = 2,
                 max_positions: int = 2048):
        super().__init__()
        self.stride = stride
        self.conv1 = nn.Conv1d(n_mels, n_state, kernel_size=3, stride=stride, padding=1)
        self.conv2 = nn.Conv1d(n_state, n_state, kernel_size=3, stride=2, padding=1)
        self.blocks = nn.ModuleList(ResidualAttentionBlock(n_state, n_head) for _ in range(n_layer))
        cos, sin = rope_tables(n_state // n_head, max_positions)
        self.register_buffer("rope_cos", cos, persistent=False)  # (2048, 64)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, x: Tensor, x_len: Tensor) -> tuple[Tensor, Tensor]:
        """log-mel (B, n_mels, T), lengths (B,) -> hidden (B, T', n_state), lengths (B,)."""
        t = x.shape[-1]
        x = F.gelu(self.conv1(x * non_pad_mask(x_len, t)[:, None]))
        x_len, t = _conv_len(x_len), _conv_len(t)
        x = F.gelu(self.conv2(x * non_pad_mask(x_len, t)[:, None]))
        x_len, t = _conv_len(x_len), _conv_len(t)
        mask = non_pad_mask(x_len, t)  # (B, T')
        mask_pad = mask[:, :, None]  # (B, T', 1)
        bias = ((1.0 - mask.to(x.dtype)) * -1.0e10)[:, None, None, :]  # (B, 1, 1, T')
        x = x.permute(0, 2, 1)  # (B, T', C)
        cos, sin = self.rope_cos[:t].to(x.dtype), self.rope_sin[:t].to(x.dtype)
        for block in self.blocks:
            x = block(x, bias, mask_pad, cos, sin)
        return x, x_len


class FSQCodebook(nn.Module):
    """Finite scalar quantiser: project to 8 dims, round 0.999 tanh to {-1, 0, 1}, base-3 index."""

    def __init__(self, dim: int, level: int = 3):
        super().__init__()
        self.project_down = nn.Linear(dim, 8)
        self.level = level

    def encode(self, x: Tensor) -> Tensor:
        """(B, T, dim) -> (B, T) int32 tokens; dimension 0 is the least significant trit."""
        h = self.project_down(x).float().tanh() * 0.9990000128746033
        h = h.round() + 1  # (B, T, 8) digits in {0, 1, 2}
        powers = torch.pow(self.level, torch.arange(8, device=x.device, dtype=h.dtype))
        return torch.sum(h * powers, dim=-1).int()


class FSQVectorQuantization(nn.Module):
    """Holds the codebook under the upstream name `_codebook`."""

    def __init__(self, dim: int, codebook_size: int):
        super().__init__()
        assert codebook_size == 3**8
        self._codebook = FSQCodebook(dim=dim, level=3)
        self.codebook_size = codebook_size

    def encode(self, x: Tensor) -> Tensor:
        return self._codebook.encode(x)
