"""EnTokenizer / MTLTokenizer on the generated tokenizer files, and the Turbo tokenizer files."""
from __future__ import annotations

import json
import logging
import sys
import types
import unicodedata

import pytest
import torch

from chatterbox.models.tokenizers import EnTokenizer, MTLTokenizer
from chatterbox.models.tokenizers.tokenizer import korean_normalize
from chatterbox.testing_tokenizers import (
    MTL_LANGUAGES,
    TURBO_TAGS,
    write_cangjie_map,
    write_en_tokenizer,
    write_mtl_tokenizer,
    write_turbo_tokenizer,
)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    write_en_tokenizer(d)
    write_mtl_tokenizer(d)
    write_cangjie_map(d)
    return d


@pytest.fixture(scope="module")
def en(ckpt):
    return EnTokenizer(ckpt / "tokenizer.json")


@pytest.fixture()
def mtl(ckpt):
    return MTLTokenizer(ckpt / "grapheme_mtl_merged_expanded_v1.json")


# --- English ------------------------------------------------------------------------------------


def test_en_special_ids(en):
    voc = en.tokenizer.get_vocab()
    assert (voc["[STOP]"], voc["[UNK]"], voc["[SPACE]"], voc["[START]"]) == (0, 1, 2, 255)
    assert max(voc.values()) < 704


def test_en_encode_decode(en):
    ids = en.encode("Hello there, the thing!")
    assert ids.count(2) == 3  # three spaces -> [SPACE]
    assert 1 not in ids
    assert en.decode(ids) == "Hello there, the thing!"
    toks = en.text_to_tokens("Hi you.")
    assert toks.dtype == torch.int32 and toks.shape == (1, len(en.encode("Hi you.")))
    assert en.decode(toks) == "Hi you."
    # characters outside the vocabulary become [UNK] and are dropped by decode, like [STOP]
    assert en.encode("é") == [1]
    assert en.decode([*en.encode("ok"), 0]) == "ok"


