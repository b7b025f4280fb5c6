"""Long text: split_text (cuts, abbreviations, merging, guarantees) and crossfade_join of the pieces."""
from __future__ import annotations

import math
import random
import re
import time

import pytest
import torch

from chatterbox.audio import crossfade_join
from chatterbox.text import (
    DEFAULT_MAX_CHARS,
    LANGUAGE_MAX_CHARS,
    default_max_chars,
    is_speakable,
    split_text,
)


def _sentences(text: str, max_chars: int = 30) -> list[str]:
    """Pieces with merging off, and max_chars small enough that the text does not fit as a whole."""
    return split_text(text, max_chars, min_chars=0)


def test_short_text_is_returned_stripped_and_unchanged():
    assert split_text("  Hello   there.\n") == ["Hello   there."]  # fits: exactly text.strip()
    text = "First sentence. Second one!"
    assert split_text(text) == [text]
    assert split_text("x" * DEFAULT_MAX_CHARS) == ["x" * DEFAULT_MAX_CHARS]


@pytest.mark.parametrize("text", ["", "   ", "\n\t ", "...", "!!!", "🙂🙂", "— — ?!", "«»"])
def test_nothing_to_speak_gives_no_pieces(text):
    assert split_text(text) == []


@pytest.mark.parametrize(
    "text, pieces",
    [
        ("It rains. The sun shines! Is it cold? Yes.", ["It rains.", "The sun shines!", "Is it cold?", "Yes."]),
        ("Mr. Smith met Dr. Jones. They spoke.", ["Mr. Smith met Dr. Jones.", "They spoke."]),
        ("Use a tool, e.g. a hammer. Or i.e. this.", ["Use a tool, e.g. a hammer.", "Or i.e. this."]),
        ("The U.S. Army came. It left.", ["The U.S. Army came.", "It left."]),
        ("J. R. R. Tolkien wrote it. Then he slept.", ["J. R. R. Tolkien wrote it.", "Then he slept."]),
        ("Pi is 3.14 today. It costs $2.50 now.", ["Pi is 3.14 today.", "It costs $2.50 now."]),
        ("We had 1,000 men. See No. 5 here.", ["We had 1,000 men.", "See No. 5 here."]),
        ('He said "Hi." Then he left.', ['He said "Hi."', "Then he left."]),
        ("(It was late.) We went home.", ["(It was late.)", "We went home."]),
        ('"Stop!" she cried. He did not stop.', ['"Stop!" she cried.', "He did not stop."]),
        ("Wait... what is it? Wait... Then go.", ["Wait... what is it?", "Wait...", "Then go."]),
        ("Wait\u2026 Then we go home.", ["Wait\u2026", "Then we go home."]),
        ("Really?! I never knew that.", ["Really?!", "I never knew that."]),
        ("At 5 p.m. the shop shut. Acme Inc. The firm.", ["At 5 p.m. the shop shut.", "Acme Inc.", "The firm."]),
        ("Main St. is far away now. Okay.", ["Main St. is far away now.", "Okay."]),
        ("¿Qué pasa? «Nada.» Todo bien ya.", ["¿Qué pasa?", "«Nada.»", "Todo bien ya."]),
        ("Version 2.0.1 is out now. Go.", ["Version 2.0.1 is out now.", "Go."]),
    ],
)
def test_sentence_boundaries(text, pieces):
    assert _sentences(text, max_chars=len(text) - 1) == pieces


def test_cjk_and_other_scripts():
    assert _sentences("你好。今天天气很好！我们去公园吗？好的。", 12) == ["你好。", "今天天气很好！", "我们去公园吗？", "好的。"]
    assert _sentences("「こんにちは。」と言った。はい。", 10) == ["「こんにちは。」", "と言った。", "はい。"]
    assert _sentences("मैं घर जा रहा हूँ। तुम कहाँ हो?", 20) == ["मैं घर जा रहा हूँ।", "तुम कहाँ हो?"]
    assert _sentences("مرحبا كيف حالك؟ أنا بخير.", 20) == ["مرحبا كيف حالك؟", "أنا بخير."]


def test_paragraphs_and_whitespace():
    text = "Heading without a stop\n\nThe body   starts\nhere and goes on.\n\n\n  Next part."
    assert _sentences(text, 40) == ["Heading without a stop", "The body starts here and goes on.", "Next part."]
    # a single newline inside a paragraph is ordinary whitespace (hard-wrapped text)
    assert _sentences("one two\nthree four five six", 12) == ["one two", "three four", "five six"]


