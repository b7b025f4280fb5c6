"""Package hygiene: version, lazy exports, no global state changed on import, no host syncs in T3's hot files."""
from __future__ import annotations

import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import chatterbox

SRC = Path(chatterbox.__file__).parent


def test_version_from_metadata():
    assert chatterbox.__version__ == metadata.version("chatterbox-fast")


def test_import_changes_no_global_torch_state():
    code = (
        "import torch, torch._dynamo, torch._inductor.config as ic\n"
        "before = (torch._dynamo.config.cache_size_limit, torch._dynamo.config.suppress_errors,"
        " torch.get_float32_matmul_precision(), torch.backends.cudnn.benchmark, ic.fx_graph_cache)\n"
        "import chatterbox, chatterbox.tts, chatterbox.tts_turbo, chatterbox.mtl_tts, chatterbox.vc\n"
        "after = (torch._dynamo.config.cache_size_limit, torch._dynamo.config.suppress_errors,"
        " torch.get_float32_matmul_precision(), torch.backends.cudnn.benchmark, ic.fx_graph_cache)\n"
        "assert before == after, (before, after)\n"
        "assert chatterbox.ChatterboxTTS.__name__ == 'ChatterboxTTS'\n"
        "assert len(chatterbox.SUPPORTED_LANGUAGES) == 23\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_t3_hot_files_have_no_host_syncs():
    pattern = re.compile(r"\.item\(\)|\.tolist\(\)|inplace\s*=\s*True")
    for rel in ["models/t3/t3.py", "models/t3/inference/t3_hf_backend.py", "models/t3/inference/sampling.py"]:
        for n, line in enumerate((SRC / rel).read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            assert not pattern.search(code), f"{rel}:{n}: {line.strip()}"


def test_no_torchaudio_anywhere():
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"^\s*(import|from)\s+torchaudio", text, re.M), path
