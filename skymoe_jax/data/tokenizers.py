"""Tokenizers: raw bytes (vocab 256) or a local Hugging Face `tokenizers` JSON file."""

from __future__ import annotations

import json
import os

import numpy as np

from skymoe_jax.errors import DataError, first_line

# Names tokenizers give the special token that ends a text (GPT-2 and Qwen, Llama 2 and Mistral, Llama 3, Gemma),
# for a tokenizer.json without its tokenizer_config.json.
END_OF_TEXT = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")


class ByteTokenizer:
    """Each UTF-8 byte is a token; decoding is lossless for any byte string."""

    vocab_size = 256
    name = "byte"
    end_of_text = None  # no byte ends a text

    def encode(self, data: bytes | str) -> np.ndarray:
        raw = data.encode("utf-8") if isinstance(data, str) else data
        return np.frombuffer(raw, np.uint8).astype(np.int32)

    def encode_text(self, text: str, what: str) -> np.ndarray:
        """text's tokens; a DataError naming `what` where part of it has none (no UTF-8 bytes)."""
        try:
            return self.encode(text)
        except UnicodeEncodeError as e:
            raise DataError(
                f"{what} has {text[e.start : e.end]!r} at character {e.start}, which is not UTF-8 text (bytes of "
                f"another encoding?); give {what} as UTF-8"
            ) from None

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
        self.end_of_text = self._end_of_text(path)

    def _end_of_text(self, path: str) -> int | None:
        """The id of the token that ends a text: tokenizer_config.json's eos_token where that file lies beside
        tokenizer.json (as Hugging Face models ship them), else a special token of one of the usual names."""
        config = os.path.join(os.path.dirname(os.path.abspath(path)), "tokenizer_config.json")
        if os.path.isfile(config):
            try:
                with open(config) as f:
                    eos = json.load(f).get("eos_token")
            except (OSError, ValueError, AttributeError) as e:
                raise DataError(f"{config} is not a readable tokenizer config ({first_line(e)})") from None
            eos = eos.get("content") if isinstance(eos, dict) else eos
            if isinstance(eos, str):
                return self._tok.token_to_id(eos)
        special = {t.content for t in self._tok.get_added_tokens_decoder().values() if t.special}
        return next((self._tok.token_to_id(name) for name in END_OF_TEXT if name in special), None)

    def encode(self, data: bytes | str) -> np.ndarray:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

    def encode_text(self, text: str, what: str) -> np.ndarray:
        """text's tokens; a DataError naming `what` where part of it has none (it became the unknown token, or
        nothing at all)."""
        ids = self.encode(text)
        unknown = getattr(self._tok.model, "unk_token", None)
        if unknown is not None and self._tok.token_to_id(unknown) in ids:
            raise DataError(f"{what} has text that the tokenizer {self.name} has no token for (it became {unknown})")
        if text and not len(ids):
            raise DataError(f"{what} {text!r} is no tokens at all to the tokenizer {self.name}; give other text")
        return ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])


def make_tokenizer(spec: str, setting: str = "data.tokenizer") -> ByteTokenizer | HFTokenizer:
    """`setting` names where spec came from (a config field or a command-line flag) in error messages."""
    if spec == "byte":
        return ByteTokenizer()
    if not os.path.isfile(spec):
        raise DataError(f"{setting}={spec!r}: no such file; give 'byte' or a path to a tokenizer.json")
    return HFTokenizer(spec, setting)
