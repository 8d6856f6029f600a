"""The `skymoe` command: bad input gives one line and a non-zero exit; params; a short train + eval."""

import json
import os
import subprocess
import sys

import pytest
from conftest import own_stderr

from skymoe_jax.cli import main
from skymoe_jax.metrics.writers import read_jsonl

TINY = [
    "--config.model.d_model=32",
    "--config.model.num_layers=2",
    "--config.model.num_heads=2",
    "--config.model.num_kv_heads=1",
    "--config.model.ffn_dim=64",
    "--config.moe.expert_ffn_dim=32",
    "--config.moe.num_experts=4",
    "--config.moe.group_size=0",
    "--config.data.seq_len=32",
    "--config.data.batch_size=8",
    "--config.data.shuffle_window=64",
    "--config.train.steps=6",
    "--config.train.log_every=2",
    "--config.train.eval_every=3",
    "--config.train.eval_batches=2",
    "--config.train.checkpoint_every=3",
    "--config.optim.warmup_steps=2",
    "--config.train.progress=False",
]


def _skymoe(*args, cwd=None, env=None):
    """Run the installed console script the way a user does (env: its environment; None: this process's); its
    stderr without JAX's CUDA plugin's start-up lines (conftest.py)."""
    result = subprocess.run(
        [sys.executable, "-m", "skymoe_jax.cli", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600
    )
    result.stderr = own_stderr(result.stderr)
    return result


@pytest.mark.parametrize(
    "args,needle",
    [
        (["train", "--config.moe.top_k=99"], "moe.top_k=99"),
        (["train", "--config.moe.capacity_factor=0"], "moe.capacity_factor"),
        (["train", "--config.moe.num_expert=16"], "did you mean 'moe.num_experts'"),
        (["train", "--config.model.num_heads=5"], "model.num_heads=5 does not divide"),
        (
            ["train", "--config.data.source=files", "--config.data.train_files=/no/such/file.txt"],
            "data.train_files: no file matches '/no/such/file.txt'",
        ),
        (["train", "--config=configs/missing.py"], "config file 'configs/missing.py' not found"),
        (["train", "--bogus=1"], "unknown flag --bogus"),
        (["train", "--stop_exit_code=abc"], "--stop_exit_code='abc' must be an integer"),
        (["train", "--flagfile=/no/such/flags.txt"], "--flagfile: Unable to open flagfile"),
        (["import-hf", "--config.moe.top_k=2"], "skymoe import-hf reads no config"),
        (["config", "--config=configs/default.py", "--workdir=x"], "not both"),
        (["train", "--stop_exit_code=300"], "--stop_exit_code=300 must be an exit status between 0 and 255"),
        (["eval"], "needs --workdir"),
        (["params", "--mesh=1,1,1", "--device_memory=80XB"], "--device_memory='80XB' must be a size with its unit"),
        (["params", "--device_memory=80GB"], "--device_memory needs --mesh"),
        (["frobnicate"], "unknown command"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(args, needle, tmp_path):
    result = _skymoe(*args, cwd=tmp_path)
    assert result.returncode != 0
    assert needle in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()


def test_stop_exit_code_only_after_a_stop(monkeypatch, tmp_path):
    """Kubernetes restarts a JobSet whose pod failed: a stopped (saved) run can ask to look failed."""
    import skymoe_jax.run.loop as loop

    for stopped, code in ((True, 75), (False, 0)):
        monkeypatch.setattr(loop, "train", lambda config, workdir, s=stopped: {"stopped": True} if s else {})
        assert main(["train", f"--workdir={tmp_path}", "--stop_exit_code=75", *TINY]) == code


def test_params_json_for_the_paper_model(capsys):
    assert main(["params", "--config=configs/skywork_moe_146b.py", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    # The paper reports about 146B total and 22B activated parameters.
    assert 145e9 < out["total_params"] < 147e9
    assert 21.5e9 < out["active_params"] < 23e9
    assert out["flops_per_token"] > 6 * out["active_params"]


@pytest.mark.parametrize("memory,fits", [("H200", True), ("80GiB", True), ("0.01GB", False)])
def test_params_says_whether_the_planned_peak_fits_a_device(memory, fits, capsys):
    assert main(["params", "--mesh=1,8,1", f"--device_memory={memory}", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)["plan"]
    assert plan["peak_bytes"] == plan["state_bytes"] + sum(plan["activation_bytes"].values())
    assert plan["fits"] is fits and plan["fits"] == (plan["peak_bytes"] <= plan["device_memory_bytes"])


def test_train_then_eval_then_resume(tmp_path, capsys):
    workdir = str(tmp_path / "run")
    assert main(["train", f"--workdir={workdir}", *TINY]) == 0
    records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    assert [r["step"] for r in records] == [2, 3, 4, 6]  # log steps, plus the eval at 3
    for key in ("loss", "ce_loss", "aux_loss", "lr", "grad_norm", "tokens_per_sec"):
        assert isinstance(records[-1][key], float), key
    for key in ("drop_rate", "alpha", "max1_max2", "max2_max3", "expert_load"):
        assert len(records[-1][key]) == 2, key  # one entry per MoE layer
    assert "eval_loss" in records[-1] and "eval_loss" not in records[0]
    assert "done: 6 steps" in capsys.readouterr().out

    # `skymoe config --workdir` shows what resuming would run: the saved config plus the overrides.
    assert main(["config", f"--workdir={workdir}", "--config.train.steps=8", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["model"]["d_model"], shown["train"]["steps"]) == (32, 8)

    assert main(["eval", f"--workdir={workdir}", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["step"] == 6
    # Same params, same cached validation batches: eval reproduces the final in-training eval.
    assert abs(result["eval_loss"] - records[-1]["eval_loss"]) < 1e-5

    # More steps in the same workdir continue from the step-6 checkpoint.
    assert main(["train", f"--workdir={workdir}", *TINY, "--config.train.steps=8"]) == 0
    assert [r["step"] for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))] == [2, 3, 4, 6, 8]
    capsys.readouterr()
    assert main(["train", f"--workdir={workdir}", *TINY, "--config.moe.num_experts=8"]) == 2
    assert "moe.num_experts 4 -> 8" in capsys.readouterr().err


def test_every_command_has_help_listing_its_flags(monkeypatch, capsys):
    from skymoe_jax.args import Args
    from skymoe_jax.cli import BENCHES, COMMANDS

    declared = {}
    original = Args.help

    def recording(self, about):
        declared.update(self._flags)
        return original(self, about)

    monkeypatch.setattr(Args, "help", recording)
    commands = [[c] for c in COMMANDS if c != "bench"] + [["bench", b] for b in BENCHES]
    for words in commands:
        declared.clear()
        assert main([*words, "--help"]) == 0, words
        out = capsys.readouterr().out
        assert out.startswith(f"usage: skymoe {' '.join(words)} [flags]"), out
        for name, flag in declared.items():
            assert f"--{name}  {flag.help}" in out, (words, name)
        assert "--flagfile=PATH" in out
    assert main(["bench", "--help"]) == 0 and "skymoe bench NAME --help" in capsys.readouterr().out
    assert main(["--version"]) == 0 and capsys.readouterr().out.startswith("skymoe-jax ")


def test_config_prints_the_resolved_config_and_reads_flagfiles(tmp_path, capsys):
    assert main(["config", "--config.moe.top_k=4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "moe.top_k = 4" in lines and "model.d_model = 128" in lines
    flags = tmp_path / "flags.txt"
    flags.write_text("--config.moe.top_k=3\n--json\n")
    assert main(["config", f"--flagfile={flags}"]) == 0
    assert json.loads(capsys.readouterr().out)["moe"]["top_k"] == 3
    assert main(["config", "--config.moe.top_k=99"]) == 2  # validated as for train
    assert "moe.top_k=99" in capsys.readouterr().err
