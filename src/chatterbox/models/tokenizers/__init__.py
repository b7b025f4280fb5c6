from .tokenizer import EnTokenizer, MTLTokenizer

__all__ = ["EnTokenizer", "MTLTokenizer"]
