"""`skymoe export-hf`: models of this trainer load in transformers with the same logits (trained Mixtral- and
Llama-shaped ones, random Qwen2-MoE, Qwen3-MoE and OLMoE-shaped ones); import-hf then export-hf gives back the
original tensors bit for bit; what a format cannot express is refused in one sentence; a two-process export writes
its files from both processes without gathering the model on one."""

import json
import os
import pathlib
import subprocess
import sys
import sysconfig

import jax
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch", reason="torch is not installed: pip install -e '.[hf]' to run the HF tests")
transformers = pytest.importorskip("transformers", reason="transformers is not installed: pip install -e '.[hf]'")

from faults import train_tokenizer  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402
from test_hf_import import MODELS, SMALL  # noqa: E402

from skymoe_jax import load_model  # noqa: E402
from skymoe_jax.checkpoint.hf import new_run, save_initial  # noqa: E402
from skymoe_jax.checkpoint.hf_export import hf_config  # noqa: E402
from skymoe_jax.cli import main  # noqa: E402
from skymoe_jax.config import apply_overrides, base_config  # noqa: E402
from skymoe_jax.errors import ConfigError  # noqa: E402
from skymoe_jax.model.spec import ModelSpec  # noqa: E402
from skymoe_jax.model.transformer import build_model  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Odd vocabularies (not a multiple of 8) and grouped-query attention (4 heads, 2 KV heads).
SHAPES = [
    "--config.model.d_model=32",
    "--config.model.num_heads=4",
    "--config.model.num_kv_heads=2",
    "--config.model.ffn_dim=48",
    "--config.data.seq_len=32",
    "--config.data.batch_size=8",
    "--config.train.steps=2",
    "--config.train.eval_every=0",
    "--config.optim.warmup_steps=1",
    "--config.train.progress=False",
]
TINY_MOE = [
    "--config.model.vocab_size=259",
    "--config.model.num_layers=3",
    "--config.moe.num_experts=4",
    "--config.moe.expert_ffn_dim=24",
    "--config.moe.group_size=0",
    "--config.moe.gate_norm=False",
    "--config.moe.dropless=True",
]
MOE = [
    *TINY_MOE,
    # Layers stored stage by stage with padding: the export must find each layer at its slot.
    "--config.parallel.mesh=(2,-1,1)",
    "--config.parallel.pipeline_stage_layers=(1,2)",
]
TEXT = "def add(a, b):\n    return a + b  # the sum of two numbers\n"
DENSE = ["--config.model.vocab_size=263", "--config.model.num_layers=2", "--config.moe.num_experts=0"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    # The dense run reads a Hugging Face tokenizer, which the export copies beside the weights.
    tokenizer = train_tokenizer(root / "tokenizer.json", [TEXT] * 20)
    # A small corpus: tokenizing the whole built-in one with a BPE tokenizer takes minutes here.
    email = os.path.join(sysconfig.get_paths()["stdlib"], "email", "*.py")
    hf_data = [
        f"--config.data.tokenizer={tokenizer}",
        "--config.data.source=files",
        f"--config.data.train_files={email}",
        "--config.data.num_streams=1",  # its one validation document fills one stream
    ]
    for name, flags in (("moe", MOE), ("dense", [*DENSE, *hf_data])):
        assert main(["train", f"--workdir={root / name}", *SHAPES, *flags]) == 0
    return root


def _logits_match(workdir, hf_dir):
    model, config = load_model(str(workdir))
    tokens = np.random.default_rng(1).integers(0, config.model.vocab_size, (2, 24)).astype(np.int32)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        want = hf(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
    got = np.asarray(model(tokens).logits)
    assert got.shape == want.shape
    # fp32 on both sides, dropless: only summation orders differ (measured 1.2e-7 at |logits| ~ 0.6).
    assert np.max(np.abs(got - want)) <= 1e-4


def test_trained_moe_exports_as_mixtral_with_the_same_logits(runs, tmp_path, capsys):
    out = tmp_path / "hf"
    assert main(["export-hf", f"--workdir={runs / 'moe'}", f"--out={out}", "--max_shard_size=40KB"]) == 0
    text = capsys.readouterr().out
    assert "as MixtralForCausalLM" in text and "with an index" in text and "byte tokenizer" in text
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["num_local_experts"], config["vocab_size"]) == ("mixtral", 4, 259)
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(index.values()) == {p.name for p in out.glob("model-*.safetensors")}
    _logits_match(runs / "moe", out)


def test_trained_dense_model_exports_as_llama_with_the_same_logits(runs, tmp_path, capsys):
    out = tmp_path / "hf"
    assert main(["export-hf", f"--workdir={runs / 'dense'}", f"--out={out}", "--step=2"]) == 0
    assert "as LlamaForCausalLM" in capsys.readouterr().out
    assert [p.name for p in out.glob("*.safetensors")] == ["model.safetensors"]
    _logits_match(runs / "dense", out)
    from tokenizers import Tokenizer

    want = Tokenizer.from_file(str(runs / "tokenizer.json")).encode(TEXT, add_special_tokens=False).ids
    assert transformers.AutoTokenizer.from_pretrained(out)(TEXT, add_special_tokens=False)["input_ids"] == want


# A small MoE for each newer format, with what sets it apart and the parts only a config here can give it: two
# shared experts exported as Qwen2-MoE's one, dense layers in both of our patterns, top-k left unnormalized, heads
# wider than d_model / num_heads.
FORMATS = {
    "Qwen2MoeForCausalLM": [
        "--config.moe.num_shared_experts=2",
        "--config.moe.shared_expert_ffn_dim=20",
        "--config.moe.shared_expert_gate=sigmoid",
        "--config.model.qkv_bias=True",
        "--config.moe.first_k_dense=1",
        "--config.moe.renormalize=False",
    ],
    "Qwen3MoeForCausalLM": [
        "--config.model.qk_norm=head",
        "--config.model.head_dim=16",
        "--config.moe.moe_every=2",
        "--config.moe.first_k_dense=1",
    ],
    "OlmoeForCausalLM": ["--config.model.qk_norm=full", "--config.moe.renormalize=False"],
}


@pytest.mark.parametrize("architecture", list(FORMATS))
def test_moe_model_exports_in_its_format_with_the_same_logits(architecture, tmp_path, capsys):
    config = apply_overrides(base_config(), [*SHAPES, *TINY_MOE, *FORMATS[architecture]])
    shapes = nnx.eval_shape(lambda: build_model(ModelSpec.from_config(config)))
    rng = np.random.default_rng(0)
    # Weights larger than at init (as the import tests give transformers' models), so routing and norms show.
    values = jax.tree.map(lambda a: rng.normal(0, 0.2, a.shape), nnx.to_pure_dict(nnx.state(shapes, nnx.Param)))
    run, out = tmp_path / "run", tmp_path / "hf"
    save_initial(new_run(str(run)), config, values, source="random weights")
    assert main(["export-hf", f"--workdir={run}", f"--out={out}"]) == 0
    assert f"as {architecture}" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["architectures"] == [architecture]
    _logits_match(run, out)


@pytest.mark.parametrize(
    "kind,dtype",
    [
        ("llama", "fp32"),
        ("qwen2", "fp32"),
        ("qwen3", "fp32"),
        ("mixtral", "bf16"),
        ("qwen2_moe", "fp32"),
        ("qwen3_moe", "bf16"),
        ("olmoe", "fp32"),
    ],
)
def test_import_then_export_gives_back_the_original_tensors(kind, dtype, tmp_path):
    config_cls, model_cls, extra = MODELS[kind]
    torch.manual_seed(0)
    model = model_cls(config_cls(**{**SMALL, **extra, "tie_word_embeddings": False})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    if dtype == "bf16":
        model = model.to(torch.bfloat16)
    model.save_pretrained(tmp_path / "original")
    assert main(["import-hf", f"--hf_dir={tmp_path / 'original'}", f"--out={tmp_path / 'imported'}"]) == 0
    assert (
        main(["export-hf", f"--workdir={tmp_path / 'imported'}", f"--out={tmp_path / 'back'}", f"--dtype={dtype}"]) == 0
    )
    original, back = (
        load_file(tmp_path / "original" / "model.safetensors"),
        load_file(tmp_path / "back" / "model.safetensors"),
    )
    assert set(back) == set(original)
    for name, value in original.items():
        assert back[name].dtype == value.dtype and np.array_equal(back[name], value), name


@pytest.mark.parametrize(
    "fields,words",
    [
        ({"moe.gate_norm": True}, "as Mixtral: gate logit normalization"),
        ({"moe.renormalize": False}, "renormalizes the top-k"),
        ({"moe.first_k_dense": 1}, "Mixtral has experts in every layer"),
        ({"model.qkv_bias": True}, "no q/k/v biases"),
        ({"moe.num_shared_experts": 1}, "as Qwen2-MoE: .*sigmoid gate.*shared_expert_gate=none"),
        ({"moe.num_shared_experts": 1, "moe.shared_expert_gate": "sigmoid", "model.qk_norm": "head"}, "query and key"),
        ({"model.qk_norm": "head", "model.qkv_bias": True}, "as Qwen3-MoE: .*output projection"),
        ({"model.qk_norm": "full", "moe.first_k_dense": 1}, "OLMoE has experts in every layer"),
        ({"model.qk_norm": "full", "moe.gate_norm": True}, "OLMoE's plain softmax router"),
        ({"model.qk_norm": "full", "model.head_dim": 64}, "OLMoE's query norm is as wide as the model"),
        ({"moe.score": "sigmoid"}, "as Mixtral: .*moe.score=sigmoid"),
        ({"moe.routed_scale": 2.5}, "moe.routed_scale=2.5"),
        ({"model.qk_norm": "head", "moe.num_groups": 2}, "as Qwen3-MoE: .*moe.num_groups=2"),
        ({"model.qk_norm": "full", "moe.balance": "bias"}, "as OLMoE: .*no expert selection bias"),
    ],
)
def test_what_a_format_cannot_express_is_refused_in_one_sentence(fields, words):
    c = base_config()
    c.moe.update(gate_norm=False, dropless=True)
    for field, value in fields.items():
        section, name = field.split(".")
        c[section][name] = value
    with pytest.raises(ConfigError, match=words) as refused:
        hf_config(c, "float32")
    assert "\n" not in str(refused.value)


def test_dense_models_without_a_format_are_refused_in_one_sentence():
    c = base_config()
    c.moe.num_experts = 0
    c.model.qk_norm = "full"
    with pytest.raises(ConfigError, match=r"no dense Hugging Face format .* full-width QK-norm .*model.qk_norm=full"):
        hf_config(c, "float32")
    c.model.update(qk_norm="head", qkv_bias=True)
    with pytest.raises(ConfigError, match=r"as Qwen3: .*output projection.*model.qkv_bias=False"):
        hf_config(c, "float32")


def test_capacity_dropping_is_exported_with_a_note():
    c = base_config()
    c.moe.gate_norm = False
    assert "capacity dropping" in hf_config(c, "float32")[1][0]


def test_bad_export_flags_are_one_line_and_write_nothing(runs, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    cases = [
        ([f"--workdir={runs / 'dense'}", f"--out={taken}"], "already exists and is not an empty directory"),
        ([f"--workdir={runs / 'dense'}", f"--out={tmp_path / 'a'}", "--dtype=fp8"], "--dtype='fp8' must be one of"),
        ([f"--workdir={runs / 'dense'}", f"--out={tmp_path / 'b'}", "--step=7"], "7"),
        ([f"--workdir={tmp_path / 'nowhere'}", f"--out={tmp_path / 'c'}"], "no such directory"),
        ([f"--workdir={runs / 'dense'}", f"--out={tmp_path / 'd'}", "--max_shard_size=5"], "must be a size"),
    ]
    for flags, words in cases:
        assert main(["export-hf", *flags]) == 2
        err = capsys.readouterr().err
        assert words in err and len(err.strip().splitlines()) == 1, err
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]
    assert not any((tmp_path / name).exists() for name in "abcd")


def test_two_processes_export_the_same_files_each_writing_its_own(runs, tmp_path):
    assert main(["export-hf", f"--workdir={runs / 'moe'}", f"--out={tmp_path / 'one'}", "--max_shard_size=40KB"]) == 0
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKYMOE_")}
    env.update(JAX_PLATFORMS="cpu", SKYMOE_LOG_DIR=str(tmp_path / "logs"))
    command = [sys.executable, "-m", "skymoe_jax.cli", "export-hf", f"--workdir={runs / 'moe'}"]
    two = subprocess.run(
        [
            str(ROOT / "launch" / "local.sh"),
            "2",
            "-d",
            "4",
            "--",
            *command,
            f"--out={tmp_path / 'two'}",
            "--max_shard_size=40KB",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-2000:]
    files = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == files
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) >= 2  # file i is written by process i mod 2, so both processes wrote
    for name in shards:
        a, b = load_file(tmp_path / "one" / name), load_file(tmp_path / "two" / name)
        assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
