"""Exporting a checkpoint of this trainer as a Hugging Face model directory: config.json, safetensors
(sharded with model.safetensors.index.json above --max_shard_size) and the tokenizer when the run used
one. MoE models become the format whose attention and shared experts they have: Qwen2-MoE with shared
experts, else Mixtral, Qwen3-MoE with per-head QK-norm or OLMoE with the full-width one, formats serving engines
(vLLM, SGLang, transformers) load; dense models become Llama, Qwen2 when the attention has q/k/v biases, or Qwen3
with per-head QK-norm.

What the format cannot express is refused in one sentence, not approximated: gate logit normalization (it
divides each token's logits by their own standard deviation, which no fixed router weight reproduces), top-k
probabilities left unnormalized (Mixtral), dense layers among the MoE ones (Mixtral, OLMoE; the Qwen formats list
them in mlp_only_layers), q/k/v biases (Mixtral; Qwen3 and OLMoE's attention_bias biases the output projection
too), and shared experts without Qwen2-MoE's sigmoid gate. Capacity dropping is a training-time limit: the
exported model runs dropless, as inference does everywhere, and the export says so.

A multi-process run exports without gathering the model on one host: parameters are restored split
over all devices, each tensor is gathered in turn, and each process keeps and writes only the files
assigned to it (file i to process i mod the process count).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh

from skymoe_jax.checkpoint import storage
from skymoe_jax.checkpoint.hf_names import Tensor, layer_tensors, outside_tensors
from skymoe_jax.checkpoint.manager import Checkpointer, saved_config, split_checkpoint_path
from skymoe_jax.errors import CheckpointError, ConfigError
from skymoe_jax.model.axes import AXES
from skymoe_jax.model.mesh_layout import MeshLayout
from skymoe_jax.model.spec import ModelSpec
from skymoe_jax.model.transformer import at_path, build_model, layer_path
from skymoe_jax.parallel import mesh as mesh_lib

DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16"}
DEFAULT_MAX_SHARD_BYTES = 5e9  # transformers' save_pretrained default


@dataclasses.dataclass(frozen=True)
class Export:
    out: str
    architecture: str  # e.g. MixtralForCausalLM, Qwen3MoeForCausalLM, LlamaForCausalLM
    step: int
    files: int
    tensors: int
    notes: tuple[str, ...]


def hf_config(config: ml_collections.ConfigDict, dtype: str) -> tuple[dict, tuple[str, ...]]:
    """(config.json for the target architecture, notes for the user); ConfigError for what it cannot express."""
    m = config.model
    common = {
        "vocab_size": m.vocab_size,
        "hidden_size": m.d_model,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_heads,
        "num_key_value_heads": m.num_kv_heads,
        "head_dim": ModelSpec.from_config(config).head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_theta,
        "initializer_range": m.init_std,
        # RoPE has no hard limit; this is the length the model was trained on.
        "max_position_embeddings": config.data.seq_len,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
        "use_cache": True,
    }
    if not config.moe.num_experts:
        return _dense_config(m, common), ()
    return _moe_config(config, common)


def _moe_config(config: ml_collections.ConfigDict, common: dict) -> tuple[dict, tuple[str, ...]]:
    m, e = config.model, config.moe
    spec = ModelSpec.from_config(config)
    arch = moe_architecture(config)
    name, architecture = MOE_FORMATS[arch]
    dense = [i for i, is_moe in enumerate(spec.moe_layers) if not is_moe]
    refusals = []
    if e.gate_norm:
        refusals.append(
            "gate logit normalization (moe.gate_norm=True) scales each token's router logits by their own "
            f"standard deviation, which {name}'s plain softmax router cannot reproduce"
        )
    if arch == "mixtral" and not e.renormalize:
        refusals.append("Mixtral renormalizes the top-k probabilities, this model does not (moe.renormalize=False)")
    if arch in ("mixtral", "olmoe") and dense:
        refusals.append(
            f"{name} has experts in every layer, this model has dense ones (moe.first_k_dense={e.first_k_dense}, "
            f"moe.moe_every={e.moe_every})"
        )
    if arch == "mixtral" and m.qkv_bias:
        refusals.append("Mixtral's attention has no q/k/v biases (model.qkv_bias=True)")
    if arch in ("qwen3_moe", "olmoe") and m.qkv_bias:
        refusals.append(
            f"{name}'s attention biases (attention_bias) include one on the output projection, which this model has "
            "not (model.qkv_bias=True)"
        )
    if arch == "olmoe" and spec.head_dim * m.num_heads != m.d_model:
        refusals.append(
            f"OLMoE's query norm is as wide as the model, this model's queries are not (model.head_dim={m.head_dim} "
            f"x model.num_heads={m.num_heads} != model.d_model={m.d_model})"
        )
    if arch == "qwen2_moe" and m.qk_norm != "none":
        refusals.append(
            f"Qwen2-MoE, the one format with shared experts, has no query and key norms (model.qk_norm={m.qk_norm})"
        )
    if arch == "qwen2_moe" and e.shared_expert_gate != "sigmoid":
        refusals.append(
            "Qwen2-MoE scales its shared expert by a sigmoid gate, this model does not "
            f"(moe.shared_expert_gate={e.shared_expert_gate}; train with sigmoid)"
        )
    if e.score != "softmax" or e.routed_scale != 1.0 or e.num_groups != 1:
        refusals.append(
            f"{name}'s router is a softmax over every expert with unscaled weights (moe.score={e.score}, "
            f"moe.routed_scale={e.routed_scale}, moe.num_groups={e.num_groups})"
        )
    if e.balance != "aux":
        refusals.append(f"{name}'s router has no expert selection bias (moe.balance={e.balance})")
    if refusals:
        raise ConfigError(f"cannot export as {name}: {'; '.join(refusals)}")
    notes = []
    if not e.dropless:
        notes.append(
            f"trained with capacity dropping (moe.capacity_factor={e.capacity_factor}); the exported model "
            "runs every token through its experts, as `skymoe eval --config.moe.dropless=True` does"
        )
    target = {
        **common,
        "model_type": arch,
        "architectures": [architecture],
        "num_experts_per_tok": e.top_k,
        "output_router_logits": False,
        "router_aux_loss_coef": 0.0,  # a training loss: it does not change the logits
    }
    if arch == "mixtral":
        target.update(num_local_experts=e.num_experts, intermediate_size=e.expert_ffn_dim, sliding_window=None)
    elif arch == "olmoe":
        target.update(num_experts=e.num_experts, intermediate_size=e.expert_ffn_dim, norm_topk_prob=e.renormalize)
        # OLMoE's class defaults name its own tokenizer's special tokens; this model's tokenizer is another.
        target.update(attention_bias=False, clip_qkv=None, pad_token_id=None, bos_token_id=None, eos_token_id=None)
    else:
        target.update(
            num_experts=e.num_experts,
            intermediate_size=m.ffn_dim,  # the dense layers'
            moe_intermediate_size=e.expert_ffn_dim,
            norm_topk_prob=e.renormalize,
            # Every dense layer listed: Qwen's most general form of our pattern (the first k, then all but every n-th).
            decoder_sparse_step=1,
            mlp_only_layers=dense,
            use_sliding_window=False,
        )
        if arch == "qwen2_moe":
            target.update(shared_expert_intermediate_size=spec.shared_width, qkv_bias=m.qkv_bias)
        else:
            target.update(attention_bias=False)
    return target, tuple(notes)


MOE_FORMATS = {  # model_type: (name, architecture class)
    "mixtral": ("Mixtral", "MixtralForCausalLM"),
    "qwen2_moe": ("Qwen2-MoE", "Qwen2MoeForCausalLM"),
    "qwen3_moe": ("Qwen3-MoE", "Qwen3MoeForCausalLM"),
    "olmoe": ("OLMoE", "OlmoeForCausalLM"),
}


def moe_architecture(config: ml_collections.ConfigDict) -> str:
    """The HF model_type an MoE model exports as: the one format with shared experts (Qwen2-MoE), else the one
    with its attention's query and key norms (none: Mixtral, per head: Qwen3-MoE, full width: OLMoE)."""
    if config.moe.num_shared_experts:
        return "qwen2_moe"
    return {"none": "mixtral", "head": "qwen3_moe", "full": "olmoe"}[config.model.qk_norm]


