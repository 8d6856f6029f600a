"""Checkpoints under faults: SIGKILL and exact resume, SIGKILL mid-save, SIGTERM, restore onto
other meshes, non-finite guards, and damaged or mismatched checkpoints."""

import itertools
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from skymoe_jax.checkpoint.manager import Checkpointer
from skymoe_jax.cli import main
from skymoe_jax.config import apply_overrides, base_config
from skymoe_jax.data.pipeline import make_dataset
from skymoe_jax.data.sources import load_documents
from skymoe_jax.data.tokenizers import ByteTokenizer
from skymoe_jax.errors import CheckpointError
from skymoe_jax.metrics.writers import read_jsonl
from skymoe_jax.training import runtime as runtime_lib

TINY = ["--config.model.d_model=32", "--config.model.num_layers=2", "--config.model.num_heads=2",
        "--config.model.num_kv_heads=1", "--config.model.ffn_dim=64", "--config.moe.expert_ffn_dim=32",
        "--config.moe.num_experts=4", "--config.moe.group_size=0", "--config.data.seq_len=32",
        "--config.data.batch_size=8", "--config.data.shuffle_window=64", "--config.optim.warmup_steps=2",
        "--config.train.eval_every=0", "--config.train.progress=False", "--config.parallel.mesh=(1,-1,1)"]


def _cmd(workdir, *flags):
    return [sys.executable, "-m", "skymoe_jax.cli", "train", f"--workdir={workdir}", *TINY, *flags]


def _env():
    # One device per process: these tests are about checkpoints, and small meshes start faster.
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}


def _last_per_step(workdir):
    return {r["step"]: r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))}


def _wait_for(predicate, proc, timeout=300):
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "timed out"
        time.sleep(0.002)


def _logged(workdir, step):
    path = os.path.join(workdir, "metrics.jsonl")
    return os.path.exists(path) and any(r["step"] >= step for r in read_jsonl(path))


