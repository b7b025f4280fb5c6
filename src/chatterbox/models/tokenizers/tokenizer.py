"""Text tokenizers: English (`EnTokenizer`) and multilingual grapheme (`MTLTokenizer`).

Both wrap a HuggingFace `tokenizers` JSON file and encode spaces as the literal `[SPACE]` token.
Token ids come back as an int32 (1, T) CPU tensor; the caller adds the start (255) and stop (0)
text tokens.

Loading: a missing file -> `FileNotFoundError`; a file that is not tokenizer JSON -> `ValueError`;
a vocabulary without `[START]` or `[STOP]` -> `ValueError` naming them (upstream: a bare assert).

Optional language packages (multilingual only), and what happens when they are missing:

| language | package | missing package |
| --- | --- | --- |
| ja | `pykakasi` (extra `multilingual`) | `ImportError` naming `pip install 'chatterbox-fast[multilingual]'` (upstream only warns and passes kanji through, which the grapheme vocabulary cannot spell: wrong audio) |
| zh | `spacy_pkuseg` (extra `multilingual`) | logged warning once; no word segmentation (as upstream; the Cangjie conversion still works) |
| zh | `Cangjie5_TC.json` beside the vocab file | logged warning once; Chinese characters pass through unchanged (never downloaded here) |
| he | `dicta_onnx` (not in any extra) | logged warning once, text unchanged (as upstream) |
| ru | `russian_text_stresser` (not in any extra) | logged warning once, text unchanged (as upstream) |

Optional packages and the Cangjie table load lazily, on the first text of that language.
"""
from __future__ import annotations

import json
import logging
import unicodedata
from pathlib import Path
from typing import Callable, Sequence

import torch
from tokenizers import Tokenizer

logger = logging.getLogger(__name__)

SOT = "[START]"
EOT = "[STOP]"
UNK = "[UNK]"
SPACE = "[SPACE]"
PAD = "[PAD]"
SEP = "[SEP]"
CLS = "[CLS]"
MASK = "[MASK]"

CANGJIE_FILE = "Cangjie5_TC.json"
MULTILINGUAL_HINT = "pip install 'chatterbox-fast[multilingual]'"


def _load_tokenizer(vocab_file_path: str | Path) -> Tokenizer:
    path = Path(vocab_file_path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust loader raises a bare Exception on malformed JSON
        raise ValueError(f"{path} is not a valid HuggingFace tokenizers JSON file: {e}") from e
    _check_sot_eot(tok, str(path))
    return tok


def _check_sot_eot(tok: Tokenizer, where: str) -> None:
    missing = [t for t in (SOT, EOT) if t not in tok.get_vocab()]
    if missing:
        raise ValueError(f"{where} lacks the required special tokens {missing}")


def _decode(tok: Tokenizer, seq: Sequence[int] | torch.Tensor) -> str:
    if isinstance(seq, torch.Tensor):
        seq = seq.reshape(-1).tolist()
    txt = tok.decode(list(seq), skip_special_tokens=False)
    return txt.replace(" ", "").replace(SPACE, " ").replace(EOT, "").replace(UNK, "")


def _to_tensor(ids: list[int]) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.int32).unsqueeze(0)  # (1, T)


class EnTokenizer:
    """English tokenizer over `tokenizer.json`: spaces become `[SPACE]`, no other normalisation."""

    def __init__(self, vocab_file_path: str | Path):
        self.tokenizer = _load_tokenizer(vocab_file_path)

    def check_vocabset_sot_eot(self) -> None:
        """Raise ValueError unless `[START]` and `[STOP]` are in the vocabulary."""
        _check_sot_eot(self.tokenizer, "tokenizer")

    def encode(self, txt: str) -> list[int]:
        """Token ids of `txt` (spaces -> `[SPACE]`)."""
        return self.tokenizer.encode(txt.replace(" ", SPACE)).ids

    def text_to_tokens(self, text: str) -> torch.Tensor:
        """int32 (1, T) CPU tensor of token ids, without start/stop tokens."""
        return _to_tensor(self.encode(text))

    def decode(self, seq: Sequence[int] | torch.Tensor) -> str:
        """Text of token ids; `[STOP]`/`[UNK]` dropped, `[SPACE]` -> space."""
        return _decode(self.tokenizer, seq)


