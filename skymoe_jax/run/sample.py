"""sample(): a trained model continues a prompt (`skymoe sample`, `skymoe_jax.sample` in a notebook).

Any run's checkpoint (pipelined, expert-parallel, upcycled, imported) is restored onto one local device,
whatever mesh wrote it, and decoded with a KV cache (model/decode.py), every token routed to its experts
with none dropped. The text goes through the run's tokenizer (bytes, or its Hugging Face tokenizer.json)
unless another is given, as an imported model needs: `skymoe import-hf` keeps the byte default.
"""

from __future__ import annotations

import math
import os

import jax

from skymoe_jax.checkpoint.load import load_model
from skymoe_jax.data.tokenizers import make_tokenizer
from skymoe_jax.errors import ConfigError, DataError
from skymoe_jax.model.decode import decoding_model, generate
from skymoe_jax.model.transformer import Transformer
from skymoe_jax.run import compile_cache


def sample(
    model: str | os.PathLike | Transformer,
    prompt: str,
    *,
    max_tokens: int = 100,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    tokenizer: str | None = None,
) -> str:
    """The text `model` writes after `prompt`: up to max_tokens tokens, fewer where the tokenizer's end-of-text
    token comes (left out of the text).

    model: a run's workdir (its latest checkpoint) or WORKDIR/checkpoints/STEP, whose tokenizer (data.tokenizer)
    and sequence length (data.seq_len, the most tokens the model reads) apply; or a Transformer, e.g. a fresh
    `build_model(...)`, with no length limit. temperature 0 is greedy decoding; otherwise each token is drawn from
    softmax(logits / temperature) over the most likely tokens that hold top_p of the probability (nucleus
    sampling; 1 keeps all). seed: the draws'. tokenizer: 'byte' or a tokenizer.json path instead of the run's
    (default 'byte' for a Transformer).
    """
    _check(max_tokens, temperature, top_p, seed)
    if not prompt:
        raise DataError("the prompt is empty; give the text the model should continue")
    if isinstance(model, Transformer):
        context, setting = None, "tokenizer"
        tok = make_tokenizer(tokenizer or "byte", setting)
    else:
        model, config = load_model(os.fspath(model), device=jax.local_devices()[0])
        compile_cache.enable(config.train.compilation_cache_dir)
        context = config.data.seq_len
        setting = "tokenizer" if tokenizer else "the run's data.tokenizer"
        tok = make_tokenizer(tokenizer or config.data.tokenizer, setting)
    vocab = model.spec.vocab_size
    if tok.vocab_size > vocab:
        raise DataError(
            f"{setting} {tok.name} has {tok.vocab_size} tokens but the model only {vocab}; give the model's own "
            "tokenizer (tokenizer='byte' or a tokenizer.json path)"
        )
    ids = tok.encode_text(prompt, "the prompt")
    if context is not None and len(ids) + max_tokens - 1 > context:
        room = context + 1 - len(ids)
        raise DataError(
            f"the prompt is {len(ids)} tokens and the model reads at most data.seq_len={context}: "
            + (f"ask for at most {room} new tokens (max_tokens)" if room > 0 else "give a shorter prompt")
        )
    new = generate(
        decoding_model(model),
        ids,
        max_tokens,
        key=jax.random.key(seed),
        temperature=temperature,
        top_p=top_p,
        vocab=tok.vocab_size,
        stop=tok.end_of_text,
    ).tolist()
    if new and new[-1] == tok.end_of_text:
        new = new[:-1]
    # Decoded with the prompt, so a character or word the two share comes out whole; then the prompt's part cut.
    whole, head = tok.decode([*ids.tolist(), *new]), tok.decode(ids)
    return whole[len(head) :] if whole.startswith(head) else tok.decode(new)


def _check(max_tokens: int, temperature: float, top_p: float, seed: int) -> None:
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ConfigError(f"max_tokens={max_tokens!r} must be a positive integer")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ConfigError(f"temperature={temperature!r} must be a number >= 0 (0: greedy, the most likely token)")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ConfigError(f"top_p={top_p!r} must be in (0, 1]: the share of probability the draws keep (1: all)")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ConfigError(f"seed={seed!r} must be an integer in [0, 2**32)")
