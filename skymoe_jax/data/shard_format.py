"""The on-disk layout of prepared data, shared by `skymoe prepare-data` (writer) and training (reader).

DIR/metadata.json              settings, tokenizer, counts and the shard list, with a sha256 of them
DIR/shards/UUUUU-PPPP.array_record   one record per document: its token ids, little-endian uint16/uint32
DIR/shards/UUUUU-PPPP.json     written after the shard is complete: its counts and size in bytes
DIR/val/                       optional: validation data prepared the same way (`--out=DIR/val`)
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np
from array_record.python.array_record_module import ArrayRecordReader

from skymoe_jax.errors import DataError

FORMAT_VERSION = 2  # 2 adds the metadata's own sha256; 1 (without it) is still read
METADATA = "metadata.json"
SHARDS = "shards"
VALIDATION = "val"


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer that holds every id: half the disk and page cache of int32 for most
    vocabularies."""
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def tokenizer_identity(spec: str) -> dict[str, Any]:
    """What a prepared directory records about its tokenizer; two specs agree when their sha256 agree.

    The content hash, not the path, identifies an HF tokenizer: the same file moves between machines,
    and a retrained file at the same path must not silently pass.
    """
    if spec == "byte":
        return {"name": "byte", "path": None, "sha256": None}
    with open(spec, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    return {"name": os.path.basename(spec), "path": os.path.abspath(spec), "sha256": digest}


def describe_tokenizer(identity: dict[str, Any]) -> str:
    return (
        "the byte tokenizer" if identity["name"] == "byte" else f"{identity['path']} (sha256 {identity['sha256'][:12]})"
    )


def indexed_records(path: str) -> int | None:
    """The number of records a shard's index lists, or None if the file cannot be opened as an ArrayRecord file."""
    try:
        reader = ArrayRecordReader(path)
        try:
            return reader.num_records() if reader.ok() else None
        finally:
            reader.close()  # raises for a damaged footer
    except RuntimeError:
        return None


def write_json(path: str, value: dict[str, Any]) -> None:
    """Write-then-rename, so a reader (or a re-run after a crash) sees the old file or the new one, never half."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def read_json(path: str) -> dict[str, Any] | None:
    """The JSON object in path, or None if it is missing or not a complete JSON object."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _checksum(meta: dict[str, Any]) -> str:
    content = {k: v for k, v in meta.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def write_metadata(path: str, meta: dict[str, Any]) -> None:
    """The shard list and counts decide which bytes training reads: a changed byte must not pass unseen."""
    write_json(path, {**meta, "sha256": _checksum(meta)})


def _bad_field(meta: dict[str, Any]) -> str | None:
    """What is wrong with the fields training reads, or None; for metadata that passed its checksum (or has none)."""

    def count(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    tokenizer, shards, vocab_size = meta.get("tokenizer"), meta.get("shards"), meta.get("vocab_size")
    if not (count(vocab_size) and vocab_size > 0):
        return f"vocab_size {vocab_size!r} is not a positive integer"
    if meta.get("dtype") != token_dtype(vocab_size).name:
        return f"dtype {meta.get('dtype')!r} is not {token_dtype(vocab_size).name}, the one for vocab_size {vocab_size}"
    if not (
        isinstance(tokenizer, dict)
        and isinstance(tokenizer.get("name"), str)
        and all(isinstance(tokenizer.get(k), (str, type(None))) for k in ("path", "sha256"))
    ):
        return f"tokenizer {tokenizer!r} is not a name, path and sha256"
    if not (
        isinstance(shards, list)
        and shards
        and all(
            isinstance(s, dict)
            and isinstance(s.get("file"), str)
            and count(s.get("documents"))
            and count(s.get("bytes"))
            for s in shards
        )
    ):
        return "the shard list is not a list of files with their document and byte counts"
    if meta.get("documents") != sum(s["documents"] for s in shards):
        return f"documents {meta.get('documents')!r} is not the sum of the shards' counts"
    return None


def read_metadata(directory: str, what: str) -> dict[str, Any]:
    """DIR/metadata.json of a finished `skymoe prepare-data` run; `what` names the setting that pointed here."""
    path = os.path.join(directory, METADATA)
    if not os.path.isfile(path):
        raise DataError(f"{what}: {directory} has no {METADATA}; prepare it with skymoe prepare-data --out={directory}")
    meta = read_json(path)
    if meta is None or meta.get("format_version") not in (1, FORMAT_VERSION):
        raise DataError(
            f"{path} is not a skymoe prepare-data metadata file (version {FORMAT_VERSION}); "
            f"prepare the data again into a new directory"
        )
    if ("sha256" in meta or meta["format_version"] >= 2) and meta.get("sha256") != _checksum(meta):
        raise DataError(
            f"{path} is damaged (its sha256 does not match its contents); prepare the data again into a new directory"
        )
    if not meta.get("complete"):
        raise DataError(
            f"{directory} is only partly prepared; re-run the same skymoe prepare-data command to finish it"
        )
    bad = _bad_field(meta)
    if bad:
        raise DataError(f"{path} is damaged ({bad}); prepare the data again into a new directory")
    return meta
