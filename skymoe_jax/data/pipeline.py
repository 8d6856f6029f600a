"""The grain input pipeline: shuffle documents by seed, pack them into fixed-length
sequences with segment ids and positions, batch, and shift into model inputs."""

from __future__ import annotations

import grain
import grain.experimental
import ml_collections
import numpy as np

from skymoe_jax.data.sources import Documents


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


def make_dataset(docs: Documents, data: ml_collections.ConfigDict, *, seed: int, process_index: int = 0,
                 process_count: int = 1) -> grain.IterDataset:
    """An endless, deterministic stream of this process's share of each global batch.

    Documents are reshuffled every epoch (grain seeds each epoch from `seed`); each
    process packs a disjoint 1/process_count of the documents. Packed sequences are
    then shuffled in windows of data.shuffle_window, so the rows of a batch come from
    many documents rather than consecutive pieces of one long file.
    """
    ds = grain.MapDataset.source(docs)
    if process_count > 1:
        ds = ds[process_index::process_count]
    ds = ds.shuffle(seed=seed).repeat().map(lambda tokens: {"tokens": tokens}).to_iter_dataset()
    ds = grain.experimental.ConcatThenSplitIterDataset(ds, length_struct={"tokens": data.seq_len + 1})
    if data.shuffle_window > 1:
        ds = grain.experimental.WindowShuffleIterDataset(ds, window_size=data.shuffle_window, seed=seed)
    ds = ds.batch(data.batch_size // process_count, drop_remainder=True)
    return ds.map(to_model_batch)
