"""Autoregressive decoding with a KV cache: the prompt in one pass, then one token per step.

`generate` runs both in one jitted call: a prefill of the prompt fills each layer's cache of keys and
values, and a `while_loop` feeds back one sampled token per step. The cache has a fixed length (prompt +
new tokens - 1, the last token is never fed back), so nothing recompiles from one token to the next.
Positions count from the prompt's first token as in training, so the rotary embeddings are the training
forward's.

MoE routing: capacity dropping depends on the routing group a token shares with others, which a token
decoded alone does not have, so no cache could reproduce a capacity-limited forward pass. A decoding model
(`decoding_model`) routes every token to its top-k experts with nothing dropped (moe.dropless), as serving
engines do; its plain forward pass is the reference its cached decoding matches (tests/test_sample.py).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from skymoe_jax.model.mesh_layout import MeshLayout
from skymoe_jax.model.transformer import DecoderLayer, SelectionBias, Transformer, build_model, layer_biases


class KVCache(NamedTuple):
    """Per stack, [blocks, layers per block, batch, length, kv_heads, head_dim]: the stack's layout."""

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]


def decoding_model(model: Transformer) -> Transformer:
    """The same parameters as a model that routes every token (dropless, one routing group per sequence) and
    keeps its layers in order: a pipelined stack's stage padding is left out, so a step reads no layer twice."""
    spec = dataclasses.replace(model.spec, dropless=True, group_size=0)
    layout = MeshLayout(layout=model.mesh_layout.layout)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: build_model(spec, mesh_layout=layout)))
    state = nnx.state(model, nnx.Param)
    if model.mesh_layout.pipelined:
        slots = model.mesh_layout.layer_slots(spec.num_layers)
        state["stacks"] = jax.tree.map(lambda a: a[slots], state["stacks"])
    decoding = nnx.merge(graphdef, state)
    if model.selection_bias is not None:
        decoding.selection_bias = SelectionBias(model.selection_bias[...])
    return decoding


def empty_cache(model: Transformer, batch: int, length: int) -> KVCache:
    spec = model.spec
    shapes = [
        (repeats, len(pattern), batch, length, spec.num_kv_heads, spec.head_dim) for pattern, repeats in spec.stacks()
    ]
    zeros = tuple(jnp.zeros(shape, spec.compute_dtype) for shape in shapes)
    return KVCache(zeros, zeros)


def forward_cached(
    model: Transformer, tokens: jax.Array, start: jax.Array, cache: KVCache
) -> tuple[jax.Array, KVCache]:
    """Logits [B, S, V] of tokens [B, S] at positions start, start + 1, ... of sequences whose tokens before
    `start` have their keys and values in `cache`; and the cache with these tokens' added."""
    b, s = tokens.shape
    length = cache.keys[0].shape[3]
    positions = start + jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    # A query sees the keys at its position and before; the slots after it are empty or not yet its past.
    mask = (jnp.arange(length) <= positions[..., None])[:, None]  # [B, 1, S, length]
    x = model.embed(tokens)
    keys, values = [], []
    biases = model.stack_biases(None)
    for stack, stack_keys, stack_values, stack_bias in zip(model.stacks, cache.keys, cache.values, biases):
        graphdef, state = nnx.split(stack.blocks)

        def block(x, inputs, graphdef=graphdef):
            block_state, block_keys, block_values, block_bias = inputs
            layers = nnx.merge(graphdef, block_state).layers
            out_keys, out_values = [], []
            for layer, k, v, bias in zip(layers, block_keys, block_values, layer_biases(layers, block_bias)):
                x, k, v = _layer(layer, x, positions, mask, start, k, v, bias)
                out_keys.append(k)
                out_values.append(v)
            return x, (jnp.stack(out_keys), jnp.stack(out_values))

        x, (stack_keys, stack_values) = jax.lax.scan(block, x, (state, stack_keys, stack_values, stack_bias))
        keys.append(stack_keys)
        values.append(stack_values)
    return model.head(model.final_norm(x)), KVCache(tuple(keys), tuple(values))


