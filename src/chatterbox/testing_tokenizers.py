"""Small but real tokenizer files for tests, demos and generated checkpoint directories.

Each builder writes files in the formats the real checkpoints use, with tiny vocabularies whose ids
fit the corresponding T3 text embeddings:

- `write_en_tokenizer(dir)` -> `tokenizer.json` (HF `tokenizers` BPE, whitespace pre-tokeniser;
  `[STOP]`=0, `[UNK]`=1, `[SPACE]`=2, `[START]`=255; < 704 ids).
- `write_mtl_tokenizer(dir)` -> `grapheme_mtl_merged_expanded_v1.json` (grapheme-level, language tokens
  `[en]`, `[fr]`, ..., Cangjie tokens `[cj_a]`...; < 2454 ids).
- `write_cangjie_map(dir)` -> `Cangjie5_TC.json` (a few real Cangjie codes).
- `write_turbo_tokenizer(dir)` -> GPT-2 style `vocab.json`, `merges.txt`, `tokenizer_config.json`,
  `special_tokens_map.json` for `transformers.AutoTokenizer.from_pretrained(dir)` (byte-level BPE,
  paralinguistic tags as added tokens; ids < 50276). Use a directory without an English
  `tokenizer.json`: AutoTokenizer would prefer that file.

Everything is deterministic: the same call always writes the same bytes.
"""
from __future__ import annotations

import json
import string
import unicodedata
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

EN_TOKENIZER_FILE = "tokenizer.json"
MTL_TOKENIZER_FILE = "grapheme_mtl_merged_expanded_v1.json"
CANGJIE_FILE = "Cangjie5_TC.json"

