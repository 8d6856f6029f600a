"""Helpers shared by the fault and fuzz tests: a workdir's content hashes, a small Hugging Face tokenizer, and a
persistent compilation cache for modules that compile the same programs again (a resume, an eval)."""

import hashlib
import os

import jax
import pytest


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """Imported by a test module, it applies to that module: later runs read what the first one compiled."""
    names = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    before = {name: getattr(jax.config, name) for name in names}
    for name, value in zip(names, (str(tmp_path_factory.mktemp("xla_cache")), 0.0, 0)):
        jax.config.update(name, value)
    yield
    for name, value in before.items():
        jax.config.update(name, value)


def digest(workdir) -> dict[str, str]:
    """Content hash of every file under the workdir."""
    out = {}
    for root, _, files in os.walk(workdir):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, workdir)] = hashlib.sha256(f.read()).hexdigest()
    return out


def train_tokenizer(path, texts, vocab_size: int = 120) -> str:
    """A BPE tokenizer.json trained on texts, saved at path."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["[UNK]"]))
    tok.save(str(path))
    return str(path)
