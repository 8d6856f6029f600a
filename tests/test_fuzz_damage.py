"""Randomized damage to training data and checkpoints, met by the commands a user runs.

Each draw damages copies of one target: a text corpus (byte or Hugging Face tokenizer), a JSONL corpus, a
dataset written by `skymoe prepare-data`, or the checkpoints of a short run. Damage is cut-short, deleted,
emptied, bit-flipped or overwritten files, and what a format lets through: invalid JSON lines, records
without the text field or with a non-string one, unpaired surrogate escapes, altered metadata and config
fields, a moved data position. Then the real command runs in-process: `skymoe train` resuming the short run
on the damaged data, or `skymoe train` / `skymoe eval` on the damaged checkpoints. Exactly one outcome passes:
  - refused: exit status 2 and one stderr line naming the damaged file or its directory (for the latest
    checkpoint: telling to remove it), with the workdir and the damaged inputs byte for byte as before;
  - harmless: exit 0 with a finite loss, and for a checkpoint exactly the undamaged one's result.
What is harmless is decided apart from the code under test: bytes the byte tokenizer takes, lines JSON parses,
records ArrayRecord reads back unchanged, or a checkpoint whose undamaged twin gives the same result.

Draw N seeds its own generator, and every failure message prints N with the damage (file, kind, offset):
`SKYMOE_FUZZ_SEEDS=N` reruns it. The default profile runs a fixed set of draws covering every target;
`SKYMOE_FUZZ=long` runs SKYMOE_FUZZ_COUNT draws (default 200).

A changed byte inside a tensor chunk that still decompresses is not seen by orbax or tensorstore (zstd frames
carry no checksum, OCDBT checksums its b-tree and not the values); the fingerprints saved with each checkpoint
(skymoe_jax/checkpoint/fingerprint.py) refuse it, so such a draw must be refused like any other.
"""

import contextlib
import io
import json
import math
import os
import shutil

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader
from faults import digest, train_tokenizer
from test_cli import TINY

from skymoe_jax.cli import main
from skymoe_jax.data.prepare import prepare
from skymoe_jax.metrics.writers import read_jsonl

TARGETS = ("text", "text_hf", "jsonl", "prepared", "checkpoint")
FAST_DRAWS = [0, 1, 2, 3, 4, 5, 7, 8, 9, 13, 14, 19]
STREAMS = 2
BASE = [
    *TINY,
    "--config.train.steps=6",
    "--config.train.eval_batches=1",
    "--config.metrics.similarity_every=0",
    f"--config.data.num_streams={STREAMS}",
]
RESUME = ["--config.train.steps=7", "--config.train.eval_every=0"]
REMOVE = "remove it to resume from an earlier checkpoint"
# Words with multi-byte characters, so a cut can split one.
WORDS = ["def", "return", "café", "naïve", "λx", "→", "Σ", "total", "日本語", "π", "# note", "x", "y", "über"]

pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")


def _draws() -> list[int]:
    if os.environ.get("SKYMOE_FUZZ_SEEDS"):
        return [int(s) for s in os.environ["SKYMOE_FUZZ_SEEDS"].split(",")]
    if os.environ.get("SKYMOE_FUZZ") == "long":
        return list(range(int(os.environ.get("SKYMOE_FUZZ_COUNT", "200"))))
    return FAST_DRAWS


