"""The MoE families' shipped configs train on their own defaults: configs/deepseek_style.py (sigmoid scores,
groups, bias balancing with a sequence-wise aux loss, a shared expert) moves its bias and reports MaxVio.
(configs/fine_grained.py's shapes are upcycled exactly in tests/test_upcycle.py.)"""

import json

import numpy as np

from skymoe_jax.cli import main


def test_deepseek_style_trains_and_moves_its_bias(tmp_path):
    workdir = tmp_path / "ds"
    flags = ["--config=configs/deepseek_style.py", f"--workdir={workdir}", "--config.train.progress=False"]
    assert main(["train", *flags, "--config.train.steps=3", "--config.optim.warmup_steps=1"]) == 0
    last = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()][-1]
    bias = np.asarray(last["expert_bias"])
    assert bias.shape == (4, 64)
    # Three updates of +-1e-3 (or 0 where an expert sits at the mean load): every bias a multiple of 1e-3 within 3e-3.
    np.testing.assert_allclose(bias * 1e3, np.round(bias * 1e3), atol=1e-3)
    assert np.abs(bias).max() <= 3e-3 + 1e-9 and np.abs(bias).max() > 0
    assert all(v >= 0 for v in last["max_vio"]) and np.isfinite(last["loss"])
