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
    for rel in ["models/t3/t3.py", "models/t3/inference/sampling.py"]:
        for n, line in enumerate((SRC / rel).read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            assert not pattern.search(code), f"{rel}:{n}: {line.strip()}"


def test_compiled_decode_step_is_a_pure_tensor_program():
    """The functions the compiled T3 step runs contain no host syncs, prints, RNG draws or in-place ops on inputs."""
    import inspect

    from chatterbox.models.t3.inference import sampling
    from chatterbox.runtime import t3_decoder as d

    fns = [d.T3Decoder._step, d.T3Decoder._sample, d._attend, d._rope, d.LlamaBackbone.step, d.LlamaBackbone._qkv,
           d.LlamaBackbone._cos_sin, d.GPT2Backbone.step, d.GPT2Backbone._qkv, sampling.process_llama,
           sampling.process_gpt, sampling.cfg_combine, sampling.repetition_penalty, sampling.temperature,
           sampling.min_p_filter, sampling.top_p_filter, sampling.top_k_filter, sampling.sample]
    bad = re.compile(r"\.item\(\)|\.tolist\(\)|\.cpu\(\)|\bprint\(|torch\.rand|\.exponential_|"
                     r"(?<![\w.])(bool|int|float)\(|\.numpy\(|torch\.tensor\(")
    for fn in fns:
        src = inspect.getsource(fn).split('"""')
        code = src[0] + (src[2] if len(src) > 2 else "")  # without the docstring
        for line in code.splitlines():
            line = line.split("#", 1)[0]
            assert not bad.search(line), f"{fn.__qualname__}: {line.strip()}"
    # the only in-place writes are the KV cache's (the gpt-fast pattern), in _attend
    assert inspect.getsource(d._attend).count("] = ") == 2


def test_no_torchaudio_anywhere():
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"^\s*(import|from)\s+torchaudio", text, re.M), path
