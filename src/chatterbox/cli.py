"""Command line: `chatterbox --text "Hello." --out hello.wav [--voice ref.wav] [--model turbo]`."""
from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Optional

from .registry import MODEL_KINDS as MODELS

logger = logging.getLogger("chatterbox.cli")


def load_model(model: str, device: str, ckpt_dir: Optional[str], watermark: bool):
    """`from_local(ckpt_dir)` when a directory is given, else `from_pretrained` (Hugging Face Hub)."""
    from .registry import load_model as _load

    return _load(model, ckpt_dir, device, watermark=watermark)


def synthesize(tts, text: str, *, model: str, voice: Optional[str], language: Optional[str], seed: Optional[int],
               max_new_tokens: int):
    """Speak `text` (long text split into sentence pieces, decoded as one batch, crossfaded); (1, N) float32."""
    from .text import split_text

    conds = tts.make_conditionals(voice) if voice else None
    pieces = split_text(text, language=language)
    if len(pieces) > 1:
        logger.info("speaking %d pieces as one batch", len(pieces))
    args = (text, language) if model == "multilingual" else (text,)
    return tts.generate(*args, conds=conds, seed=seed, max_new_tokens=max_new_tokens, split_text=True)


def write_wav(path: str, wav, sr: int) -> None:
    import soundfile as sf

    sf.write(path, wav.reshape(-1).numpy(), sr, subtype="PCM_16")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="chatterbox", description="Chatterbox text-to-speech (chatterbox-fast).")
    ap.add_argument("--text", required=True, help="text to speak (long text is split into sentence pieces)")
    ap.add_argument("--out", required=True, help="output WAV path (24 kHz, 16-bit)")
    ap.add_argument("--voice", help="reference audio to clone (any rate, mono or stereo)")
    ap.add_argument("--model", choices=MODELS, default="original")
    ap.add_argument("--language", default=None, help="language code for --model multilingual (e.g. en, fr, ja)")
    ap.add_argument("--device", default=None, help="cuda, cuda:N, mps or cpu (default: cuda if available)")
    ap.add_argument("--ckpt-dir", default=None, help="local checkpoint directory (skips the Hub download)")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--max-new-tokens", type=int, default=1000, help="speech tokens per piece of text (25 per second)")
    ap.add_argument("--compile", action="store_true", help="compile the model first (worth it for long jobs)")
    ap.add_argument("--no-watermark", action="store_true", help="do not apply the Perth watermark")
    ap.add_argument("-q", "--quiet", action="store_true")
    return ap


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:  # `chatterbox serve ...`: the OpenAI-compatible HTTP server
        from .serve.cli import main as serve_main

        return serve_main(argv[1:])
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if a.quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if a.model == "multilingual" and not a.language:
        print("chatterbox: --language is required with --model multilingual", file=sys.stderr)
        return 2
    try:
        from .checkpoints import resolve_device

        device = resolve_device(a.device)
        t0 = time.perf_counter()
        tts = load_model(a.model, device, a.ckpt_dir, watermark=not a.no_watermark)
        logger.info("loaded %s on %s in %.1f s", a.model, device, time.perf_counter() - t0)
        if a.compile:
            tts.compile()
        t0 = time.perf_counter()
        wav = synthesize(tts, a.text, model=a.model, voice=a.voice, language=a.language, seed=a.seed,
                         max_new_tokens=a.max_new_tokens)
        dt = time.perf_counter() - t0
        write_wav(a.out, wav, tts.sr)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"chatterbox: error: {e}", file=sys.stderr)
        return 1
    secs = wav.shape[1] / tts.sr
    logger.info("wrote %s: %.2f s of audio in %.2f s (real-time factor %.2f)", a.out, secs, dt, dt / max(secs, 1e-9))
    return 0


if __name__ == "__main__":
    sys.exit(main())
