"""Imported Hugging Face models compute the same logits as transformers' PyTorch implementation."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed: pip install -e '.[hf]' to run the HF tests")
transformers = pytest.importorskip("transformers", reason="transformers is not installed: pip install -e '.[hf]'")

from skymoe_jax import load_model  # noqa: E402
from skymoe_jax.cli import main  # noqa: E402

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
}


def _hf_model(kind, seed=0):
    config_cls, model_cls, extra = MODELS[kind]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**SMALL, **extra)).eval()
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
    assert config.moe.num_experts == (4 if kind == "mixtral" else 0)
    assert config.model.qkv_bias == (kind == "qwen2")
    assert config.model.qk_norm == ("head" if kind == "qwen3" else "none")


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
