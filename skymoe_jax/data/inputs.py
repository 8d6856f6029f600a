"""The training and validation datasets a config asks for, as one process's share of every batch."""

from __future__ import annotations

import grain
import ml_collections

from skymoe_jax.data.pipeline import make_mixture
from skymoe_jax.data.prepared import load_prepared
from skymoe_jax.data.sources import load_documents
from skymoe_jax.data.tokenizers import make_tokenizer
from skymoe_jax.errors import DataError


def make_datasets(
    config: ml_collections.ConfigDict, *, process_index: int = 0, process_count: int = 1
) -> tuple[grain.IterDataset, grain.IterDataset]:
    """(training, validation) batches for data.source builtin, files or prepared."""
    tokenizer = make_tokenizer(config.data.tokenizer)
    if tokenizer.vocab_size > config.model.vocab_size:
        raise DataError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size="
            f"{config.model.vocab_size}; set --config.model.vocab_size={tokenizer.vocab_size}"
        )
    if config.data.source == "prepared":
        train, val = load_prepared(config.data)  # refuses data prepared with another tokenizer
    else:
        train_docs, val_docs = load_documents(config.data, tokenizer)
        train, val = [(train_docs, 1.0)], [(val_docs, 1.0)]
    seed = config.data.shuffle_seed
    shard = {"process_index": process_index, "process_count": process_count}
    return (
        make_mixture(train, config.data, seed=seed, **shard),
        make_mixture(val, config.data, seed=seed + 1, **shard),
    )
