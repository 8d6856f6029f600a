"""ModelSpec: the hashable, static view of the model part of a config.

Modules keep a ModelSpec instead of a ConfigDict so that the NNX graph definition
is hashable and a jit cache key.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import ml_collections
import numpy as np


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    ffn_dim: int
    rope_theta: float
    norm_eps: float
    init_std: float
    dtype: str
    param_dtype: str
    remat: str
    attention_impl: str
    qkv_bias: bool
    first_k_dense: int
    moe_every: int
    num_experts: int
    top_k: int
    expert_ffn_dim: int
    router_init_std: float
    gate_norm: bool
    gate_norm_lambda: float
    gate_norm_ddof: int
    gate_norm_eps: float
    renormalize: bool
    capacity_factor: float
    eval_capacity_factor: float
    group_size: int
    drop_policy: str
    dropless: bool
    dropless_impl: str
    layout: str = "gshard"  # parallel.layout: how the MoE layer is laid out over a mesh
    routing_impl: str = "auto"  # moe.routing_impl: XLA or Pallas routing kernels (kernels/ops.py)
    # Layers per pipeline stage when the `pipeline` mesh axis is > 1, else (). The layer stack is then
    # stored stage by stage, each stage padded to the longest (model/pipeline.py).
    stage_layers: tuple[int, ...] = ()

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    @property
    def num_moe_layers(self) -> int:
        return sum(self.moe_layers)

    def stacks(self) -> tuple[tuple[tuple[bool, ...], int], ...]:
        """Layers as scan stacks of identical super-blocks: ((pattern, repeats), ...), True = MoE layer.

        The first k dense layers form one stack; the rest repeat a pattern of
        (moe_every - 1) dense layers and one MoE layer. Compile time then depends
        on the number of stacks (at most two), not on depth.
        """
        if self.num_experts == 0:
            return (((False,), self.num_layers),)
        out = [((False,), self.first_k_dense)] if self.first_k_dense else []
        pattern = (False,) * (self.moe_every - 1) + (True,)
        out.append((pattern, (self.num_layers - self.first_k_dense) // self.moe_every))
        return tuple(out)

    @property
    def pipelined(self) -> bool:
        return len(self.stage_layers) > 1

    @property
    def stored_layers(self) -> int:
        """Length of the stored layer stack: num_layers, or stages x the longest stage when pipelined."""
        return len(self.stage_layers) * max(self.stage_layers) if self.pipelined else self.num_layers

    def layer_slots(self) -> np.ndarray:
        """For each layer (in order), its index in the stored stack."""
        if not self.pipelined:
            return np.arange(self.num_layers)
        longest = max(self.stage_layers)
        return np.concatenate([s * longest + np.arange(n) for s, n in enumerate(self.stage_layers)])

    def layer_places(self) -> tuple[tuple[int, int, int], ...]:
        """For each layer (in order), where its parameters live: (stack, position in the stack's pattern,
        index on the stack's stored 'layers' axis), i.e. params["stacks"][stack]["blocks"]["layers"][position]
        at that index."""
        # A pipelined model is one stack of one-layer blocks (validated), so block r is layer r.
        slots = self.layer_slots()
        return tuple(
            (s, p, int(slots[r]) if self.pipelined else r)
            for s, (pattern, repeats) in enumerate(self.stacks())
            for r in range(repeats)
            for p in range(len(pattern))
        )

    @property
    def moe_layers(self) -> tuple[bool, ...]:
        return tuple(is_moe for pattern, repeats in self.stacks() for _ in range(repeats) for is_moe in pattern)

    @classmethod
    def from_config(cls, c: ml_collections.ConfigDict) -> ModelSpec:
        """The model and moe sections' fields that the model reads (each cast to its declared type: a config
        may give 10000 for a float), the parallel layout and the pipeline split."""
        fields = {f.name: f.type for f in dataclasses.fields(cls)}
        taken = {name: value for section in (c.model, c.moe) for name, value in section.items() if name in fields}
        cast = {"int": int, "float": float, "str": str, "bool": bool}
        return cls(
            **{name: cast[fields[name]](value) for name, value in taken.items()},
            layout=c.parallel.layout,
            stage_layers=pipeline_stage_layers(c),
        )


def pipeline_stage_layers(c: ml_collections.ConfigDict) -> tuple[int, ...]:
    """Layers per pipeline stage: parallel.pipeline_stage_layers, or as even as possible (earlier
    stages take the remainder); () without a pipeline axis."""
    stages = c.parallel.mesh[0]
    if stages <= 1:
        return ()
    if c.parallel.pipeline_stage_layers:
        return tuple(c.parallel.pipeline_stage_layers)
    base, extra = divmod(c.model.num_layers, stages)
    return tuple(base + (i < extra) for i in range(stages))