def _layer(layer: DecoderLayer, x, positions, mask, start, k_cache, v_cache, bias):
    """DecoderLayer.__call__ with attention over the cache, which takes this step's keys and values first; bias:
    the layer's selection bias [E] or None."""
    q, k, v = layer.attn.project(layer.attn_norm(x), positions, k_cache.shape[1])
    k_cache = jax.lax.dynamic_update_slice_in_dim(k_cache, k, start, axis=1)
    v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache, v, start, axis=1)
    x = x + layer.attn.output(jax.nn.dot_product_attention(q, k_cache, v_cache, mask=mask))
    h = layer.ffn_norm(x)
    return x + (layer.ffn(h, train=False, bias=bias)[0] if layer.is_moe else layer.ffn(h)), k_cache, v_cache


def next_token(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array, vocab: jax.Array):
    """A token from logits [V]: the most likely one at temperature 0, else a draw from softmax(logits /
    temperature) over the fewest most likely tokens whose probabilities reach top_p (nucleus sampling, which
    always keeps the most likely token). Only ids below `vocab` (the tokenizer's) are candidates."""
    logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab, logits, -jnp.inf)
    scaled = logits / jnp.where(temperature > 0, temperature, 1.0)
    probs = jax.nn.softmax(scaled)
    order = jnp.argsort(-probs, stable=True)  # ties in id order, as argmax breaks them
    sorted_probs = probs[order]
    keep = jnp.zeros(probs.shape, bool).at[order].set(jnp.cumsum(sorted_probs) - sorted_probs < top_p)
    drawn = jax.random.categorical(key, jnp.where(keep, scaled, -jnp.inf))
    return jnp.where(temperature > 0, drawn, jnp.argmax(logits)).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_tokens"))
def _generate(graphdef, state, prompt, key, temperature, top_p, vocab, stop, *, max_tokens: int):
    model = nnx.merge(graphdef, state)
    p = prompt.shape[0]
    logits, cache = forward_cached(model, prompt[None], jnp.int32(0), empty_cache(model, 1, p + max_tokens - 1))
    draw = functools.partial(next_token, temperature=temperature, top_p=top_p, vocab=vocab)
    first = draw(logits[0, -1], jax.random.fold_in(key, 0))
    out = jnp.zeros((max_tokens,), jnp.int32).at[0].set(first)

    def more(carry):
        i, token, _, _ = carry
        return (i < max_tokens) & (token != stop)

    def step(carry):
        i, token, cache, out = carry
        logits, cache = forward_cached(model, token[None, None], p + i - 1, cache)
        token = draw(logits[0, -1], jax.random.fold_in(key, i))
        return i + 1, token, cache, out.at[i].set(token)

    count, _, _, out = jax.lax.while_loop(more, step, (jnp.int32(1), first, cache, out))
    return out, count


def generate(
    model: Transformer,
    prompt: jax.Array,
    max_tokens: int,
    *,
    key: jax.Array,
    temperature: float = 1.0,
    top_p: float = 1.0,
    vocab: int | None = None,
    stop: int | None = None,
) -> jax.Array:
    """Up to max_tokens new tokens after prompt [P] (int32), each drawn by `next_token` with its own key
    (key folded with its index); it ends after `stop` (returned with the rest) when that token comes.
    `model` is a decoding_model."""
    graphdef, state = nnx.split(model)
    out, count = _generate(
        graphdef,
        state,
        jnp.asarray(prompt, jnp.int32),
        key,
        jnp.float32(temperature),
        jnp.float32(top_p),
        jnp.int32(model.spec.vocab_size if vocab is None else vocab),
        jnp.int32(-1 if stop is None else stop),
        max_tokens=max_tokens,
    )
    return out[: int(count)]
