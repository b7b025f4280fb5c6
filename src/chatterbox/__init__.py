"""chatterbox-fast: a drop-in, compile-first implementation of Resemble AI's Chatterbox TTS."""
from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("chatterbox-fast")
except _metadata.PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0+unknown"

_LAZY = {
    "ChatterboxTTS": ("chatterbox.tts", "ChatterboxTTS"),
    "ChatterboxVC": ("chatterbox.vc", "ChatterboxVC"),
    "ChatterboxMultilingualTTS": ("chatterbox.mtl_tts", "ChatterboxMultilingualTTS"),
    "SUPPORTED_LANGUAGES": ("chatterbox.mtl_tts", "SUPPORTED_LANGUAGES"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    # Lazy exports keep `import chatterbox` light: torch/transformers load only when a model is used.
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'chatterbox' has no attribute {name!r}")
