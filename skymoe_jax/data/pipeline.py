"""The grain input pipeline: shuffle documents by seed, pack them into fixed-length
sequences with segment ids and positions, mix sources by weight, batch, and shift into
model inputs."""

from __future__ import annotations

from collections.abc import Sequence

import grain
import grain.experimental
import ml_collections
import numpy as np

from skymoe_jax.data.sources import Documents
from skymoe_jax.errors import DataError

# Random access to documents as int32 token arrays: sources.Documents or prepared.PreparedDocuments.
DocumentSource = grain.sources.RandomAccessDataSource


def to_model_batch(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Packed [B, S+1] rows -> next-token inputs/targets [B, S].

    A target counts only if it continues the same document as its input; padding
    (segment 0) and the first token of the next packed document are masked.
    """
    tokens, segments = packed["tokens"], packed["tokens_segment_ids"]
    same_doc = (segments[:, 1:] == segments[:, :-1]) & (segments[:, :-1] != 0)
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "positions": packed["tokens_positions"][:, :-1],
        "segment_ids": segments[:, :-1],
        "loss_mask": same_doc.astype(np.float32),
    }


def _packed(
    docs: DocumentSource, data: ml_collections.ConfigDict, seed: int, index: int, streams: int
) -> grain.IterDataset:
    """Packed sequences of documents index, index + streams, ... in a per-epoch shuffled order."""
    ds = grain.MapDataset.source(docs)[index::streams]
    reading = grain.ReadOptions(num_threads=data.read_threads, prefetch_buffer_size=data.read_ahead)
    ds = ds.shuffle(seed=seed).repeat().map(lambda tokens: {"tokens": tokens}).to_iter_dataset(reading)
    return grain.experimental.ConcatThenSplitIterDataset(ds, length_struct={"tokens": data.seq_len + 1})


def _stream(
    sources: Sequence[tuple[DocumentSource, float]],
    data: ml_collections.ConfigDict,
    seed: int,
    index: int,
    streams: int,
) -> grain.IterDataset:
    """Stream `index`'s rows of every batch: each source packed on its own, then mixed by weight."""
    # Source k shuffles with seed + k: a single source keeps the seed, and so the batches, it always had.
    packed = [_packed(docs, data, seed + k, index, streams) for k, (docs, _) in enumerate(sources)]
    # Mixing whole packed sequences makes the weights shares of tokens, not of documents (which vary in
    # length). grain interleaves deterministically: every source gets its share of each run of sequences.
    ds = packed[0] if len(packed) == 1 else grain.IterDataset.mix(packed, [w for _, w in sources])
    window = data.shuffle_window // streams
    if window > 1:
        ds = grain.experimental.WindowShuffleIterDataset(ds, window_size=window, seed=seed + index)
    return ds.batch(data.batch_size // streams, drop_remainder=True)


def make_mixture(
    sources: Sequence[tuple[DocumentSource, float]],
    data: ml_collections.ConfigDict,
    *,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.IterDataset:
    """An endless, deterministic stream of this process's rows of each global batch.

    sources are (documents, weight) pairs. Each source's documents are dealt into data.num_streams streams;
    in stream j every source packs its documents (reshuffled every epoch), the packed sequences are mixed by weight, and
    they fill rows [j*r, (j+1)*r) of every batch, r = batch_size / num_streams. A process reads only
    the streams of its rows, so each process reads a disjoint share of the data and the global batch
    is the same for any process count that divides num_streams. Packed sequences are shuffled in
    windows (data.shuffle_window in all), so a batch's rows come from many documents rather than
    consecutive pieces of one long file.
    """
    streams = data.num_streams
    for docs, _ in sources:
        if len(docs) < streams:
            raise DataError(
                f"{len(docs)} documents cannot fill data.num_streams={streams} streams; "
                "lower data.num_streams or add data"
            )
    per_process = streams // process_count
    mine = [
        _stream(sources, data, seed, j, streams)
        for j in range(process_index * per_process, (process_index + 1) * per_process)
    ]
    ds = (
        mine[0]
        if len(mine) == 1
        else grain.experimental.ZipIterDataset(mine).map(
            lambda parts: {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        )
    )
    return ds.map(to_model_batch)


def make_dataset(
    docs: Documents, data: ml_collections.ConfigDict, *, seed: int, process_index: int = 0, process_count: int = 1
) -> grain.IterDataset:
    """make_mixture of one source: the builtin and files data."""
    return make_mixture([(docs, 1.0)], data, seed=seed, process_index=process_index, process_count=process_count)
