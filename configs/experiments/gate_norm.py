"""Skywork-MoE's gating-logit-normalization ablation (paper section 3.1) at small scale.

Paper (2.5B parameters, 16 experts, ~75B tokens): without normalization the gate is nearly
uniform (Max1/Max2 -> 1); with lambda = 1 Max1/Max2 ~ 3 and Max2/Max3 ~ 1.45, training loss
2.338 vs 2.355 and token drop rate ~1.1% vs ~2.2%. Here: the default config (4 layers, 8
experts top-2, capacity factor 1.25, adaptive aux coefficients, 300 steps of 4096 byte tokens
of the built-in corpus) four times, changing only the gate: no normalization, and
normalization with lambda 0.5, 1 and 2.

    python configs/experiments/gate_norm.py --out=runs/gate_norm [--seed=0]

trains the four runs in OUT/<run> (OUT/seed<N>/<run> for another seed), writes the comparison
report to OUT/report (OUT/seed<N>/report) with `skymoe report --compare`, and prints a
markdown table of every seed's runs found under OUT. Re-running skips finished runs.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys

RUNS = {
    "no_norm": ["--config.moe.gate_norm=False"],
    "lambda_0.5": ["--config.moe.gate_norm=True", "--config.moe.gate_norm_lambda=0.5"],
    "lambda_1": ["--config.moe.gate_norm=True", "--config.moe.gate_norm_lambda=1.0"],
    "lambda_2": ["--config.moe.gate_norm=True", "--config.moe.gate_norm_lambda=2.0"],
}
COMMON = ["--config.train.eval_every=50", "--config.metrics.similarity_every=50", "--config.train.progress=False"]


def seed_dir(out: str, seed: int) -> str:
    return out if seed == 0 else os.path.join(out, f"seed{seed}")


def main() -> int:
    from skymoe_jax.cli import main as skymoe
    from skymoe_jax.metrics.runs import load_run, summary_table

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/gate_norm")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    base = seed_dir(args.out, args.seed)
    workdirs = [os.path.join(base, name) for name in RUNS]
    for workdir, flags in zip(workdirs, RUNS.values()):
        if not os.path.isdir(os.path.join(workdir, "checkpoints", "300")):
            if (
                skymoe(
                    [
                        "train",
                        f"--workdir={workdir}",
                        f"--config.seed={args.seed}",
                        f"--config.data.shuffle_seed={args.seed}",
                        *COMMON,
                        *flags,
                    ]
                )
                != 0
            ):
                return 1
    if (
        skymoe(
            ["report", f"--workdir={workdirs[0]}", "--compare", *workdirs[1:], f"--out={os.path.join(base, 'report')}"]
        )
        != 0
    ):
        return 1
    bases = [args.out, *sorted(glob.glob(os.path.join(args.out, "seed*")))]
    finished = [
        os.path.join(b, name) for b in bases for name in RUNS if os.path.isfile(os.path.join(b, name, "metrics.jsonl"))
    ]
    print(summary_table([load_run(w, name=os.path.relpath(w, args.out)) for w in finished]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
