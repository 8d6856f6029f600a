"""Helpers shared by the fault and fuzz tests: a workdir's content hashes, waiting on a running `skymoe train`, and a
small Hugging Face tokenizer."""

import hashlib
import os
import socket
import subprocess
import time

from conftest import xla_flags

from skymoe_jax.metrics.writers import read_jsonl


def digest(workdir) -> dict[str, str]:
    """Content hash of every file under the workdir."""
    out = {}
    for root, _, files in os.walk(workdir):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, workdir)] = hashlib.sha256(f.read()).hexdigest()
    return out


def wait_for(predicate, proc, timeout=300) -> None:
    """Poll predicate until it holds, failing if proc ends first or after timeout seconds."""
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "timed out"
        time.sleep(0.002)


def logged(workdir, step) -> bool:
    """The run in workdir has written a metrics record at step or later."""
    path = os.path.join(workdir, "metrics.jsonl")
    return os.path.exists(path) and any(r["step"] >= step for r in read_jsonl(path))


def start_processes(command: list[str], count: int, devices: int, env: dict[str, str]) -> list[subprocess.Popen]:
    """count processes of command joined as one JAX run (SKYMOE_* variables, a free local port), with devices CPU
    devices each; each one's stdout and stderr in its .stdout."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    joined = {
        **env,
        "SKYMOE_COORDINATOR": f"127.0.0.1:{port}",
        "SKYMOE_NUM_PROCESSES": str(count),
        "XLA_FLAGS": xla_flags(devices),
    }
    return [
        subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**joined, "SKYMOE_PROCESS_ID": str(i)},
        )
        for i in range(count)
    ]


def train_tokenizer(path, texts, vocab_size: int = 120) -> str:
    """A BPE tokenizer.json trained on texts, saved at path."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["[UNK]"]))
    tok.save(str(path))
    return str(path)
