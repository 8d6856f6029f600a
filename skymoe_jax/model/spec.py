"""ModelSpec: the hashable, static view of the model part of a config.

Modules keep a ModelSpec instead of a ConfigDict so that the NNX graph definition
is hashable and a jit cache key.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import ml_collections


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
    scan_layers: bool
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
    routing_impl: str = "auto"  # moe.routing_impl: XLA or Pallas routing kernels (kernels/ops.py)
    qk_norm: str = "none"  # model.qk_norm: none | head (Qwen3) | full (OLMoE)
    num_shared_experts: int = 0
    shared_expert_ffn_dim: int = 0
    shared_expert_gate: str = "none"
    head_dim: int = 0  # model.head_dim; 0 becomes d_model // num_heads
    score: str = "softmax"  # moe.score
    routed_scale: float = 1.0
    num_groups: int = 1
    top_groups: int = 1
    aux_scope: str = "batch"  # moe.aux_scope: with `sequence` each layer forms its per-sequence aux loss itself
    aux_loss: str = "paper"  # moe.aux_loss, the form the layer takes with aux_scope=sequence

    def __post_init__(self):
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.d_model // self.num_heads)  # frozen: set once, here

    @property
    def shared_width(self) -> int:
        """The shared experts' FFN width, all of them as one FFN (0: none)."""
        return self.num_shared_experts * (self.shared_expert_ffn_dim or self.expert_ffn_dim)

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
    def moe_layers(self) -> tuple[bool, ...]:
        return tuple(is_moe for pattern, repeats in self.stacks() for _ in range(repeats) for is_moe in pattern)

    @classmethod
    def from_config(cls, c: ml_collections.ConfigDict) -> ModelSpec:
        """The model and moe sections' fields that the model reads, each cast to its declared type (a config
        may give 10000 for a float). The mesh's part is MeshLayout.from_config (model/mesh_layout.py)."""
        fields = {f.name: f.type for f in dataclasses.fields(cls)}
        taken = {name: value for section in (c.model, c.moe) for name, value in section.items() if name in fields}
        cast = {"int": int, "float": float, "str": str, "bool": bool}
        return cls(**{name: cast[fields[name]](value) for name, value in taken.items()})
