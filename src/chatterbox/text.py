"""Text clean-up before tokenisation: upstream's `punc_norm` rule sets, input checks, languages.

`punc_norm` reproduces upstream's three module-level functions exactly (English `tts.py`,
multilingual `mtl_tts.py`, Turbo/Nano `tts_turbo.py`), including their quirks (see the tests).

Production choice (deviation from upstream): upstream turns an empty string into the fixed sentence
"You need to add some text for me to talk." and speaks it, and speaks "." for whitespace-only text.
The public API instead calls `validate_text` first, which raises `ValueError` for empty or
whitespace-only text and for text longer than the API's limit, so a caller bug never becomes audio.
`punc_norm` itself keeps upstream's behaviour for callers that want it. `validate_text` also rejects
text with nothing to speak (only punctuation, symbols, emoji): see `is_speakable`.

`split_text` cuts long text into pieces that each fit one utterance (see its docstring and
`DEFAULT_MAX_CHARS`), for `generate(..., split_text=True)` and the CLI.
"""
from __future__ import annotations

import re
import unicodedata

EMPTY_TEXT_SENTENCE = "You need to add some text for me to talk."

# Literal replacements, applied in order over the whole string.
_ENGLISH_REPLACEMENTS: tuple[tuple[str, str], ...] = (
    ("...", ", "),
    ("\u2026", ", "),  # …
    (":", ","),
    (" - ", ", "),
    (";", ", "),
    ("\u2014", "-"),  # em dash
    ("\u2013", "-"),  # en dash
    (" ,", ","),
    ("\u201c", '"'),
    ("\u201d", '"'),
    ("\u2018", "'"),
    ("\u2019", "'"),
)
_TURBO_REPLACEMENTS: tuple[tuple[str, str], ...] = (
    ("\u2026", ", "),
    (":", ","),
    ("\u2014", "-"),
    ("\u2013", "-"),
    (" ,", ","),
    ("\u201c", '"'),
    ("\u201d", '"'),
    ("\u2018", "'"),
    ("\u2019", "'"),
)
_ENDERS = (".", "!", "?", "-", ",")
_CJK_ENDERS = ("\u3001", "\uff0c", "\u3002", "\uff1f", "\uff01")  # 、 ， 。 ？ ！

RULES: dict[str, tuple[tuple[tuple[str, str], ...], tuple[str, ...]]] = {
    "english": (_ENGLISH_REPLACEMENTS, _ENDERS),
    "multilingual": (_ENGLISH_REPLACEMENTS, _ENDERS + _CJK_ENDERS),
    "turbo": (_TURBO_REPLACEMENTS, _ENDERS),
}

# A.11: language code -> name, the same 23 entries for every multilingual checkpoint.
SUPPORTED_LANGUAGES: dict[str, str] = {
    "ar": "Arabic", "da": "Danish", "de": "German", "el": "Greek", "en": "English",
    "es": "Spanish", "fi": "Finnish", "fr": "French", "he": "Hebrew", "hi": "Hindi",
    "it": "Italian", "ja": "Japanese", "ko": "Korean", "ms": "Malay", "nl": "Dutch",
    "no": "Norwegian", "pl": "Polish", "pt": "Portuguese", "ru": "Russian", "sv": "Swedish",
    "sw": "Swahili", "tr": "Turkish", "zh": "Chinese",
}


def punc_norm(text: str, style: str = "english") -> str:
    """Upstream's punctuation clean-up; `style` is "english", "multilingual" or "turbo"."""
    try:
        replacements, enders = RULES[style]
    except KeyError:
        raise ValueError(f"unknown punc_norm style {style!r}; expected one of {sorted(RULES)}") from None
    if len(text) == 0:
        return EMPTY_TEXT_SENTENCE
    if text[0].islower():  # decided on the raw input: a leading space prevents capitalisation
        text = text[0].upper() + text[1:]
    text = " ".join(text.split())
    for old, new in replacements:
        text = text.replace(old, new)
    text = text.rstrip(" ")
    if not text.endswith(enders):
        text += "."
    return text


def punc_norm_multilingual(text: str) -> str:
    """`punc_norm` with the multilingual rules (CJK sentence enders kept)."""
    return punc_norm(text, "multilingual")


def punc_norm_turbo(text: str) -> str:
    """`punc_norm` with the Turbo/Nano rules (keeps `...`, ` - ` and `;`)."""
    return punc_norm(text, "turbo")


