"""S3Gen flow encoder: 6 conformer layers at 25 Hz, x2 upsample, 4 conformer layers at 50 Hz.

Padding is exact: the pre-lookahead convolution sees zeros beyond each row's length (the input is
masked first), the upsample convolution is causal and attention masks padded keys, so frames below
the length are the same whether or not a sequence is padded to a bucket length.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..utils.mask import make_non_pad_mask
from .attention import RelPositionMultiHeadedAttention
from .embedding import EspnetRelPositionalEncoding
from .encoder_layer import ConformerEncoderLayer
from .positionwise_feed_forward import PositionwiseFeedForward
from .subsampling import LinearNoSubsampling


class Upsample1D(nn.Module):
    """(B, C, T) -> (B, C', stride*T): nearest repeat, left pad 2*stride, conv k=2*stride+1."""

    def __init__(self, channels: int, out_channels: int, stride: int = 2):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels
        self.stride = stride
        self.conv = nn.Conv1d(channels, out_channels, 2 * stride + 1, stride=1, padding=0)

    def forward(self, inputs: Tensor, input_lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Returns the upsampled features and the lengths times `stride`."""
        x = inputs.repeat_interleave(self.stride, dim=2)  # nearest-neighbour x stride
        x = self.conv(F.pad(x, (2 * self.stride, 0)))
        return x, input_lengths * self.stride


class PreLookaheadLayer(nn.Module):
    """Residual conv pair seeing frames t-2..t+3: conv k=L+1 over [t, t+L], LeakyReLU, causal conv k=3."""

    def __init__(self, channels: int, pre_lookahead_len: int = 1):
        super().__init__()
        self.channels = channels
        self.pre_lookahead_len = pre_lookahead_len
        self.conv1 = nn.Conv1d(channels, channels, kernel_size=pre_lookahead_len + 1, stride=1, padding=0)
        self.conv2 = nn.Conv1d(channels, channels, kernel_size=3, stride=1, padding=0)

    def forward(self, inputs: Tensor, mask: Tensor | None = None) -> Tensor:
        """inputs (B, T, C), optional valid mask (B, 1, T) -> (B, T, C).

        With a mask, padded frames are zeroed before the look-ahead, so the last valid frames see
        the same zeros as an unpadded sequence does (upstream has no mask and leaks padding).
        """
        x = inputs.transpose(1, 2)  # (B, C, T)
        if mask is not None:
            x = x * mask.to(x.dtype)
        x = F.leaky_relu(self.conv1(F.pad(x, (0, self.pre_lookahead_len))))
        x = self.conv2(F.pad(x, (2, 0)))
        return x.transpose(1, 2) + inputs


class UpsampleConformerEncoder(nn.Module):
    """Token embeddings (B, T, 512) + lengths -> (B, 2T, 512) and the valid mask (B, 1, 2T)."""

    def __init__(self, input_size: int = 512, output_size: int = 512, attention_heads: int = 8,
                 linear_units: int = 2048, num_blocks: int = 6, dropout_rate: float = 0.1,
                 positional_dropout_rate: float = 0.1, attention_dropout_rate: float = 0.1,
                 input_layer: str = "linear", pos_enc_layer_type: str = "rel_pos_espnet",
                 normalize_before: bool = True, static_chunk_size: int = 0, use_dynamic_chunk: bool = False,
                 global_cmvn: nn.Module | None = None, use_dynamic_left_chunk: bool = False,
                 positionwise_conv_kernel_size: int = 1, macaron_style: bool = False,
                 selfattention_layer_type: str = "rel_selfattn", activation_type: str = "swish",
                 use_cnn_module: bool = False, cnn_module_kernel: int = 15, causal: bool = False,
                 cnn_module_norm: str = "batch_norm", key_bias: bool = True,
                 gradient_checkpointing: bool = False, num_up_blocks: int = 4, pre_lookahead_len: int = 3,
                 upsample_stride: int = 2):
        super().__init__()
        if (input_layer, pos_enc_layer_type, selfattention_layer_type) != ("linear", "rel_pos_espnet", "rel_selfattn"):
            raise NotImplementedError("only S3Gen's linear / rel_pos_espnet / rel_selfattn encoder is implemented")
        if macaron_style or use_cnn_module or static_chunk_size or use_dynamic_chunk or global_cmvn is not None:
            raise NotImplementedError("macaron, conv modules, chunking and CMVN are not used by S3Gen")
        if activation_type != "swish":
            raise NotImplementedError(f"activation {activation_type!r}")
        self._output_size = output_size
        self.global_cmvn = None
        self.normalize_before = normalize_before
        self.static_chunk_size = static_chunk_size
        self.use_dynamic_chunk = use_dynamic_chunk
        self.use_dynamic_left_chunk = use_dynamic_left_chunk
        self.gradient_checkpointing = gradient_checkpointing

        def input_layer_() -> LinearNoSubsampling:
            pos = EspnetRelPositionalEncoding(output_size, positional_dropout_rate)
            return LinearNoSubsampling(input_size, output_size, dropout_rate, pos)

        def layers(n: int) -> nn.ModuleList:
            act = nn.SiLU()
            return nn.ModuleList(
                ConformerEncoderLayer(
                    output_size,
                    RelPositionMultiHeadedAttention(attention_heads, output_size, attention_dropout_rate, key_bias),
                    PositionwiseFeedForward(output_size, linear_units, dropout_rate, act),
                    dropout_rate=dropout_rate,
                    normalize_before=normalize_before,
                )
                for _ in range(n)
            )

        # registration order follows upstream's state dict
        self.embed = input_layer_()
        self.after_norm = nn.LayerNorm(output_size, eps=1e-5)
        self.pre_lookahead_layer = PreLookaheadLayer(channels=output_size, pre_lookahead_len=pre_lookahead_len)
        self.encoders = layers(num_blocks)
        self.up_layer = Upsample1D(channels=output_size, out_channels=output_size, stride=upsample_stride)
        self.up_embed = input_layer_()
        self.up_encoders = layers(num_up_blocks)

    def output_size(self) -> int:
        """Attention dimension (512)."""
        return self._output_size

    def forward(self, xs: Tensor, xs_lens: Tensor, decoding_chunk_size: int = 0,
                num_decoding_left_chunks: int = -1) -> tuple[Tensor, Tensor]:
        """xs (B, T, D), xs_lens (B,) -> (B, 2T, D), valid mask (B, 1, 2T) bool. Chunk args are ignored."""
        masks = make_non_pad_mask(xs_lens, xs.size(1))[:, None]  # (B, 1, T)
        xs, pos_emb, masks = self.embed(xs, masks)
        xs = self.pre_lookahead_layer(xs, masks)
        for layer in self.encoders:
            xs = layer(xs, masks, pos_emb)

        xs, xs_lens = self.up_layer(xs.transpose(1, 2), xs_lens)
        xs = xs.transpose(1, 2)  # (B, 2T, D)
        masks = make_non_pad_mask(xs_lens, xs.size(1))[:, None]  # (B, 1, 2T)
        xs, pos_emb, masks = self.up_embed(xs, masks)
        for layer in self.up_encoders:
            xs = layer(xs, masks, pos_emb)
        if self.normalize_before:
            xs = self.after_norm(xs)
        return xs, masks
