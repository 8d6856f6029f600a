"""Two local processes (4 CPU devices each, gloo) train exactly like one process with 8 devices."""

import os
import pathlib
import subprocess
import sys

import numpy as np

from skymoe_jax.metrics.writers import read_jsonl

ROOT = pathlib.Path(__file__).resolve().parent.parent
FLAGS = ["--config.model.d_model=32", "--config.model.num_layers=2", "--config.model.num_heads=2",
         "--config.model.num_kv_heads=1", "--config.moe.expert_ffn_dim=32", "--config.data.seq_len=32",
         "--config.data.batch_size=8", "--config.moe.group_size=0", "--config.train.steps=5",
         "--config.train.log_every=1", "--config.train.eval_every=5", "--config.train.eval_batches=2",
         "--config.optim.warmup_steps=1", "--config.parallel.mesh=(1,4,2)", "--config.train.checkpoint_every=0"]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKYMOE_")}
    env.update(JAX_PLATFORMS="cpu", **extra)
    return env


def test_two_processes_match_one(tmp_path):
    skymoe = [sys.executable, "-m", "skymoe_jax.cli", "train"]
    one = subprocess.run([*skymoe, f"--workdir={tmp_path / 'one'}", *FLAGS], capture_output=True, text=True,
                         timeout=600, env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"))
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([str(ROOT / "launch" / "local.sh"), "2", "-d", "4", "--", *skymoe,
                          f"--workdir={tmp_path / 'two'}", *FLAGS], capture_output=True, text=True, timeout=600,
                         env=_env(SKYMOE_LOG_DIR=str(tmp_path / "logs")))
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-2000:]
    a, b = read_jsonl(tmp_path / "one" / "metrics.jsonl"), read_jsonl(tmp_path / "two" / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4, 5]
    # Same global batches and the same program; only the collectives' transport differs.
    for key in ("loss", "grad_norm", "drop_rate", "alpha"):
        np.testing.assert_allclose([r[key] for r in b], [r[key] for r in a], rtol=1e-6, err_msg=key)
    assert "done: 5 steps" in two.stdout
