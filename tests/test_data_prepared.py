"""Training input from prepared (ArrayRecord) data: mixture weights, per-process shares, iterator
state, validation splits, and refusals (other tokenizer, damaged shards)."""

import itertools
import os

import numpy as np
import pytest

from skymoe_jax.checkpoint.manager import DataPosition
from skymoe_jax.config import base_config, parse_sources
from skymoe_jax.data import prepared
from skymoe_jax.data.inputs import make_datasets
from skymoe_jax.data.prepare import prepare
from skymoe_jax.errors import DataError

# Each source writes only its own letters, so every token says which source it came from. Document
# lengths differ 13x between sources: weights by document would give very different token shares.
# Few streams and hundreds of documents per source: grain's index shuffle takes milliseconds per
# element over ranges of a few dozen, microseconds over thousands.
ALPHABETS = {"a": (b"abcdefgh", 30), "b": (b"ijklmnop", 120), "c": (b"qrstuvwx", 400), "val": (b"yz", 50)}
WEIGHTS = {"a": 0.7, "b": 0.2, "c": 0.1}


def _write_source(root, name, count=400):
    letters, length = ALPHABETS[name]
    rng = np.random.default_rng(len(name) + letters[0])
    os.makedirs(root / f"{name}_text", exist_ok=True)
    for i in range(count):
        (root / f"{name}_text" / f"{i:03d}.txt").write_bytes(
            rng.choice(list(letters), length).astype(np.uint8).tobytes()
        )
    return str(root / f"{name}_text" / "*.txt")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepared")
    dirs = {}
    for name in WEIGHTS:
        dirs[name] = str(root / name)
        prepare(_write_source(root, name), "byte", dirs[name], shard_docs=150)
    return dirs


def _config(sources, spec=None, **data):
    c = base_config()
    c.data.source = "prepared"
    c.data.sources = spec or ",".join(f"{sources[n]}:{w}" for n, w in WEIGHTS.items())
    c.data.seq_len, c.data.batch_size, c.data.shuffle_window, c.data.val_fraction = 32, 16, 256, 0.25
    c.data.num_streams = 2
    for k, v in data.items():
        c.data[k] = v
    return c


def _rows(batch):
    """Each row's tokens: the inputs plus the last target."""
    return np.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1)


def _source_of(row):
    letters = set(row.astype(np.uint8).tobytes())
    owners = [n for n, (alphabet, _) in ALPHABETS.items() if letters <= set(alphabet)]
    assert len(owners) == 1, f"a packed sequence mixes sources: {sorted(letters)}"
    return owners[0]


def test_mixture_shares_of_tokens_match_the_weights(sources):
    """grain's mix interleaves deterministically (no sampling): over any prefix of one stream each
    source is within one sequence of its exact share, so over 2 streams the count of sequences is
    within 2 * 3 of weight * rows. The window shuffle only reorders: 64 batches are 4 whole windows
    (128 sequences per stream). Sequences are full (no padding), so shares of sequences are shares of
    tokens."""
    c = _config(sources)
    train, _ = make_datasets(c)
    batches = list(itertools.islice(iter(train), 64))
    counts = dict.fromkeys(WEIGHTS, 0)
    for batch in batches:
        assert (batch["segment_ids"] > 0).all()
        for row in _rows(batch):
            counts[_source_of(row)] += 1
    rows = 64 * c.data.batch_size
    for name, weight in WEIGHTS.items():
        assert abs(counts[name] - weight * rows) <= c.data.num_streams * len(WEIGHTS), (counts, name)


def test_batches_follow_the_model_batch_contract(sources):
    batch = next(iter(make_datasets(_config(sources))[0]))
    s = 32
    assert {k: v.shape for k, v in batch.items()} == {
        k: (16, s) for k in ("inputs", "targets", "positions", "segment_ids", "loss_mask")
    }
    assert batch["inputs"].dtype == np.int32 and batch["loss_mask"].dtype == np.float32
    # A target counts only within its document: masked exactly where the segment changes.
    same = batch["segment_ids"][:, :-1] == batch["segment_ids"][:, 1:]
    np.testing.assert_array_equal(batch["loss_mask"][:, :-1], same.astype(np.float32))


def test_processes_read_disjoint_documents_and_together_form_the_global_batch(sources, monkeypatch):
    c = _config(sources, num_streams=4)
    whole = list(itertools.islice(iter(make_datasets(c)[0]), 3))
    # Reads are logged on each _Shards instance (not by id(), which a freed instance passes on): grain's
    # prefetch threads of one process's iterator may still be reading while the next process's runs.
    opened = []
    init, read = prepared._Shards.__init__, prepared._Shards.read
    monkeypatch.setattr(prepared._Shards, "__init__", lambda self, *a: opened.append(self) or init(self, *a))
    monkeypatch.setattr(
        prepared._Shards,
        "read",
        lambda self, r: self.__dict__.setdefault("test_reads", set()).add((self.directory, r)) or read(self, r),
    )
    for count in (2, 4):
        parts, mine = [], []
        for index in range(count):
            opened.clear()
            parts.append(list(itertools.islice(iter(make_datasets(c, process_index=index, process_count=count)[0]), 3)))
            mine.append(list(opened))
        for step, batch in enumerate(whole):
            for key in batch:
                np.testing.assert_array_equal(np.concatenate([p[step][key] for p in parts]), batch[key])
        seen = [set().union(*(s.__dict__.get("test_reads", set()) for s in shards)) for shards in mine]
        for i, j in itertools.combinations(range(count), 2):
            assert seen[i] and seen[j] and not seen[i] & seen[j]


