"""Data faults met when a run (re)starts: one line naming the file and the fix, exit status 2, and
the run's checkpoint and metrics untouched. One short run is trained once; every fault is then a
resume of it that must stop before anything is written."""

import os

import pytest
from faults import digest, train_tokenizer
from test_cli import TINY

from skymoe_jax.cli import main

DOCS = [f"def f{i}(x):\n    return x * {i} + {i * i}  # document {i}\n" * 40 for i in range(12)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 3-step run on text files with a Hugging Face tokenizer, checkpointed at step 3."""
    root = tmp_path_factory.mktemp("faults")
    for split, docs in (("train", DOCS[:8]), ("val", DOCS[8:])):
        (root / split).mkdir()
        for i, doc in enumerate(docs):
            (root / split / f"{i:02d}.txt").write_text(doc)
    tokenizer = train_tokenizer(root / "tokenizer.json", DOCS)
    # Validation files of their own: the faults below replace only the training files, which the
    # pipeline reads after the checkpoint is restored.
    flags = [
        *TINY,
        "--config.data.source=files",
        f"--config.data.train_files={root / 'train' / '*.txt'}",
        f"--config.data.val_files={root / 'val' / '*.txt'}",
        f"--config.data.tokenizer={tokenizer}",
        "--config.model.vocab_size=128",
        "--config.data.num_streams=2",
        "--config.train.steps=3",
    ]
    workdir = root / "run"
    assert main(["train", f"--workdir={workdir}", *flags]) == 0
    assert os.path.isdir(workdir / "checkpoints" / "3")
    return root, workdir, flags


def _refused(capsys, args, needle):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err, err
    return err


def _resume(workdir, flags, *more):
    return ["train", f"--workdir={workdir}", *flags, "--config.train.steps=6", *more]


def test_undecodable_file_names_the_file_and_leaves_the_run_alone(run, tmp_path, capsys):
    root, workdir, flags = run
    before = digest(workdir)
    data = tmp_path / "data"
    data.mkdir()
    for i, doc in enumerate(DOCS[:8]):  # every file undecodable, so the first batch meets one wherever it starts
        (data / f"{i:02d}.txt").write_bytes(doc.encode() + b"\xff\xfe latin-1 caf\xe9\n")
    _refused(
        capsys,
        _resume(workdir, flags, f"--config.data.train_files={data / '*.txt'}"),
        "is not valid UTF-8 text; convert it or use data.tokenizer=byte",
    )
    assert digest(workdir) == before


def test_jsonl_line_without_the_field_names_the_line(run, tmp_path, capsys):
    _, workdir, flags = run
    before = digest(workdir)
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "def a(): pass"}\n{"content": "def b(): pass"}\n')
    _refused(
        capsys,
        _resume(workdir, flags, f"--config.data.train_files={path}", "--config.data.format=jsonl"),
        f"{path}:2 has no 'text' field; set data.jsonl_field",
    )
    assert digest(workdir) == before


def test_empty_corpus(run, tmp_path, capsys):
    _, workdir, flags = run
    before = digest(workdir)
    for i in range(3):
        (tmp_path / f"{i}.txt").write_text("")
    _refused(
        capsys,
        _resume(workdir, flags, f"--config.data.train_files={tmp_path / '*.txt'}"),
        "no training documents: the data files are empty",
    )
    assert digest(workdir) == before


def test_token_ids_beyond_the_vocabulary_are_refused(run, tmp_path, capsys):
    """A tokenizer whose ids reach past model.vocab_size would index past the embedding table."""
    from tokenizers import Tokenizer

    root, _, flags = run
    n = Tokenizer.from_file(str(root / "tokenizer.json")).get_vocab_size()
    workdir = tmp_path / "small_vocab"
    _refused(
        capsys,
        ["train", f"--workdir={workdir}", *flags, f"--config.model.vocab_size={n - 1}"],
        f"the tokenizer has {n} tokens but model.vocab_size={n - 1}; set --config.model.vocab_size={n}",
    )
    assert not workdir.exists()


def test_missing_data_file_on_resume(run, tmp_path, capsys):
    _, workdir, flags = run
    before = digest(workdir)
    _refused(
        capsys,
        _resume(workdir, flags, f"--config.data.train_files={tmp_path / 'gone' / '*.txt'}"),
        "data.train_files: no file matches",
    )
    assert digest(workdir) == before
