"""Two local processes (4 CPU devices each, gloo) train exactly like one process with 8 devices, on a
prepared two-source mixture (each process reads only its rows' documents); a stop signal to one
process stops both at the same step."""

import os
import pathlib
import subprocess
import sys

import numpy as np
from conftest import xla_flags

from skymoe_jax.metrics.writers import read_jsonl

ROOT = pathlib.Path(__file__).resolve().parent.parent
FLAGS = [
    "--config.model.d_model=32",
    "--config.model.num_layers=2",
    "--config.model.num_heads=2",
    "--config.model.num_kv_heads=1",
    "--config.moe.expert_ffn_dim=32",
    "--config.data.seq_len=32",
    "--config.data.batch_size=8",
    "--config.moe.group_size=0",
    "--config.train.steps=5",
    "--config.train.log_every=1",
    "--config.train.eval_every=5",
    "--config.train.eval_batches=2",
    "--config.optim.warmup_steps=1",
    "--config.parallel.mesh=(1,4,2)",
    "--config.train.checkpoint_every=0",
]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKYMOE_")}
    env.update(JAX_PLATFORMS="cpu", **extra)
    return env


def _prepared_mixture(root) -> list[str]:
    """Two sources prepared from this interpreter's asyncio and email packages, mixed 3:1."""
    import sysconfig

    from skymoe_jax.data.prepare import prepare

    sources = []
    for package, weight in (("asyncio", 3), ("email", 1)):
        prepare(os.path.join(sysconfig.get_paths()["stdlib"], package, "*.py"), "byte", str(root / package))
        sources.append(f"{root / package}:{weight}")
    return [
        "--config.data.source=prepared",
        f"--config.data.sources={','.join(sources)}",
        "--config.data.num_streams=2",
        "--config.data.val_fraction=0.3",
    ]


def test_two_processes_match_one(tmp_path):
    skymoe = [sys.executable, "-m", "skymoe_jax.cli", "train"]
    flags = [*FLAGS, *_prepared_mixture(tmp_path)]
    one = subprocess.run(
        [*skymoe, f"--workdir={tmp_path / 'one'}", *flags],
        capture_output=True,
        text=True,
        timeout=600,
        env=_env(XLA_FLAGS=xla_flags(8)),
    )
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run(
        [str(ROOT / "launch" / "local.sh"), "2", "-d", "4", "--", *skymoe, f"--workdir={tmp_path / 'two'}", *flags],
        capture_output=True,
        text=True,
        timeout=600,
        env=_env(SKYMOE_LOG_DIR=str(tmp_path / "logs")),
    )
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-2000:]
    a, b = read_jsonl(tmp_path / "one" / "metrics.jsonl"), read_jsonl(tmp_path / "two" / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4, 5]
    # Same global batches and the same program; only the collectives' transport differs.
    for key in ("loss", "grad_norm", "drop_rate", "alpha"):
        np.testing.assert_allclose([r[key] for r in b], [r[key] for r in a], rtol=1e-6, err_msg=key)
    assert "done: 5 steps" in two.stdout


def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path):
    """The stop is agreed at multiples of train.stop_check_every: both processes save that step and exit 0."""
    import signal
    import time

    from faults import start_processes

    from skymoe_jax.checkpoint.manager import Checkpointer

    workdir = tmp_path / "run"
    flags = [f for f in FLAGS if not f.startswith("--config.train.steps")]
    cmd = [
        sys.executable,
        "-m",
        "skymoe_jax.cli",
        "train",
        f"--workdir={workdir}",
        *flags,
        "--config.train.steps=100000",
        "--config.train.eval_every=0",
        "--config.train.stop_check_every=3",
    ]
    procs = start_processes(cmd, 2, 4, _env())
    try:
        metrics = workdir / "metrics.jsonl"
        deadline = time.time() + 300
        while not (metrics.exists() and len(read_jsonl(metrics)) >= 4):
            assert all(p.poll() is None for p in procs) and time.time() < deadline, procs[0].communicate()[0][-2000:]
            time.sleep(0.01)
        procs[1].send_signal(signal.SIGTERM)  # only the process that does not print
        outs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    step = Checkpointer(workdir).latest_step()
    assert step % 3 == 0 and step >= 6
    assert f"stopped by another process after step {step}; saved checkpoint" in outs[0]
