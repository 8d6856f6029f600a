"""`skymoe prepare-data`: tokenize text or JSONL files into ArrayRecord shards (layout: shard_format.py).

The inputs are cut into units: a group of `shard_docs` text files (one shard), or one JSONL file (a
shard per `shard_docs` documents). Worker processes take one unit at a time. A shard is written under
a temporary name and renamed when complete, and only then is its sidecar .json written, so a re-run
skips every shard whose sidecar matches the file and redoes the rest: shards that were being written
when the run stopped, shards cut short or damaged since, and shards of input files whose size
changed (e.g. a bad JSON line fixed after a run stopped on it).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import multiprocessing
import os
import queue
import re
import signal
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from skymoe_jax.data import shard_format
from skymoe_jax.data.sources import Documents, expand_globs, jsonl_documents
from skymoe_jax.data.tokenizers import make_tokenizer
from skymoe_jax.errors import DataError

# One record per chunk: training reads documents in random order, and a chunk is the unit of reading.
WRITER_OPTIONS = "group_size:1"
_SIDECAR = re.compile(r"^(\d+)-(\d+)\.json$")

Report = Callable[[int, int, int], None]  # (input bytes consumed, documents written, tokens written)


@dataclasses.dataclass(frozen=True)
class Job:
    """The settings every worker needs (picklable: it travels to spawned processes)."""

    tokenizer: str
    format: str
    field: str
    shard_docs: int
    dtype: str
    out: str


@dataclasses.dataclass(frozen=True)
class Unit:
    index: int
    paths: tuple[str, ...]
    digest: str  # of the input files' paths and sizes, kept in each shard's sidecar
    done: frozenset[int] = frozenset()  # parts already written and verified


def shard_stem(unit: int, part: int) -> str:
    return f"{unit:05d}-{part:04d}"


@functools.lru_cache(maxsize=1)
def _tokenizer(spec: str):
    return make_tokenizer(spec, setting="--tokenizer")


def _chunks(unit: Unit, job: Job) -> Iterator[tuple[list[tuple[str, str | None]], int, bool]]:
    """(documents, input bytes they stand for, whether they end the unit) for each shard of the unit."""
    if job.format == "text":
        yield [(p, None) for p in unit.paths], sum(os.path.getsize(p) for p in unit.paths), True
        return
    path = unit.paths[0]
    docs = jsonl_documents(path, job.field, field_setting="--field")
    chunk, counted = list(itertools.islice(docs, job.shard_docs)), 0
    while chunk:
        following = list(itertools.islice(docs, job.shard_docs))
        # Characters stand in for bytes on the progress bar; the unit's last shard settles the difference.
        nbytes = sum(len(text) for _, text in chunk)
        counted += nbytes
        yield chunk, nbytes if following else os.path.getsize(path) - counted + nbytes, not following
        chunk = following


def write_unit(unit: Unit, job: Job, report: Report) -> None:
    """Write the unit's shards that are not done yet, reporting after each."""
    tokenizer = _tokenizer(job.tokenizer)
    dtype = np.dtype(job.dtype)
    for part, (items, nbytes, last) in enumerate(_chunks(unit, job)):
        if part in unit.done:
            report(nbytes, 0, 0)
            continue
        docs = Documents(items, tokenizer, tokenizer_setting="--tokenizer")
        stem = os.path.join(job.out, shard_format.SHARDS, shard_stem(unit.index, part))
        path, tmp = stem + ".array_record", stem + ".array_record.tmp"
        writer = ArrayRecordWriter(tmp, WRITER_OPTIONS)
        count = tokens = 0
        try:
            for i in range(len(docs)):
                ids = docs[i]
                if len(ids):  # a document with no tokens adds nothing to a packed sequence
                    writer.write(ids.astype(dtype).tobytes())
                    count, tokens = count + 1, tokens + len(ids)
        except BaseException:
            writer.close()
            os.remove(tmp)
            raise
        writer.close()
        os.replace(tmp, path)
        shard_format.write_json(
            stem + ".json",
            {"documents": count, "tokens": tokens, "bytes": os.path.getsize(path), "last": last, "inputs": unit.digest},
        )
        report(nbytes, count, tokens)


_report_queue = None


def _start_worker(reports) -> None:
    global _report_queue
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops the pool
    _report_queue = reports


def _write_unit_in_worker(unit: Unit, job: Job) -> None:
    write_unit(unit, job, lambda *counts: _report_queue.put(counts))


def _units(paths: list[str], job: Job) -> list[tuple[str, ...]]:
    nonempty = [p for p in paths if os.path.getsize(p) > 0]
    if job.format == "jsonl":
        return [(p,) for p in nonempty]
    return [tuple(nonempty[i : i + job.shard_docs]) for i in range(0, len(nonempty), job.shard_docs)]


