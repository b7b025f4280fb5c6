"""Padding and chunk masks for the S3Gen encoder and estimator.

Every mask is built on the device of its inputs from a Python-int length (known from a tensor shape
or a bucket), so nothing here reads a tensor back to the host.
"""
from __future__ import annotations

import torch
from torch import Tensor


def make_pad_mask(lengths: Tensor, max_len: int = 0) -> Tensor:
    """(B,) lengths -> (B, max_len) bool, True at padded positions (t >= length).

    `max_len` should be given (usually the padded width). If it is 0 it is taken from the largest
    length, which costs one host sync; inference code always passes it.
    """
    if max_len <= 0:
        max_len = int(lengths.max())  # host sync; only for callers that do not know the width
    t = torch.arange(max_len, device=lengths.device)
    return t[None, :] >= lengths[:, None]


def make_non_pad_mask(lengths: Tensor, max_len: int = 0) -> Tensor:
    """(B,) lengths -> (B, max_len) bool, True at valid positions (t < length)."""
    return ~make_pad_mask(lengths, max_len)


def subsequent_chunk_mask(size: int, chunk_size: int, num_left_chunks: int = -1,
                          device: torch.device | str = "cpu") -> Tensor:
    """(size, size) bool: query i sees keys j < (i // chunk_size + 1) * chunk_size.

    `num_left_chunks` is accepted for compatibility and ignored (all left chunks are visible).
    """
    idx = torch.arange(size, device=device)
    limit = (idx // chunk_size + 1) * chunk_size  # (size,)
    return idx[None, :] < limit[:, None]


def add_optional_chunk_mask(xs: Tensor, masks: Tensor, use_dynamic_chunk: bool = False,
                            use_dynamic_left_chunk: bool = False, decoding_chunk_size: int = 0,
                            static_chunk_size: int = 0, num_decoding_left_chunks: int = -1) -> Tensor:
    """Attention mask (B, 1 or T, T) bool for key padding `masks` (B, 1, T), chunked if requested.

    Inference never takes the random dynamic-chunk path: with `use_dynamic_chunk` a positive
    `decoding_chunk_size` gives fixed chunks and anything else gives full attention. Rows with no
    visible key are not possible for lengths >= 1 and are not checked (that check was a host sync).
    """
    if use_dynamic_chunk and decoding_chunk_size > 0:
        chunk = subsequent_chunk_mask(xs.size(1), decoding_chunk_size, num_decoding_left_chunks, xs.device)
        return masks & chunk[None]  # (B, T, T)
    if static_chunk_size > 0:
        chunk = subsequent_chunk_mask(xs.size(1), static_chunk_size, num_decoding_left_chunks, xs.device)
        return masks & chunk[None]  # (B, T, T)
    return masks
