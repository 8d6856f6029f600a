"""Why loss-free balancing at 1e-2 a step does not balance 64 softmax experts: its step-to-step load, measured.

The balance study (balance.py) found `moe.balance=bias` at a rate of 1e-2 balancing the default 8-expert model as
well as 1e-3, and not balancing the fine-grained one (64 experts top-8) at all, with its logs every 10 steps. Here
the fine-grained model trains 300 steps with the bias at each rate and a record every step, so the load's move from
one step to the next is seen: whether an expert that was overloaded is underloaded a step later (the bias
overshooting) or stays overloaded (the bias too slow).

    python configs/experiments/bias_oscillation.py [--seeds=0] [--nice=0]

trains the runs that are not finished into experiments/bias_oscillation/f64/seed<N>/<rate> (their metrics.jsonl
are kept in the repository, so the command re-reports without training) and prints, per rate, over steps
LATE+1..STEPS: how far each expert's load moves in one step (in units of the uniform share), the lag-1
autocorrelation of its load error (negative: overloaded one step, underloaded the next), how often the busiest
expert changes, the share of (expert, step) loads above twice the uniform share, how far a layer's drop rate moves
in one step, the drop rate, and the bias spread at the end.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from skymoe_jax.metrics import study
from skymoe_jax.metrics.study import finished, workdir

STEPS = 300
LATE = 200  # the statistics read steps LATE+1..STEPS, past the first fall of the drop rate
OUT = "experiments/bias_oscillation"
SEEDS = "0"
FINE_GRAINED = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fine_grained.py"))
REGIMES = {"f64": [f"--config={FINE_GRAINED}"]}
COMMON = [
    f"--config.train.steps={STEPS}",
    "--config.train.log_every=1",
    f"--config.train.eval_every={STEPS}",
    f"--config.train.checkpoint_every={STEPS // 3}",
    "--config.train.progress=False",
    "--config.moe.balance=bias",
]


def arms() -> dict[str, list[str]]:
    return {f"bias {rate}": [f"--config.moe.bias_update_rate={rate}"] for rate in ("1e-3", "1e-2")}


def train_command(path: str, regime: str, seed: int, flags: list[str]) -> list[str]:
    return study.train_command(path, seed, [*REGIMES[regime], *COMMON, *flags])


def step_to_step(load: np.ndarray, drop: np.ndarray) -> dict[str, float]:
    """load [steps, layers, E] shares of the assignments, drop [steps, layers] rates, one record per step: how the
    load moves between consecutive steps (see the module's docstring)."""
    n = load.shape[-1]
    error = load - 1.0 / n
    centred = error - error.mean(axis=0)
    lag1 = (centred[1:] * centred[:-1]).sum(axis=0) / (centred * centred).sum(axis=0)
    busiest = load.argmax(axis=-1)
    return {
        "load move / uniform": float(np.abs(np.diff(load, axis=0)).mean() * n),
        "lag-1 autocorrelation": float(np.nanmean(lag1)),
        "busiest changes": float((busiest[1:] != busiest[:-1]).mean()),
        "above 2x uniform %": float((load * n > 2).mean() * 100),
        "drop move (points)": float(np.abs(np.diff(drop, axis=0)).mean() * 100),
        "drop rate %": float(drop.mean() * 100),
    }


def tables(out: str, regime: str, seeds: list[int]) -> str:
    from skymoe_jax.metrics.runs import load_run

    heads = None
    rows = []
    for arm in arms():
        for seed in seeds:
            path = workdir(out, regime, seed, arm)
            if not finished(path, STEPS):
                continue
            run = load_run(path)
            steps, load = run.series("expert_load")
            late = steps > LATE
            if np.any(np.diff(steps[late]) != 1):
                raise ValueError(f"{path} does not hold a record every step past step {LATE}")
            stats = step_to_step(load[late], run.series("drop_rate")[1][late])
            bias = run.series("expert_bias")[1][-1]
            stats["bias spread"] = float((bias.max(-1) - bias.min(-1)).mean())
            heads = heads or list(stats)
            rows.append(f"| {arm} | {seed} | " + " | ".join(f"{v:.3g}" for v in stats.values()) + " |")
    if not rows:
        return "no finished runs"
    head = f"{regime}, steps {LATE + 1}-{STEPS}, one record a step; means over the MoE layers, experts and steps"
    table = ["| arm | seed | " + " | ".join(heads) + " |", "| --- " * (len(heads) + 2) + "|"]
    return "\n".join([head, "", *table, *rows])


def main() -> int:
    return study.main(sys.modules[__name__])


if __name__ == "__main__":
    sys.exit(main())