def _digest(lines: list[str]) -> str:
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _unit_digest(paths: tuple[str, ...]) -> str:
    return _digest([f"{os.path.abspath(p)}\t{os.path.getsize(p)}" for p in paths])


def _settings(job: Job, tokenizer_spec: str, vocab_size: int, units: list[tuple[str, ...]]) -> dict[str, Any]:
    """What decides the shards' names and contents; a re-run must match it to reuse any shard.

    Input sizes are not here but in each shard's sidecar: a changed file redoes only its own shards.
    """
    return {
        "tokenizer": shard_format.tokenizer_identity(tokenizer_spec),
        "vocab_size": vocab_size,
        "dtype": np.dtype(job.dtype).name,
        "format": job.format,
        "field": job.field if job.format == "jsonl" else None,
        "shard_docs": job.shard_docs,
        "inputs": {
            "files": sum(len(u) for u in units),
            "sha256": _digest(["\t".join(os.path.abspath(p) for p in u) for u in units]),
        },
    }


def _check_out_dir(out: str, settings: dict[str, Any]) -> None:
    """Refuse to resume with other settings, or to write into a directory that holds something else."""
    previous = shard_format.read_json(os.path.join(out, shard_format.METADATA))
    if previous is None:
        strangers = sorted(set(os.listdir(out)) - {shard_format.VALIDATION}) if os.path.isdir(out) else []
        if strangers:
            raise DataError(
                f"--out={out} already holds files that skymoe prepare-data did not write "
                f"({strangers[0]}, ...); choose a new or empty directory"
            )
        return
    for key, value in settings.items():
        if previous.get(key) != value:
            if key == "inputs":
                what = "other input files"
            elif key == "tokenizer":
                what = f"{shard_format.describe_tokenizer(previous[key])}, not {shard_format.describe_tokenizer(value)}"
            else:
                what = f"{key} {previous.get(key)!r}, not {value!r}"
            raise DataError(
                f"--out={out} was prepared from {what}; re-run with the same flags and inputs to "
                "resume, or choose a new --out"
            )


def _sidecars(shard_dir: str) -> dict[tuple[int, int], dict[str, Any]]:
    found = {}
    for name in os.listdir(shard_dir):
        match = _SIDECAR.match(name)
        if match:
            record = shard_format.read_json(os.path.join(shard_dir, name))
            found[int(match[1]), int(match[2])] = record or {}
    return found


def _intact(path: str, record: dict[str, Any]) -> bool:
    """The shard has the size its sidecar recorded and a readable index with as many documents."""
    if not os.path.isfile(path) or os.path.getsize(path) != record.get("bytes"):
        return False
    return shard_format.indexed_records(path) == record.get("documents")


def _verified(shard_dir: str, digests: list[str]) -> tuple[dict[tuple[int, int], dict[str, Any]], int]:
    """Finished shards that are intact and of unchanged inputs, and how many were not (those are removed)."""
    good, stale = {}, 0
    for (unit, part), record in _sidecars(shard_dir).items():
        stem = os.path.join(shard_dir, shard_stem(unit, part))
        if unit < len(digests) and record.get("inputs") == digests[unit] and _intact(stem + ".array_record", record):
            good[unit, part] = record
        else:
            for leftover in (stem + ".json", stem + ".array_record"):
                if os.path.exists(leftover):
                    os.remove(leftover)
            stale += 1
    return good, stale


def _complete(unit: int, done: dict[tuple[int, int], dict[str, Any]]) -> bool:
    """Parts 0..L are all done and part L ended the unit."""
    parts = sorted(part for u, part in done if u == unit)
    return bool(parts) and parts == list(range(len(parts))) and bool(done[unit, parts[-1]].get("last"))


