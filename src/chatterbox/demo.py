"""End-to-end demo that needs no download: `python -m chatterbox.demo --out demo.wav`.

Without `--ckpt-dir` it writes a checkpoint directory with upstream's file names filled by the
deterministic-weight rule (cached under ~/.cache/chatterbox-fast), loads it the way users load
real checkpoints (`from_local`) and synthesises the text. The voice is random-weight babble —
the point is that the whole pipeline runs, and how fast.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional

from . import cli

DEFAULT_TEXT = "Chatterbox fast runs the whole text to speech pipeline end to end."


def det_checkpoint(kind: str) -> Path:
    """The cached deterministic-weight checkpoint directory for `kind`, written on first use."""
    from .registry import get_spec
    from .testing import write_checkpoint

    kind = get_spec(kind).kind
    root = Path(os.environ.get("CHATTERBOX_FAST_CACHE", Path.home() / ".cache" / "chatterbox-fast"))
    d = root / f"det-{kind}"
    if not (d / "conds.pt").is_file():
        print(f"writing a deterministic-weight '{kind}' checkpoint to {d} (first run only) ...", file=sys.stderr)
        write_checkpoint(kind, d)
    return d


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="demo.wav")
    ap.add_argument("--text", default=DEFAULT_TEXT)
    ap.add_argument("--model", choices=cli.MODELS, default="original")
    ap.add_argument("--ckpt-dir", default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--max-new-tokens", type=int, default=100)
    a = ap.parse_args(argv)
    ckpt = a.ckpt_dir or str(det_checkpoint(a.model))
    args = ["--text", a.text, "--out", a.out, "--model", a.model, "--ckpt-dir", ckpt, "--seed", "0",
            "--max-new-tokens", str(a.max_new_tokens), "--no-watermark"]
    if a.model == "multilingual":
        args += ["--language", "en"]
    if a.device:
        args += ["--device", a.device]
    return cli.main(args)


if __name__ == "__main__":
    sys.exit(main())