@pytest.mark.parametrize("consumed", [5, 21])  # inside the first shuffle window (16 batches each), and the second
def test_iterator_state_restores_the_exact_next_batch(sources, consumed):
    c = _config(sources)
    it = iter(make_datasets(c)[0])
    for _ in range(consumed):
        next(it)
    saved = DataPosition(it).get_state()  # the bytes grain's checkpoint handler writes
    expected = [next(it) for _ in range(3)]
    resumed = iter(make_datasets(c)[0])
    DataPosition(resumed).set_state(saved)
    for want in expected:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_validation_is_a_hash_split_or_dir_val(sources, tmp_path):
    c = _config(sources, spec=sources["a"])
    train, val = prepared.load_prepared(c.data)
    train_docs = {train[0][0][i].tobytes() for i in range(len(train[0][0]))}
    val_docs = {val[0][0][i].tobytes() for i in range(len(val[0][0]))}
    assert not train_docs & val_docs and len(train_docs | val_docs) == 400
    assert 0.2 < len(val_docs) / 400 < 0.3
    again = prepared.load_prepared(c.data)[1][0][0]
    assert {again[i].tobytes() for i in range(len(again))} == val_docs  # the split is stable

    # With DIR/val, validation reads it and training reads every document of DIR.
    import shutil

    directory = str(tmp_path / "a")
    shutil.copytree(sources["a"], directory)
    prepare(_write_source(tmp_path, "val", 100), "byte", os.path.join(directory, "val"))
    train_ds, val_ds = make_datasets(_config(sources, spec=directory))
    assert {_source_of(r) for b in itertools.islice(iter(val_ds), 8) for r in _rows(b)} == {"val"}
    assert {_source_of(r) for b in itertools.islice(iter(train_ds), 8) for r in _rows(b)} == {"a"}
    assert len(prepared.load_prepared(_config(sources, spec=directory).data)[0][0][0]) == 400


def test_data_prepared_with_another_tokenizer_is_refused(sources, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["abc def"] * 5, trainers.BpeTrainer(vocab_size=40, special_tokens=["[UNK]"]))
    tok.save(str(tmp_path / "tokenizer.json"))
    c = _config(sources, spec=sources["a"])
    c.data.tokenizer = str(tmp_path / "tokenizer.json")
    with pytest.raises(
        DataError,
        match=r"was tokenized with the byte tokenizer but data.tokenizer is .*tokenizer.json"
        r".*; set --config.data.tokenizer=byte",
    ):
        prepared.load_prepared(c.data)


@pytest.mark.parametrize("damage", ["truncated", "overwritten"])
def test_damaged_shard_names_the_shard_and_the_fix(sources, tmp_path, damage):
    import shutil

    directory = str(tmp_path / "a")
    shutil.copytree(sources["a"], directory)
    shard = os.path.join(directory, "shards", "00000-0000.array_record")
    size = os.path.getsize(shard)
    with open(shard, "r+b") as f:
        if damage == "truncated":
            f.truncate(size - 100)
        else:  # same size: the chunk checksums find it
            f.seek(1024)  # inside the records (small shards keep them in the first few KiB)
            f.write(b"\xff" * 2048)
    needle = r"shard .*00000-0000.array_record is damaged .*; delete .*00000-0000.json and re-run"
    with pytest.raises(DataError, match=needle):
        train, val = make_datasets(_config(sources, spec=directory, shuffle_window=0))
        for ds in (train, val):
            for _ in itertools.islice(iter(ds), 200):
                pass


def test_sources_string_is_parsed_and_normalized():
    assert parse_sources("x:3, y:1") == [("x", 0.75), ("y", 0.25)]
    assert parse_sources("only") == [("only", 1.0)]
    for bad, needle in (
        ("x:0.7,y:abc", "'abc' is not a weight"),
        ("x:-1", "positive weight"),
        (":0.5", "needs a directory"),
        (" , ", "needs data.sources"),
    ):
        with pytest.raises(ValueError, match=needle):
            parse_sources(bad)


def test_bench_data_compares_whole_shuffle_windows_with_the_step(sources):
    from skymoe_jax.bench.data import data_benchmark

    c = _config(sources)  # 256-sequence windows of 16-row batches: 16 batches per window
    given = data_benchmark(c, batches=20, workers=0, step_tokens_per_sec=1000.0)
    assert (given["batches"], given["shuffle_windows"]) == (32, 2)
    assert given["pipeline_tokens_per_sec"] > 0 and "the pipeline is" in given["summary"]
    # A step far too slow to time here: about 500 s at this machine's measured matmul peak, so no noise in that
    # measurement brings it under data.bench.MAX_STEP_SECONDS (2048 x 24 layers was 18 s, and timed on CI).
    c.model.d_model, c.model.num_layers, c.data.batch_size = 8192, 48, 64
    big = data_benchmark(c, batches=4, workers=0)
    assert "step_tokens_per_sec" not in big and "no GPU step rate was measured" in big["summary"]
    assert big["h100_full_mfu_tokens_per_sec"] > 0
