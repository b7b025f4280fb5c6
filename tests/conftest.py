"""Shared test fixtures: golden parity data (copied from ../shared/reference/parity) and helpers."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

FIXTURES = Path(__file__).parent / "fixtures"


def load_fixture(name: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and the `info` metadata of tests/fixtures/<name>.safetensors."""
    with safe_open(str(FIXTURES / f"{name}.safetensors"), framework="pt") as f:
        info = json.loads((f.metadata() or {}).get("info", "{}"))
        return {k: f.get_tensor(k) for k in f.keys()}, info


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """||ours - ref|| / ||ref|| in float64."""
    ours, ref = ours.detach().double().cpu(), ref.detach().double().cpu()
    assert ours.shape == ref.shape, f"shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    return float((ours - ref).norm() / ref.norm())


def read_inventory(name: str) -> dict[str, tuple[int, ...]]:
    """state_dicts/<name>.tsv -> {key: shape} (scalars as ())."""
    out = {}
    for line in (FIXTURES / f"{name}.tsv").read_text().splitlines()[1:]:
        key, shape, _dtype, _kind = line.split("\t")
        out[key] = () if shape in ("", "scalar") else tuple(int(s) for s in shape.split("x"))
    return out


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory):
    """kind -> a complete deterministic-weight checkpoint directory, written once per test session.

    Short references keep S3Gen's prompt (and CI time) small; Turbo/Nano need more than 5 s.
    """
    from chatterbox.testing import write_checkpoint

    made: dict = {}

    def get(kind: str):
        if kind not in made:
            seconds = 5.5 if kind in ("turbo", "nano") else 2.0
            made[kind] = write_checkpoint(kind, tmp_path_factory.mktemp(f"ckpt-{kind}"), ref_seconds=seconds)
        return made[kind]

    return get


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """kind -> a shared `chatterbox.testing.tiny_model` (2-layer T3, full-size S3Gen with 2 flow steps).

    For tests of the pipeline's logic that do not change the model (compile tests build their own).
    """
    from chatterbox.testing import tiny_model

    made: dict = {}

    def get(kind: str):
        if kind not in made:
            made[kind] = tiny_model(kind, tmp_path_factory.mktemp(f"tiny-{kind}"), cfm_steps=2)
        return made[kind]

    yield get
    for m in made.values():
        m.close()