def _text(rng, words: int) -> str:
    return "\n".join(" ".join(rng.choice(WORDS, 6)) for _ in range(words // 6)) + "\n"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The undamaged inputs, a 6-step run on the text corpus checkpointed at 3 and 6, and its results."""
    root = tmp_path_factory.mktemp("damage")
    rng = np.random.default_rng(0)
    # Small documents: a prepared stream (4 documents of about 200 tokens) is read whole to fill the first
    # shuffle window (64 / 2 streams x 33 tokens), so a damaged record is met before the first step.
    texts = {"train": [_text(rng, 36) for _ in range(8)], "val": [_text(rng, 36) for _ in range(3)]}
    for split, docs in texts.items():
        (root / "text" / split).mkdir(parents=True)
        (root / "jsonl" / split).mkdir(parents=True)
        for i, doc in enumerate(docs):
            (root / "text" / split / f"{i:02d}.txt").write_text(doc)
        records = [{"text": doc, "id": i} for i, doc in enumerate(docs * 2)]
        for part in range(3 if split == "train" else 1):
            lines = [
                json.dumps(r, ensure_ascii=bool(rng.integers(2))) for r in records[part :: 3 if split == "train" else 1]
            ]
            (root / "jsonl" / split / f"{part}.jsonl").write_text("\n".join(lines) + "\n")
    tokenizer = train_tokenizer(root / "tokenizer.json", texts["train"] + texts["val"])
    prepare(str(root / "text" / "train" / "*.txt"), "byte", str(root / "prepared"), shard_docs=3)
    prepare(str(root / "text" / "val" / "*.txt"), "byte", str(root / "prepared" / "val"), shard_docs=2)

    workdir = root / "run"
    # Relative paths in the saved config keep its size, and so what an offset into it hits, the same in every
    # temporary directory: a draw damages the same bytes when rerun. The checkpoint draws run from root too.
    flags = [
        "--config.data.source=files",
        "--config.data.train_files=text/train/*.txt",
        "--config.data.val_files=text/val/*.txt",
    ]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        assert main(["train", f"--workdir={workdir}", *BASE, *flags]) == 0
        assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "6"]
        resumed = root / "resumed"
        shutil.copytree(workdir, resumed)
        assert main(["train", f"--workdir={resumed}", *RESUME]) == 0
        evaluated = _eval(workdir)
    return {"root": root, "workdir": workdir, "tokenizer": tokenizer, "train_loss": _last(resumed), "eval": evaluated}


def _last(workdir) -> tuple[int, float]:
    record = read_jsonl(os.path.join(workdir, "metrics.jsonl"))[-1]
    return record["step"], record["loss"]


def _eval(workdir) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["eval", f"--workdir={workdir}", "--json"]) == 0
    return out.getvalue()