class _Progress:
    """Input bytes done of the total, with documents and tokens written; a rich bar on a terminal only."""

    def __init__(self, total_bytes: int, done_bytes: int):
        self._bar = None
        self.documents = self.tokens = 0
        if sys.stdout.isatty():
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self._bar = Progress(
                TextColumn("[bold]prepare-data"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[counts]}"),
            )
            self._task = self._bar.add_task("prepare", total=total_bytes, completed=done_bytes, counts="")
            self._bar.start()

    def advance(self, nbytes: int, documents: int, tokens: int) -> None:
        self.documents += documents
        self.tokens += tokens
        if self._bar is not None:
            self._bar.update(
                self._task, advance=nbytes, counts=f"{self.documents:,} documents, {self.tokens:,} tokens written"
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def _run(todo: list[Unit], job: Job, workers: int, progress: _Progress) -> int:
    """Write the units' missing shards; returns the number of processes that did."""
    if workers == 1 or len(todo) <= 1:
        for unit in todo:
            write_unit(unit, job, progress.advance)
        return 1
    # spawn, not fork: the parent may hold JAX's threads, and a forked copy of a lock held by one deadlocks.
    context = multiprocessing.get_context("spawn")
    reports = context.Queue()
    with context.Pool(min(workers, len(todo)), initializer=_start_worker, initargs=(reports,)) as pool:
        pending = [pool.apply_async(_write_unit_in_worker, (unit, job)) for unit in todo]
        while pending:
            try:
                progress.advance(*reports.get(timeout=0.1))
            except queue.Empty:
                pass
            for result in [r for r in pending if r.ready()]:
                result.get()  # a worker's error stops the run here; the shards finished so far stay recorded
                pending.remove(result)
    # Leaving the pool terminated the workers; the reports still in the queue only move the bar.
    return min(workers, len(todo))


def prepare(
    input_glob: str,
    tokenizer: str,
    out: str,
    *,
    fmt: str = "text",
    field: str = "text",
    workers: int = 1,
    shard_docs: int = 10_000,
) -> dict[str, Any]:
    """Tokenize the files matching input_glob (comma-separated globs) into out/; resumes a stopped run.

    Returns the counts and a one-line summary.
    """
    start = time.perf_counter()
    paths = expand_globs(input_glob, "--input")
    vocab_size = _tokenizer(tokenizer).vocab_size
    job = Job(
        tokenizer=tokenizer,
        format=fmt,
        field=field,
        shard_docs=shard_docs,
        dtype=shard_format.token_dtype(vocab_size).str,
        out=out,
    )
    units = _units(paths, job)
    if not units:
        raise DataError(f"--input={input_glob!r}: every matching file is empty; nothing to prepare")
    settings = _settings(job, tokenizer, vocab_size, units)
    _check_out_dir(out, settings)

    shard_dir = os.path.join(out, shard_format.SHARDS)
    os.makedirs(shard_dir, exist_ok=True)
    metadata_path = os.path.join(out, shard_format.METADATA)
    shard_format.write_metadata(
        metadata_path, {"format_version": shard_format.FORMAT_VERSION, "complete": False, **settings}
    )
    for name in os.listdir(shard_dir):
        if name.endswith(".tmp"):  # cut short by a stopped run; redone below
            os.remove(os.path.join(shard_dir, name))
    digests = [_unit_digest(unit_paths) for unit_paths in units]
    done, stale = _verified(shard_dir, digests)
    todo = [
        Unit(i, unit_paths, digests[i], frozenset(part for u, part in done if u == i))
        for i, unit_paths in enumerate(units)
        if not _complete(i, done)
    ]

    done_bytes = sum(os.path.getsize(p) for i, unit_paths in enumerate(units) if _complete(i, done) for p in unit_paths)
    progress = _Progress(sum(os.path.getsize(p) for unit_paths in units for p in unit_paths), done_bytes)
    try:
        used = _run(todo, job, workers, progress)
    finally:
        progress.close()

    records = _sidecars(shard_dir)
    shards = [
        {
            "file": os.path.join(shard_format.SHARDS, shard_stem(*key) + ".array_record"),
            **{k: records[key][k] for k in ("documents", "tokens", "bytes")},
        }
        for key in sorted(records)
    ]
    totals = {"documents": sum(s["documents"] for s in shards), "tokens": sum(s["tokens"] for s in shards)}
    shard_format.write_metadata(
        metadata_path,
        {"format_version": shard_format.FORMAT_VERSION, "complete": True, **settings, **totals, "shards": shards},
    )
    seconds = time.perf_counter() - start
    skipped = len(done)
    written = len(shards) - skipped
    line = (
        f"prepared {totals['documents']:,} documents, {totals['tokens']:,} tokens ({settings['dtype']}, "
        f"vocabulary {vocab_size}) in {len(shards)} shard{'s' * (len(shards) != 1)}: {written} written"
        + (f" ({stale} earlier shards discarded: cut short, damaged or of changed inputs)" if stale else "")
        + f", {skipped} already done; {progress.tokens / seconds:,.0f} tokens/s written by "
        f"{used} process{'es' * (used != 1)} in {seconds:.1f}s; metadata in {metadata_path}"
    )
    return {
        **totals,
        "shards": len(shards),
        "written": written,
        "skipped": skipped,
        "redone": stale,
        "seconds": seconds,
        "metadata": metadata_path,
        "summary": line,
    }