def test_en_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        EnTokenizer(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        EnTokenizer(bad)
    # a valid tokenizer without [START]
    data = json.loads(write_en_tokenizer(tmp_path).read_text())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "[START]"]
    del data["model"]["vocab"]["[START]"]
    (tmp_path / "nostart.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"\[START\]"):
        EnTokenizer(tmp_path / "nostart.json")


# --- Multilingual -------------------------------------------------------------------------------


def test_mtl_basics(mtl):
    voc = mtl.tokenizer.get_vocab()
    assert max(voc.values()) < 2454 and all(f"[{lang}]" in voc for lang in MTL_LANGUAGES)
    ids = mtl.encode("Bonjour à Vous", language_id="fr")
    assert ids[0] == voc["[fr]"] and ids.count(voc["[SPACE]"]) == 2
    assert 1 not in ids
    # lowercased and NFKD-decomposed: "à" -> "a" + U+0300
    assert mtl.decode(ids) == "[fr]" + unicodedata.normalize("NFKD", "bonjour à vous")
    t = mtl.text_to_tokens("hi", language_id="en")
    assert t.dtype == torch.int32 and t.shape == (1, 3)
    assert mtl.encode("hi") == mtl.encode("HI")  # no language: no prefix, still lowercased
    assert mtl.encode("HI", lowercase=False) != mtl.encode("HI")


def test_korean(mtl):
    assert korean_normalize(" 한국 ") == "\u1112\u1161\u11ab\u1100\u116e\u11a8"
    ids = mtl.encode("한국어", language_id="ko")
    assert 1 not in ids  # NFKD + jamo all in vocab


def test_chinese_cangjie(mtl, caplog):
    with caplog.at_level(logging.WARNING):
        out = mtl.cangjie_converter("你好 日曰x")
    # 曰 shares 日's code "a" and is second in file order -> index suffix "1"
    assert out == "[cj_o][cj_n][cj_f][cj_.][cj_v][cj_n][cj_d][cj_.] [cj_a][cj_.][cj_a][cj_1][cj_.]x"
    assert "spacy_pkuseg" in caplog.text or "spacy_pkuseg" in sys.modules
    ids = mtl.encode("你好。", language_id="zh")
    assert 1 not in ids


def test_chinese_with_segmenter(mtl, monkeypatch):
    fake = types.ModuleType("spacy_pkuseg")
    fake.pkuseg = lambda: types.SimpleNamespace(cut=lambda text: ["中國", "人"])
    monkeypatch.setitem(sys.modules, "spacy_pkuseg", fake)
    assert mtl.cangjie_converter("中國人") == "[cj_l][cj_.][cj_w][cj_i][cj_r][cj_m][cj_.] [cj_o][cj_.]"


def test_chinese_without_mapping_passes_through(tmp_path, caplog):
    write_mtl_tokenizer(tmp_path)  # no Cangjie5_TC.json beside it
    tok = MTLTokenizer(tmp_path / "grapheme_mtl_merged_expanded_v1.json")
    with caplog.at_level(logging.WARNING):
        assert tok.cangjie_converter("你好") in ("你好", "你 好")
    assert "Cangjie mapping" in caplog.text


def test_japanese_missing_pykakasi_is_a_clear_error(mtl, monkeypatch):
    monkeypatch.setitem(sys.modules, "pykakasi", None)  # import fails even if installed
    with pytest.raises(ImportError, match=r"chatterbox-fast\[multilingual\]"):
        mtl.encode("日本語", language_id="ja")
    assert mtl.encode("abc", language_id="en")  # other languages unaffected


def test_japanese_with_pykakasi(mtl, monkeypatch):
    segments = [
        {"orig": "日本", "hira": "にほん"},
        {"orig": "は", "hira": "は"},
        {"orig": "橋", "hira": "はし"},
        {"orig": "ガイド", "hira": "がいど"},
    ]
    fake = types.ModuleType("pykakasi")
    fake.kakasi = lambda: types.SimpleNamespace(convert=lambda text: segments)
    monkeypatch.setitem(sys.modules, "pykakasi", fake)
    out = mtl.hiragana_normalize("日本は橋ガイド")
    assert out == unicodedata.normalize("NFKD", "にほんは はしガイド")
    assert 1 not in mtl.encode("日本は橋ガイド", language_id="ja")


def test_hebrew_russian_optional(mtl, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "dicta_onnx", None)
    monkeypatch.setitem(sys.modules, "russian_text_stresser", None)
    monkeypatch.setitem(sys.modules, "russian_text_stresser.text_stresser", None)
    with caplog.at_level(logging.WARNING):
        assert mtl.language_step("שלום", "he") == "שלום"
        assert mtl.language_step("привет", "ru") == "привет"
    assert "dicta_onnx" in caplog.text and "russian_text_stresser" in caplog.text
    fake = types.ModuleType("dicta_onnx")

    class Dicta:
        def add_diacritics(self, text):
            raise RuntimeError("model broke")

    fake.Dicta = Dicta
    monkeypatch.setitem(sys.modules, "dicta_onnx", fake)
    tok = MTLTokenizer(mtl.cangjie_converter.mapping_file.parent / "grapheme_mtl_merged_expanded_v1.json")
    assert tok.language_step("שלום", "he") == "שלום"  # failure -> warning, unchanged


# --- Turbo --------------------------------------------------------------------------------------


def test_turbo_files_load_with_autotokenizer(tmp_path, ckpt):
    from transformers import AutoTokenizer

    with pytest.raises(ValueError, match="separate"):
        write_turbo_tokenizer(ckpt)  # beside an English tokenizer.json
    tok = AutoTokenizer.from_pretrained(write_turbo_tokenizer(tmp_path / "turbo"))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    text = "Hello world [laugh] and the [clear throat] thing, ünï!"
    ids = tok(text, return_tensors="pt", padding=True, truncation=True)["input_ids"]
    assert ids.shape[0] == 1 and ids.dtype == torch.int64 and int(ids.max()) < 50276
    assert tok.decode(ids[0]) == text
    for tag in TURBO_TAGS:
        assert len(tok(tag)["input_ids"]) == 1, tag


def test_segmenter_load_failure_only_warns(mtl, monkeypatch, caplog):
    fake = types.ModuleType("spacy_pkuseg")

    def pkuseg():
        raise OSError("could not download the default model")

    fake.pkuseg = pkuseg
    monkeypatch.setitem(sys.modules, "spacy_pkuseg", fake)
    with caplog.at_level(logging.WARNING):
        assert mtl.cangjie_converter("中") == "[cj_l][cj_.]"
    assert "could not download" in caplog.text
