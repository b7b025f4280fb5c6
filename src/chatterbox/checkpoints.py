"""Checkpoint files: device resolution, hub download, loading with clear errors."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, Optional, Union

import torch
from torch import nn

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]


def resolve_device(device: Union[str, torch.device, None]) -> str:
    """Validate a device string early: 'cuda' without CUDA is an error; 'mps' without MPS falls back to 'cpu'."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unsupported device {str(device)!r}; use 'cuda', 'cuda:N', 'mps' or 'cpu'") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device={str(device)!r} requested but CUDA is not available "
                               "(install a CUDA build of PyTorch or pass device='cpu')")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise RuntimeError(f"device={str(device)!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif dev.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            logger.warning("MPS is not available on this machine; falling back to the CPU")
            return "cpu"
    elif dev.type != "cpu":
        raise ValueError(f"unsupported device {str(device)!r}; use 'cuda', 'cuda:N', 'mps' or 'cpu'")
    return str(dev)


def map_location(device: str) -> Optional[str]:
    """Where torch.load should put tensors (upstream: CPU for cpu/mps, else as saved)."""
    return "cpu" if device in ("cpu", "mps") else None


def require_files(ckpt_dir: PathLike, names: Iterable[str], what: str) -> Path:
    """The checkpoint directory, after checking that every required file is there."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {ckpt_dir}")
    missing = [n for n in names if not (ckpt_dir / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{what} checkpoint directory {ckpt_dir} is missing {', '.join(missing)}")
    return ckpt_dir


def load_weights(path: PathLike, device: str = "cpu") -> dict[str, torch.Tensor]:
    """A flat tensor dict from a .safetensors file or a torch pickle (weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        return torch.load(str(path), map_location=map_location(device) or "cpu", weights_only=True)
    except Exception as e:  # truncated or foreign files raise many different types
        raise ValueError(f"could not read checkpoint {path} ({type(e).__name__}: {e})") from e


def load_into(module: nn.Module, state_dict: dict, *, name: str, strict: bool = True) -> nn.Module:
    """load_state_dict with errors that name the file's problem (missing, unexpected or mis-shaped tensors)."""
    if "model" in state_dict and not torch.is_tensor(state_dict["model"]):  # legacy wrapping
        state_dict = state_dict["model"][0]
    own = module.state_dict()
    wrong = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
             for k, v in state_dict.items() if k in own and torch.is_tensor(v) and v.shape != own[k].shape]
    if wrong:
        raise ValueError(f"{name} does not fit this model (wrong variant?): " + "; ".join(wrong[:5]))
    params = {k for k, _ in module.named_parameters()}
    missing = sorted(params - set(state_dict))
    if missing:
        raise ValueError(f"{name} is missing {len(missing)} weight(s), e.g. {missing[:5]} (wrong or truncated file?)")
    result = module.load_state_dict(state_dict, strict=strict)
    if not strict and result.unexpected_keys:
        logger.info("%s: ignored %d unexpected key(s), e.g. %s", name, len(result.unexpected_keys), result.unexpected_keys[:3])
    return module


def download(repo_id: str, filenames: Iterable[str], token: Optional[str] = None) -> Path:
    """Fetch files from the Hugging Face Hub (cached); returns their local directory."""
    from huggingface_hub import hf_hub_download

    local = None
    for name in filenames:
        local = hf_hub_download(repo_id=repo_id, filename=name, token=token)
    return Path(local).parent


def snapshot(repo_id: str, allow_patterns: list[str], token: Optional[str] = None) -> Path:
    """Download the matching files of a Hub repository snapshot; returns its local directory."""
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id=repo_id, repo_type="model", allow_patterns=allow_patterns, token=token))
