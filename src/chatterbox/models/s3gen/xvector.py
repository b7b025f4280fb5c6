"""CAM++ speaker encoder (x-vector, 192 dims) used by S3Gen for the speaker embedding.

Front end: Kaldi log-mel filterbank (80 bins, 16 kHz) from `chatterbox.audio.kaldi_fbank`, mean
normalised over time per utterance. Network: a 2-D conv "FCM" head over (frequency, time), then a
densely connected TDNN trunk with context-aware masking (CAM), statistics pooling and a linear
layer followed by an affine-free BatchNorm. Module and state-dict names follow upstream exactly;
every ReLU is out of place.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...audio import kaldi_fbank

# ------------------------------------------------------------------------------------------------
# Front end
# ------------------------------------------------------------------------------------------------


def extract_feature(audio: Union[Tensor, Sequence[Tensor]]) -> tuple[Tensor, list[int], list[int]]:
    """16 kHz waves ((B, L) or a list of (L,)) -> (mean-normalised fbank (B, frames, 80) zero-padded,
    frame counts, sample counts)."""
    if isinstance(audio, Tensor) and audio.dim() == 2:
        feats = kaldi_fbank(audio, num_mel_bins=80)  # (B, M, 80): equal lengths, one batched call
        feats = feats - feats.mean(dim=1, keepdim=True)
        return feats, [feats.shape[1]] * feats.shape[0], [audio.shape[1]] * audio.shape[0]
    items = [a.reshape(-1) for a in ([audio] if isinstance(audio, Tensor) else audio)]
    feats = []
    for a in items:
        f = kaldi_fbank(a, num_mel_bins=80)  # (M, 80)
        feats.append(f - f.mean(dim=0, keepdim=True))
    lengths = [f.shape[0] for f in feats]
    padded = nn.utils.rnn.pad_sequence(feats, batch_first=True)  # zero padding to the longest
    return padded, lengths, [a.shape[0] for a in items]


# ------------------------------------------------------------------------------------------------
# FCM head
# ------------------------------------------------------------------------------------------------


class BasicResBlock(nn.Module):
    """2-D residual block; stride only along frequency."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=(stride, 1), padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=(stride, 1), bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class FCM(nn.Module):
    """Feature-map head: (B, F, T) -> (B, 32 * F / 8, T)."""

    def __init__(self, num_blocks: Sequence[int] = (2, 2), m_channels: int = 32, feat_dim: int = 80):
        super().__init__()
        self.conv1 = nn.Conv2d(1, m_channels, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(m_channels)
        self.layer1 = nn.Sequential(BasicResBlock(m_channels, m_channels, 2),
                                    *[BasicResBlock(m_channels, m_channels, 1) for _ in range(num_blocks[0] - 1)])
        self.layer2 = nn.Sequential(BasicResBlock(m_channels, m_channels, 2),
                                    *[BasicResBlock(m_channels, m_channels, 1) for _ in range(num_blocks[0] - 1)])
        self.conv2 = nn.Conv2d(m_channels, m_channels, 3, stride=(2, 1), padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(m_channels)
        self.out_channels = m_channels * (feat_dim // 8)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x[:, None])))  # (B, 32, F, T)
        out = self.layer2(self.layer1(out))  # (B, 32, F/4, T)
        out = F.relu(self.bn2(self.conv2(out)))  # (B, 32, F/8, T)
        b, c, f, t = out.shape
        return out.reshape(b, c * f, t)  # channel-major: index c * F/8 + f


# ------------------------------------------------------------------------------------------------
# TDNN trunk
# ------------------------------------------------------------------------------------------------


class Nonlinear(nn.Module):
    """BatchNorm1d (`batchnorm`) optionally followed by an out-of-place ReLU."""

    def __init__(self, channels: int, relu: bool = True, affine: bool = True):
        super().__init__()
        self.batchnorm = nn.BatchNorm1d(channels, affine=affine)
        self.relu = relu

    def forward(self, x: Tensor) -> Tensor:
        x = self.batchnorm(x)
        return F.relu(x) if self.relu else x


class TDNNLayer(nn.Module):
    """Conv1d (no bias) -> BN -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 dilation: int = 1):
        super().__init__()
        padding = (kernel_size - 1) // 2 * dilation
        self.linear = nn.Conv1d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                                dilation=dilation, bias=False)
        self.nonlinear = Nonlinear(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.nonlinear(self.linear(x))


class CAMLayer(nn.Module):
    """Local conv gated by a context mask from global and 100-frame segment means."""

    def __init__(self, bn_channels: int, out_channels: int, kernel_size: int, dilation: int,
                 reduction: int = 2, seg_len: int = 100):
        super().__init__()
        self.linear_local = nn.Conv1d(bn_channels, out_channels, kernel_size,
                                      padding=(kernel_size - 1) // 2 * dilation, dilation=dilation, bias=False)
        self.linear1 = nn.Conv1d(bn_channels, bn_channels // reduction, 1)
        self.linear2 = nn.Conv1d(bn_channels // reduction, out_channels, 1)
        self.seg_len = seg_len

    def seg_pooling(self, x: Tensor) -> Tensor:
        """Mean over consecutive seg_len frames (last segment partial), repeated back to (B, C, T)."""
        seg = F.avg_pool1d(x, kernel_size=self.seg_len, stride=self.seg_len, ceil_mode=True)  # (B, C, S)
        b, c, s = seg.shape
        seg = seg[..., None].expand(b, c, s, self.seg_len).reshape(b, c, s * self.seg_len)
        return seg[..., : x.shape[-1]]

    def forward(self, x: Tensor) -> Tensor:
        y = self.linear_local(x)  # (B, 32, T)
        context = x.mean(-1, keepdim=True) + self.seg_pooling(x)
        context = F.relu(self.linear1(context))
        return y * torch.sigmoid(self.linear2(context))


class CAMDenseTDNNLayer(nn.Module):
    """BN-ReLU-conv1x1 bottleneck (to bn_channels), BN-ReLU, CAM layer (to growth channels)."""

    def __init__(self, in_channels: int, out_channels: int, bn_channels: int, kernel_size: int,
                 dilation: int = 1):
        super().__init__()
        self.nonlinear1 = Nonlinear(in_channels)
        self.linear1 = nn.Conv1d(in_channels, bn_channels, 1, bias=False)
        self.nonlinear2 = Nonlinear(bn_channels)
        self.cam_layer = CAMLayer(bn_channels, out_channels, kernel_size, dilation)

    def forward(self, x: Tensor) -> Tensor:
        return self.cam_layer(self.nonlinear2(self.linear1(self.nonlinear1(x))))


class CAMDenseTDNNBlock(nn.ModuleList):
    """Densely connected stack: x <- [x ; layer(x)] for layers tdnnd1..tdnndN."""

    def __init__(self, num_layers: int, in_channels: int, out_channels: int, bn_channels: int,
                 kernel_size: int, dilation: int = 1):
        super().__init__()
        for i in range(num_layers):
            layer = CAMDenseTDNNLayer(in_channels + i * out_channels, out_channels, bn_channels,
                                      kernel_size, dilation)
            self.add_module(f"tdnnd{i + 1}", layer)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self:
            x = torch.cat([x, layer(x)], dim=1)
        return x


class TransitLayer(nn.Module):
    """BN -> ReLU -> conv1x1 (no bias)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.nonlinear = Nonlinear(in_channels)
        self.linear = nn.Conv1d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.nonlinear(x))


class StatsPool(nn.Module):
    """(B, C, T) -> (B, 2C): mean and unbiased standard deviation over time."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x.mean(dim=-1), x.std(dim=-1, unbiased=True)], dim=-1)


class DenseLayer(nn.Module):
    """conv1x1 (no bias) on (B, C) or (B, C, T), then an affine-free BatchNorm."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.linear = nn.Conv1d(in_channels, out_channels, 1, bias=False)
        self.nonlinear = Nonlinear(out_channels, relu=False, affine=False)

    def forward(self, x: Tensor) -> Tensor:
        x = self.linear(x[..., None])[..., 0] if x.dim() == 2 else self.linear(x)
        return self.nonlinear(x)


class CAMPPlus(nn.Module):
    """CAM++: fbank (B, T, 80) -> x-vector (B, 192); `inference(wav16)` adds the front end."""

    def __init__(self, feat_dim: int = 80, embedding_size: int = 192, growth_rate: int = 32,
                 bn_size: int = 4, init_channels: int = 128, config_str: str = "batchnorm-relu",
                 memory_efficient: bool = True, output_level: str = "segment", **kwargs):
        super().__init__()
        if config_str != "batchnorm-relu":
            raise ValueError(f"only config_str='batchnorm-relu' is supported, got {config_str!r}")
        if output_level not in ("segment", "frame"):
            raise ValueError(f"output_level must be 'segment' or 'frame', got {output_level!r}")
        self.output_level = output_level
        self.head = FCM(feat_dim=feat_dim)
        channels = self.head.out_channels
        layers: "OrderedDict[str, nn.Module]" = OrderedDict()
        layers["tdnn"] = TDNNLayer(channels, init_channels, 5, stride=2, dilation=1)
        channels = init_channels
        for i, (num_layers, kernel_size, dilation) in enumerate(zip((12, 24, 16), (3, 3, 3), (1, 2, 2))):
            layers[f"block{i + 1}"] = CAMDenseTDNNBlock(num_layers, channels, growth_rate,
                                                        bn_size * growth_rate, kernel_size, dilation)
            channels = channels + num_layers * growth_rate
            layers[f"transit{i + 1}"] = TransitLayer(channels, channels // 2)
            channels //= 2
        layers["out_nonlinear"] = Nonlinear(channels)
        if output_level == "segment":
            layers["stats"] = StatsPool()
            layers["dense"] = DenseLayer(channels * 2, embedding_size)
        self.xvector = nn.Sequential(layers)

    def forward(self, x: Tensor) -> Tensor:
        """Features (B, T, feat_dim) -> (B, embedding_size) (or (B, T', C) at frame level)."""
        x = self.xvector(self.head(x.permute(0, 2, 1)))
        return x.transpose(1, 2) if self.output_level == "frame" else x

    def inference(self, audio_list: Union[Tensor, Sequence[Tensor]]) -> Tensor:
        """16 kHz waves ((B, L), or a list of (L,) tensors) -> x-vectors (B, 192) float32."""
        feats, _, _ = extract_feature(audio_list)
        return self.forward(feats.to(torch.float32))
