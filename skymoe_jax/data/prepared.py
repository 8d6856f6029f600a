"""Training from `skymoe prepare-data` output: the checks against the run's tokenizer, and each source's
training and validation documents for pipeline.make_mixture.

data.sources (config.parse_sources) names the directories and their weights. Validation
documents come from DIR/val when that directory exists (prepared with --out=DIR/val); otherwise
each source holds out the data.val_fraction of its documents picked by a hash of shard name and
record number, which depends on neither machine nor process count.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import ml_collections
import numpy as np

from skymoe_jax.config import parse_sources
from skymoe_jax.data import shard_format
from skymoe_jax.data.sources import in_validation
from skymoe_jax.errors import DataError, first_line


class _Shards:
    """All records of one prepared directory, numbered in shard order."""

    def __init__(self, directory: str, meta: dict[str, Any]):
        self.directory = directory
        self.paths = [os.path.join(directory, s["file"]) for s in meta["shards"]]
        self.ends = np.cumsum([s["documents"] for s in meta["shards"]])
        self.dtype = np.dtype(meta["dtype"]).newbyteorder("<")
        for path, shard in zip(self.paths, meta["shards"]):
            size = os.path.getsize(path) if os.path.isfile(path) else None
            if size != shard["bytes"]:
                raise DataError(
                    self.damaged(path, "missing" if size is None else f"{size} bytes, {shard['bytes']} when written")
                )
        try:
            self.source = grain.sources.ArrayRecordDataSource(self.paths)
        except RuntimeError as e:  # a damaged index; find the shard to name it
            bad = next((p for p in self.paths if shard_format.indexed_records(p) is None), self.paths[0])
            raise DataError(self.damaged(bad, first_line(e))) from None
        if len(self.source) != self.ends[-1]:  # a metadata file that does not describe these shards
            raise DataError(
                f"{os.path.join(directory, shard_format.METADATA)} counts {self.ends[-1]} documents but "
                f"its shards hold {len(self.source)}; prepare the data again into a new directory"
            )

    def damaged(self, path: str, what: str) -> str:
        sidecar = os.path.splitext(path)[0] + ".json"
        return (
            f"shard {path} is damaged ({what}); delete {sidecar} and re-run the skymoe prepare-data command "
            f"that wrote {self.directory} to redo it"
        )

    def read(self, record: int) -> np.ndarray:
        try:
            raw = self.source[record]
        except RuntimeError as e:  # a chunk that fails its checksum
            shard = self.paths[int(np.searchsorted(self.ends, record, side="right"))]
            raise DataError(self.damaged(shard, first_line(e))) from None
        return np.frombuffer(raw, self.dtype).astype(np.int32)


class PreparedDocuments:
    """Chosen documents of a prepared directory (a grain data source): item i is a document's token ids, int32."""

    def __init__(self, shards: _Shards, indices: np.ndarray):
        self._shards = shards
        self._indices = indices

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, index: int) -> np.ndarray:
        return self._shards.read(int(self._indices[index]))


def _open(directory: str, tokenizer: str, what: str) -> tuple[_Shards, dict[str, Any]]:
    meta = shard_format.read_metadata(directory, what)
    wanted = shard_format.tokenizer_identity(tokenizer)
    # The content hash decides (a byte tokenizer has none): a path can move, a retrained file can keep its name.
    if meta["tokenizer"]["sha256"] != wanted["sha256"]:
        fix = "byte" if meta["tokenizer"]["name"] == "byte" else meta["tokenizer"]["path"]
        raise DataError(
            f"{directory} was tokenized with {shard_format.describe_tokenizer(meta['tokenizer'])} but "
            f"data.tokenizer is {shard_format.describe_tokenizer(wanted)}; set "
            f"--config.data.tokenizer={fix} (or a copy of that file)"
        )
    return _Shards(directory, meta), meta


def _split(meta: dict[str, Any], fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(training, validation) record numbers."""
    total = sum(s["documents"] for s in meta["shards"])
    held_out = np.fromiter(
        (
            in_validation(f"{os.path.basename(s['file'])}:{r}", fraction)
            for s in meta["shards"]
            for r in range(s["documents"])
        ),
        bool,
        total,
    )
    records = np.arange(total, dtype=np.int64)
    return records[~held_out], records[held_out]


def load_prepared(
    data: ml_collections.ConfigDict,
) -> tuple[list[tuple[PreparedDocuments, float]], list[tuple[PreparedDocuments, float]]]:
    """(training, validation) sources as (documents, weight) pairs, in data.sources order."""
    train, val = [], []
    for directory, weight in parse_sources(data.sources):
        shards, meta = _open(directory, data.tokenizer, "data.sources")
        val_dir = os.path.join(directory, shard_format.VALIDATION)
        if os.path.isdir(val_dir):
            val_shards, val_meta = _open(val_dir, data.tokenizer, "data.sources")
            train_docs = PreparedDocuments(shards, np.arange(meta["documents"], dtype=np.int64))
            val_docs = PreparedDocuments(val_shards, np.arange(val_meta["documents"], dtype=np.int64))
            val_fix = f"prepare more documents into {val_dir}"
        else:
            train_records, val_records = _split(meta, data.val_fraction)
            train_docs, val_docs = PreparedDocuments(shards, train_records), PreparedDocuments(shards, val_records)
            val_fix = f"raise data.val_fraction, prepare validation data into {val_dir}"
        for docs, role, fix in ((train_docs, "training", "prepare more data"), (val_docs, "validation", val_fix)):
            if len(docs) < data.num_streams:
                raise DataError(
                    f"{directory} has {len(docs)} {role} documents, fewer than data.num_streams="
                    f"{data.num_streams}; {fix} or lower data.num_streams"
                )
        train.append((train_docs, weight))
        val.append((val_docs, weight))
    return train, val
