"""Tokenizers: raw bytes (vocab 256) or a local Hugging Face `tokenizers` JSON file."""

from __future__ import annotations

import os

import numpy as np

from skymoe_jax.errors import DataError


class ByteTokenizer:
    """Each UTF-8 byte is a token; decoding is lossless for any byte string."""

    vocab_size = 256
    name = "byte"

    def encode(self, data: bytes | str) -> np.ndarray:
        raw = data.encode("utf-8") if isinstance(data, str) else data
        return np.frombuffer(raw, np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        return bytes(np.asarray(ids, np.uint8)).decode("utf-8", errors="replace")


class HFTokenizer:
    """A tokenizer.json from the Hugging Face `tokenizers` library, loaded from local disk."""

    def __init__(self, path: str, setting: str = "data.tokenizer"):
        from tokenizers import Tokenizer

        try:
            self._tok = Tokenizer.from_file(path)
        except Exception as e:  # the library raises plain Exceptions for malformed files
            raise DataError(f"{setting}={path!r} is not a readable Hugging Face tokenizer.json ({e})") from None
        self.vocab_size = self._tok.get_vocab_size()
        self.name = os.path.abspath(path)

    def encode(self, data: bytes | str) -> np.ndarray:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])


def make_tokenizer(spec: str, setting: str = "data.tokenizer") -> ByteTokenizer | HFTokenizer:
    """`setting` names where spec came from (a config field or a command-line flag) in error messages."""
    if spec == "byte":
        return ByteTokenizer()
    if not os.path.isfile(spec):
        raise DataError(f"{setting}={spec!r}: no such file; give 'byte' or a path to a tokenizer.json")
    return HFTokenizer(spec, setting)
