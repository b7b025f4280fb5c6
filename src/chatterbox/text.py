"""Text clean-up before tokenisation: upstream's `punc_norm` rule sets, input checks, languages.

`punc_norm` reproduces upstream's three module-level functions exactly (English `tts.py`,
multilingual `mtl_tts.py`, Turbo/Nano `tts_turbo.py`), including their quirks (see the tests).

Production choice (deviation from upstream): upstream turns an empty string into the fixed sentence
"You need to add some text for me to talk." and speaks it, and speaks "." for whitespace-only text.
The public API instead calls `validate_text` first, which raises `ValueError` for empty or
whitespace-only text and for text longer than the API's limit, so a caller bug never becomes audio.
`punc_norm` itself keeps upstream's behaviour for callers that want it.
"""
from __future__ import annotations

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
