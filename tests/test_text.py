"""punc_norm rule sets (upstream's measured worked examples) and text/language validation."""
from __future__ import annotations

import pytest

from chatterbox.text import (
    EMPTY_TEXT_SENTENCE,
    SUPPORTED_LANGUAGES,
    is_speakable,
    punc_norm,
    punc_norm_multilingual,
    punc_norm_turbo,
    validate_language,
    validate_text,
)


@pytest.mark.parametrize(
    "text, english, multilingual, turbo",
    [
        ("wait... what?", "Wait,  what?", "Wait,  what?", "Wait... what?"),
        ("a - b; c: d", "A, b,  c, d.", "A, b,  c, d.", "A - b; c, d."),
        ("   ", ".", ".", "."),
        (" lower start", "lower start.", "lower start.", "lower start."),
        ("well\u2026", "Well,", "Well,", "Well,"),
        ("你好。", "你好。.", "你好。", "你好。."),
        ("", EMPTY_TEXT_SENTENCE, EMPTY_TEXT_SENTENCE, EMPTY_TEXT_SENTENCE),
    ],
)
def test_worked_examples(text, english, multilingual, turbo):
    assert punc_norm(text) == english
    assert punc_norm_multilingual(text) == multilingual
    assert punc_norm_turbo(text) == turbo


def test_quotes_dashes_and_whitespace():
    text = "\u201cHi\u201d \u2018there\u2019\u2014now\u2013then\t\n ok"
    assert punc_norm(text) == "\"Hi\" 'there'-now-then ok."
    assert punc_norm_turbo(text) == "\"Hi\" 'there'-now-then ok."
    assert punc_norm("Hello ,world!") == "Hello,world!"
    assert punc_norm("Already fine!") == "Already fine!"
    assert punc_norm_multilingual("你好，") == "你好，"
    with pytest.raises(ValueError, match="style"):
        punc_norm("x", style="klingon")


def test_validate_text():
    assert validate_text("Hello.") == "Hello."
    for bad in ("", "   ", "\n\t"):
        with pytest.raises(ValueError, match="empty"):
            validate_text(bad)
    with pytest.raises(ValueError, match="limit of 10"):
        validate_text("x" * 11, max_chars=10)
    assert validate_text("x" * 10, max_chars=10)
    with pytest.raises(TypeError):
        validate_text(None)  # type: ignore[arg-type]


@pytest.mark.parametrize("text", ["...", "!!!", "\U0001f642\U0001f642", " - ; : ", "\u2014\u2026", "\u3002\uff01", "$%&*", "\u0301"])
def test_validate_text_rejects_nothing_to_speak(text):
    assert not is_speakable(text)
    with pytest.raises(ValueError, match="nothing to speak"):
        validate_text(text)


@pytest.mark.parametrize("text", ["a", "7", "...ok!", "\u4f60", "\u0905", "\u0645", "\u00bd", "\u2167", "\U0001f642 hi"])
def test_validate_text_accepts_any_letter_or_digit(text):
    assert is_speakable(text) and validate_text(text) == text


def test_validate_language():
    assert len(SUPPORTED_LANGUAGES) == 23
    assert validate_language("FR") == "fr"
    assert validate_language(None) is None and validate_language("") is None
    with pytest.raises(ValueError, match="Supported languages: ar, da"):
        validate_language("xx")