def validate_text(text: str, max_chars: int | None = None) -> str:
    """Check user text before synthesis; returns it unchanged or raises TypeError/ValueError."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if not text.strip():
        raise ValueError("text is empty or only whitespace; pass the words to speak")
    if not is_speakable(text):
        shown = text.strip() if len(text.strip()) <= 40 else text.strip()[:40] + "..."
        raise ValueError(
            f"text {shown!r} has nothing to speak: it holds only punctuation, symbols or emoji; "
            "pass at least one letter or digit"
        )
    if max_chars is not None and len(text) > max_chars:
        raise ValueError(
            f"text is {len(text)} characters long, above the limit of {max_chars}; "
            "split it into shorter pieces (e.g. sentences) and synthesise them one by one"
        )
    return text


def validate_language(language_id: str | None) -> str | None:
    """Lower-cased language code, None for a falsy id; ValueError listing the codes if unsupported."""
    if not language_id:
        return None
    code = language_id.lower()
    if code not in SUPPORTED_LANGUAGES:
        codes = ", ".join(sorted(SUPPORTED_LANGUAGES))
        raise ValueError(f"Unsupported language_id {language_id!r}. Supported languages: {codes}")
    return code


def is_speakable(text: str) -> bool:
    """True if `text` holds a letter or a digit of any script (Unicode categories L* and N*)."""
    return any(unicodedata.category(ch)[0] in "LN" for ch in text)


# --- long-text splitting -----------------------------------------------------------------------
#
# Budget: one utterance holds at most 1,000 speech tokens (25 tokens/s, 40 s). English TTS speech
# runs at roughly 12-16 characters per second, so 300 characters is about 20-25 s: half the budget,
# leaving room for slow voices and low cfg/exaggeration settings, and short enough that T3 keeps
# its alignment. Scripts that carry a syllable (Han, Hangul) or a mora (kana) per character speak
# far fewer characters per second (Mandarin ~4, Japanese ~6, Korean ~5 syllables plus spaces), so
# they get proportionally smaller defaults. These are estimates, not measurements on the real model.
DEFAULT_MAX_CHARS = 300
LANGUAGE_MAX_CHARS: dict[str, int] = {"zh": 80, "ja": 100, "ko": 160}
# Pieces shorter than max_chars // MIN_PIECE_DIVISOR (37 characters, ~6 English words, for 300) are
# merged with a neighbour when the merged piece still fits: T3 is least reliable on very short
# utterances and a batch of slivers wastes rows.
MIN_PIECE_DIVISOR = 8

# Sentence enders: Latin and shared marks (need a space or the end after them), then marks that end
# a sentence with no space after them (CJK full-width forms).
_SPACED_ENDERS = frozenset(".!?\u2026\u203c\u2047\u2048\u2049\u061f\u06d4\u0964\u0965\u1362\u0589")
_CJK_ENDERS_SET = frozenset("\u3002\uff01\uff1f\uff61")  # 。！？｡
_CLOSERS = frozenset("\"')]}\u201d\u2019\u00bb\u203a\u300d\u300f\u3011\uff09\u3015\u3009\u300b")
_OPENERS = frozenset("\"'([{\u201c\u2018\u00ab\u2039\u00bf\u00a1\u300c\u300e\u3010\uff08\u3014\u3008\u300a")
_SPACED_CLAUSE = frozenset(",;:\u060c\u061b")  # , ; : and Arabic comma / semicolon
_CJK_CLAUSE = frozenset("\uff0c\u3001\uff1b\uff1a")  # ， 、 ； ：
_DASHES = frozenset("\u2014\u2013\u2015")  # em dash, en dash, horizontal bar
# A "." after these words (case-insensitive) never ends a sentence: titles before a name and
# abbreviations that are always followed by more of the sentence.
_TITLE_ABBREVIATIONS = frozenset(
    "mr mrs ms mx dr prof st sr sra srta mt ft rev fr gen col lt sgt capt cmdr adm gov sen rep hon "
    "pres supt insp messrs mme mlle hr frl dra vs cf e.g i.e viz approx ca z.b d.h u.a bzw usw vgl "
    "p.ex".split()
)
# ... and after these only when a number follows ("No. 5", "Fig. 3", "pp. 10-12").
_NUMBER_ABBREVIATIONS = frozenset("no nos nr vol vols p pp fig figs art sec ch eq ex op".split())
# Initials ("J.") and dotted acronyms ("U.S", "a.m") never end a sentence either: "J. R. R. Tolkien",
# "the U.S. Army". A missed boundary only makes a longer piece; a false one puts a pause mid-phrase.
_INITIALS = re.compile(r"(?:[^\W\d_]\.)*[^\W\d_]")
_PARAGRAPH = re.compile(r"\n[^\S\n]*\n\s*")  # a blank line (possibly holding spaces)

Cut = tuple[int, int]  # (end of the left piece, start of the right piece); a < b when a space is dropped


def default_max_chars(text: str = "", language: str | None = None) -> int:
    """The `max_chars` `split_text` uses: per language code, else guessed from the script of `text`."""
    if language:
        return LANGUAGE_MAX_CHARS.get(language.lower().split("-")[0], DEFAULT_MAX_CHARS)
    letters = han = kana = hangul = 0
    for ch in text:
        if not ch.isalpha():
            continue
        letters += 1
        o = ord(ch)
        if 0x3040 <= o <= 0x30FF or 0x31F0 <= o <= 0x31FF or 0xFF66 <= o <= 0xFF9F:
            kana += 1
        elif 0x4E00 <= o <= 0x9FFF or 0x3400 <= o <= 0x4DBF or 0xF900 <= o <= 0xFAFF or 0x20000 <= o <= 0x2FA1F:
            han += 1
        elif 0xAC00 <= o <= 0xD7A3 or 0x1100 <= o <= 0x11FF or 0x3130 <= o <= 0x318F:
            hangul += 1
    if letters and 2 * (han + kana) >= letters:
        return LANGUAGE_MAX_CHARS["ja" if kana else "zh"]
    if letters and 2 * hangul >= letters:
        return LANGUAGE_MAX_CHARS["ko"]
    return DEFAULT_MAX_CHARS


def _skip(s: str, i: int, chars: frozenset) -> int:
    while i < len(s) and s[i] in chars:
        i += 1
    return i


def _word_before(s: str, i: int) -> str:
    """The token that ends just before position i, without leading quotes/brackets."""
    start = s.rfind(" ", 0, i) + 1
    return s[start:i].lstrip("".join(_OPENERS)).lower()


def _sentence_cuts(p: str) -> list[Cut]:
    """Sentence boundaries of one whitespace-normalised paragraph."""
    cuts: list[Cut] = []
    i, n = 0, len(p)
    while i < n:
        ch = p[i]
        if ch in _CJK_ENDERS_SET:
            j = _skip(p, _skip(p, i, _CJK_ENDERS_SET | _SPACED_ENDERS), _CLOSERS)
            if j < n:
                cuts.append((j, j + 1) if p[j] == " " else (j, j))
            i = j
            continue
        if ch not in _SPACED_ENDERS:
            i += 1
            continue
        run_end = _skip(p, i, _SPACED_ENDERS)
        j = _skip(p, run_end, _CLOSERS)
        if j >= n or p[j] != " ":  # "3.14", "e.g.,", "Yahoo!Inc" or the end of the text
            i = j  # j > i: past the run of marks
            continue
        k = _skip(p, j + 1, _OPENERS)
        nxt = p[k] if k < n else ""
        boundary = not nxt.islower()  # "wait... what", '"Hi!" she said', "etc. and"
        if boundary and p[i:run_end] == ".":
            word = _word_before(p, i)
            if word in _TITLE_ABBREVIATIONS or _INITIALS.fullmatch(word):  # "Dr. Who", "J. R. R.", "U.S."
                boundary = False
            elif word in _NUMBER_ABBREVIATIONS and nxt.isdigit():  # "No. 5"
                boundary = False
        if boundary:
            cuts.append((j, j + 1))
        i = j + 1
    return cuts


def _clause_cuts(s: str) -> list[Cut]:
    """Clause boundaries: , ; : (and Arabic forms) before a space, CJK ，、；：, dashes, ellipses, " (" ."""
    cuts: list[Cut] = []
    n = len(s)
    for i, ch in enumerate(s):
        if ch in _CJK_CLAUSE:
            j = _skip(s, i + 1, _CLOSERS)
            if j < n:
                cuts.append((j, j + 1) if s[j] == " " else (j, j))
        elif ch in _SPACED_CLAUSE or ch in _SPACED_ENDERS:  # "a, b", "wait... what" (not "1,000", "3:30")
            if i + 1 < n and (s[i + 1] in _SPACED_CLAUSE or s[i + 1] in _SPACED_ENDERS):
                continue  # inside a run such as "..."; the run's last mark decides
            j = _skip(s, i + 1, _CLOSERS)
            if j < n and s[j] == " ":
                cuts.append((j, j + 1))
        elif ch in _DASHES or (ch == "-" and 0 < i < n - 1 and s[i - 1] == " " and s[i + 1] == " "):
            if i + 1 < n and s[i + 1] == " ":
                cuts.append((i + 1, i + 2))  # "a — b": the dash ends the left piece
            elif i + 1 < n and 0 < i and s[i - 1] != " " and ch != "-":
                cuts.append((i + 1, i + 1))  # "a—b"
        elif ch == "(" and i > 0 and s[i - 1] == " ":
            cuts.append((i - 1, i))
    return sorted(set(c for c in cuts if 0 < c[0] and c[1] < n))


def _word_cuts(s: str) -> list[Cut]:
    return [(i, i + 1) for i, ch in enumerate(s) if ch == " " and 0 < i < len(s) - 1]


def _is_grapheme_start(s: str, i: int) -> bool:
    ch = s[i]
    if unicodedata.category(ch)[0] == "M" or ch in "\u200d\ufe0e\ufe0f" or s[i - 1] == "\u200d":
        return False
    return not ("\U0001f3fb" <= ch <= "\U0001f3ff")  # skin-tone modifiers


def _char_chunks(s: str, max_chars: int) -> list[tuple[str, str]]:
    """Cut text with no usable boundary into near-equal chunks at grapheme starts (joined with "")."""
    cuts: list[Cut] = []
    start, n = 0, len(s)
    while n - start > max_chars:
        remaining = -(-(n - start) // max_chars)  # chunks still needed, ceil
        end = start + -(-(n - start) // remaining)
        space = s.rfind(" ", start + 1, end + 1)  # glued units ("— — word") can still hold a space
        cut = space if space > start else end
        while space <= start and cut > start + 1 and not _is_grapheme_start(s, cut):
            cut -= 1
        if space <= start and cut == start + 1 and not _is_grapheme_start(s, cut):
            cut = end  # a cluster longer than max_chars: cut it anyway
        if s[cut] == " ":  # glued units can hold a space: drop it at the cut as the other levels do
            cuts.append((cut, cut + 1))
            start = cut + 1
        elif s[cut - 1] == " ":
            cuts.append((cut - 1, cut))
            start = cut
        else:
            cuts.append((cut, cut))
            start = cut
    return _units(s, cuts)


def _units(s: str, cuts: list[Cut]) -> list[tuple[str, str]]:
    """`s` cut at `cuts` -> [(text, joiner before it)]; the joiner is " " where a space was dropped."""
    units, prev, joiner = [], 0, ""
    for a, b in cuts:
        if a > prev:
            units.append((s[prev:a], joiner))
            prev, joiner = b, s[a:b]
    units.append((s[prev:], joiner))
    return [(t, j) for t, j in units if t]


def _glue_unspeakable(units: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Attach units with nothing to speak ("...", "—", "🙂") to the unit before (or after) them."""
    out: list[tuple[str, str]] = []
    lead: tuple[str, str] | None = None  # unspeakable units before the first speakable one
    for text, joiner in units:
        if not is_speakable(text):
            if out:
                out[-1] = (out[-1][0] + joiner + text, out[-1][1])
            else:
                lead = (text, joiner) if lead is None else (lead[0] + joiner + text, lead[1])
            continue
        if lead is not None:
            text, joiner, lead = lead[0] + joiner + text, lead[1], None
        out.append((text, joiner))
    return out if out else units


