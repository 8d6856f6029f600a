"""`skymoe prepare-data`: round trips through the training pipeline, resuming, and one-line refusals."""

import itertools
import json
import os
import shutil

import numpy as np
import pytest

from skymoe_jax.cli import main
from skymoe_jax.config import base_config
from skymoe_jax.data import shard_format
from skymoe_jax.data.inputs import make_datasets
from skymoe_jax.data.prepare import prepare
from skymoe_jax.data.tokenizers import make_tokenizer
from skymoe_jax.errors import DataError

WORDS = ["alpha", "beta", "gamma", "delta", "kappa", "omega", "sigma", "theta"]


def _documents(count=60, seed=0):
    """Distinct documents of varied length: a numbered head, then words."""
    rng = np.random.default_rng(seed)
    return [f"doc{i:03d} " + " ".join(rng.choice(WORDS, rng.integers(3, 40))) for i in range(count)]


def _write_jsonl(path, docs, field="body"):
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)))


def _hf_tokenizer(path, docs):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=120, special_tokens=["[UNK]"]))
    tok.save(str(path))
    return str(path)


def _stream(ds, batches):
    """One stream, no window shuffle: rows are consecutive pieces of the packed document stream."""
    return np.concatenate(
        [
            np.append(b["inputs"][r], b["targets"][r, -1])
            for b in itertools.islice(iter(ds), batches)
            for r in range(b["inputs"].shape[0])
        ]
    )


@pytest.mark.parametrize("tokenizer", ["byte", "hf"])
def test_round_trip_text_to_batches_gives_back_the_documents(tmp_path, tokenizer):
    docs = _documents()
    (tmp_path / "in").mkdir()
    for i, d in enumerate(docs):
        (tmp_path / "in" / f"{i:03d}.txt").write_text(d)
    spec = "byte" if tokenizer == "byte" else _hf_tokenizer(tmp_path / "tokenizer.json", docs)
    out = str(tmp_path / "out")
    result = prepare(str(tmp_path / "in" / "*.txt"), spec, out, shard_docs=16)
    meta = shard_format.read_metadata(out, "test")
    assert (result["documents"], result["shards"], meta["dtype"]) == (60, 4, "uint16")
    assert meta["tokenizer"]["sha256"] == shard_format.tokenizer_identity(spec)["sha256"]

    c = base_config()
    c.data.source, c.data.sources, c.data.tokenizer = "prepared", out, spec
    c.data.seq_len, c.data.batch_size, c.data.num_streams, c.data.shuffle_window = 32, 2, 1, 0
    c.data.val_fraction = 0.2
    train, val = make_datasets(c)
    tok = make_tokenizer(spec)
    # Two epochs of each split hold every document whole, whatever the packing cut.
    batches = 2 * meta["tokens"] // (2 * 33) + 2
    texts = [tok.decode(_stream(ds, batches)) for ds in (train, val)]
    if tokenizer == "hf":  # this BPE decodes with a space between tokens
        texts, docs = [t.replace(" ", "") for t in texts], [d.replace(" ", "") for d in docs]
    found = [[d in text for d in docs] for text in texts]
    assert all(a != b for a, b in zip(*found))  # each document in exactly one of training and validation
    assert 3 <= sum(found[1]) <= 20


def test_token_ids_take_two_bytes_up_to_65536():
    assert shard_format.token_dtype(65536) == np.uint16 and shard_format.token_dtype(65537) == np.uint32


def _shards(out):
    d = os.path.join(out, "shards")
    return {n: open(os.path.join(d, n), "rb").read() for n in sorted(os.listdir(d)) if n.endswith(".array_record")}


