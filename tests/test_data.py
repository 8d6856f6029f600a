"""Documents, tokenizers and the grain pipeline: packing, masking, determinism, splits, errors."""

import itertools
import json
import tracemalloc

import grain
import numpy as np
import pytest

from skymoe_jax.config import base_config
from skymoe_jax.data.inputs import make_datasets
from skymoe_jax.data.pipeline import make_dataset, to_model_batch
from skymoe_jax.data.sources import builtin_corpus_files, load_documents
from skymoe_jax.data.tokenizers import ByteTokenizer, make_tokenizer
from skymoe_jax.errors import DataError


def _files_config(tmp_path, docs, fmt="text", **data):
    c = base_config()
    c.data.source = "files"
    c.data.format = fmt
    if fmt == "text":
        for i, d in enumerate(docs):
            (tmp_path / f"doc{i}.txt").write_text(d)
        c.data.train_files = str(tmp_path / "*.txt")
    else:
        (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs) + "\n")
        c.data.train_files = str(tmp_path / "docs.jsonl")
    for k, v in data.items():
        c.data[k] = v
    return c


def test_to_model_batch_masks_document_boundaries_and_padding():
    packed = {
        "tokens": np.array([[1, 2, 3, 7, 8, 0]]),
        "tokens_segment_ids": np.array([[1, 1, 1, 2, 2, 0]]),
        "tokens_positions": np.array([[0, 1, 2, 0, 1, 0]]),
    }
    b = to_model_batch(packed)
    np.testing.assert_array_equal(b["inputs"], [[1, 2, 3, 7, 8]])
    np.testing.assert_array_equal(b["targets"], [[2, 3, 7, 8, 0]])
    # 3 -> 7 crosses into the next document and 8 -> pad is padding: neither is a target.
    np.testing.assert_array_equal(b["loss_mask"], [[1, 1, 0, 1, 0]])
    np.testing.assert_array_equal(b["positions"], [[0, 1, 2, 0, 1]])


def test_packed_batches_reassemble_the_documents(tmp_path):
    docs = [f"document {i} " + "x" * (7 * i + 3) for i in range(12)]
    c = _files_config(tmp_path, docs, seq_len=16, batch_size=2, val_fraction=0.0, shuffle_window=0, num_streams=1)
    c.data.val_files = str(tmp_path / "doc0.txt")
    train, _ = load_documents(c.data, ByteTokenizer())
    it = iter(make_dataset(train, c.data, seed=0))
    # Rows hold consecutive pieces of the document stream: inputs plus the row's last target.
    rows = [np.append(b["inputs"][r], b["targets"][r, -1]) for b in itertools.islice(it, 40) for r in range(2)]
    text = bytes(np.concatenate(rows).astype(np.uint8)).decode()
    for d in docs:
        assert d in text


def test_pipeline_is_deterministic_and_seed_dependent():
    c = base_config()
    train, _ = load_documents(c.data, ByteTokenizer())
    first = [b["inputs"] for b in itertools.islice(iter(make_dataset(train, c.data, seed=3)), 3)]
    again = [b["inputs"] for b in itertools.islice(iter(make_dataset(train, c.data, seed=3)), 3)]
    other = [b["inputs"] for b in itertools.islice(iter(make_dataset(train, c.data, seed=4)), 3)]
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_builtin_split_is_by_file_and_disjoint():
    c = base_config()
    root, files = builtin_corpus_files()
    train, val = load_documents(c.data, ByteTokenizer())
    train_paths = {p for p, _ in train._items}
    val_paths = {p for p, _ in val._items}
    assert not train_paths & val_paths
    assert len(val_paths) > 10 and len(train_paths) > 10 * len(val_paths)
    assert train_paths | val_paths == {f for f in files if __import__("os").path.getsize(f) > 0}


def test_documents_are_read_ahead_as_configured(monkeypatch):
    # grain's own defaults (16 threads, 500 documents, per stream) reach it unless the pipeline passes these.
    seen = []
    to_iter = grain.MapDataset.to_iter_dataset
    monkeypatch.setattr(
        grain.MapDataset, "to_iter_dataset", lambda ds, options=None: seen.append(options) or to_iter(ds, options)
    )
    c = base_config()
    c.data.read_threads, c.data.read_ahead = 3, 7
    make_datasets(c)
    assert seen == [grain.ReadOptions(num_threads=3, prefetch_buffer_size=7)] * (2 * c.data.num_streams)


def test_the_training_iterator_holds_little_of_the_corpus():
    # On the defaults, grain's read-ahead of 500 documents per stream kept 299 MiB of the built-in corpus
    # (each stream's ~200 documents, tokenized, two and more times over) for the whole run. Now the shuffle
    # window (4,096 sequences) and 8 streams x (16 + 2 in flight) documents hold about 28 MiB.
    train, _ = make_datasets(base_config())
    tracemalloc.start()
    try:
        iterator = iter(train)
        batches = list(itertools.islice(iterator, 8))
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(batches) == 8 and held < 64 * 2**20, f"{held / 2**20:.0f} MiB held by the training iterator"


def test_two_processes_read_disjoint_documents():
    c = base_config()
    c.data.shuffle_window = 0
    train, _ = load_documents(c.data, ByteTokenizer())
    halves = [next(iter(make_dataset(train, c.data, seed=0, process_index=i, process_count=2))) for i in range(2)]
    assert halves[0]["inputs"].shape == (c.data.batch_size // 2, c.data.seq_len)
    assert not np.array_equal(halves[0]["inputs"], halves[1]["inputs"])


def test_jsonl_documents_and_errors(tmp_path):
    c = _files_config(tmp_path, ["alpha beta", "gamma"], fmt="jsonl", val_fraction=0.0)
    c.data.val_files, c.data.num_streams = c.data.train_files, 2  # a stream per document
    train, val = load_documents(c.data, ByteTokenizer())
    assert bytes(train[0].astype(np.uint8)) == b"alpha beta" and len(val) == 2

    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    c.data.train_files = str(tmp_path / "bad.jsonl")
    with pytest.raises(DataError, match=r"bad.jsonl:2 has no 'text' field"):
        load_documents(c.data, ByteTokenizer())


def test_missing_data_file_names_the_pattern(tmp_path):
    c = base_config()
    c.data.source = "files"
    c.data.train_files = str(tmp_path / "missing*.txt")
    with pytest.raises(DataError, match="data.train_files: no file matches"):
        load_documents(c.data, ByteTokenizer())


def test_hf_tokenizer_from_local_file(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        ["def foo(): return bar", "class Baz: pass"] * 20, trainers.BpeTrainer(vocab_size=80, special_tokens=["[UNK]"])
    )
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    loaded = make_tokenizer(str(path))
    ids = loaded.encode("def foo(): return bar")
    assert ids.dtype == np.int32 and ids.max() < loaded.vocab_size
    assert loaded.decode(ids).replace(" ", "") == "deffoo():returnbar"
    with pytest.raises(DataError, match="no such file"):
        make_tokenizer(str(tmp_path / "absent.json"))


def test_processes_together_see_the_single_process_batches():
    c = base_config()
    train, _ = load_documents(c.data, ByteTokenizer())
    whole = list(itertools.islice(iter(make_dataset(train, c.data, seed=0)), 3))
    for count in (2, 4):
        parts = [
            list(itertools.islice(iter(make_dataset(train, c.data, seed=0, process_index=i, process_count=count)), 3))
            for i in range(count)
        ]
        for step, batch in enumerate(whole):
            for key in batch:
                np.testing.assert_array_equal(np.concatenate([p[step][key] for p in parts]), batch[key])