# ---------------------------------------------------------------------------------------------
# Language steps (multilingual)


def _is_kanji(c: str) -> bool:
    return 0x4E00 <= ord(c) <= 0x9FFF


def korean_normalize(text: str) -> str:
    """Split precomposed Hangul syllables into conjoining jamo, then strip surrounding whitespace."""
    out = []
    for ch in text:
        b = ord(ch) - 0xAC00
        if 0 <= b <= 0xD7AF - 0xAC00:
            out.append(chr(0x1100 + b // 588) + chr(0x1161 + (b % 588) // 28))
            if b % 28:
                out.append(chr(0x11A7 + b % 28))
        else:
            out.append(ch)
    return "".join(out).strip()


class _Lazy:
    """One optional component, built on first use; warns once (or raises) if unavailable."""

    def __init__(self, build: Callable[[], object], what: str, required: bool = False):
        self.build, self.what, self.required = build, what, required
        self.obj, self.tried = None, False

    def get(self):
        if not self.tried:
            self.tried = True
            try:
                self.obj = self.build()
            except ImportError as e:
                if self.required:
                    self.tried = False
                    raise ImportError(f"{self.what} needs an optional package ({e}); run {MULTILINGUAL_HINT}") from e
                logger.warning("%s unavailable (%s); skipping that step", self.what, e)
            except Exception as e:  # e.g. a model download inside the package failed
                if self.required:
                    self.tried = False
                    raise
                logger.warning("%s failed to load (%s); skipping that step", self.what, e)
        return self.obj


def _make_kakasi():
    import pykakasi

    return pykakasi.kakasi()


def _make_pkuseg():
    from spacy_pkuseg import pkuseg

    return pkuseg()  # may fetch its default model on first use (spacy_pkuseg's own behaviour)


def _make_dicta():
    from dicta_onnx import Dicta

    return Dicta()


def _make_stresser():
    from russian_text_stresser.text_stresser import RussianTextStresser

    return RussianTextStresser()


class CangjieConverter:
    """Chinese characters -> `[cj_x]...[cj_.]` Cangjie code tokens, from a local `Cangjie5_TC.json`."""

    def __init__(self, mapping_file: str | Path | None):
        self.mapping_file = Path(mapping_file) if mapping_file else None
        self.word2cj: dict[str, str] | None = None
        self.cj2word: dict[str, list[str]] = {}
        self.segmenter = _Lazy(_make_pkuseg, "Chinese word segmentation (spacy_pkuseg)")

    def _load(self) -> dict[str, str]:
        if self.word2cj is None:
            self.word2cj = {}
            if self.mapping_file is None or not self.mapping_file.is_file():
                logger.warning("Cangjie mapping %s not found; Chinese characters pass through unchanged", self.mapping_file)
                return self.word2cj
            try:
                entries = json.loads(self.mapping_file.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                logger.warning("could not read Cangjie mapping %s (%s); Chinese passes through", self.mapping_file, e)
                return self.word2cj
            for entry in entries:
                glyph, code = entry.split("\t")[:2]
                self.word2cj[glyph] = code  # last occurrence wins
                self.cj2word.setdefault(code, []).append(glyph)
        return self.word2cj

    def encode_glyph(self, glyph: str) -> str | None:
        """Cangjie code of one glyph plus its homograph index (omitted when 0), or None."""
        code = self._load().get(glyph)
        if code is None:
            return None
        index = self.cj2word[code].index(glyph)
        return code + (str(index) if index else "")

    def __call__(self, text: str) -> str:
        """Segment (if spacy_pkuseg is available) and replace each coded `Lo` character."""
        seg = self.segmenter.get()
        if seg is not None:
            text = " ".join(seg.cut(text))
        out = []
        for ch in text:
            code = self.encode_glyph(ch) if unicodedata.category(ch) == "Lo" else None
            out.append(ch if code is None else "".join(f"[cj_{c}]" for c in code) + "[cj_.]")
        return "".join(out)


class MTLTokenizer:
    """Multilingual grapheme tokenizer: lowercase, NFKD, language step, `[lang]` prefix, `[SPACE]`."""

    def __init__(self, vocab_file_path: str | Path):
        self.tokenizer = _load_tokenizer(vocab_file_path)
        self.cangjie_converter = CangjieConverter(Path(vocab_file_path).parent / CANGJIE_FILE)
        self._kakasi = _Lazy(_make_kakasi, "Japanese text (pykakasi)", required=True)
        self._dicta = _Lazy(_make_dicta, "Hebrew diacritics (dicta_onnx)")
        self._stresser = _Lazy(_make_stresser, "Russian stress marks (russian_text_stresser)")

    def check_vocabset_sot_eot(self) -> None:
        """Raise ValueError unless `[START]` and `[STOP]` are in the vocabulary."""
        _check_sot_eot(self.tokenizer, "tokenizer")

    def preprocess_text(self, raw_text: str, language_id: str | None = None, lowercase: bool = True,
                        nfkd_normalize: bool = True) -> str:
        """Lowercase and NFKD-normalise (language-independent steps)."""
        text = raw_text.lower() if lowercase else raw_text
        return unicodedata.normalize("NFKD", text) if nfkd_normalize else text

    def hiragana_normalize(self, text: str) -> str:
        """Japanese: kanji runs -> hiragana readings (pykakasi); kana and the rest unchanged; NFKD."""
        out = []
        for seg in self._kakasi.get().convert(text):
            orig, hira = seg["orig"], seg["hira"]
            if any(_is_kanji(c) for c in orig):
                out.append(" " + hira if hira[:1] in ("は", "へ") else hira)
            else:
                out.append(orig)
        return unicodedata.normalize("NFKD", "".join(out))

    def _optional_step(self, lazy: _Lazy, method: str, text: str) -> str:
        obj = lazy.get()
        if obj is None:
            return text
        try:
            return getattr(obj, method)(text)
        except Exception as e:  # upstream: any failure of these optional models only warns
            logger.warning("%s failed (%s); text left unchanged", lazy.what, e)
            return text

    def language_step(self, text: str, language_id: str | None) -> str:
        """The language-specific rewrite for `language_id` (zh, ja, he, ko, ru; others unchanged)."""
        if language_id == "zh":
            return self.cangjie_converter(text)
        if language_id == "ja":
            return self.hiragana_normalize(text)
        if language_id == "he":
            return self._optional_step(self._dicta, "add_diacritics", text)
        if language_id == "ko":
            return korean_normalize(text)
        if language_id == "ru":
            return self._optional_step(self._stresser, "stress_text", text)
        return text

    def encode(self, txt: str, language_id: str | None = None, lowercase: bool = True,
               nfkd_normalize: bool = True) -> list[int]:
        """Token ids of `txt` for language `language_id` (prefixed with `[language_id]` when given)."""
        txt = self.preprocess_text(txt, language_id, lowercase, nfkd_normalize)
        txt = self.language_step(txt, language_id)
        if language_id:
            txt = f"[{language_id.lower()}]{txt}"
        return self.tokenizer.encode(txt.replace(" ", SPACE)).ids

    def text_to_tokens(self, text: str, language_id: str | None = None, lowercase: bool = True,
                       nfkd_normalize: bool = True) -> torch.Tensor:
        """int32 (1, T) CPU tensor of token ids, without start/stop tokens."""
        return _to_tensor(self.encode(text, language_id, lowercase, nfkd_normalize))

    def decode(self, seq: Sequence[int] | torch.Tensor) -> str:
        """Text of token ids; `[STOP]`/`[UNK]` dropped, `[SPACE]` -> space."""
        return _decode(self.tokenizer, seq)
