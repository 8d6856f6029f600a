"""`skymoe acceptance`: the one command to run on a GPU machine before trusting it (and the kernels).

    skymoe acceptance [--out=acceptance.json] [--reduced]

In order, all written to one JSON file:
1. every Pallas routing kernel against its XLA twin, the flash attention kernel against dense attention, and
   the dropless experts' grouped matmul against jax.lax.ragged_dot, forward and backward
   (bench/kernel_checks.py): compiled through Triton on a GPU;
2. `skymoe bench routing`: XLA against Pallas per routing stage, at the bench's shapes;
3. `skymoe bench step` on configs/gpu_medium.py, which also measures a matmul peak;
4. a short configs/gpu_medium.py training run, with MFU (the data-sheet peak of a known GPU; on
   a CPU, the matmul peak measured in 3).
Off a GPU (or with --reduced) the same steps run cut down to finish in about a minute: kernels
interpreted (and their CUDA lowering checked), small shapes, gpu_medium shrunk to a few layers of
width 64, a few steps. Exit status 0 when every check passed, 1 when one failed.
"""

from __future__ import annotations

import importlib.metadata
import json
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from skymoe_jax.bench import kernel_checks as kernel_acceptance
from skymoe_jax.bench.routing import SHAPES, Shape, routing_benchmark
from skymoe_jax.bench.step import step_benchmark
from skymoe_jax.config import load_config
from skymoe_jax.kernels import common
from skymoe_jax.run.loop import train

CONFIG = "configs/gpu_medium.py"
# A short run: long enough for a steady tokens/s after compiling, short next to a real one.
GPU_RUN = ["--config.train.steps=60", "--config.train.log_every=20", "--config.optim.warmup_steps=10"]
# gpu_medium's settings (bf16, remat, top-2 of 16 experts, capacity) at a size a 2-core CPU runs in seconds.
REDUCED_RUN = [
    "--config.model.d_model=64",
    "--config.model.num_layers=2",
    "--config.model.num_heads=2",
    "--config.model.num_kv_heads=1",
    "--config.model.ffn_dim=128",
    "--config.moe.expert_ffn_dim=64",
    "--config.moe.group_size=0",
    "--config.data.seq_len=64",
    "--config.data.batch_size=8",
    "--config.data.shuffle_window=64",
    "--config.train.steps=6",
    "--config.train.log_every=2",
    "--config.optim.warmup_steps=2",
]
COMMON_RUN = [
    "--config.train.eval_every=0",
    "--config.train.checkpoint_every=0",
    "--config.train.progress=False",
    "--config.metrics.tensorboard=False",
    "--config.metrics.similarity_every=0",
]
REDUCED_ROUTING_SHAPES = (Shape(256, 64, 16, 2),)


def run(out: str, reduced: bool) -> dict[str, Any]:
    """All checks and measurements; writes them to `out` and returns them."""
    start = time.perf_counter()
    device = jax.devices()[0]
    result: dict[str, Any] = {
        "mode": "reduced" if reduced else "full",
        "environment": {
            "jax": jax.__version__,
            "jaxlib": importlib.metadata.version("jaxlib"),
            "platform": device.platform,
            "device_kind": device.device_kind,
            "devices": jax.device_count(),
            "processes": jax.process_count(),
            "pallas": "compiled (Triton)" if common.on_gpu() else "interpreted",
        },
    }
    kernels = kernel_acceptance.check_kernels(kernel_acceptance.CPU_CASES if reduced else kernel_acceptance.GPU_CASES)
    result["kernels"] = kernels
    result["attention"] = kernel_acceptance.check_attention(
        kernel_acceptance.ATTENTION_CPU_CASE if reduced else kernel_acceptance.ATTENTION_GPU_CASE
    )
    result["grouped_matmul"] = kernel_acceptance.check_grouped_matmul(
        kernel_acceptance.GROUPED_CPU_CASE if reduced else kernel_acceptance.GROUPED_GPU_CASE
    )
    result["bench_routing"] = routing_benchmark(
        REDUCED_ROUTING_SHAPES if reduced else SHAPES, ("xla", "pallas"), repeats=1 if reduced else 5
    )
    overrides = [*(REDUCED_RUN if reduced else GPU_RUN), *COMMON_RUN]
    result["bench_step"] = step_benchmark(load_config(CONFIG, overrides), steps=2 if reduced else 10)
    if common.on_gpu():
        peak = []  # the data-sheet peak of the device table (metrics/flops.py)
    else:  # no table peak for a CPU: MFU against the matmul peak bench step just measured
        peak = [f"--config.metrics.peak_flops_per_device={result['bench_step']['measured_peak_flops']}"]
    with tempfile.TemporaryDirectory(prefix="skymoe-acceptance-") as workdir:
        summary = train(load_config(CONFIG, [*overrides, *peak]), workdir)
    result["train"] = {k: v for k, v in summary.items() if k != "workdir"}
    trained = bool(np.isfinite(summary["loss"])) and "mfu" in summary
    checks = (kernels, result["attention"], result["grouped_matmul"])
    result["passed"] = all(c["passed"] for c in checks) and trained
    result["seconds"] = time.perf_counter() - start
    with open(out, "w") as f:
        json.dump(result, f, indent=1, default=lambda o: np.asarray(o).tolist())
    return result


