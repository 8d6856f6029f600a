"""Config loading, overrides and validation messages."""

import sys

import pytest

import skymoe_jax
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
        ("--config.model.head_dim=-2", "model.head_dim=-2 must be a non-negative integer"),
        ("--config.model.head_dim=15", "head dimension 15 must be even"),
        ("--config.moe.top_k=abc", "moe.top_k"),
        ("--config.moe.drop_policy=random", "moe.drop_policy"),
        ("--config.moe.moe_every=3", "moe.moe_every=3"),
        ("--config.data.tokenizer=/no/such/tokenizer.json", "data.tokenizer"),
        ("--config.data.read_ahead=0", "data.read_ahead=0 must be a positive integer"),
        ("--config.data.read_threads=-1", "data.read_threads=-1 must be a non-negative integer"),
        ("--config.metrics.wandb.tags=ablation", "metrics.wandb.tags need metrics.wandb.project"),
        ("--config.metrics.wandb.project=team/moe", "the entity (team) goes in WANDB_ENTITY"),
        ("--config.metrics.mlflow.tracking_uri=http://mlflow:5000", "needs metrics.mlflow.experiment"),
    ],
)
def test_bad_overrides_name_the_field(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config("configs/default.py", [override])
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["--config.moe.score=relu"], "moe.score='relu' is not one of softmax, sigmoid"),
        (["--config.moe.aux_scope=document"], "moe.aux_scope='document' is not one of batch, sequence"),
        (["--config.moe.routed_scale=0"], "moe.routed_scale=0.0 must be > 0"),
        (["--config.moe.num_groups=3"], "moe.num_groups=3 must be a positive integer dividing moe.num_experts=8"),
        (["--config.moe.num_groups=4", "--config.moe.top_groups=5"], "moe.top_groups=5 must be between 1 and"),
        (["--config.moe.num_groups=4", "--config.moe.top_k=3"], "moe.top_k=3 exceeds the 2 experts in"),
        (["--config.moe.num_groups=2", "--config.moe.routing_impl=pallas"], "set moe.routing_impl=xla"),
    ],
)
def test_routing_fields_are_validated(overrides, needle):
    with pytest.raises(ConfigError) as err:
        load_config("configs/default.py", overrides)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_a_long_wandb_tag_is_refused():
    with pytest.raises(ConfigError, match="longer than W&B's 64 characters"):
        load_config(
            "configs/default.py", ["--config.metrics.wandb.project=p", f"--config.metrics.wandb.tags=a,{'x' * 65}"]
        )


@pytest.mark.parametrize("tracker,field", [("wandb", "project"), ("mlflow", "experiment")])
def test_a_tracker_without_its_package_stops_the_run_before_it_starts(tracker, field, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, tracker, None)  # what an environment without the extra finds
    config = load_config("configs/default.py", [f"--config.metrics.{tracker}.{field}=skymoe"])
    with pytest.raises(ConfigError) as err:
        skymoe_jax.train(config, str(tmp_path / "run"))
    assert str(err.value) == (
        f"metrics.{tracker}.{field}='skymoe' needs {tracker}, which is not installed: pip install "
        f"'skymoe-jax[{tracker}]' (pip install -e '.[{tracker}]' in a clone), or set metrics.{tracker}.{field}=''"
    )
    assert not (tmp_path / "run").exists()


def test_missing_config_file_lists_builtins():
    with pytest.raises(ConfigError, match="configs/default.py"):
        load_config("configs/nope.py")


def test_shape_changes_lists_only_shape_fields():
    old = base_config()
    new = apply_overrides(old, ["--config.moe.num_experts=16", "--config.optim.lr=0.1"])
    assert shape_changes(old, new) == "moe.num_experts 8 -> 16"