def _dense_config(m: ml_collections.ConfigDict, common: dict) -> dict:
    """config.json for a dense model: Llama, Qwen2 with q/k/v biases, Qwen3 with per-head QK-norm."""
    if m.qk_norm == "full":
        raise ConfigError(
            "cannot export: no dense Hugging Face format has a full-width QK-norm (model.qk_norm=full, OLMoE's, "
            "which is an MoE format); train with model.qk_norm=head (Qwen3) or none"
        )
    if m.qk_norm == "head":
        if m.qkv_bias:
            raise ConfigError(
                "cannot export as Qwen3: its attention biases (attention_bias) include one on the output projection, "
                "which this model has not (model.qkv_bias=True); train with model.qkv_bias=False"
            )
        return {
            **common,
            "model_type": "qwen3",
            "architectures": ["Qwen3ForCausalLM"],
            "intermediate_size": m.ffn_dim,
            "attention_bias": False,
            "use_sliding_window": False,
        }
    if m.qkv_bias:
        return {
            **common,
            "model_type": "qwen2",
            "architectures": ["Qwen2ForCausalLM"],
            "intermediate_size": m.ffn_dim,
            "use_sliding_window": False,
        }
    return {
        **common,
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "intermediate_size": m.ffn_dim,
        "attention_bias": False,
        "mlp_bias": False,
    }


