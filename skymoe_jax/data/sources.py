"""Documents for training and validation: the built-in corpus (this interpreter's
standard-library sources) or local text / JSONL files, split deterministically."""

from __future__ import annotations

import glob
import json
import os
import sysconfig
import zlib
from collections.abc import Iterator, Sequence

import ml_collections
import numpy as np

from skymoe_jax.errors import DataError


def builtin_corpus_files() -> tuple[str, list[str]]:
    """(root, sorted .py paths under it): the running Python's standard library, without site-packages."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__"))
        files.extend(os.path.join(dirpath, f) for f in filenames if f.endswith(".py"))
    if not files:
        raise DataError(f"the built-in corpus is empty: no .py files under {root}; use data.source='files'")
    return root, sorted(files)


def expand_globs(spec: str, field: str) -> list[str]:
    paths = []
    for pattern in (p.strip() for p in spec.split(",") if p.strip()):
        matches = sorted(m for m in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(m))
        if not matches:
            raise DataError(f"{field}: no file matches {pattern!r}; check the path")
        paths.extend(matches)
    return paths


def in_validation(key: str, fraction: float) -> bool:
    """Stable hash split, independent of file order and machine."""
    return zlib.crc32(key.encode("utf-8")) % 10_000 < fraction * 10_000


class Documents:
    """A random-access list of documents (grain data source): item i is its token ids, int32."""

    def __init__(self, items: Sequence[tuple[str, str | None]], tokenizer, tokenizer_setting: str = "data.tokenizer"):
        self._items = list(items)  # (path, None) reads the whole file; (path, text) holds a JSONL document
        self._tokenizer = tokenizer
        self._tokenizer_setting = tokenizer_setting  # named in errors: a config field or a command-line flag

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> np.ndarray:
        path, text = self._items[index]
        if text is None:
            with open(path, "rb") as f:
                text = f.read()
        try:
            return self._tokenizer.encode(text)
        except UnicodeDecodeError:
            raise DataError(_not_utf8(path, self._tokenizer_setting)) from None


def _not_utf8(path: str, tokenizer_setting: str) -> str:
    return f"{path} is not valid UTF-8 text; convert it or use {tokenizer_setting}=byte"


def jsonl_documents(path: str, field: str, field_setting: str = "data.jsonl_field") -> Iterator[tuple[str, str]]:
    """(path:line, text) for each line of a JSONL file with a non-empty `field`, read one line at a time."""
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise DataError(f"{where} is not valid JSON; fix the line or remove it") from None
            if not isinstance(record, dict) or field not in record:
                raise DataError(f"{where} has no {field!r} field; set {field_setting} to the field holding the text")
            text = record[field]
            if not isinstance(text, str):
                raise DataError(
                    f"{where}: field {field!r} is {type(text).__name__}, not a string; fix the line or set "
                    f"{field_setting} to the field holding the text"
                )
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:  # JSON may escape a lone UTF-16 surrogate; no tokenizer can take it
                raise DataError(
                    f"{where}: field {field!r} holds an unpaired surrogate escape (\\ud800-\\udfff), "
                    "which is not text; fix the line or remove it"
                ) from None
            if text:
                yield where, text


def _items(paths: list[str], data: ml_collections.ConfigDict, tokenizer) -> list[tuple[str, str | None]]:
    if data.format == "jsonl":
        return [doc for p in paths for doc in jsonl_documents(p, data.jsonl_field)]
    paths = [p for p in paths if os.path.getsize(p) > 0]
    if tokenizer.name != "byte":
        # Read once up front, as JSONL is: a file met undecodable mid-run would stop the run after it had
        # written steps and checkpoints.
        for path in paths:
            with open(path, "rb") as f:
                try:
                    f.read().decode("utf-8")
                except UnicodeDecodeError:
                    raise DataError(_not_utf8(path, "data.tokenizer")) from None
    return [(p, None) for p in paths]


def load_documents(data: ml_collections.ConfigDict, tokenizer) -> tuple[Documents, Documents]:
    """(train, validation) documents. Without val_files, documents are split by a hash of their name."""
    if data.source == "builtin":
        root, paths = builtin_corpus_files()
        items = [(p, None) for p in paths if os.path.getsize(p) > 0]
        key = lambda item: os.path.relpath(item[0], root)
        train = [it for it in items if not in_validation(key(it), data.val_fraction)]
        val = [it for it in items if in_validation(key(it), data.val_fraction)]
        train_from = val_from = f"the built-in corpus under {root}"
    else:
        items = _items(expand_globs(data.train_files, "data.train_files"), data, tokenizer)
        train_from = val_from = f"data.train_files={data.train_files!r}"
        if data.val_files.strip():
            train, val = items, _items(expand_globs(data.val_files, "data.val_files"), data, tokenizer)
            val_from = f"data.val_files={data.val_files!r}"
        else:
            train = [it for it in items if not in_validation(it[0], data.val_fraction)]
            val = [it for it in items if in_validation(it[0], data.val_fraction)]
    if not train:
        raise DataError(
            "no training documents: the data files are empty or all went to validation "
            f"(lower data.val_fraction or add data to {train_from})"
        )
    if not val:
        raise DataError(
            f"no validation documents: the files of {val_from} are empty; give files with text"
            if data.val_files.strip()
            else f"no validation documents in {train_from}: give data.val_files or raise data.val_fraction"
        )
    for docs, role, source in ((train, "training", train_from), (val, "validation", val_from)):
        if len(docs) < data.num_streams:  # the pipeline refuses too, but without naming the files
            raise DataError(
                f"{len(docs)} {role} documents from {source} cannot fill data.num_streams="
                f"{data.num_streams} streams; add data or lower data.num_streams"
            )
    return Documents(train, tokenizer), Documents(val, tokenizer)