def test_long_sentence_cut_at_clauses_evenly():
    text = "When the rain stopped, we walked to the river; the water was high, and the boats were gone."
    pieces = split_text(text, 50)
    assert pieces == ["When the rain stopped, we walked to the river;", "the water was high, and the boats were gone."]
    # the fewest pieces, as even as possible: 3 clauses of ~30 fit as 2 pieces, not 45 + 15
    assert split_text("aaaa bbbb cccc, dddd eeee ffff, gggg hhhh iiii", 30) == ["aaaa bbbb cccc,", "dddd eeee ffff, gggg hhhh iiii"]
    # a clause that is itself too long is cut between words; its pieces pack with the short clauses
    assert split_text("Um, so, I think that this long clause has no commas at all in it", 40) == [
        "Um, so, I think that this long clause", "has no commas at all in it"]


def test_clause_marks():
    assert _sentences("alpha beta: gamma delta; epsilon", 20) == ["alpha beta:", "gamma delta; epsilon"]
    assert _sentences("alpha beta \u2014 gamma delta epsilon", 20) == ["alpha beta \u2014", "gamma delta epsilon"]
    assert _sentences("alpha beta\u2014gamma delta epsilon", 20) == ["alpha beta\u2014", "gamma delta epsilon"]
    assert _sentences("alpha beta (gamma delta) epsilon zeta", 26) == ["alpha beta", "(gamma delta) epsilon zeta"]
    assert _sentences("今天天气很好，我们去公园、然后回家。", 11) == ["今天天气很好，", "我们去公园、然后回家。"]
    assert _sentences("we have 1,000,000 men at 3:30 today", 20) == ["we have 1,000,000", "men at 3:30 today"]


def test_word_and_character_fallback():
    pieces = split_text("word " * 100, 48)
    # 9 words (44 chars) fit in 48 -> 12 pieces, balanced as 4 x 9 words and 8 x 8 words (not 11 x 9 + 1)
    assert sorted(len(p) for p in pieces) == [39] * 8 + [44] * 4
    assert " ".join(pieces) == " ".join(("word " * 100).split())
    cjk = "我" * 250  # no spaces, no punctuation: near-equal character chunks joined with ""
    pieces = split_text(cjk, 100)
    assert [len(p) for p in pieces] == [84, 83, 83] and "".join(pieces) == cjk
    url = "see https://example.com/" + "a" * 200 + " ok"
    pieces = split_text(url, 80)
    assert all(len(p) <= 80 for p in pieces) and "".join(pieces).replace(" ", "") == url.replace(" ", "")
    # graphemes stay whole: a combining accent is never separated from its letter
    pieces = split_text("e\u0301" * 30, 7)
    assert all(p[0] != "\u0301" for p in pieces) and "".join(pieces) == "e\u0301" * 30


def test_tiny_fragments_are_merged_when_they_fit():
    text = "Yes. " + "This is a rather long sentence that goes on. " * 3 + "OK."
    pieces = split_text(text, 100)
    sentence = "This is a rather long sentence that goes on."
    assert pieces == [f"Yes. {sentence}", sentence, f"{sentence} OK."]  # sentences stay whole, slivers join
    assert split_text(text, 100, min_chars=0)[0] == "Yes."  # merging off
    # a sliver that cannot fit next to either neighbour stays on its own
    long = "x" * 45 + "."
    assert split_text(f"{long} Hi. {long}", 48) == [long, "Hi.", long]


def test_punctuation_runs_attach_to_a_neighbour():
    assert _sentences("Hello there. ... World is big.", 20) == ["Hello there. ...", "World is big."]
    assert _sentences("... Hello there. World is big.", 20) == ["... Hello there.", "World is big."]
    assert _sentences("Hello there.\n\n🙂\n\nWorld is big.", 20) == ["Hello there. 🙂", "World is big."]


