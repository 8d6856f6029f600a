"""train.compilation_cache_dir: training and evaluation point JAX's persistent compilation cache at it, unless
the environment chose one; a second run loads the programs the first compiled, except programs over more than one
CPU device, which XLA:CPU would load without the order of their collectives."""

import os

import jax
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from test_cli import _skymoe

from skymoe_jax.errors import ConfigError
from skymoe_jax.run import compile_cache


@pytest.fixture
def no_cache_chosen():
    """This pytest process's cache (tests/conftest.py) unset for the test, as in a user's fresh process."""
    saved = jax.config.jax_compilation_cache_dir, jax.config.jax_compilation_cache_max_size
    jax.config.update("jax_compilation_cache_dir", None)
    jax.config.update("jax_compilation_cache_max_size", -1)
    yield
    jax.config.update("jax_compilation_cache_dir", saved[0])
    jax.config.update("jax_compilation_cache_max_size", saved[1])


def test_enable_sets_the_directory_and_a_size_bound(no_cache_chosen, tmp_path):
    assert compile_cache.enable("") is None
    assert jax.config.jax_compilation_cache_dir is None
    path = compile_cache.enable(str(tmp_path / "a" / "xla"))
    assert path == str(tmp_path / "a" / "xla") and os.path.isdir(path)
    assert jax.config.jax_compilation_cache_dir == path
    assert jax.config.jax_compilation_cache_max_size == compile_cache.MAX_BYTES


def test_without_filelock_the_cache_stays_unbounded_rather_than_failing(no_cache_chosen, tmp_path, monkeypatch):
    real = compile_cache.importlib.util.find_spec
    monkeypatch.setattr(compile_cache.importlib.util, "find_spec", lambda n: None if n == "filelock" else real(n))
    assert compile_cache.enable(str(tmp_path)) == str(tmp_path)
    assert jax.config.jax_compilation_cache_max_size == -1


def test_a_directory_chosen_before_wins(no_cache_chosen, tmp_path):
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "env"))
    jax.config.update("jax_compilation_cache_max_size", 123)
    assert compile_cache.enable(str(tmp_path / "config")) == str(tmp_path / "env")
    assert not (tmp_path / "config").exists()
    assert jax.config.jax_compilation_cache_max_size == 123


def test_a_directory_that_cannot_be_made_is_a_config_error(no_cache_chosen, tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"train.compilation_cache_dir=.*cannot be created"):
        compile_cache.enable(str(tmp_path / "file" / "xla"))
    assert jax.config.jax_compilation_cache_dir is None


def _entries_named(name: str) -> list[str]:
    """This test process's cache entries (tests/conftest.py's directory) of the program jit names after name."""
    return [p for p in os.listdir(jax.config.jax_compilation_cache_dir) if p.startswith(f"jit_{name}-")]


@pytest.mark.parametrize("devices", [8, 1])
def test_programs_over_several_cpu_devices_are_kept_out_of_the_cache(devices):
    mesh = Mesh(np.array(jax.devices()[:devices]), ("d",))
    assert compile_cache.loads_safely(mesh) == (devices == 1)

    def total(x):
        return jax.lax.psum(x, "d")

    total.__name__ = name = f"kept_out_probe_{devices}"  # a program no other test compiles
    program = jax.jit(jax.shard_map(total, mesh=mesh, in_specs=P("d"), out_specs=P()))
    before = jax.config.jax_persistent_cache_min_compile_time_secs
    with compile_cache.kept_out(mesh):
        np.testing.assert_array_equal(program(np.arange(devices * 2.0)), np.arange(devices * 2.0).reshape(-1, 2).sum(0))
    assert jax.config.jax_persistent_cache_min_compile_time_secs == before
    # conftest.py writes every program to this process's cache; the context keeps the several-device one out.
    assert bool(_entries_named(name)) == (devices == 1)


def _no_cache_env():
    """This process's environment without the test run's cache settings (tests/conftest.py): a user's, so JAX's
    own thresholds decide what is cached (programs that compile in 1 s or more). One CPU device: the programs of
    several are kept out of the cache (the test above)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE"))}
    return {**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}


def _train(workdir, cache):
    # The default model and batch, whose train and eval steps compile for longer than JAX's 1-s threshold.
    flags = ["--config.train.steps=3", "--config.optim.warmup_steps=1", "--config.train.eval_every=3"]
    flags += ["--config.train.eval_batches=1", "--config.train.checkpoint_every=3", "--config.train.progress=False"]
    cache_flag = f"--config.train.compilation_cache_dir={cache}"
    return _skymoe("train", f"--workdir={workdir}", *flags, cache_flag, env=_no_cache_env())


def _entries(cache, suffix):
    return {p.name: p.read_bytes() for p in cache.iterdir() if p.name.endswith(suffix)}


def _steps(names: set[str]) -> set[str]:
    return {n for n in names if n.startswith(("jit_train_step-", "jit_eval_step-"))}


def test_a_second_run_loads_the_first_runs_programs(tmp_path):
    cache = tmp_path / "cache"
    first = _train(tmp_path / "one", cache)
    assert first.returncode == 0, first.stderr
    entries = set(_entries(cache, "-cache"))
    assert any(name.startswith("jit_train_step-") for name in entries), entries
    stamps = _entries(cache, "-atime")
    train_stamp = next(n for n in stamps if n.startswith("jit_train_step-"))
    second = _train(tmp_path / "two", cache)
    assert second.returncode == 0, second.stderr
    # The steps were not compiled and written again, and the train step's entry was read (JAX stamps its access
    # time). Small programs can join the cache too where a loaded machine makes them compile past JAX's 1-s threshold.
    assert not _steps(set(_entries(cache, "-cache")) - entries)
    assert _entries(cache, "-atime")[train_stamp] != stamps[train_stamp]
    assert first.stdout.split("train loss")[1].split(",")[0] == second.stdout.split("train loss")[1].split(",")[0]
    # `skymoe eval` reads the eval step the training runs compiled.
    eval_stamp = next(n for n in stamps if n.startswith("jit_eval_step-"))
    before = _entries(cache, "-atime")[eval_stamp]
    result = _skymoe("eval", f"--workdir={tmp_path / 'one'}", env=_no_cache_env())
    assert result.returncode == 0, result.stderr
    assert not _steps(set(_entries(cache, "-cache")) - entries)
    assert _entries(cache, "-atime")[eval_stamp] != before


def test_the_command_says_so_in_one_line_when_the_directory_cannot_be_made(tmp_path):
    result = _skymoe("train", "--config.train.compilation_cache_dir=/dev/null/xla", cwd=tmp_path, env=_no_cache_env())
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "skymoe train: error: train.compilation_cache_dir=/dev/null/xla cannot be created (Not a directory); "
        "point it at a writable directory, or set it to '' to compile every run"
    )
    assert not (tmp_path / "runs").exists()