def describe(result: dict[str, Any], out: str) -> str:
    k, env, t = result["kernels"], result["environment"], result["train"]
    failed = [
        f"{r['stage']} {r['direction']} (tokens {r['tokens']}, E {r['experts']}, k {r['top_k']}): "
        f"error {r['max_rel_error']:.2e}"
        for r in k["rows"]
        if not r["passed"]
    ]
    failed += [f"no Triton call {name}" for name in k["missing_kernels"]]
    lines = [
        f"{env['device_kind']} ({env['platform']}), jax {env['jax']}, Pallas {env['pallas']}, {result['mode']} mode",
        f"kernels vs XLA twins, forward and backward: {len(k['rows']) - len(failed)} of {len(k['rows'])} "
        f"comparisons within {kernel_acceptance.TOLERANCE:g}; Triton calls {len(k['triton_kernels'])} of "
        f"{len(kernel_acceptance.KERNELS)}" + ("".join(f"\n  FAILED {f}" for f in failed)),
        _describe_attention(result["attention"]),
        _describe_grouped_matmul(result["grouped_matmul"]),
        f"bench step: {result['bench_step']['summary']}",
        f"train {t['steps']} steps: loss {t['loss']:.3f}, {t['tokens_per_sec']:,.0f} tokens/s, "
        f"MFU {100 * t.get('mfu', float('nan')):.1f}%",
        f"acceptance {'PASSED' if result['passed'] else 'FAILED'} in {result['seconds']:.0f}s; wrote {out}",
    ]
    return "\n".join(lines)


def _describe_attention(a: dict[str, Any]) -> str:
    r = a["rows"][0]
    title = (
        f"flash attention vs dense ({r['batch']} x {r['seq_len']} tokens, {r['heads']} heads / {r['kv_heads']} KV, "
        f"head_dim {r['head_dim']})"
    )
    return _describe_check(title, a, kernel_acceptance.ATTENTION_TOLERANCE, kernel_acceptance.ATTENTION_KERNELS)


def _describe_grouped_matmul(g: dict[str, Any]) -> str:
    r = g["rows"][0]
    title = f"grouped matmul vs ragged_dot ({r['rows']} rows, {r['width']} -> {r['ffn']}, {r['experts']} experts)"
    return _describe_check(
        title, g, kernel_acceptance.GROUPED_MATMUL_TOLERANCE, kernel_acceptance.GROUPED_MATMUL_KERNELS
    )


def _describe_check(title: str, check: dict[str, Any], tolerance: float, kernels: tuple[str, ...]) -> str:
    """One line for a kernel checked against its reference forward and backward, and the Triton calls missing."""
    errors = ", ".join(f"{row['direction']} {row['max_rel_error']:.1e}" for row in check["rows"])
    missing = "".join(f"\n  FAILED no Triton call {name}" for name in check["missing_kernels"])
    return (
        f"{title}: {errors} (tolerance {tolerance:g}), {'passed' if check['passed'] else 'FAILED'}; "
        f"Triton calls {len(check['triton_kernels'])} of {len(kernels)}{missing}"
    )


def main(argv: Sequence[str]) -> int:
    from skymoe_jax.args import Args, Flag

    args = Args(
        argv,
        "acceptance",
        "The GPU acceptance run: kernels against XLA (forward and backward), routing and step benchmarks, and a "
        "short configs/gpu_medium.py run, into one JSON file.",
        {
            "out": Flag("acceptance.json", "the JSON file to write"),
            "reduced": Flag(not common.on_gpu(), "the CPU-sized version", shown="true without a GPU, false on one"),
        },
    )
    result = run(args.out, args.reduced)
    print(describe(result, args.out))
    return 0 if result["passed"] else 1