def test_language_defaults():
    assert default_max_chars("Hello", None) == DEFAULT_MAX_CHARS == 300
    assert default_max_chars("", "zh") == LANGUAGE_MAX_CHARS["zh"] and default_max_chars("", "ZH") == 80
    assert default_max_chars("", "fr") == 300 and default_max_chars("", "ja") == 100 and default_max_chars("", "ko") == 160
    assert default_max_chars("我们去公园吧", None) == 80  # guessed from the script
    assert default_max_chars("こんにちは世界", None) == 100
    assert default_max_chars("안녕하세요 여러분", None) == 160
    assert default_max_chars("Hello 世界 and more words", None) == 300
    # 210 chars > 80: one sentence per piece, and 7-char sentences (< 80 // 8) merge in pairs
    assert split_text("今天天气很好。" * 30, language="zh") == ["今天天气很好。" * 2] * 15
    assert split_text("今天天气很好。" * 30, language="en") == ["今天天气很好。" * 30]  # 210 <= 300


def test_bad_arguments():
    with pytest.raises(TypeError):
        split_text(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_chars"):
        split_text("Hello.", 0)


_WORDS = ["Mr.", "Dr.", "e.g.", "i.e.", "U.S.", "J.", "3.14", "$2.50", "1,000", "hello", "World", "the", "cat",
          "a", "quick", "Brown", "fox...", "wait,", "why?", "Yes!", "no.", '"Hi."', "(aside)", "\u2014", "-", "etc.",
          "St.", "\u00abOui\u00bb", "\u00bfQu\u00e9?", "caf\u00e9;", "x:", "\U0001f642", "word\u2014word"]
_CJK = ["你好。", "世界！", "今天天气很好，", "我们", "x" * 50, "https://example.com/" + "a" * 120]


@pytest.mark.parametrize("seed", range(4))
def test_guarantees_on_random_text(seed):
    rng = random.Random(seed)
    for _ in range(150):
        with_cjk = rng.random() < 0.3
        vocab = _WORDS + _CJK if with_cjk else _WORDS
        text = "".join(rng.choice(vocab) + rng.choice([" ", " ", " ", "\n", "  ", "\n\n", ""]) for _ in range(rng.randint(1, 120)))
        max_chars = rng.choice([20, 40, 80, 150, 300])
        pieces = split_text(text, max_chars)
        assert pieces, text
        for p in pieces:
            assert p == p.strip() and 0 < len(p) <= max_chars and is_speakable(p), (text, max_chars, p)
        if len(text.strip()) <= max_chars:
            assert pieces == [text.strip()]
        elif not with_cjk and not re.search("\\S[\u2014\u2013]\\S", text):  # every cut falls at a space
            assert " ".join(pieces) == " ".join(text.split()), (text, max_chars)
        # no character other than whitespace is lost or added
        assert re.sub(r"\s", "", "".join(pieces)) == re.sub(r"\s", "", text), (text, max_chars)


def test_spaced_text_rejoins_exactly():
    rng = random.Random(7)
    words = [w for w in _WORDS if "\u2014" not in w]
    for _ in range(300):
        text = " ".join(rng.choice(words) + rng.choice(["", "", "\n", "\n\n "]) for _ in range(rng.randint(20, 150)))
        max_chars = rng.choice([20, 40, 80, 150, 300])
        pieces = split_text(text, max_chars)
        if len(text.strip()) > max_chars:
            assert " ".join(pieces) == " ".join(text.split()), (text, max_chars)
        for i, p in enumerate(pieces):  # merging is complete: a sliver has no neighbour it fits with
            if len(p) < max_chars // 8:
                assert all(len(p) + 1 + len(pieces[j]) > max_chars for j in (i - 1, i + 1) if 0 <= j < len(pieces))


def test_long_input_is_fast():
    text = "It was a dark and stormy night; the rain fell in torrents, except at occasional intervals. " * 1000
    start = time.perf_counter()
    pieces = split_text(text)
    assert time.perf_counter() - start < 2.0
    assert len(pieces) == 1000 and pieces[0] == text.split(". ")[0] + "."


# --- crossfade_join -------------------------------------------------------------------------------

SR = 24000


def _sine(n: int, freq: float, phase: float, amp: float = 0.5) -> torch.Tensor:
    t = torch.arange(n, dtype=torch.float64) / SR
    return (amp * torch.sin(2 * math.pi * freq * t + phase)).float()[None]


def _max_step(x: torch.Tensor) -> float:
    return float(x.reshape(-1).diff().abs().max())


def test_crossfade_lengths():
    pieces = [torch.ones(1, n) for n in (1000, 2000, 3000)]
    assert crossfade_join(pieces, SR).shape == (1, 6000 - 2 * 480)  # 20 ms = 480 samples per join
    assert crossfade_join(pieces, SR, fade_ms=10).shape == (1, 6000 - 2 * 240)
    assert crossfade_join(pieces, SR, gap_ms=100).shape == (1, 6000 + 2 * 2400)
    assert crossfade_join(pieces, SR, fade_ms=0).shape == (1, 6000)
    # pieces shorter than the fade: the overlap shrinks to what is there (5, then 480 into the earlier audio)
    assert crossfade_join([torch.ones(1, 1000), torch.ones(1, 5), torch.ones(1, 1000)], SR).shape == (1, 1520)
    assert crossfade_join([torch.ones(1, 3), torch.ones(1, 2)], SR).shape == (1, 3)
    assert crossfade_join([torch.ones(1, 3), torch.ones(1, 2)], SR, gap_ms=1).shape == (1, 5 + 24)
    assert crossfade_join([torch.ones(1, 0), torch.ones(1, 700), torch.ones(0)], SR).shape == (1, 700)


def test_crossfade_identity_and_empty():
    x = _sine(5000, 220, 0.3)
    for kw in ({}, {"gap_ms": 50}, {"equal_power": True}):
        out = crossfade_join([x], SR, **kw)
        assert out.shape == (1, 5000) and torch.equal(out, x) and out.data_ptr() != x.data_ptr()
    assert torch.equal(crossfade_join([x[0]], SR), x)  # (n,) pieces are accepted
    empty = crossfade_join([], SR)
    assert empty.shape == (1, 0) and empty.dtype == torch.float32
    assert crossfade_join([torch.zeros(1, 0)], SR).shape == (1, 0)
    y = crossfade_join([x.double(), x.double()], SR)
    assert y.dtype == torch.float64


def test_crossfade_has_no_click():
    a, b = _sine(4800, 220, math.pi / 2), _sine(4800, 330, -math.pi / 2)  # a ends near +0.5, b starts at -0.5
    fade = 480
    assert _max_step(torch.cat([a, b], 1)) > 0.95  # plain concatenation clicks
    own = max(_max_step(a), _max_step(b))  # ~0.043 for the 330 Hz sine
    out = crossfade_join([a, b], SR)
    # a crossfade step is a convex mix of the signals' steps plus the gain change times |a - b| <= 2 * 0.5
    assert _max_step(out) <= own + math.pi * 0.5 / fade + 1e-6
    assert torch.equal(out[:, : 4800 - fade], a[:, : 4800 - fade])  # untouched outside the overlap
    assert torch.equal(out[:, 4800:], b[:, fade:])
    gapped = crossfade_join([a, b], SR, gap_ms=50)
    assert _max_step(gapped) <= own + math.pi * 0.5 / fade + 1e-6
    assert torch.count_nonzero(gapped[:, 4800: 4800 + 1200]) == 0  # 50 ms of silence between them
    assert float(gapped[0, 4799].abs()) < 1e-4 and float(gapped[0, 6000].abs()) < 1e-4  # faded to ~0 at the gap


def test_crossfade_gains():
    n, fade = 2000, 480
    ones, zeros = torch.ones(1, n), torch.zeros(1, n)
    flat = crossfade_join([ones, ones], SR)  # raised cosine: gains sum to 1, a shared level is unchanged
    assert torch.allclose(flat, torch.ones_like(flat), atol=1e-6)
    out_gain = crossfade_join([ones, zeros], SR, equal_power=True)[0, n - fade: n]
    in_gain = crossfade_join([zeros, ones], SR, equal_power=True)[0, n - fade: n]
    assert torch.allclose(out_gain ** 2 + in_gain ** 2, torch.ones(fade), atol=1e-6)  # equal power
    assert float(out_gain[0]) > 0.99 and float(in_gain[0]) < 0.01 and torch.all(in_gain.diff() > 0)


def test_crossfade_bad_input():
    with pytest.raises(ValueError, match="piece 1"):
        crossfade_join([torch.ones(1, 10), torch.ones(2, 10)], SR)
    with pytest.raises(ValueError, match=">= 0"):
        crossfade_join([torch.ones(1, 10)], SR, fade_ms=-1)
