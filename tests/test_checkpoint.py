"""Checkpoints under faults: SIGKILL and exact resume, SIGKILL mid-save, SIGTERM, restore onto
other meshes, non-finite guards, and damaged or mismatched checkpoints."""

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import xla_flags
from faults import digest, logged, wait_for

from skymoe_jax.checkpoint.manager import Checkpointer, DataPosition
from skymoe_jax.cli import main
from skymoe_jax.config import apply_overrides, base_config
from skymoe_jax.data.pipeline import make_dataset
from skymoe_jax.data.sources import load_documents
from skymoe_jax.data.tokenizers import ByteTokenizer
from skymoe_jax.errors import CheckpointError
from skymoe_jax.metrics.writers import read_jsonl
from skymoe_jax.training import runtime as runtime_lib

# A tiny model on the default data settings (the built-in corpus, 16 x 256 tokens, shuffle window 4096, 8 streams).
TINY_MODEL = [
    "--config.model.d_model=32",
    "--config.model.num_layers=2",
    "--config.model.num_heads=2",
    "--config.model.num_kv_heads=1",
    "--config.model.ffn_dim=64",
    "--config.moe.expert_ffn_dim=32",
    "--config.moe.num_experts=4",
    "--config.moe.group_size=0",
    "--config.optim.warmup_steps=2",
    "--config.train.eval_every=0",
    "--config.train.progress=False",
    "--config.parallel.mesh=(1,-1,1)",
]
TINY = TINY_MODEL + ["--config.data.seq_len=32", "--config.data.batch_size=8", "--config.data.shuffle_window=64"]


def _cmd(workdir, *flags, model=TINY):
    return [sys.executable, "-m", "skymoe_jax.cli", "train", f"--workdir={workdir}", *model, *flags]


def _env():
    # One device per process: these tests are about checkpoints, and small meshes start faster.
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(1)}


def _last_per_step(workdir):
    return {r["step"]: r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))}


def test_default_data_resumes_exactly_from_a_mid_window_position():
    # The default window (4096 sequences over 8 streams) spans 256 steps, so step 30 is mid-window and the saved
    # packer state sits at a document boundary: the case grain's JSON state lost (see DataPosition).
    c = base_config()
    docs, _ = load_documents(c.data, ByteTokenizer())
    data = iter(make_dataset(docs, c.data, seed=0))
    first = list(itertools.islice(data, 30))
    saved = DataPosition(data).get_state()
    rest = list(itertools.islice(data, 20))
    resumed = iter(make_dataset(docs, c.data, seed=0))
    DataPosition(resumed).set_state(saved)
    again = list(itertools.islice(resumed, 20))
    for want, got in zip(rest, again):
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    # Documents begun (position 0) over the 50 steps: the resumed run starts as many as the uninterrupted one.
    starts = lambda batches: sum(int(np.sum(b["positions"] == 0)) for b in batches)
    assert starts(first + again) == starts(first + rest) > 0


