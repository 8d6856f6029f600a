"""Importing a local Hugging Face checkpoint (config.json + safetensors, single or
sharded with an index) of Llama, Mistral, Qwen2, Qwen3 (dense), or Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE (MoE)
into a checkpoint of this trainer plus the matching config file.

Weights are read tensor by tensor with safetensors (bf16 or fp32 on disk) and stored
in model.param_dtype (float32 by default). The architectures map onto this model
exactly: HF's rotate-half rotary embedding and RMSNorm are the ones used here, q/k/v
biases (Qwen2, Qwen2-MoE) become model.qkv_bias, Qwen3's per-head q/k norms model.qk_norm=head and OLMoE's
full-width ones model.qk_norm=full, tied embeddings are copied into the (untied) head, and the MoE formats'
softmax-top-k router is moe.gate_norm=False, dropless, with moe.renormalize from norm_topk_prob (always on in
Mixtral). Qwen2-MoE's shared expert is one shared expert with moe.shared_expert_gate=sigmoid; Qwen's dense layers
(mlp_only_layers, decoder_sparse_step) become moe.first_k_dense and moe.moe_every where that pattern can say them.
A head_dim of its own (Qwen3-MoE's 128 with hidden_size 2048 and 32 heads) is model.head_dim. Not representable,
hence refused: rotary scaling (rope_scaling / rope_type other than default), activations other than SiLU, a bias
on the attention's output projection (attention_bias), OLMoE's clip_qkv, and dense layers placed where no
moe.first_k_dense and moe.moe_every put them. Sliding windows (Mistral, Qwen's use_sliding_window) are imported
as full attention, identical for sequences up to the window.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from skymoe_jax.checkpoint.hf_names import layer_tensors, outside_tensors
from skymoe_jax.checkpoint.manager import Checkpointer, tree_path_name
from skymoe_jax.config import base_config, flatten, validate
from skymoe_jax.errors import CheckpointError
from skymoe_jax.model.mesh_layout import MeshLayout
from skymoe_jax.model.spec import ModelSpec
from skymoe_jax.model.transformer import at_path, build_model, layer_path, put_path
from skymoe_jax.training.optim import make_optimizer
from skymoe_jax.training.state import TrainState

MOE_ARCHITECTURES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", *MOE_ARCHITECTURES)


def read_hf_config(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            hf = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found; --hf_dir must hold config.json and *.safetensors") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None
    if hf.get("model_type") not in ARCHITECTURES:
        raise CheckpointError(
            f"{path}: model_type {hf.get('model_type')!r} is not supported; supported: {', '.join(ARCHITECTURES)}"
        )
    return hf


def config_from_hf(hf: dict) -> ml_collections.ConfigDict:
    """This trainer's config for the HF architecture (training fields keep their defaults)."""
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling")
    if scaling or rope.get("rope_type", "default") != "default":
        raise CheckpointError(f"rotary scaling {scaling or rope} is not supported; only plain RoPE models import")
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"hidden_act={hf['hidden_act']!r} is not supported (SwiGLU with SiLU only)")
    heads = hf["num_attention_heads"]
    if hf.get("attention_bias"):
        raise CheckpointError(
            "attention_bias=True puts a bias on the attention's output projection too, which this model does not "
            "have; not supported"
        )
    if hf.get("clip_qkv") is not None:
        raise CheckpointError(f"clip_qkv={hf['clip_qkv']} clamps q, k and v, which this model does not; not supported")
    arch = hf["model_type"]
    c = base_config()
    c.name = f"hf_{arch}"
    m = c.model
    m.vocab_size, m.d_model, m.num_layers = hf["vocab_size"], hf["hidden_size"], hf["num_hidden_layers"]
    m.num_heads, m.num_kv_heads = heads, hf.get("num_key_value_heads") or heads
    if hf.get("head_dim") not in (None, m.d_model // heads) or m.d_model % heads:
        m.head_dim = hf.get("head_dim") or m.d_model // heads
    m.ffn_dim = hf["intermediate_size"]
    m.rope_theta = float(hf.get("rope_theta") or rope.get("rope_theta") or 10000.0)
    m.norm_eps = float(hf.get("rms_norm_eps", 1e-6))
    m.init_std = float(hf.get("initializer_range", 0.02))
    # Qwen2-MoE configs before transformers 5 have no qkv_bias: their q/k/v projections always had biases.
    m.qkv_bias = arch == "qwen2" or (arch == "qwen2_moe" and bool(hf.get("qkv_bias", True)))
    m.qk_norm = {"qwen3": "head", "qwen3_moe": "head", "olmoe": "full"}.get(arch, "none")
    if arch in MOE_ARCHITECTURES:
        _moe_from_hf(c, hf)
    else:
        c.moe.num_experts = 0
    validate(c)
    return c


def _moe_from_hf(c: ml_collections.ConfigDict, hf: dict) -> None:
    """The moe section for an HF MoE architecture."""
    arch, e = hf["model_type"], c.moe
    # transformers writes Qwen3-MoE's num_experts as num_local_experts, Mixtral's name.
    e.num_experts, e.top_k = hf.get("num_experts") or hf["num_local_experts"], hf["num_experts_per_tok"]
    e.expert_ffn_dim = hf["intermediate_size"] if arch in ("mixtral", "olmoe") else hf["moe_intermediate_size"]
    # The formats' routers take the top k of a float32 softmax: this router without gate normalization, dropless.
    e.gate_norm, e.dropless = False, True
    e.renormalize = arch == "mixtral" or bool(hf.get("norm_topk_prob", False))
    e.router_init_std = c.model.init_std
    if arch == "qwen2_moe":
        if not hf.get("shared_expert_intermediate_size"):
            raise CheckpointError(
                "shared_expert_intermediate_size must be positive; a Qwen2-MoE without a shared expert is not supported"
            )
        e.num_shared_experts, e.shared_expert_ffn_dim = 1, hf["shared_expert_intermediate_size"]
        e.shared_expert_gate = "sigmoid"
    if arch in ("qwen2_moe", "qwen3_moe"):
        e.first_k_dense, e.moe_every = _layer_pattern(c, hf)


def _layer_pattern(c: ml_collections.ConfigDict, hf: dict) -> tuple[int, int]:
    """(moe.first_k_dense, moe.moe_every) that put MoE layers where Qwen's mlp_only_layers and decoder_sparse_step
    do (a layer is MoE unless listed, and when its number counted from 1 is a multiple of the step); where two
    patterns place them alike ([dense, MoE]), the one with every layer MoE after the first k."""
    step, dense = hf.get("decoder_sparse_step") or 1, set(hf.get("mlp_only_layers") or ())
    n = c.model.num_layers
    want = tuple(i not in dense and (i + 1) % step == 0 for i in range(n))
    trial = ml_collections.ConfigDict(c.to_dict())
    for every in range(1, n + 1):
        for k in (k for k in range(n) if (n - k) % every == 0):
            trial.moe.first_k_dense, trial.moe.moe_every = k, every
            if ModelSpec.from_config(trial).moe_layers == want:
                return k, every
    moe = [i for i, is_moe in enumerate(want) if is_moe]
    raise CheckpointError(
        f"mlp_only_layers={sorted(dense)} with decoder_sparse_step={step} puts the MoE layers at {moe} of {n}, which "
        "this model's layer pattern (moe.first_k_dense dense layers, then every moe.moe_every-th layer MoE) cannot "
        "place; not supported"
    )


class _Tensors:
    """Named tensors of all safetensors files of a checkpoint, read on demand as float32 numpy."""

    def __init__(self, hf_dir: str):
        from safetensors import safe_open

        index = os.path.join(hf_dir, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index, encoding="utf-8") as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        else:
            files = sorted(n for n in os.listdir(hf_dir) if n.endswith(".safetensors"))
        if not files:
            raise CheckpointError(f"{hf_dir} has no .safetensors files")
        self._where = {}
        self._files = {}
        for name in files:
            path = os.path.join(hf_dir, name)
            if not os.path.exists(path):
                raise CheckpointError(f"{path} is listed in the index but missing")
            handle = safe_open(path, framework="flax")  # jax arrays: bf16 reads without torch
            self._files[name] = handle
            for key in handle.keys():
                self._where[key] = name

    def has(self, key: str) -> bool:
        return key in self._where

    def __call__(self, key: str) -> np.ndarray:
        if key not in self._where:
            raise CheckpointError(f"tensor {key} is missing from the safetensors files")
        return np.asarray(self._files[self._where[key]].get_tensor(key).astype(jnp.float32))


def _params(hf: dict, config: ml_collections.ConfigDict, get: _Tensors, abstract: dict) -> dict:
    """The pure-dict parameter tree of this trainer from HF tensors, shaped like `abstract` (a pure dict
    of the model's parameter shapes, not pipelined)."""
    tied = hf.get("tie_word_embeddings", False) or not get.has("lm_head.weight")
    params = {}
    for t in outside_tensors():
        name = "model.embed_tokens.weight" if tied and t.hf == "lm_head.weight" else t.hf
        put_path(params, t.path, t.to_ours(get(name), at_path(abstract, t.path).shape))
    spec = ModelSpec.from_config(config)
    per_layer = {}  # (stack, position in its pattern, path) -> the layers' values in order
    for i, (stack, position, _) in enumerate(MeshLayout().layer_places(spec)):
        layer = at_path(abstract, layer_path(stack, position))
        for t in layer_tensors(
            i,
            arch=hf["model_type"],
            num_experts=spec.num_experts if spec.moe_layers[i] else 0,
            qkv_bias=spec.qkv_bias,
            qk_norm=spec.qk_norm,
            shared=spec.shared_width > 0,
        ):
            shape = at_path(layer, t.path).shape[1 if t.expert is None else 2 :]
            per_layer.setdefault((stack, position, t.path), []).append(t.to_ours(get(t.hf), shape))
    for (stack, position, path), values in per_layer.items():
        stacked = np.stack(values)  # expert tensors come layer by layer, expert by expert
        if path[:2] == ("ffn", "experts"):
            stacked = stacked.reshape(-1, spec.num_experts, *values[0].shape)
        put_path(params, (*layer_path(stack, position), *path), stacked)
    return params


def import_hf(hf_dir: str, out: str) -> ml_collections.ConfigDict:
    """Write OUT/checkpoints/0 (fresh optimizer) and OUT/config.py; returns the config."""
    hf = read_hf_config(hf_dir)
    config = config_from_hf(hf)
    ckpt = new_run(out)
    values = _params(hf, config, _Tensors(hf_dir), nnx.to_pure_dict(_abstract_params(config)))
    save_initial(ckpt, config, values, source=hf_dir)
    return config


def new_run(out: str) -> Checkpointer:
    """The checkpoints of a new run at `out`; CheckpointError if it holds some already."""
    ckpt = Checkpointer(out, create=True)
    if ckpt.latest_step() is not None:
        raise CheckpointError(f"--out={out} already holds checkpoints; choose a new directory")
    return ckpt


def save_initial(ckpt: Checkpointer, config: ml_collections.ConfigDict, values: dict, source: str) -> None:
    """Step 0 of the run (closing ckpt): the parameters `values`, a pure dict shaped as the config's model, with a
    fresh optimizer; and its config.py, which names `source`."""
    params = _abstract_params(config)
    expected = {
        tree_path_name(path): tuple(v.shape)
        for path, v in jax.tree_util.tree_leaves_with_path(params, is_leaf=lambda v: isinstance(v, nnx.Variable))
    }
    for path, value in jax.tree_util.tree_leaves_with_path(values):
        name = tree_path_name(path)
        if expected[name] != value.shape:
            raise CheckpointError(f"tensor for {name} has shape {value.shape} but config.json implies {expected[name]}")
    dtype = ModelSpec.from_config(config).weight_dtype
    nnx.replace_by_pure_dict(params, jax.tree.map(lambda a: jnp.asarray(a, dtype), values))
    state = TrainState.fresh(params, make_optimizer(config, params), config)
    ckpt.save(0, state, config)
    ckpt.close()
    write_config_file(config, os.path.join(os.path.dirname(ckpt.directory), "config.py"), source=source)


def _abstract_params(config: ml_collections.ConfigDict) -> nnx.State:
    return nnx.state(nnx.eval_shape(lambda: build_model(ModelSpec.from_config(config))), nnx.Param)


def write_config_file(config: ml_collections.ConfigDict, path: str, source: str) -> None:
    """A configs/-style file: base_config() plus every field that differs from it."""
    defaults = dict(flatten(base_config()))
    lines = [
        f'"""Imported from {source} by `skymoe import-hf`."""',
        "",
        "from skymoe_jax.config import base_config",
        "",
        "",
        "def get_config():",
        "    config = base_config()",
    ]
    lines += [f"    config.{key} = {value!r}" for key, value in flatten(config) if defaults[key] != value]
    lines += ["    return config", ""]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
