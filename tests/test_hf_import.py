"""Imported Hugging Face models compute the same logits as transformers' PyTorch implementation."""

import json
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed: pip install -e '.[hf]' to run the HF tests")
transformers = pytest.importorskip("transformers", reason="transformers is not installed: pip install -e '.[hf]'")

from skymoe_jax import load_model  # noqa: E402
from skymoe_jax.cli import main  # noqa: E402
from skymoe_jax.config import flatten  # noqa: E402

SMALL = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
)
MODELS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {"sliding_window": None}),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {"tie_word_embeddings": True}),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {"head_dim": 8}),
    "mixtral": (
        transformers.MixtralConfig,
        transformers.MixtralForCausalLM,
        {"num_local_experts": 4, "num_experts_per_tok": 2},
    ),
    # Each MoE format with what sets it apart: Qwen2-MoE's shared expert, q/k/v biases and every other layer MoE
    # (decoder_sparse_step=2), Qwen3-MoE's per-head QK-norm, its own head_dim, renormalized top-k and a dense first
    # layer (mlp_only_layers), OLMoE's full-width QK-norm and unnormalized top-k.
    "qwen2_moe": (
        transformers.Qwen2MoeConfig,
        transformers.Qwen2MoeForCausalLM,
        {
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 24,
            "shared_expert_intermediate_size": 40,
            "num_hidden_layers": 4,
            "decoder_sparse_step": 2,
        },
    ),
    "qwen3_moe": (
        transformers.Qwen3MoeConfig,
        transformers.Qwen3MoeForCausalLM,
        {
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 24,
            "head_dim": 16,  # wider than hidden_size / heads, as Qwen3-MoE's checkpoints are
            "norm_topk_prob": True,
            "mlp_only_layers": [0],
        },
    ),
    "olmoe": (
        transformers.OlmoeConfig,
        transformers.OlmoeForCausalLM,
        {"num_experts": 4, "num_experts_per_tok": 2, "pad_token_id": None, "eos_token_id": None},
    ),
}
# What each imported config says about the parts that differ between the formats.
IMPORTED = {
    "llama": {},
    "mistral": {},
    "qwen2": {"model.qkv_bias": True},
    "qwen3": {"model.qk_norm": "head"},
    "mixtral": {"moe.num_experts": 4, "moe.expert_ffn_dim": 48, "moe.renormalize": True},
    "qwen2_moe": {
        "moe.num_experts": 4,
        "moe.expert_ffn_dim": 24,
        "model.ffn_dim": 48,
        "model.qkv_bias": True,
        "moe.num_shared_experts": 1,
        "moe.shared_expert_ffn_dim": 40,
        "moe.shared_expert_gate": "sigmoid",
        "moe.renormalize": False,
        "moe.moe_every": 2,
    },
    "qwen3_moe": {
        "moe.num_experts": 4,
        "moe.expert_ffn_dim": 24,
        "model.qk_norm": "head",
        "model.head_dim": 16,
        "moe.renormalize": True,
        "moe.first_k_dense": 1,
    },
    "olmoe": {"moe.num_experts": 4, "moe.expert_ffn_dim": 48, "model.qk_norm": "full", "moe.renormalize": False},
}


def _hf_model(kind, seed=0):
    config_cls, model_cls, extra = MODELS[kind]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**SMALL, **extra})).eval()
    with torch.no_grad():  # larger-than-init weights make differences visible, and give the biases values
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def _compare(hf_dir, reference, tmp_path, capsys):
    out = tmp_path / "imported"
    assert main(["import-hf", f"--hf_dir={hf_dir}", f"--out={out}"]) == 0
    assert "imported" in capsys.readouterr().out
    model, config = load_model(str(out))
    tokens = np.random.default_rng(1).integers(0, SMALL["vocab_size"], (2, 24)).astype(np.int32)
    with torch.no_grad():
        want = reference(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
    got = np.asarray(model(tokens).logits)
    # fp32 on both sides; the only differences are summation orders (atol 1e-4 per the issue).
    assert np.max(np.abs(got - want)) <= 1e-4
    return config


@pytest.mark.parametrize("kind", list(MODELS))
def test_logits_match_transformers(kind, tmp_path, capsys):
    model = _hf_model(kind)
    model.save_pretrained(tmp_path / "hf")
    config = _compare(tmp_path / "hf", model, tmp_path, capsys)
    want = {"moe.num_experts": 0, "model.qkv_bias": False, "model.qk_norm": "none", "model.head_dim": 0}
    want["moe.num_shared_experts"] = 0
    want.update({"moe.first_k_dense": 0, "moe.moe_every": 1, **IMPORTED[kind]})
    got = dict(flatten(config))
    assert {key: got[key] for key in want} == want
    if want["moe.num_experts"]:
        assert (config.moe.gate_norm, config.moe.dropless, config.moe.top_k) == (False, True, 2)


def test_sharded_safetensors_with_index(tmp_path, capsys):
    model = _hf_model("mixtral")
    model.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    assert json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())["weight_map"]
    _compare(tmp_path / "hf", model, tmp_path, capsys)


def test_bf16_checkpoint(tmp_path, capsys):
    model = _hf_model("llama").to(torch.bfloat16)
    model.save_pretrained(tmp_path / "hf")
    reference = model.float()  # the bf16 weights, exactly, computed in fp32
    _compare(tmp_path / "hf", reference, tmp_path, capsys)


def test_unsupported_model_is_refused(tmp_path, capsys):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert main(["import-hf", f"--hf_dir={tmp_path / 'hf'}", f"--out={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err
    assert "model_type 'gpt2' is not supported" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "kind,fields,words",
    [
        ("llama", {"attention_bias": True}, "attention_bias=True puts a bias on the attention's output projection"),
        ("olmoe", {"clip_qkv": 8.0}, "clip_qkv=8.0 clamps q, k and v"),
        ("qwen3_moe", {"mlp_only_layers": [1]}, r"puts the MoE layers at \[0\] of 2, which .* cannot place"),
    ],
)
def test_what_this_model_cannot_express_is_refused_in_one_sentence(kind, fields, words, tmp_path, capsys):
    config_cls, _, extra = MODELS[kind]
    config_cls(**{**SMALL, **extra, **fields}).save_pretrained(tmp_path / "hf")  # refused before any tensor is read
    assert main(["import-hf", f"--hf_dir={tmp_path / 'hf'}", f"--out={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err
    assert re.search(words, err) and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_imported_dense_model_evaluates_and_trains_on(tmp_path, capsys):
    # A dense import holds no aux coefficients; eval and resuming from its step-0 checkpoint must not ask for them.
    config_cls, model_cls, _ = MODELS["llama"]
    model_cls(config_cls(**{**SMALL, "vocab_size": 256})).save_pretrained(tmp_path / "hf")
    out = tmp_path / "imported"
    assert main(["import-hf", f"--hf_dir={tmp_path / 'hf'}", f"--out={out}"]) == 0
    assert main(["eval", f"--workdir={out}", "--config.train.eval_batches=1"]) == 0
    assert (
        main(
            [
                "train",
                f"--workdir={out}",
                "--config.train.steps=2",
                "--config.optim.warmup_steps=1",
                "--config.data.batch_size=8",
                "--config.data.seq_len=32",
                "--config.train.progress=False",
            ]
        )
        == 0
    )
    out_text = capsys.readouterr().out
    assert "resuming at step 0" in out_text and "done: 2 steps" in out_text
