"""Parameter counts, model FLOPs per token, and MFU: the one place these formulas live.

Counts come from the model itself (abstract shapes, no memory), so they cannot
drift from the code. Training FLOPs per token = 3 x forward (backward is twice the
forward), with forward = 2 x (activated matmul parameters) + causal attention:
2 * L * H * head_dim * S (QK^T and AV over the causal half of an S x S score
matrix, i.e. an average context of S/2). The embedding lookup and norm scales are
not matmuls and count zero FLOPs; dropped or padded expert slots are not model
FLOPs either, so MFU measures useful work.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
from flax import nnx

from skymoe_jax.model.spec import ModelSpec
from skymoe_jax.model.transformer import build_model


@dataclasses.dataclass(frozen=True)
class ParamCounts:
    total: int
    active: int  # per token: all non-expert parameters plus k/E of the expert parameters
    embedding: int  # input embedding table (a lookup, no FLOPs)
    expert: int  # all routed-expert parameters
    norm: int  # RMSNorm scales (elementwise, no FLOPs)

    @property
    def active_matmul(self) -> int:
        return self.active - self.embedding - self.norm


def param_counts(spec: ModelSpec) -> ParamCounts:
    # Remat does not change the parameters (one cache entry for all three).
    return _counts(dataclasses.replace(spec, remat="none"))


@functools.lru_cache(maxsize=64)
def _counts(spec: ModelSpec) -> ParamCounts:
    abstract = nnx.eval_shape(lambda: build_model(spec))
    params = nnx.state(abstract, nnx.Param)
    total = expert = embedding = norm = 0
    for path, leaf in jax.tree.leaves_with_path(params, is_leaf=lambda v: isinstance(v, nnx.Variable)):
        size = math.prod(leaf.shape)
        total += size
        axes = leaf.axes
        if "expert" in axes:
            expert += size
        elif axes == ("vocab", "embed"):
            embedding += size
        elif getattr(path[-1], "key", None) == "scale":  # every RMSNorm's, the QK-norms' included
            norm += size
    active = total - expert + (expert * spec.top_k // spec.num_experts if spec.num_experts else 0)
    return ParamCounts(total=total, active=active, embedding=embedding, expert=expert, norm=norm)


def attention_flops_per_token(spec: ModelSpec, seq_len: int) -> int:
    """Forward FLOPs of QK^T and AV per token under a causal mask (average context S/2)."""
    return 2 * spec.num_layers * spec.num_heads * spec.head_dim * seq_len


def flops_per_token(spec: ModelSpec, seq_len: int, counts: ParamCounts | None = None) -> int:
    """Training (forward + backward) model FLOPs per token."""
    counts = counts or param_counts(spec)
    return 3 * (2 * counts.active_matmul + attention_flops_per_token(spec, seq_len))


def stage_flops_per_token(
    spec: ModelSpec, seq_len: int, stage_layers: tuple[int, ...], counts: ParamCounts | None = None
) -> list[float]:
    """Training FLOPs per token of each pipeline stage: its layers, plus the head on the last stage.

    Needs identical layers (as pipelining does): a layer is the activated matmul work minus the
    head, divided evenly, plus its attention. The embedding on stage 0 is a lookup (no FLOPs).
    """
    counts = counts or param_counts(spec)
    head = spec.d_model * spec.vocab_size
    layer = 3 * (
        2 * (counts.active_matmul - head) / spec.num_layers + attention_flops_per_token(spec, seq_len) / spec.num_layers
    )
    out = [n * layer for n in stage_layers]
    out[-1] += 3 * 2 * head
    return out


def pipeline_utilization(stage_flops: list[float], microbatches: int, repeats: int = 1) -> float:
    """Busy share of a pipeline schedule over the FLOPs of its virtual stages (P x R of them, R chunks per
    device; R = 1 is GPipe): M R + P - 1 ticks of the slowest virtual stage each, while the useful work is M times
    the sum of all of them (1 - this = bubble, imbalance included)."""
    devices = len(stage_flops) // repeats
    return microbatches * sum(stage_flops) / (devices * (microbatches * repeats + devices - 1) * max(stage_flops))


# Dense bf16 peak FLOP/s per device (tensor cores, no sparsity), from the vendors' data sheets.
PEAK_FLOPS = {
    "h100": 989e12,  # H100 SXM
    "h200": 989e12,
    "a100": 312e12,
    "a800": 312e12,
}


def device_peak_flops(device: jax.Device | None = None) -> float | None:
    """Table peak for the device kind, or None when it is not in the table (measure instead)."""
    kind = (device or jax.devices()[0]).device_kind.lower()
    for name, peak in PEAK_FLOPS.items():
        if name in kind:
            return peak
    return None


def peak_flops(override: float = 0.0, device: jax.Device | None = None) -> float | None:
    """The MFU denominator: `metrics.peak_flops_per_device` when set (> 0), else the table peak or None."""
    return float(override) if override > 0 else device_peak_flops(device)


def mfu(tokens_per_sec_per_device: float, flops_per_tok: float, peak: float) -> float:
    """Model FLOPs utilization: achieved model FLOP/s of one device over its peak."""
    return tokens_per_sec_per_device * flops_per_tok / peak
