"""Router math as pure functions: gating logit normalization, softmax or sigmoid scores, group-limited top-k,
renormalization, the two auxiliary-loss forms (over the batch or per sequence), z-loss and router statistics.

All functions take and return float32 arrays with tokens flattened to [T, E];
the caller owns the gate matmul (always float32, see block.py). Every statistic
over tokens goes through `mean` (default: the mean over axis 0), so under expert
parallelism the block passes a mean that also averages across the devices holding
the other tokens, and losses and metrics stay those of the global batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

TokenMean = Callable[[jax.Array], jax.Array]


def local_mean(a: jax.Array) -> jax.Array:
    return jnp.mean(a, axis=0)


class Routing(NamedTuple):
    probs: jax.Array  # [T, E] gate probabilities g: the softmax, or the sigmoid scores normalized to sum 1
    weights: jax.Array  # [T, k] combine weights of the chosen experts (renormalized if configured)
    experts: jax.Array  # [T, k] int32 chosen experts, best first
    logits: jax.Array  # [T, E] the logits fed to the score function (z' with normalization, z without)


def normalize_logits(z: jax.Array, lam: float, ddof: int, eps: float) -> jax.Array:
    """Skywork gating logit normalization: lam * (z - mean(z)) / (std(z) + eps), per token over experts.

    Subtracting the mean does not change the softmax but keeps z' well scaled for the z-loss.
    eps guards tokens whose logits are all equal (std = 0).
    """
    mean = jnp.mean(z, axis=-1, keepdims=True)
    return lam * (z - mean) / (_safe_std(z, ddof) + eps)


def _safe_std(z: jax.Array, ddof: int) -> jax.Array:
    """jnp.std over the last axis (keepdims), with derivative 0 where it is 0.

    sqrt has an infinite derivative at 0, and the derivative of var there is 0: the product is NaN,
    e.g. for every token of a zero-initialised router. std is not differentiable where all z are equal,
    but z' = lam * u / (std + eps) is (u = z - mean is 0 there and std = O(|u|)): its Jacobian is
    lam * (I - 1/n) / eps whatever finite value std's derivative takes, so 0 gives the exact gradient.
    The inner where keeps sqrt's own derivative finite (the double-where trick); values are jnp.std's.
    """
    var = jnp.var(z, axis=-1, keepdims=True, ddof=ddof)
    positive = var > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, var, 1.0)), 0.0)


def top_k_by_argmax(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """jax.lax.top_k over the last axis, as k argmax passes: (values, int32 indices), equal values in index
    order as lax.top_k gives them. XLA's CPU backend sorts each row for lax.top_k; the passes took the
    default train step 1.4% faster there (docs/BENCHMARKS.md), and k is a handful of experts."""
    n = x.shape[-1]
    values, indices = [], []
    for _ in range(k):
        index = jnp.argmax(x, axis=-1).astype(jnp.int32)
        values.append(jnp.take_along_axis(x, index[..., None], axis=-1)[..., 0])
        indices.append(index)
        x = jnp.where(jnp.arange(n) == index[..., None], -jnp.inf, x)
    return jnp.stack(values, axis=-1), jnp.stack(indices, axis=-1)


def route(
    z: jax.Array,
    top_k: int,
    *,
    gate_norm: bool,
    lam: float = 1.0,
    ddof: int = 0,
    eps: float = 1e-6,
    renormalize: bool = True,
    score: str = "softmax",
    num_groups: int = 1,
    top_groups: int = 1,
    bias: jax.Array | None = None,
) -> Routing:
    """Gate logits [T, E] -> probabilities, top-k experts and their combine weights.

    score: softmax, or sigmoid as DeepSeek-V3: each expert's own s = sigmoid(z), top-k on s, the chosen s as
    weights. The aux losses and statistics read probs, the scores normalized to sum 1 per token (as
    DeepSeek-V3's sequence-wise loss does), so they keep their softmax meaning under either score.
    bias [E] (loss-free balancing) shifts the scores the groups and the top-k select by, and nothing else: the
    weights are the chosen experts' unbiased scores.
    """
    z = z.astype(jnp.float32)
    if gate_norm:
        z = normalize_logits(z, lam, ddof, eps)
    if score == "sigmoid":
        scores = jax.nn.sigmoid(z)
        probs = scores / jnp.sum(scores, axis=-1, keepdims=True)
    else:
        scores = probs = jax.nn.softmax(z, axis=-1)
    if bias is None:
        # Selection only masks scores, so the top-k values are the chosen experts' scores: the combine weights.
        weights, experts = top_k_by_argmax(limit_to_groups(scores, num_groups, top_groups, score), top_k)
    else:
        experts = top_k_by_argmax(limit_to_groups(scores + bias, num_groups, top_groups, score), top_k)[1]
        weights = jnp.take_along_axis(scores, experts, axis=-1)
    if renormalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return Routing(probs, weights, experts.astype(jnp.int32), z)


def limit_to_groups(selection: jax.Array, num_groups: int, top_groups: int, score: str) -> jax.Array:
    """Group-limited routing: selection scores [T, E] with the experts outside each token's top_groups groups
    set to -inf. Groups are contiguous runs of E / num_groups experts, so they line up with the expert axis.

    A group's score is the sum of its two best scores under sigmoid (DeepSeek-V3) and its best score under
    softmax (DeepSeek-V2's rule).
    """
    if num_groups == 1:
        return selection
    t, n = selection.shape
    per_group = n // num_groups
    grouped = selection.reshape(t, num_groups, per_group)
    if score == "sigmoid":
        group_scores = jnp.sum(top_k_by_argmax(grouped, min(2, per_group))[0], axis=-1)
    else:
        group_scores = jnp.max(grouped, axis=-1)
    chosen = top_k_by_argmax(group_scores, top_groups)[1]
    keep = jnp.any(chosen[..., None] == jnp.arange(num_groups), axis=1)  # [T, groups]
    return jnp.where(jnp.repeat(keep, per_group, axis=-1), selection, -jnp.inf)


def assignments(experts: jax.Array, num_experts: int) -> jax.Array:
    """[T, E] float32: how many of each token's top-k chose expert j (0 or 1)."""
    return jax.nn.one_hot(experts, num_experts, dtype=jnp.float32).sum(axis=1)


def expert_fractions(experts: jax.Array, num_experts: int, mean: TokenMean = local_mean) -> jax.Array:
    """f_j: the share of all top-k assignments that chose expert j (sums to 1), before any dropping."""
    return mean(assignments(experts, num_experts)) / experts.shape[-1]


def max_violation(load: jax.Array) -> jax.Array:
    """MaxVio (loss-free balancing, arXiv 2408.15664): the busiest expert's load over the mean load, minus 1,
    from loads f [..., E] that sum to 1 (E * max_j f_j - 1; 0 when balanced, E - 1 when one expert takes all)."""
    return load.shape[-1] * jnp.max(load, axis=-1) - 1.0


def interleaved_rows(a: jax.Array, seq_len: int) -> jax.Array:
    """Per-token values a [T, ...] in rows of seq_len tokens -> the same tokens regrouped so that position j of
    row r comes from row (r + j) mod rows: every row keeps one token of each position but mixes the sequences.
    The per-sequence load of such rows is what the batch's load and the positions imply without any
    sequence's own content (the `seq_max_vio_shuffled` statistic)."""
    rows = a.shape[0] // seq_len
    x = a.reshape(rows, seq_len, *a.shape[1:])
    positions = jnp.arange(seq_len)[None, :]
    return x[(jnp.arange(rows)[:, None] + positions) % rows, positions].reshape(a.shape)


def aux_loss_from_means(mean_probs: jax.Array, fractions: jax.Array, form: str) -> jax.Array:
    """The aux loss from its two token means, P_j = mean_t g_tj and f_j (see expert_fractions), over the last axis
    (so [rows, E] means give one loss per row).

    paper (Skywork eq. 4): sum_j (1/n - P_j)^2. switch: n * sum_j f_j * P_j (1.0 when balanced),
    f_j a count that carries no gradient. Both are functions of means over the batch, so
    microbatches can be averaged first and the loss taken once, as for the whole batch.
    """
    n = mean_probs.shape[-1]
    if form == "paper":
        return jnp.sum((1.0 / n - mean_probs) ** 2, axis=-1)
    return n * jnp.sum(jax.lax.stop_gradient(fractions) * mean_probs, axis=-1)


def aux_loss_paper(probs: jax.Array, mean: TokenMean = local_mean) -> jax.Array:
    """Skywork eq. 4 over the tokens of probs [T, E]."""
    return aux_loss_from_means(mean(probs), None, "paper")


def aux_loss_switch(probs: jax.Array, experts: jax.Array, mean: TokenMean = local_mean) -> jax.Array:
    """Switch Transformer form over the tokens of probs [T, E] with their top-k experts."""
    return aux_loss_from_means(mean(probs), expert_fractions(experts, probs.shape[-1], mean), "switch")


def z_loss(logits: jax.Array, mean: TokenMean = local_mean) -> jax.Array:
    """Router z-loss (ST-MoE): mean_t logsumexp(z_t)^2 over the logits fed to the softmax."""
    return mean(jax.nn.logsumexp(logits, axis=-1) ** 2)


def router_stats(probs: jax.Array, experts: jax.Array, mean: TokenMean = local_mean) -> dict[str, jax.Array]:
    """Token means: gate probabilities P_j (mean_probs), Max1/Max2, Max2/Max3, entropy, expert load f_j.

    Max2/Max3 needs three experts; with two it is NaN (reported as null).
    """
    n = probs.shape[-1]
    top = top_k_by_argmax(probs, min(3, n))[0]
    tiny = jnp.finfo(jnp.float32).tiny
    max1_max2 = mean(top[:, 0] / jnp.maximum(top[:, 1], tiny))
    max2_max3 = mean(top[:, 1] / jnp.maximum(top[:, 2], tiny)) if n >= 3 else jnp.float32(jnp.nan)
    entropy = mean(-jnp.sum(probs * jnp.log(jnp.maximum(probs, tiny)), axis=-1))
    return {
        "mean_probs": mean(probs),
        "max1_max2": max1_max2,
        "max2_max3": max2_max3,
        "router_entropy": entropy,
        "expert_load": expert_fractions(experts, n, mean),
    }
