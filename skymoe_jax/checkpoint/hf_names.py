"""Where each Hugging Face tensor (Llama, Mistral, Qwen2, Qwen3, Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE naming)
lives in this trainer's parameters, and how its layout differs; import and export both read this one table, so a
round trip is exact by construction.

torch Linear weights are [out, in]; this model keeps [in..., out...] with heads split out (wq is
[d_model, heads, head_dim], wo is [heads, head_dim, d_model]). Biases are [heads, head_dim] here and
flat there, as is OLMoE's full-width query and key norm scale ([heads, head_dim] here). Other norm scales and the
embedding table have the same layout on both sides.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class Tensor:
    hf: str  # name in the Hugging Face checkpoint
    path: tuple[str, ...]  # parameter path: inside a layer for per-layer tensors, else from the root
    inputs: int = 0  # > 0: a Linear weight whose input spans the first `inputs` dimensions here
    flat: bool = False  # a bias or OLMoE's q/k norm scale, [heads, head_dim] here
    expert: int | None = None  # index on the experts axis of an MoE layer's expert weights

    def to_ours(self, value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        return (value.T if self.inputs else value).reshape(shape)

    def to_hf(self, value: np.ndarray) -> np.ndarray:
        if self.inputs:
            return value.reshape(math.prod(value.shape[: self.inputs]), -1).T
        return value.reshape(-1) if self.flat else value


def outside_tensors() -> list[Tensor]:
    """The tensors outside the layer stack (the head is untied here; a tied HF model shares the table)."""
    return [
        Tensor("model.embed_tokens.weight", ("embed", "table")),
        Tensor("model.norm.weight", ("final_norm", "scale")),
        Tensor("lm_head.weight", ("head", "w"), inputs=1),
    ]


def layer_tensors(
    i: int,
    *,
    arch: str,
    num_experts: int,
    qkv_bias: bool,
    qk_norm: str,
    shared: bool = False,
) -> list[Tensor]:
    """Layer i's tensors in HF model_type `arch`, paths inside the layer (model/transformer.py's layer_path).
    num_experts: 0 for a dense layer. qk_norm: 'head' is Qwen3's per-head q_norm and k_norm (a head_dim vector
    each, on both sides), 'full' OLMoE's over all heads. shared: Qwen2-MoE's shared expert and its sigmoid gate."""
    p = f"model.layers.{i}."
    out = [
        Tensor(p + "input_layernorm.weight", ("attn_norm", "scale")),
        Tensor(p + "self_attn.q_proj.weight", ("attn", "wq"), inputs=1),
        Tensor(p + "self_attn.k_proj.weight", ("attn", "wk"), inputs=1),
        Tensor(p + "self_attn.v_proj.weight", ("attn", "wv"), inputs=1),
        Tensor(p + "self_attn.o_proj.weight", ("attn", "wo"), inputs=2),
    ]
    if qkv_bias:
        out += [Tensor(p + f"self_attn.{x}_proj.bias", ("attn", f"b{x}"), flat=True) for x in "qkv"]
    if qk_norm != "none":
        out += [
            Tensor(p + f"self_attn.{x}_norm.weight", ("attn", f"{x}_norm", "scale"), flat=qk_norm == "full")
            for x in "qk"
        ]
    out.append(Tensor(p + "post_attention_layernorm.weight", ("ffn_norm", "scale")))
    if not num_experts:
        return out + _ffn(p + "mlp.", ("ffn",))
    # Mixtral names its MoE block and expert matrices its own way (w1 gate, w3 up, w2 down); the others as an FFN.
    moe, names = (p + "block_sparse_moe.", ("w1", "w3", "w2")) if arch == "mixtral" else (p + "mlp.", FFN)
    out.append(Tensor(moe + "gate.weight", ("ffn", "gate"), inputs=1))
    for j in range(num_experts):
        out += _ffn(moe + f"experts.{j}.", ("ffn", "experts"), names, expert=j)
    if shared:
        out += _ffn(moe + "shared_expert.", ("ffn", "shared"))
        out.append(Tensor(moe + "shared_expert_gate.weight", ("ffn", "shared_gate"), inputs=1))
    return out


FFN = ("gate_proj", "up_proj", "down_proj")  # HF's SwiGLU matrices: ours w_gate, w_up, w_down


def _ffn(prefix: str, path: tuple[str, ...], names: tuple[str, ...] = FFN, expert: int | None = None) -> list[Tensor]:
    return [
        Tensor(prefix + f"{name}.weight", (*path, ours), inputs=1, expert=expert)
        for name, ours in zip(names, ("w_gate", "w_up", "w_down"))
    ]