def _locate(path: str, step: int | None) -> tuple[str, int]:
    """(workdir, step): --step, the step in the path, or the latest."""
    workdir, in_path = split_checkpoint_path(path)
    if not storage.isdir(workdir):
        raise CheckpointError(f"{path}: no such directory; give a workdir or WORKDIR/checkpoints/STEP")
    if step is not None and in_path is not None and step != in_path:
        raise ConfigError(f"--step={step} disagrees with the checkpoint path {path}; give one of them")
    step = in_path if step is None else step
    if step is None:
        step = Checkpointer(workdir).latest_step()
        if step is None:
            raise CheckpointError(f"{workdir} holds no checkpoint to export")
    return workdir, step


def _restore(workdir: str, step: int, config: ml_collections.ConfigDict) -> dict:
    """The parameters as a pure dict, split over every device of every process."""
    abstract = nnx.eval_shape(
        lambda: build_model(ModelSpec.from_config(config), mesh_layout=MeshLayout.from_config(config))
    )
    params = nnx.state(abstract, nnx.Param)
    # Every device on one axis, each matrix split along a model dimension: a host holds 1/processes of it.
    mesh = Mesh(np.asarray(jax.devices()).reshape(1, -1, 1), AXES, axis_types=(AxisType.Auto,) * 3)
    rules = {**mesh_lib.layout_rules("gshard"), "embed": ("data",), "mlp": ("data",), "vocab": ("data",)}
    source = Checkpointer(workdir)
    restored = source.restore_params(step, params, mesh_lib.tree_shardings(params, mesh, rules))
    source.close()
    return nnx.to_pure_dict(restored)


Place = tuple[int, int, int]  # MeshLayout.layer_places: (stack, position in the pattern, stored index)


def _tensor_list(config: ml_collections.ConfigDict) -> list[tuple[Tensor, Place | None]]:
    """(tensor, where its layer is stored; None outside the layers) in the order transformers writes them."""
    spec, layout = ModelSpec.from_config(config), MeshLayout.from_config(config)
    embed, *rest = outside_tensors()
    arch = moe_architecture(config) if spec.num_experts else "dense"
    layers = [
        (t, place)
        for i, place in enumerate(layout.layer_places(spec))
        for t in layer_tensors(
            i,
            arch=arch,
            num_experts=spec.num_experts if spec.moe_layers[i] else 0,
            qkv_bias=spec.qkv_bias,
            qk_norm=spec.qk_norm,
            shared=spec.shared_width > 0,
        )
    ]
    return [(embed, None), *layers, *((t, None) for t in rest)]


