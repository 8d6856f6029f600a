"""Importing a local Hugging Face checkpoint (config.json + safetensors, single or
sharded with an index) of Llama, Mistral, Qwen2, Qwen3 (dense) or Mixtral (MoE) into a
checkpoint of this trainer plus the matching config file.

Weights are read tensor by tensor with safetensors (bf16 or fp32 on disk) and stored
in model.param_dtype (float32 by default). The architectures map onto this model
exactly: HF's rotate-half rotary embedding and RMSNorm are the ones used here, q/k/v
biases (Qwen2) become model.qkv_bias, Qwen3's per-head q/k norms model.qk_norm=head,
tied embeddings are copied into the (untied) head, and Mixtral's softmax-top-k-renormalize
router is moe.gate_norm=False, moe.renormalize=True, dropless. Not representable, hence refused: rotary scaling
(rope_scaling / rope_type other than default) and activations other than SiLU.
Mistral's sliding window is imported as full attention, identical for sequences up
to the window.
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
from skymoe_jax.model.spec import ModelSpec
from skymoe_jax.model.transformer import at_path, build_model, layer_path, put_path
from skymoe_jax.training.optim import make_optimizer
from skymoe_jax.training.state import TrainState

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "mixtral")


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
    if hf.get("head_dim") not in (None, hf["hidden_size"] // heads):
        raise CheckpointError(
            f"head_dim={hf['head_dim']} differs from hidden_size / num_attention_heads; not supported"
        )
    c = base_config()
    c.name = f"hf_{hf['model_type']}"
    m = c.model
    m.vocab_size, m.d_model, m.num_layers = hf["vocab_size"], hf["hidden_size"], hf["num_hidden_layers"]
    m.num_heads, m.num_kv_heads = heads, hf.get("num_key_value_heads") or heads
    m.ffn_dim = hf["intermediate_size"]
    m.rope_theta = float(hf.get("rope_theta") or rope.get("rope_theta") or 10000.0)
    m.norm_eps = float(hf.get("rms_norm_eps", 1e-6))
    m.init_std = float(hf.get("initializer_range", 0.02))
    m.qkv_bias = hf["model_type"] == "qwen2" or bool(hf.get("attention_bias", False))
    m.qk_norm = "head" if hf["model_type"] == "qwen3" else "none"
    e = c.moe
    if hf["model_type"] == "mixtral":
        e.num_experts, e.top_k = hf["num_local_experts"], hf["num_experts_per_tok"]
        e.expert_ffn_dim = hf["intermediate_size"]
        e.gate_norm, e.renormalize, e.dropless = False, True, True
        e.router_init_std = m.init_std
    else:
        e.num_experts = 0
    validate(c)
    return c


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
    of the model's parameter shapes; one stack of one-layer blocks)."""
    tied = hf.get("tie_word_embeddings", False) or not get.has("lm_head.weight")
    params = {}
    for t in outside_tensors():
        name = "model.embed_tokens.weight" if tied and t.hf == "lm_head.weight" else t.hf
        put_path(params, t.path, t.to_ours(get(name), at_path(abstract, t.path).shape))
    layers = at_path(abstract, layer_path(0, 0))
    per_layer = {}
    for i in range(config.model.num_layers):
        for t in layer_tensors(
            i, num_experts=config.moe.num_experts, qkv_bias=config.model.qkv_bias, qk_norm=config.model.qk_norm
        ):
            shape = at_path(layers, t.path).shape[1 if t.expert is None else 2 :]
            per_layer.setdefault(t.path, []).append(t.to_ours(get(t.hf), shape))
    stacked = {}
    for path, values in per_layer.items():
        stack = np.stack(values)  # expert tensors come layer by layer, expert by expert
        if path[:2] == ("ffn", "experts"):
            stack = stack.reshape(config.model.num_layers, -1, *values[0].shape)
        put_path(stacked, path, stack)
    put_path(params, layer_path(0, 0), stacked)
    return params


def import_hf(hf_dir: str, out: str) -> ml_collections.ConfigDict:
    """Write OUT/checkpoints/0 (fresh optimizer) and OUT/config.py; returns the config."""
    hf = read_hf_config(hf_dir)
    config = config_from_hf(hf)
    ckpt = Checkpointer(out, create=True)
    if ckpt.latest_step() is not None:
        raise CheckpointError(f"--out={out} already holds checkpoints; choose a new directory")
    spec = ModelSpec.from_config(config)
    params = nnx.state(nnx.eval_shape(lambda: build_model(spec)), nnx.Param)
    values = _params(hf, config, _Tensors(hf_dir), nnx.to_pure_dict(params))
    expected = {
        tree_path_name(path): tuple(v.shape)
        for path, v in jax.tree_util.tree_leaves_with_path(params, is_leaf=lambda v: isinstance(v, nnx.Variable))
    }
    for path, value in jax.tree_util.tree_leaves_with_path(values):
        name = tree_path_name(path)
        if expected[name] != value.shape:
            raise CheckpointError(f"tensor for {name} has shape {value.shape} but config.json implies {expected[name]}")
    dtype = spec.weight_dtype
    nnx.replace_by_pure_dict(params, jax.tree.map(lambda a: jnp.asarray(a, dtype), values))
    state = TrainState.fresh(params, make_optimizer(config, params), config)
    ckpt.save(0, state, config)
    ckpt.close()
    write_config_file(config, os.path.join(out, "config.py"), source=hf_dir)
    return config


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