_LEVELS = (_clause_cuts, _word_cuts)


def _pack(s: str, level: int, max_chars: int) -> list[tuple[str, str]]:
    """Pieces of at most max_chars from `s`, cutting at `_LEVELS[level]` boundaries first."""
    if len(s) <= max_chars:
        return [(s, "")]
    if level >= len(_LEVELS):
        return _char_chunks(s, max_chars)
    units = _glue_unspeakable(_units(s, _LEVELS[level](s)))
    if len(units) < 2:
        return _pack(s, level + 1, max_chars)
    atoms: list[tuple[str, str]] = []
    for text, joiner in units:
        sub = _pack(text, level + 1, max_chars)
        atoms.append((sub[0][0], joiner))
        atoms.extend(sub[1:])
    return _balance(atoms, max_chars)


def _balance(atoms: list[tuple[str, str]], max_chars: int) -> list[tuple[str, str]]:
    """Group consecutive atoms into the fewest pieces <= max_chars, as even in length as possible."""
    n = len(atoms)
    best: list[tuple[int, int] | None] = [(0, 0)] + [None] * n  # (pieces, sum of squared slack) of atoms[:i]
    back = [0] * (n + 1)
    for end in range(1, n + 1):
        length = 0
        for start in range(end - 1, -1, -1):
            length += len(atoms[start][0]) + (len(atoms[start + 1][1]) if start + 1 < end else 0)
            if length > max_chars and start < end - 1:
                break
            prev = best[start]
            if prev is None:
                continue
            cand = (prev[0] + 1, prev[1] + (max_chars - length) ** 2)
            if best[end] is None or cand < best[end]:
                best[end], back[end] = cand, start
    pieces: list[tuple[str, str]] = []
    end = n
    while end > 0:
        start = back[end]
        text = atoms[start][0] + "".join(j + t for t, j in atoms[start + 1:end])
        pieces.append((text, atoms[start][1]))
        end = start
    return pieces[::-1]