def export_hf(
    path: str,
    out: str,
    *,
    step: int | None = None,
    dtype: str = "fp32",
    max_shard_bytes: float = DEFAULT_MAX_SHARD_BYTES,
) -> Export:
    """Write the checkpoint at `path` (a workdir's latest, WORKDIR/checkpoints/STEP, or --step) to `out`."""
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype={dtype!r} must be one of fp32, bf16")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ConfigError(f"--out={out} already exists and is not an empty directory; choose a new one")
    np_dtype = np.dtype(jnp.dtype(DTYPES[dtype]))
    workdir, step = _locate(path, step)
    config = saved_config(workdir, step)
    target, notes = hf_config(config, DTYPES[dtype])
    tokenizer = config.data.tokenizer
    if tokenizer != "byte" and not os.path.isfile(tokenizer):
        raise ConfigError(f"the run's tokenizer {tokenizer} is gone; the export needs it beside the weights")
    multihost_utils.sync_global_devices("skymoe export-hf: checked")  # no process writes before all checked
    params = _restore(workdir, step, config)
    tensors = _tensor_list(config)
    sizes = [math.prod(_shape(params, t, place)) * np_dtype.itemsize for t, place in tensors]
    files = _group(list(zip(tensors, sizes)), max_shard_bytes)
    names = [_file_name(i, len(files)) for i in range(len(files))]
    me, processes = jax.process_index(), jax.process_count()
    os.makedirs(out, exist_ok=True)
    layer: dict[tuple, np.ndarray] = {}
    for f, members in enumerate(files):
        mine = {}
        for t, place in members:
            value = _gather(params, t, place, layer)  # a collective: every process takes part
            if f % processes == me:
                mine[t.hf] = np.ascontiguousarray(t.to_hf(value).astype(np_dtype))
        if mine:
            _write_safetensors(os.path.join(out, names[f]), mine)
    if me == 0:
        if len(files) > 1:
            weight_map = {t.hf: names[f] for f, members in enumerate(files) for t, _ in members}
            index = {"metadata": {"total_size": int(sum(sizes))}, "weight_map": weight_map}
            _write_json(os.path.join(out, "model.safetensors.index.json"), index)
        _write_json(os.path.join(out, "config.json"), target)
        if tokenizer != "byte":
            shutil.copyfile(tokenizer, os.path.join(out, "tokenizer.json"))
            _write_json(
                os.path.join(out, "tokenizer_config.json"),
                {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": config.data.seq_len},
            )
    if tokenizer == "byte":
        notes = (*notes, "the run used the byte tokenizer (token id = byte value), so no tokenizer files are written")
    multihost_utils.sync_global_devices("skymoe export-hf: written")
    return Export(out, target["architectures"][0], step, len(files), len(tensors), notes)


def _leaf(params: dict, t: Tensor, place: Place | None):
    """The stored array holding t: a layer's stack (all stored layers) or an outside tensor."""
    return at_path(params, t.path if place is None else (*layer_path(place[0], place[1]), *t.path))


def _shape(params: dict, t: Tensor, place: Place | None) -> tuple[int, ...]:
    shape = _leaf(params, t, place).shape
    return shape[(place is not None) + (t.expert is not None) :]


def _gather(params: dict, t: Tensor, place: Place | None, layer: dict) -> np.ndarray:
    """The whole tensor on every process. `layer` keeps the current layer's gathered arrays, so an MoE
    layer's expert weights are gathered once for all of its experts."""
    key = (t.path, place)
    if key not in layer:
        if any(held_place != place for _, held_place in layer):
            layer.clear()  # tensors come layer by layer: hold one layer at a time
        leaf = _leaf(params, t, place)
        layer[key] = np.asarray(
            multihost_utils.process_allgather(leaf if place is None else leaf[place[2]], tiled=True)
        )
    value = layer[key]
    return value if t.expert is None else value[t.expert]


def _group(sized: list, max_bytes: float) -> list[list]:
    """Consecutive tensors into files of at most max_bytes (a larger tensor gets a file of its own)."""
    files, size = [[]], 0
    for item, n in sized:
        if files[-1] and size + n > max_bytes:
            files.append([])
            size = 0
        files[-1].append(item)
        size += n
    return files


def _file_name(i: int, n: int) -> str:
    return "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def _write_safetensors(path: str, tensors: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    save_file(tensors, path, metadata={"format": "pt"})  # transformers loads files marked "pt"


def _write_json(path: str, value: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2)
        f.write("\n")
