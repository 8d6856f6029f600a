"""The adaptive aux-loss coefficient study (Skywork-MoE section 3.2) at small scale.

Paper: alpha_{i+1} = beta alpha_i + (1 - beta) min(xi d_i, alpha_max) per MoE layer, with d_i the
layer's token drop rate (xi = 0.2, beta = 0.99, alpha_max = 0.01), keeps the drop rate low early
and relaxes the balancing pressure once the routing has settled. Here, per routing regime and
seed, the same initialisation and batches for every arm:

    none                  no aux loss (alpha fixed at 0)
    fixed 1e-3, 1e-2      a constant alpha
    adaptive 0.01         the paper's rule (alpha_max 0.01)
    adaptive 0.05, 0.1    the rule with a larger ceiling (small models saturate 0.01)

each (except none) with the paper's eq. 4 loss, sum_j (1/n - mean_t g_tj)^2, and with the Switch
loss, n sum_j f_j P_j (moe.aux_loss). Regimes: e8 is the default model (8 experts top-2, routing
groups of 512); e16 has 16 experts of half the width (the same expert parameters) in groups of
2048 tokens. Runs last STEPS = 600 steps (twice the default's 300): in the default run the drop
rate is still falling at step 300.

    python configs/experiments/aux_coef.py [--out=experiments/aux_coef] [--regime=e8] [--seeds=0,1,2] [--jobs=2]

trains the runs that are not finished in OUT/<regime>/seed<N>/<arm> (a run cut short resumes from
its last checkpoint; a run is finished when its metrics.jsonl has step STEPS, so the default OUT keeps
the finished runs' metrics in the repository, where the next session finds them, and .gitignore
leaves out their checkpoints), writes one comparison report per seed to OUT/<regime>/seed<N>/report with
`skymoe report --compare`, and prints the table: each arm's final eval loss (mean and spread over
seeds), drop rate, busiest expert, Max1/Max2, alpha and tokens/s, and which eval-loss and drop-rate differences
from the paper's arm exceed the seed noise. --jobs runs that many trainings at once, each pinned
to its own cores (on 2 cores, two one-core runs finish more work than one two-core run).
"""

from __future__ import annotations

import sys

import numpy as np

from skymoe_jax.metrics import study
from skymoe_jax.metrics.study import finished, noise, workdir

STEPS = 600
OUT = "experiments/aux_coef"
SEEDS = "0,1,2"
COMMON = [
    f"--config.train.steps={STEPS}",
    f"--config.train.checkpoint_every={STEPS // 4}",
    "--config.train.eval_every=100",
    "--config.train.progress=False",
]
REGIMES = {
    "e8": [],
    "e16": ["--config.moe.num_experts=16", "--config.moe.expert_ffn_dim=128", "--config.moe.group_size=2048"],
}
FORMS = {"eq4": "paper", "switch": "switch"}


def arms() -> dict[str, list[str]]:
    """Arm name -> its flags; the paper's own arm is 'eq4 adaptive 0.01'."""
    out = {"none": ["--config.aux_coef.mode=fixed", "--config.aux_coef.initial_alpha=0.0"]}
    for form, loss in FORMS.items():
        for alpha in ("1e-3", "1e-2"):
            out[f"{form} fixed {alpha}"] = [
                f"--config.moe.aux_loss={loss}",
                "--config.aux_coef.mode=fixed",
                f"--config.aux_coef.initial_alpha={alpha}",
            ]
        for ceiling in ("0.01", "0.05", "0.1"):
            out[f"{form} adaptive {ceiling}"] = [
                f"--config.moe.aux_loss={loss}",
                "--config.aux_coef.mode=adaptive",
                f"--config.aux_coef.alpha_max={ceiling}",
            ]
    return out


PAPER_ARM = "eq4 adaptive 0.01"


def train_command(path: str, regime: str, seed: int, flags: list[str]) -> list[str]:
    return study.train_command(path, seed, [*COMMON, *REGIMES[regime], *flags])


def tables(out: str, regime: str, seeds: list[int]) -> str:
    """Per arm over the seeds that finished it: mean and (max - min) of the final eval loss, and the means of
    the routing columns (last 20% of steps); then which eval-loss and drop-rate differences from the paper's
    arm exceed the seed noise."""
    from skymoe_jax.metrics.runs import load_run, summarize

    rows, finals, drops = [], {}, {}
    for arm in arms():
        done = [s for s in seeds if finished(workdir(out, regime, s, arm), STEPS)]
        if not done:
            continue
        runs = [load_run(workdir(out, regime, s, arm)) for s in done]
        summaries = [summarize(r) for r in runs]
        finals[arm] = {s: m["eval loss"] for s, m in zip(done, summaries)}
        drops[arm] = {s: m["drop rate %"] for s, m in zip(done, summaries)}
        loss = np.array(list(finals[arm].values()))
        alpha = np.mean([r.series("alpha")[1][-1] for r in runs], axis=0)

        def mean(key: str, summaries=summaries) -> float:
            return float(np.mean([s[key] for s in summaries]))

        rows.append(
            f"| {arm} | {len(runs)} | {loss.mean():.3f} | {np.ptp(loss):.3f} | "
            f"{mean('drop rate %'):.1f} | {mean('busiest expert / uniform'):.2f} | "
            f"{mean('Max1/Max2'):.2f} | {' '.join(f'{a:.3g}' for a in alpha)} | {mean('tokens/s'):,.0f} |"
        )
    head = [
        f"{regime}, {STEPS} steps; eval loss at the last step; routing columns average the last 20% of steps "
        "and the MoE layers; alpha per layer at the end",
        "",
        "| arm | seeds | eval loss | spread | drop rate % | busiest expert / uniform | Max1/Max2 | alpha | tokens/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    verdicts = [
        "",
        *noise("eval loss", finals, "{:+.3f}", PAPER_ARM),
        "",
        *noise("drop rate %", drops, "{:+.1f}", PAPER_ARM),
    ]
    return "\n".join(head + rows + verdicts)


def main() -> int:
    return study.main(sys.modules[__name__])


if __name__ == "__main__":
    sys.exit(main())