EN_SPECIALS = {"[STOP]": 0, "[UNK]": 1, "[SPACE]": 2}
EN_START_ID = 255
EXTRA_SPECIALS = ("[PAD]", "[SEP]", "[CLS]", "[MASK]")
MTL_LANGUAGES = (
    "ar", "da", "de", "el", "en", "es", "fi", "fr", "he", "hi", "it", "ja",
    "ko", "ms", "nl", "no", "pl", "pt", "ru", "sv", "sw", "tr", "zh",
)
TURBO_TAGS = (
    "[laugh]", "[chuckle]", "[cough]", "[sigh]", "[gasp]", "[groan]", "[sniff]", "[shush]",
    "[clear throat]",
)
# A few common English pairs: enough to make the BPE merge path real, small enough to read.
_EN_MERGES = (
    ("t", "h"), ("th", "e"), ("i", "n"), ("e", "r"), ("a", "n"), ("o", "n"), ("r", "e"),
    ("e", "n"), ("o", "u"), ("l", "l"), ("in", "g"), ("a", "t"), ("i", "s"), ("e", "d"),
    ("T", "h"), ("Th", "e"), ("an", "d"), ("o", "r"), ("e", "s"), ("s", "t"),
)
_TURBO_MERGES = (
    ("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("e", "r"), ("a", "n"), ("o", "n"),
    ("Ġ", "a"), ("Ġ", "s"), ("Ġ", "w"), ("r", "e"), ("o", "u"), ("i", "s"), ("l", "l"),
    ("Ġ", "h"), ("e", "n"), ("in", "g"), ("Ġ", "b"), ("Ġ", "c"), ("Ġ", "o"), ("e", "d"),
    ("Ġa", "n"), ("Ġan", "d"), ("Ġ", "i"), ("Ġ", "m"), ("Ġ", "f"), ("H", "e"), ("He", "ll"),
    ("Hell", "o"), ("o", "r"), ("Ġw", "or"),
)
_CANGJIE_ENTRIES = (  # glyph \t code (Cangjie 5); 日/曰 share a code to exercise the index suffix
    "你\tonf", "好\tvnd", "中\tl", "國\twirm", "人\to", "日\ta", "曰\ta", "我\thqi",
    "是\tamyo", "的\thapi", "大\tk", "文\tyk",
)


def _en_symbols() -> list[str]:
    return list(string.ascii_letters + string.digits + string.punctuation)


def _bpe_vocab(specials: dict[str, int], symbols: list[str], merges, top_id: int) -> dict[str, int]:
    # specials at their fixed ids, then symbols, then merge results, then filler up to top_id
    vocab = dict(specials)
    nxt = 0
    for tok in symbols + ["".join(m) for m in merges]:
        if tok in vocab:
            continue
        while nxt in vocab.values():
            nxt += 1
        vocab[tok] = nxt
    used = set(vocab.values())
    for i in range(top_id):
        if i not in used:
            vocab[f"[UNUSED{i}]"] = i
    return vocab


def _save(tok: Tokenizer, specials: list[str], path: Path) -> Path:
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def write_en_tokenizer(directory: str | Path) -> Path:
    """Write an English `tokenizer.json` (ids 0..259) into `directory`; returns its path."""
    specials = {**EN_SPECIALS, "[START]": EN_START_ID}
    vocab = _bpe_vocab(specials, _en_symbols(), _EN_MERGES, EN_START_ID)
    for s in EXTRA_SPECIALS:
        vocab[s] = len(vocab)
    assert sorted(vocab.values()) == list(range(len(vocab))) and len(vocab) < 704
    tok = Tokenizer(models.BPE(vocab=vocab, merges=list(_EN_MERGES), unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return _save(tok, [*specials, *EXTRA_SPECIALS], Path(directory) / EN_TOKENIZER_FILE)


def _mtl_symbols() -> list[str]:
    ranges = [
        (0x21, 0x7E),  # ASCII printable (upper case stays: encode(lowercase=False) must work)
        (0xA1, 0x17F),  # Latin-1 supplement, Latin extended-A
        (0x300, 0x36F),  # combining diacritics (NFKD output)
        (0x384, 0x3CE),  # Greek
        (0x400, 0x45F),  # Cyrillic
        (0x5B0, 0x5EA),  # Hebrew points and letters
        (0x600, 0x652),  # Arabic
        (0x900, 0x97F),  # Devanagari
        (0x1100, 0x1112), (0x1161, 0x1175), (0x11A8, 0x11C2),  # conjoining Hangul jamo
        (0x3001, 0x3002), (0x3041, 0x3096), (0x3099, 0x309C), (0x30A1, 0x30FC),  # kana
    ]
    out = []
    for lo, hi in ranges:
        out += [chr(c) for c in range(lo, hi + 1) if unicodedata.category(chr(c)) != "Cn"]
    return out


def write_mtl_tokenizer(directory: str | Path) -> Path:
    """Write a multilingual grapheme tokenizer (language and Cangjie tokens, < 2454 ids)."""
    specials = {**EN_SPECIALS, "[START]": EN_START_ID}
    added = [*specials, *EXTRA_SPECIALS]
    added += [f"[{lang}]" for lang in MTL_LANGUAGES]
    added += [f"[cj_{c}]" for c in string.ascii_lowercase + string.digits + "."]
    vocab = _bpe_vocab(specials, _mtl_symbols(), (), EN_START_ID)
    for s in added:
        vocab.setdefault(s, len(vocab))
    assert sorted(vocab.values()) == list(range(len(vocab))) and len(vocab) < 2454
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return _save(tok, added, Path(directory) / MTL_TOKENIZER_FILE)


def write_cangjie_map(directory: str | Path) -> Path:
    """Write a small `Cangjie5_TC.json` (JSON list of "glyph<TAB>code" strings)."""
    path = Path(directory) / CANGJIE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(list(_CANGJIE_ENTRIES), ensure_ascii=False), encoding="utf-8")
    return path


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (256 entries)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def write_turbo_tokenizer(directory: str | Path) -> Path:
    """Write GPT-2 style tokenizer files (byte-level BPE + tags) loadable by AutoTokenizer; returns the dir."""
    directory = Path(directory)
    if (directory / EN_TOKENIZER_FILE).exists():
        # AutoTokenizer would load that tokenizer.json instead of these files (as on the hub, the
        # Turbo checkpoint is a directory of its own).
        raise ValueError(f"{directory} already holds a {EN_TOKENIZER_FILE}; use a separate Turbo directory")
    directory.mkdir(parents=True, exist_ok=True)
    vocab = {ch: i for i, ch in enumerate(byte_to_unicode().values())}
    for a, b in _TURBO_MERGES:
        assert a in vocab and b in vocab, (a, b)
        vocab.setdefault(a + b, len(vocab))
    eos = "<|endoftext|>"
    vocab[eos] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in _TURBO_MERGES)
    (directory / "merges.txt").write_text(merges, encoding="utf-8")

    def added(content: str, special: bool) -> dict:
        return {"content": content, "lstrip": False, "rstrip": False, "normalized": not special,
                "single_word": False, "special": special}

    decoder = {str(vocab[eos]): added(eos, True)}
    for i, tag in enumerate(TURBO_TAGS):
        decoder[str(len(vocab) + i)] = added(tag, False)
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "add_prefix_space": False,
        "bos_token": eos, "eos_token": eos, "unk_token": eos,
        "model_max_length": 1024,
        "added_tokens_decoder": decoder,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=1, ensure_ascii=False), encoding="utf-8")
    special_map = {"bos_token": eos, "eos_token": eos, "unk_token": eos}
    (directory / "special_tokens_map.json").write_text(json.dumps(special_map, indent=1), encoding="utf-8")
    return directory
