"""Config loading, overrides and validation messages."""

import pytest

from skymoe_jax.config import apply_overrides, base_config, load_config, shape_changes
from skymoe_jax.errors import ConfigError


def test_default_and_builtin_configs_load():
    assert load_config().name == "default"
    big = load_config("configs/skywork_moe_146b.py")
    assert (big.model.num_layers, big.model.d_model, big.moe.num_experts) == (52, 4608, 16)
    assert load_config("configs/gpu_medium.py").model.dtype == "bfloat16"


def test_override_is_typed_and_applied():
    c = load_config(
        "configs/default.py", ["--config.moe.num_experts=16", "--config.optim.lr=1e-4", "--config.moe.gate_norm=False"]
    )
    assert c.moe.num_experts == 16 and c.optim.lr == 1e-4 and c.moe.gate_norm is False


def test_the_last_value_of_a_repeated_override_wins():
    c = apply_overrides(
        base_config(),
        [
            "--config.parallel.mesh=(1,8,1)",
            "--config.train.steps=50",
            "--config.parallel.mesh=(1,-1,1)",
            "--config.train.steps=70",
        ],
    )
    assert c.parallel.mesh == (1, -1, 1) and c.train.steps == 70


@pytest.mark.parametrize(
    "override,needle",
    [
        ("--config.moe.top_k=99", "moe.top_k=99"),
        ("--config.moe.capacity_factor=0", "moe.capacity_factor"),
        ("--config.moe.topk=3", "did you mean 'moe.top_k'"),
        ("--config.model.num_heads=5", "model.num_heads=5 does not divide model.d_model=128"),
        ("--config.moe.top_k=abc", "moe.top_k"),
        ("--config.moe.drop_policy=random", "moe.drop_policy"),
        ("--config.moe.moe_every=3", "moe.moe_every=3"),
        ("--config.data.tokenizer=/no/such/tokenizer.json", "data.tokenizer"),
        ("--config.data.read_ahead=0", "data.read_ahead=0 must be a positive integer"),
        ("--config.data.read_threads=-1", "data.read_threads=-1 must be a non-negative integer"),
    ],
)
def test_bad_overrides_name_the_field(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config("configs/default.py", [override])
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_config_file_lists_builtins():
    with pytest.raises(ConfigError, match="configs/default.py"):
        load_config("configs/nope.py")


def test_shape_changes_lists_only_shape_fields():
    old = base_config()
    new = apply_overrides(old, ["--config.moe.num_experts=16", "--config.optim.lr=0.1"])
    assert shape_changes(old, new) == "moe.num_experts 8 -> 16"