def _merge_small(pieces: list[tuple[str, str]], min_chars: int, max_chars: int) -> list[tuple[str, str]]:
    """Merge pieces shorter than min_chars into the shorter-after-merge neighbour while it fits."""
    pieces = list(pieces)
    stuck: set[str] = set()
    while True:
        order = sorted((len(t), i) for i, (t, _) in enumerate(pieces) if len(t) < min_chars)
        merged = False
        for _, i in order:
            options = []
            if i > 0:
                options.append((len(pieces[i - 1][0]) + len(pieces[i][1]) + len(pieces[i][0]), i - 1))
            if i + 1 < len(pieces):
                options.append((len(pieces[i][0]) + len(pieces[i + 1][1]) + len(pieces[i + 1][0]), i))
            options = [o for o in options if o[0] <= max_chars]
            if not options:
                continue
            _, left = min(options)
            (a, ja), (b, jb) = pieces[left], pieces[left + 1]
            pieces[left: left + 2] = [(a + jb + b, ja)]
            merged = True
            break
        if not merged:
            return pieces
    del stuck


def split_text(text: str, max_chars: int | None = None, *, language: str | None = None,
               min_chars: int | None = None) -> list[str]:
    """Cut `text` into pieces of at most `max_chars` characters that each fit one utterance.

    `max_chars` defaults to `default_max_chars(text, language)`: 300 for most languages (about 20-25 s
    of English speech, half of one utterance's 1,000-token budget), fewer for Chinese, Japanese and
    Korean. Cuts fall at sentence ends first (. ! ? … and 。！？, quotes or brackets closing after
    them; blank lines end paragraphs), then inside an over-long sentence at clause marks (, ; : dashes
    and ，、；：), then between words, and only for text with no spaces (CJK, a long URL) between
    characters. Abbreviations ("Mr.", "e.g.", "U.S. and"), initials ("J. R. R."), numbers ("3.14",
    "$2.50", "1,000") and ellipses before a lower-case word do not end a sentence. An over-long
    sentence is cut into the fewest pieces, as even as possible. Pieces shorter than `min_chars`
    (default max_chars // 8) are merged with a neighbour when the result still fits.

    Guarantees: no piece is empty, has leading/trailing whitespace, exceeds `max_chars` or lacks a
    letter or digit (punctuation-only runs are attached to a neighbour). Whitespace runs count as
    one space and no other character is lost or added: where a cut fell at a space,
    `" ".join(pieces)` restores the whitespace-normalised text (`" ".join(text.split())`); cuts
    between two non-space characters (CJK, an over-long word) join with "" instead. Text that fits
    comes back as `[text.strip()]` unchanged; text with nothing to speak (empty, whitespace,
    punctuation only) gives `[]`.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if max_chars is None:
        max_chars = default_max_chars(text, language)
    if max_chars < 1:
        raise ValueError(f"max_chars must be at least 1, got {max_chars}")
    min_chars = max_chars // MIN_PIECE_DIVISOR if min_chars is None else min_chars
    stripped = text.strip()
    if not is_speakable(stripped):
        return []
    if len(stripped) <= max_chars:
        return [stripped]
    sentences: list[tuple[str, str]] = []  # (sentence, joiner before it)
    for paragraph in _PARAGRAPH.split(stripped):
        p = " ".join(paragraph.split())
        for k, (sentence, joiner) in enumerate(_units(p, _sentence_cuts(p))):
            sentences.append((sentence, joiner if k else " "))
    pieces: list[tuple[str, str]] = []
    for sentence, joiner in _glue_unspeakable(sentences):
        sub = _pack(sentence, 0, max_chars)
        pieces.append((sub[0][0], joiner))
        pieces.extend(sub[1:])
    pieces = _merge_small(pieces, min_chars, max_chars)
    return [t for t, _ in pieces if is_speakable(t)]