def _run(args, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---------------------------------------------------------------------------------------------- damage


def _damage_bytes(path, rng, kinds=("truncate", "delete", "empty", "flip", "overwrite")) -> dict:
    """One random damage to the file at path: what was done, where."""
    data = path.read_bytes()
    kinds = [k for k in kinds if data or k in ("delete",)]
    kind = str(rng.choice(kinds))
    if kind == "delete":
        path.unlink()
        return {"kind": kind, "size": len(data)}
    if kind in ("truncate", "empty"):
        size = 0 if kind == "empty" else int(rng.integers(0, len(data)))
        path.write_bytes(data[:size])
        return {"kind": kind, "offset": size, "size": len(data)}
    # Half the time among the non-zero bytes: ArrayRecord pads its shards with zeros to 64 KiB blocks, which
    # would hide the few hundred bytes of records, index and footer from uniform offsets.
    content = np.flatnonzero(np.frombuffer(data, np.uint8))
    offset = int(rng.choice(content) if len(content) and rng.random() < 0.5 else rng.integers(0, len(data)))
    damaged = bytearray(data)
    if kind == "flip":
        bit = int(rng.integers(8))
        damaged[offset] ^= 1 << bit
        path.write_bytes(bytes(damaged))
        return {"kind": kind, "offset": offset, "bit": bit, "size": len(data)}
    length = min(int(rng.integers(1, 17)), len(data) - offset)
    damaged[offset : offset + length] = rng.integers(0, 256, length, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(damaged))
    return {"kind": kind, "offset": offset, "length": length, "size": len(data)}


def _jsonl_edit(path, rng) -> dict:
    """A line a JSONL file may hold but a corpus must not: invalid JSON, no text field, a non-string field, an
    unpaired surrogate escape; inserted before a random line."""
    lines = path.read_bytes().split(b"\n")
    where = int(rng.integers(0, len(lines)))
    kind = str(rng.choice(["invalid-json", "no-field", "non-string", "surrogate"]))
    line = {
        "invalid-json": b'{"text": "unterminated',
        "no-field": b'{"content": "def f(): pass"}',
        "non-string": json.dumps({"text": [1, 2, None][int(rng.integers(3))]}).encode(),
        "surrogate": b'{"text": "half a pair \\ud83d here"}',
    }[kind]
    path.write_bytes(b"\n".join(lines[:where] + [line] + lines[where:]))
    return {"kind": kind, "line": where + 1}


def _pick(rng, paths):
    return paths[int(rng.integers(len(paths)))]


def _files(directory) -> list:
    """Files in an order that holds in any run: orbax names its data files at random, but their sizes repeat."""
    return sorted(
        (p for p in directory.rglob("*") if p.is_file()),
        key=lambda p: (str(p.parent.relative_to(directory)), p.stat().st_size, p.name),
    )


# ---------------------------------------------------------------------------------------------- oracles


def _text_culprits(root, tokenizer) -> set[str]:
    """Paths whose damage must be refused (a non-UTF-8 file for a text tokenizer, a split without enough
    documents); empty when the corpus still trains."""
    culprits = set()
    for split in ("train", "val"):
        files = sorted(p for p in (root / split).glob("*.txt"))
        docs = [p for p in files if p.stat().st_size]
        if tokenizer != "byte":
            for path in docs:
                try:
                    path.read_bytes().decode("utf-8")
                except UnicodeDecodeError:
                    culprits.add(str(path))
        if len(docs) < STREAMS:
            culprits.add(str(root / split))
    return culprits


def _jsonl_culprits(root) -> set[str]:
    """What a corpus reader must refuse first: a split without files, the first bad line (path:number) in
    reading order, or a split left with too few documents."""
    documents = {}
    for split in ("train", "val"):
        paths = sorted((root / split).glob("*.jsonl"))
        if not paths:
            return {str(root / split)}
        documents[split] = 0
        for path in paths:
            for number, line in enumerate(path.read_bytes().split(b"\n"), 1):
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                try:
                    record = json.loads(line)
                except ValueError:
                    return {where}
                text = record.get("text") if isinstance(record, dict) else None
                if not isinstance(text, str):
                    return {where}
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    return {where}
                documents[split] += bool(text)
    return next(({str(root / split)} for split, count in documents.items() if count < STREAMS), set())


def _records(path) -> list[bytes] | None:
    """Every record of an ArrayRecord file, or None if the reader reports damage."""
    try:
        reader = ArrayRecordReader(str(path))
        try:
            return reader.read(list(range(reader.num_records()))) if reader.ok() else None
        finally:
            reader.close()  # raises for some damage too
    except RuntimeError:
        return None


def _prepared_culprits(directory, original, damaged: list[tuple]) -> set[str]:
    """What training must name for each damaged file: nothing for a shard's sidecar (training reads only
    metadata.json) or a shard that reads back the same records; the shard or the directory otherwise."""
    culprits = set()
    for path, _ in damaged:
        rel = os.path.relpath(path, directory)
        if path.name.endswith(".array_record"):
            if not path.exists() or _records(path) != _records(original / rel):
                culprits.add(str(path))
        elif path.name == "metadata.json":
            same = path.exists() and _json(path) == _json(original / rel)
            if not same:
                culprits.add(str(path.parent))
    return culprits


def _json(path):
    try:
        return json.loads(path.read_bytes())
    except ValueError:
        return None


# ---------------------------------------------------------------------------------------------- draws


def _data_draw(target, world, tmp_path, rng):
    """Damage a copy of a corpus; returns the overrides that train on it, what was done, and what must be named."""
    root = world["root"]
    source = {"text": "text", "text_hf": "text", "jsonl": "jsonl", "prepared": "prepared"}[target]
    data = tmp_path / source
    shutil.copytree(root / source, data)
    files = _files(data)
    damages = []
    for _ in range(int(rng.integers(1, 3))):
        path = _pick(rng, [p for p in files if p.exists()] or files)
        if not path.exists():
            continue
        if target == "jsonl" and rng.random() < 0.4:
            info = _jsonl_edit(path, rng)
        elif target == "prepared" and path.name == "metadata.json" and rng.random() < 0.4:
            info = _metadata_edit(path, rng)
        else:
            info = _damage_bytes(path, rng)
        damages.append((path, info))
    if target == "prepared":
        flags = ["--config.data.source=prepared", f"--config.data.sources={data}", "--config.data.tokenizer=byte"]
        culprits = _prepared_culprits(data, root / "prepared", damages)
    else:
        ext = "txt" if source == "text" else "jsonl"
        tokenizer = world["tokenizer"] if target == "text_hf" or (target == "jsonl" and rng.random() < 0.5) else "byte"
        flags = [
            f"--config.data.train_files={data / 'train' / ('*.' + ext)}",
            f"--config.data.val_files={data / 'val' / ('*.' + ext)}",
            f"--config.data.format={source}",
            f"--config.data.tokenizer={tokenizer}",
        ]
        culprits = _text_culprits(data, tokenizer) if source == "text" else _jsonl_culprits(data)
    return data, flags, damages, culprits


def _metadata_edit(path, rng) -> dict:
    """A field training reads, changed to a wrong value; with the file's sha256 left stale, or recomputed as a
    writer with a bug would."""
    from skymoe_jax.data import shard_format

    meta = json.loads(path.read_text())
    field = str(rng.choice(["dtype", "documents", "bytes", "file", "tokenizer", "complete", "format_version"]))
    shard = meta["shards"][int(rng.integers(len(meta["shards"])))]
    if field == "dtype":
        meta["dtype"] = str(rng.choice(["uint32", "int8", "float32", "uint64"]))
    elif field == "documents":  # kept consistent with the total, as a writer would
        shard["documents"] += 1
        meta["documents"] += 1
    elif field == "bytes":
        shard["bytes"] -= 1
    elif field == "file":
        shard["file"] = shard["file"].replace("0000", "0009")
    elif field == "tokenizer":
        meta["tokenizer"]["sha256"] = "0" * 64
    elif field == "complete":
        meta["complete"] = False
    else:
        meta["format_version"] = 7
    recompute = bool(rng.integers(2))
    if recompute:
        shard_format.write_metadata(str(path), {k: v for k, v in meta.items() if k != "sha256"})
    else:
        path.write_text(json.dumps(meta, indent=1))
    return {"kind": "edit", "field": field, "sha256": "recomputed" if recompute else "stale"}


def _checkpoint_edit(path, rng) -> dict | None:
    """A wrong-typed config field (checksum stale, or absent as in checkpoints from before checksums), or a
    moved data position (checksum stale)."""
    saved = json.loads(path.read_text())
    if path.name == "metadata":
        leaves = [(section, key) for section, fields in saved.items() if isinstance(fields, dict) for key in fields]
        section, key = leaves[int(rng.integers(len(leaves)))]
        value = saved[section][key]
        wrong = {bool: "yes", int: 1.5, float: "fast", str: 5, list: "1,2"}[type(value)]
        saved[section][key] = wrong
        legacy = bool(rng.integers(2))
        if legacy:
            del saved["sha256"]
        path.write_text(json.dumps(saved))
        return {
            "kind": "config-type",
            "field": f"{section}.{key}",
            "value": wrong,
            "sha256": "removed" if legacy else "stale",
        }
    numbers = []

    def collect(node, trail):
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for k, v in items:
            if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
                numbers.append(trail + [k])
            collect(v, trail + [k])

    collect(saved["iterator"], [])
    trail = numbers[int(rng.integers(len(numbers)))]
    node = saved["iterator"]
    for k in trail[:-1]:
        node = node[k]
    node[trail[-1]] += int(rng.integers(1, 4))
    path.write_text(json.dumps(saved, indent=1))
    return {"kind": "position-moved", "field": "/".join(map(str, trail))}


def _checkpoint_draw(world, tmp_path, rng):
    workdir = tmp_path / "run"
    shutil.copytree(world["workdir"], workdir)
    step = "6" if rng.random() < 0.75 else "3"
    files = _files(workdir / "checkpoints" / step)
    path = _pick(rng, files)
    if (
        path.name in ("metadata", "process_0-of-1.json")
        and path.parent.name in ("config", "data")
        and rng.random() < 0.5
    ):
        info = _checkpoint_edit(path, rng)
    else:
        info = _damage_bytes(path, rng, ("truncate", "delete", "flip", "overwrite"))
    return workdir, step, [(path, info)]


def _describe(draw, target, damages, command=None) -> str:
    parts = [f"{path}: " + ", ".join(f"{k}={v}" for k, v in info.items()) for path, info in damages]
    return (
        f"draw {draw} ({target}; rerun with SKYMOE_FUZZ_SEEDS={draw}): "
        + "; ".join(parts)
        + (f"; command: skymoe {' '.join(command)}" if command else "")
    )


@pytest.mark.parametrize("draw", _draws())
def test_damage_is_refused_in_one_line_or_harmless(draw, world, tmp_path, capsys, monkeypatch):
    target = TARGETS[draw % len(TARGETS)]
    rng = np.random.default_rng(draw)
    if target == "checkpoint":
        monkeypatch.chdir(world["root"])  # where the saved config's data paths start
        return _check_checkpoint(draw, world, tmp_path, rng, capsys)
    data, flags, damages, culprits = _data_draw(target, world, tmp_path, rng)
    workdir = tmp_path / "run"
    shutil.copytree(world["workdir"], workdir)
    command = ["train", f"--workdir={workdir}", *RESUME, *flags]
    what = _describe(draw, target, damages, command)
    before, inputs = digest(workdir), digest(data)
    code, _, err = _run(command, capsys)
    assert digest(data) == inputs, f"the damaged inputs were changed; {what}"
    if culprits:
        _assert_refused(code, err, culprits, what)
        assert digest(workdir) == before, f"a refused run changed the workdir; {what}"
    else:
        assert code == 0 and "Traceback" not in err, f"harmless damage was not trained on: {err!r}; {what}"
        step, loss = _last(workdir)
        assert step == 7 and math.isfinite(loss), f"the resumed run ended at step {step} with loss {loss}; {what}"


def _assert_refused(code, err, names, what):
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, f"expected one line and status 2, got {code}: {err!r}; {what}"
    assert any(name in lines[0] for name in names), f"the message names none of {sorted(names)}: {err!r}; {what}"


def _check_checkpoint(draw, world, tmp_path, rng, capsys):
    workdir, step, damages = _checkpoint_draw(world, tmp_path, rng)
    evaluate = rng.random() < 0.4
    command = ["eval", f"--workdir={workdir}", "--json"] if evaluate else ["train", f"--workdir={workdir}", *RESUME]
    what = _describe(draw, "checkpoint", damages, command)
    before = digest(workdir)
    code, out, err = _run(command, capsys)
    refused = code == 2 and len(err.strip().splitlines()) == 1
    if refused and step == "6":
        assert "checkpoints/6" in err and REMOVE in err, (
            f"the refusal does not name checkpoint 6 or the fix: {err!r}; {what}"
        )
        assert digest(workdir) == before, f"a refused run changed the workdir; {what}"
        return
    same = code == 0 and (out == world["eval"] if evaluate else _last(workdir) == world["train_loss"])
    if same:
        assert "Traceback" not in err, f"{err!r}; {what}"
        assert not evaluate or digest(workdir) == before, f"skymoe eval changed the workdir; {what}"
        return
    pytest.fail(
        f"neither a one-line refusal naming checkpoint 6 nor the undamaged result: status {code}, "
        f"stdout {out!r}, stderr {err!r}; {what}"
    )