def test_sigkill_after_step_37_resumes_bit_for_bit(tmp_path):
    flags = ["--config.train.steps=60", "--config.train.log_every=1", "--config.train.checkpoint_every=10"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run(_cmd(whole, *flags), check=True, capture_output=True, env=_env(), timeout=600)

    proc = subprocess.Popen(_cmd(killed, *flags), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    _wait_for(lambda: _logged(killed, 37) and (killed / "checkpoints" / "30").is_dir(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert Checkpointer(killed).latest_step() in (30, 40) and not (killed / "checkpoints" / "40").is_dir()

    rerun = subprocess.run(_cmd(killed, *flags), capture_output=True, text=True, env=_env(), timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming at step 30" in rerun.stdout
    a, b = _last_per_step(whole), _last_per_step(killed)
    for step in range(31, 61):
        for key in ("loss", "grad_norm", "alpha", "drop_rate", "expert_load"):
            assert a[step][key] == b[step][key], (step, key)  # bit for bit: JSON floats round-trip exactly


def test_sigkill_during_a_save_leaves_the_previous_checkpoint(tmp_path):
    # Big enough that writing a checkpoint takes a while, so the kill lands inside a save.
    flags = ["--config.train.steps=100", "--config.train.log_every=1", "--config.train.checkpoint_every=5",
             "--config.model.d_model=256", "--config.moe.expert_ffn_dim=1024", "--config.train.keep_checkpoints=5"]
    workdir = tmp_path / "run"
    proc = subprocess.Popen(_cmd(workdir, *flags), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    ckpts = workdir / "checkpoints"

    def saving_10():
        names = os.listdir(ckpts) if ckpts.is_dir() else []
        return "5" in names and any(n.startswith("10.") and "tmp" in n for n in names)

    _wait_for(saving_10, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert Checkpointer(workdir).latest_step() == 5
    ev = subprocess.run([sys.executable, "-m", "skymoe_jax.cli", "eval", f"--workdir={workdir}", "--json"],
                        capture_output=True, text=True, env=_env(), timeout=600)
    assert ev.returncode == 0, ev.stderr
    assert '"step": 5' in ev.stdout


def test_sigterm_saves_and_exits_zero(tmp_path):
    workdir = tmp_path / "run"
    proc = subprocess.Popen(_cmd(workdir, "--config.train.steps=100000", "--config.train.log_every=1",
                                 "--config.train.checkpoint_every=1000"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    _wait_for(lambda: _logged(workdir, 3), proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    line = [l for l in out.splitlines() if l.startswith("stopped by SIGTERM")]
    assert line, out
    step = Checkpointer(workdir).latest_step()
    assert step >= 3 and f"saved checkpoint {workdir / 'checkpoints' / str(step)}" in line[0]


def _config(mesh):
    c = apply_overrides(base_config(), TINY)
    c.parallel.mesh = mesh
    c.data.shuffle_window = 0
    return c


def test_restore_onto_other_meshes_gives_the_same_next_step(tmp_path):
    c = _config((1, 4, 2))
    docs, _ = load_documents(c.data, ByteTokenizer())
    data = iter(make_dataset(docs, c.data, seed=0))
    batches = list(itertools.islice(data, 4))
    rt = runtime_lib.build(c)
    with jax.set_mesh(rt.mesh):
        state = rt.init()
        for b in batches[:3]:
            state, _ = rt.train_step(state, rt.batch(b))
        ckpt = Checkpointer(tmp_path)
        ckpt.save(3, state, c, data)
        ckpt.close()
        _, expected = rt.train_step(state, rt.batch(batches[3]))
    for mesh, devices in [((1, 8, 1), jax.devices()), ((1, 1, 1), jax.devices()[:1])]:
        other = runtime_lib.build(_config(mesh), devices)
        with jax.set_mesh(other.mesh):
            restored = Checkpointer(tmp_path).restore(3, other.abstract_state())
            _, got = other.train_step(restored, other.batch(batches[3]))
        # Another mesh sums in another order: fp32 agreement to a few ulps.
        np.testing.assert_allclose(got["loss"], expected["loss"], rtol=2e-6)
        np.testing.assert_array_equal(got["drop_rate"], expected["drop_rate"])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 6-step run with checkpoints at 3 and 6, and its eval loss."""
    workdir = tmp_path_factory.mktemp("ckpt") / "run"
    assert main(["train", f"--workdir={workdir}", *TINY, "--config.train.steps=6",
                 "--config.train.checkpoint_every=3", "--config.train.log_every=3"]) == 0
    return workdir


def _eval_json(workdir, capsys):
    capsys.readouterr()
    code = main(["eval", f"--workdir={workdir}", "--json"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _copy(trained, tmp_path):
    dest = tmp_path / "run"
    shutil.copytree(trained, dest)
    return dest


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_non_finite_loss(trained, tmp_path, capsys, policy):
    workdir = _copy(trained, tmp_path)
    _, before, _ = _eval_json(workdir, capsys)
    # An absurd learning rate overflows the parameters, so a later forward pass is non-finite.
    code = main(["train", f"--workdir={workdir}", *TINY, "--config.train.steps=12", "--config.optim.lr=1e30",
                 "--config.train.log_every=1", "--config.train.checkpoint_every=3", f"--config.train.nonfinite={policy}"])
    err = capsys.readouterr().err
    if policy == "stop":
        assert code != 0
        assert "non-finite loss or gradients at step" in err and "checkpoint, step 6" in err
        assert len(err.strip().splitlines()) == 1
        assert Checkpointer(workdir).latest_step() == 6
        _, after, _ = _eval_json(workdir, capsys)
        assert after == before  # the last good checkpoint is untouched
    else:
        assert code == 0
        records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
        assert records[-1]["skipped_steps"] > 0
        assert all(np.isfinite(p) for p in records[-1]["alpha"])


def test_missing_checkpoint(tmp_path, capsys):
    code, _, err = _eval_json(tmp_path / "empty", capsys)
    assert code == 2 and "no checkpoint in" in err


def test_partial_checkpoint(trained, tmp_path, capsys):
    workdir = _copy(trained, tmp_path)
    shutil.rmtree(workdir / "checkpoints" / "6" / "state")
    code, _, err = _eval_json(workdir, capsys)
    assert code == 2 and "checkpoints/6 has no saved state" in err and len(err.strip().splitlines()) == 1
    shutil.rmtree(workdir / "checkpoints" / "6")
    code, out, _ = _eval_json(workdir, capsys)
    assert code == 0 and '"step": 3' in out  # the earlier checkpoint is unharmed


def test_corrupt_checkpoint(trained, tmp_path, capsys):
    workdir = _copy(trained, tmp_path)
    state = workdir / "checkpoints" / "6" / "state"
    for path in state.rglob("*"):
        if path.is_file() and "ocdbt" in str(path.relative_to(state)):
            path.write_bytes(b"garbage" * 10)
    code, _, err = _eval_json(workdir, capsys)
    assert code == 2 and "checkpoints/6" in err and len(err.strip().splitlines()) == 1
    shutil.rmtree(workdir / "checkpoints" / "6")
    code, out, _ = _eval_json(workdir, capsys)
    assert code == 0 and '"step": 3' in out


def test_shape_incompatible_checkpoint_names_the_parameter(trained):
    c = _config((1, 1, 1))
    c.moe.expert_ffn_dim = 48
    rt = runtime_lib.build(c, jax.devices()[:1])
    with pytest.raises(CheckpointError, match=r"parameter params/stacks/0/blocks/layers/0/ffn/experts/w_down has "
                                              r"shape \(2, 4, 32, 32\) in checkpoint .* but \(2, 4, 48, 32\)"):
        Checkpointer(trained).restore(6, rt.abstract_state())