def test_resume_skips_finished_shards_and_redoes_broken_ones(tmp_path):
    (tmp_path / "in").mkdir()
    for f in range(3):
        _write_jsonl(tmp_path / "in" / f"part{f}.jsonl", _documents(10, seed=f))
    args = (str(tmp_path / "in" / "*.jsonl"), "byte", str(tmp_path / "out"))
    kw = {"fmt": "jsonl", "field": "body", "shard_docs": 4}
    first = prepare(*args, workers=2, **kw)  # a process pool of 2
    assert (first["documents"], first["shards"], first["written"]) == (30, 9, 9)  # 4 + 4 + 2 per file
    written = _shards(args[2])
    assert prepare(*args, **kw)["skipped"] == 9

    shard_dir = tmp_path / "out" / "shards"
    with open(shard_dir / "00000-0001.array_record", "r+b") as f:
        f.truncate(1000)  # cut short
    os.remove(shard_dir / "00001-0002.json")  # written but not recorded: the run stopped in between
    (shard_dir / "00002-0000.array_record.tmp").write_bytes(b"half")
    again = prepare(*args, **kw)
    assert (again["written"], again["skipped"], again["redone"]) == (2, 7, 1)
    assert _shards(args[2]) == written and not list(shard_dir.glob("*.tmp"))

    # A bad line stops the run with its place named; the finished shards stay, training refuses the
    # directory, and after the fix only that file's shards are written.
    bad = tmp_path / "in" / "part1.jsonl"
    lines = bad.read_text().splitlines(keepends=True)
    bad.write_text("".join(lines[:2] + ["{not json\n"] + lines[3:]))
    with pytest.raises(DataError, match=r"part1.jsonl:3 is not valid JSON"):
        prepare(*args, **kw)
    with pytest.raises(DataError, match="only partly prepared; re-run"):
        shard_format.read_metadata(args[2], "test")
    bad.write_text("".join(lines[:2] + [json.dumps({"body": "fixed"}) + "\n"] + lines[3:]))
    fixed = prepare(*args, **kw)
    assert (fixed["written"], fixed["skipped"]) == (3, 6)


def test_other_settings_do_not_reuse_an_output_directory(tmp_path):
    (tmp_path / "a.txt").write_text("some text")
    prepare(str(tmp_path / "a.txt"), "byte", str(tmp_path / "out"))
    with pytest.raises(DataError, match=r"was prepared from shard_docs 10000, not 5; re-run with the same flags"):
        prepare(str(tmp_path / "a.txt"), "byte", str(tmp_path / "out"), shard_docs=5)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.md").write_text("mine")
    with pytest.raises(DataError, match="already holds files that skymoe prepare-data did not write"):
        prepare(str(tmp_path / "a.txt"), "byte", str(tmp_path / "other"))


def _refused(capsys, argv, needle):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_bad_input_is_one_line_and_nonzero(tmp_path, capsys):
    docs = _documents(40)
    (tmp_path / "in").mkdir()
    for i, d in enumerate(docs):
        (tmp_path / "in" / f"{i}.txt").write_text(d)
    tok = _hf_tokenizer(tmp_path / "tokenizer.json", docs)
    glob = str(tmp_path / "in" / "*.txt")
    _refused(
        capsys,
        ["prepare-data", f"--input={glob}", f"--tokenizer={tmp_path / 'absent.json'}", f"--out={tmp_path / 'x'}"],
        "--tokenizer=",
    )
    _refused(
        capsys,
        ["prepare-data", f"--input={tmp_path / 'none' / '*.txt'}", "--tokenizer=byte", f"--out={tmp_path / 'x'}"],
        "--input: no file matches",
    )
    assert (
        main(["prepare-data", f"--input={glob}", f"--tokenizer={tok}", f"--out={tmp_path / 'hf'}", "--workers=1"]) == 0
    )
    assert "prepared 40 documents" in capsys.readouterr().out

    train = [
        "train",
        f"--workdir={tmp_path / 'run'}",
        "--config.data.source=prepared",
        "--config.data.num_streams=2",
        "--config.data.val_fraction=0.2",
    ]
    hf = str(tmp_path / "hf")
    _refused(capsys, [*train, f"--config.data.sources={hf}:0.5,{hf}:zero"], "'zero' is not a weight")
    _refused(capsys, [*train, f"--config.data.sources={hf}"], "was tokenized with")
    _refused(
        capsys,
        [*train, f"--config.data.sources={hf}", f"--config.data.tokenizer={tok}", "--config.model.vocab_size=64"],
        "tokens but model.vocab_size=64; set --config.model.vocab_size=",
    )
    broken = str(tmp_path / "broken")
    shutil.copytree(hf, broken)
    with open(os.path.join(broken, "shards", "00000-0000.array_record"), "r+b") as f:
        f.truncate(5000)
    _refused(
        capsys,
        [*train, f"--config.data.sources={broken}", f"--config.data.tokenizer={tok}"],
        "00000-0000.array_record is damaged",
    )
    assert not (tmp_path / "run").exists()