# The CPU default config saves synchronously; the base config (GPU configs) asynchronously, recording the data
# position when the save starts while training goes on. Asynchronous saves are in the long profile: the default run
# resumes from one in test_faults.py (a mid-window position of the default data, to the same final loss).
@pytest.mark.parametrize(
    "asynchronous", [False, pytest.param(True, marks=pytest.mark.long)], ids=["sync-saves", "async-saves"]
)
def test_sigkill_after_step_37_resumes_bit_for_bit(tmp_path, asynchronous):
    # Default data settings: a mid-window checkpoint (step 30 of a 256-step shuffle window) must resume exactly.
    flags = ["--config.train.steps=60", "--config.train.log_every=1", "--config.train.checkpoint_every=10"]
    flags.append(f"--config.train.async_checkpointing={asynchronous}")
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run(_cmd(whole, *flags, model=TINY_MODEL), check=True, capture_output=True, env=_env(), timeout=600)

    proc = subprocess.Popen(
        _cmd(killed, *flags, model=TINY_MODEL), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env()
    )
    wait_for(lambda: logged(killed, 37) and (killed / "checkpoints" / "30").is_dir(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert Checkpointer(killed).latest_step() in (30, 40) and not (killed / "checkpoints" / "40").is_dir()

    rerun = subprocess.run(
        _cmd(killed, *flags, model=TINY_MODEL), capture_output=True, text=True, env=_env(), timeout=600
    )
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming at step 30" in rerun.stdout
    a, b = _last_per_step(whole), _last_per_step(killed)
    for step in range(31, 61):
        for key in ("loss", "grad_norm", "alpha", "drop_rate", "expert_load"):
            assert a[step][key] == b[step][key], (step, key)  # bit for bit: JSON floats round-trip exactly


def test_sigkill_during_a_save_leaves_the_previous_checkpoint(tmp_path):
    # Big enough that writing a checkpoint takes a while, so the kill lands inside a save, written by orbax's
    # thread while training goes on.
    flags = [
        "--config.train.async_checkpointing=True",
        "--config.train.steps=100",
        "--config.train.log_every=1",
        "--config.train.checkpoint_every=5",
        "--config.model.d_model=256",
        "--config.moe.expert_ffn_dim=1024",
        "--config.train.keep_checkpoints=5",
    ]
    workdir = tmp_path / "run"
    proc = subprocess.Popen(_cmd(workdir, *flags), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    ckpts = workdir / "checkpoints"

    def saving_10():
        names = os.listdir(ckpts) if ckpts.is_dir() else []
        return "5" in names and any(n.startswith("10.") and "tmp" in n for n in names)

    wait_for(saving_10, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert Checkpointer(workdir).latest_step() == 5
    ev = subprocess.run(
        [sys.executable, "-m", "skymoe_jax.cli", "eval", f"--workdir={workdir}", "--json"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=600,
    )
    assert ev.returncode == 0, ev.stderr
    assert '"step": 5' in ev.stdout


def test_sigterm_saves_and_exits_zero(tmp_path):
    workdir = tmp_path / "run"
    proc = subprocess.Popen(
        _cmd(
            workdir, "--config.train.steps=100000", "--config.train.log_every=1", "--config.train.checkpoint_every=1000"
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    wait_for(lambda: logged(workdir, 3), proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    line = [text for text in out.splitlines() if text.startswith("stopped by SIGTERM")]
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
        ckpt = Checkpointer(tmp_path, create=True)
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
    assert (
        main(
            [
                "train",
                f"--workdir={workdir}",
                *TINY,
                "--config.train.steps=6",
                "--config.train.checkpoint_every=3",
                "--config.train.log_every=3",
            ]
        )
        == 0
    )
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
    code = main(
        [
            "train",
            f"--workdir={workdir}",
            *TINY,
            "--config.train.steps=12",
            "--config.optim.lr=1e30",
            "--config.train.log_every=1",
            "--config.train.checkpoint_every=3",
            f"--config.train.nonfinite={policy}",
        ]
    )
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


def test_missing_checkpoint_leaves_no_directory_behind(tmp_path, capsys):
    code, _, err = _eval_json(tmp_path / "typo", capsys)
    assert code == 2 and "no checkpoint in" in err
    assert not (tmp_path / "typo").exists()


def resumed_at_step_4(tmp_path, flags, capsys) -> tuple[dict, dict, str]:
    """An 8-step run of TINY + flags, and a copy resumed from its step-4 checkpoint: (the uninterrupted run's
    records by step, the resumed copy's latest records by step, the resumed copy's workdir)."""
    flags = [*TINY, *flags, "--config.train.log_every=1", "--config.train.checkpoint_every=4", "--config.train.steps=8"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert main(["train", f"--workdir={whole}", *flags]) == 0
    shutil.copytree(whole, resumed)
    shutil.rmtree(resumed / "checkpoints" / "8")  # as if preempted after the mid-run checkpoint at step 4
    assert main(["train", f"--workdir={resumed}", *flags]) == 0
    assert "resuming at step 4" in capsys.readouterr().out
    b = _last_per_step(resumed)  # the resumed run's records follow the uninterrupted run's copy in the same file
    a = {r["step"]: r for r in read_jsonl(os.path.join(whole, "metrics.jsonl"))}
    return a, b, resumed


# A dense state has no alpha: the checkpoint holds none, and restoring must not ask for one. A dropless run's
# experts take the sorted rows (the CPU kernels where they build) in training and in eval; about 20 s, so in the
# long profile (the fuzzer's drawn configs train, resume and evaluate dropless too).
@pytest.mark.parametrize(
    "flag, eval_drop_rates",
    [("--config.moe.num_experts=0", 0), pytest.param("--config.moe.dropless=True", 2, marks=pytest.mark.long)],
)
def test_dense_and_dropless_runs_resume_exactly_and_evaluate(tmp_path, capsys, flag, eval_drop_rates):
    a, b, resumed = resumed_at_step_4(tmp_path, [flag], capsys)
    assert [a[s]["loss"] for s in range(5, 9)] == [b[s]["loss"] for s in range(5, 9)]
    assert len(read_jsonl(os.path.join(resumed, "metrics.jsonl"))) == 12
    code, out, _ = _eval_json(resumed, capsys)
    assert code == 0 and '"step": 8' in out and len(json.loads(out)["eval_drop_rate"]) == eval_drop_rates


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


def test_changed_tensor_value_is_refused_by_its_fingerprint(trained, tmp_path, capsys):
    """A tensor whose stored value changed while its file still reads (orbax checks no chunk bytes)."""
    import tensorstore as ts

    workdir = _copy(trained, tmp_path)
    state = workdir / "checkpoints" / "6" / "state"
    kvstore = {"driver": "ocdbt", "base": f"file://{state}/", "path": "params.head.w.value/"}
    array = ts.open({"driver": "zarr", "kvstore": kvstore}).result()
    value = array.read().result()
    value[3, 5] = np.nextafter(value[3, 5], np.float32(np.inf))  # one ulp in one element
    array.write(value).result()
    before = digest(workdir)
    code, _, err = _eval_json(workdir, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "checkpoints/6 is damaged: tensor params/head/w differs from what was saved" in err
    assert main(["train", f"--workdir={workdir}", "--config.train.steps=7"]) == 2
    assert digest(workdir) == before
    shutil.rmtree(workdir / "checkpoints" / "6")
    code, out, _ = _eval_json(workdir, capsys)
    assert code == 0 and '"step": 3' in out


def test_shape_incompatible_checkpoint_names_the_parameter(trained):
    c = _config((1, 1, 1))
    c.moe.expert_ffn_dim = 48
    rt = runtime_lib.build(c, jax.devices()[:1])
    with pytest.raises(
        CheckpointError,
        match=r"parameter params/stacks/0/blocks/layers/0/ffn/experts/w_down has "
        r"shape \(2, 4, 32, 32\) in checkpoint .* but \(2, 4, 48, 32\)",
    ):
        Checkpointer(trained).restore(6, rt.abstract_state())
