"""The on-disk layout of prepared data, shared by `skymoe prepare-data` (writer) and training (reader).

    DIR/metadata.json              settings, tokenizer, counts and the shard list
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

from skymoe_jax.errors import DataError

FORMAT_VERSION = 1
METADATA = "metadata.json"
SHARDS = "shards"
VALIDATION = "val"


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer that holds every id: half the disk and page cache of int32 for most vocabularies."""
    return np.dtype("<u2") if vocab_size <= 2 ** 16 else np.dtype("<u4")


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
    return "the byte tokenizer" if identity["name"] == "byte" else \
        f"{identity['path']} (sha256 {identity['sha256'][:12]})"


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


def read_metadata(directory: str, what: str) -> dict[str, Any]:
    """DIR/metadata.json of a finished `skymoe prepare-data` run; `what` names the setting that pointed here."""
    path = os.path.join(directory, METADATA)
    if not os.path.isfile(path):
        raise DataError(f"{what}: {directory} has no {METADATA}; prepare it with skymoe prepare-data --out={directory}")
    meta = read_json(path)
    if meta is None or meta.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{path} is not a skymoe prepare-data metadata file (version {FORMAT_VERSION}); "
                        f"prepare the data again into a new directory")
    if not meta.get("complete"):
        raise DataError(f"{directory} is only partly prepared; re-run the same skymoe prepare-data command to finish it")
    return meta
