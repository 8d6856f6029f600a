"""Helpers shared by the fault and fuzz tests: a workdir's content hashes and a small Hugging Face tokenizer."""

import hashlib
import os


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
