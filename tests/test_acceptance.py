"""`skymoe acceptance` in its CPU (reduced) mode runs to the end and writes every section; a kernel
that disagrees with its twin fails it."""

import json
import math

import jax.numpy as jnp
import numpy as np

from skymoe_jax.bench import kernel_checks as kernel_acceptance
from skymoe_jax.bench.routing import STAGES
from skymoe_jax.cli import main


def test_acceptance_reduced_on_cpu(tmp_path, capsys):
    out = tmp_path / "acceptance.json"
    assert main(["acceptance", f"--out={out}"]) == 0
    printed = capsys.readouterr().out
    assert "acceptance PASSED" in printed and str(out) in printed
    result = json.loads(out.read_text())
    assert result["mode"] == "reduced" and result["passed"]
    assert result["environment"]["platform"] == "cpu" and result["environment"]["pallas"] == "interpreted"

    kernels = result["kernels"]
    assert not kernels["compiled"] and kernels["passed"]
    assert kernels["triton_kernels"] == sorted(kernel_acceptance.KERNELS)  # their CUDA lowering, all eight
    checked = {(r["stage"], r["direction"]) for r in kernels["rows"]}
    assert checked == {(s, d) for s in STAGES for d in ("forward", "backward")} - {("positions", "backward")}
    assert all(r["max_rel_error"] <= kernel_acceptance.TOLERANCE for r in kernels["rows"])
    attention = result["attention"]
    assert attention["passed"] and attention["triton_kernels"] == sorted(kernel_acceptance.ATTENTION_KERNELS)
    assert [r["direction"] for r in attention["rows"]] == ["forward", "backward"]
    assert all(r["max_rel_error"] < 1e-5 for r in attention["rows"])  # interpreted: float32 exactly as dense
    assert "flash attention vs dense (1 x 32 tokens" in printed
    grouped = result["grouped_matmul"]
    assert grouped["passed"] and grouped["triton_kernels"] == sorted(kernel_acceptance.GROUPED_MATMUL_KERNELS)
    assert [r["direction"] for r in grouped["rows"]] == ["forward", "backward"]
    assert all(r["max_rel_error"] < 1e-5 for r in grouped["rows"])  # interpreted: float32 sums in another order
    assert "grouped matmul vs ragged_dot (200 rows" in printed

    assert {(r["impl"], r["stage"]) for r in result["bench_routing"]} == {
        (i, s) for i in ("xla", "pallas") for s in (*STAGES, "sum")
    }
    step = result["bench_step"]
    assert step["config"] == "gpu_medium" and step["tokens_per_sec"] > 0 and step["moe_overhead"] > 0

    train = result["train"]
    assert train["steps"] == 6 and math.isfinite(train["loss"])
    assert 0 < train["mfu"] < 1  # against the matmul peak bench step measured: a CPU has no table peak


def test_a_wrong_kernel_output_fails_the_comparison():
    want = {"experts": jnp.array([[0, 3]]), "weights": jnp.array([[0.75, 0.25]])}
    assert kernel_acceptance._difference(want, want)["passed"]
    close = {"experts": want["experts"], "weights": want["weights"] + 1e-7}
    assert kernel_acceptance._difference(close, want)["passed"]
    assert not kernel_acceptance._difference({**want, "experts": jnp.array([[0, 2]])}, want)["passed"]
    wrong = kernel_acceptance._difference({**want, "weights": jnp.array([[0.75, 0.2]])}, want)
    assert not wrong["passed"] and np.isclose(wrong["max_rel_error"], 0.05)
