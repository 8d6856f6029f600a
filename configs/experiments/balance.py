"""Which load balancing wins: Skywork's adaptive aux coefficient and gate normalization beside DeepSeek-V3's
loss-free bias, on the default model (8 experts top-2) and on the fine-grained one (64 experts top-8, shared experts).

Arms, per regime and seed (the same initialisation and batches for every arm of a seed):

    none                     no aux loss, no bias
    eq4 adaptive             the paper: eq. 4's loss, sum_j (1/n - P_j)^2, with the adaptive alpha (alpha_max 0.01)
    switch adaptive          the Switch loss, n sum_j f_j P_j, adaptive (the aux-coefficient study's proposal)
    eq4 fixed 1e-2           eq. 4 at a fixed alpha
    bias 1e-3, bias 1e-2     loss-free balancing alone (moe.balance=bias) at DeepSeek-V3's update rate and ten
                             times it: at 1e-3 the first e8 runs settled only by step ~300 of 600, with no
                             oscillation to speak of, so the second rate asks whether converging 10x faster costs
                             stability
    bias+switch adaptive     the bias (rate 1e-3) beside the Switch loss, adaptive
    bias+eq4 adaptive        the bias (rate 1e-3) beside eq. 4, adaptive
    seq switch adaptive      the Switch loss per sequence (moe.aux_scope=sequence), adaptive

all with gate normalization (lambda 1, the default), and the bias and Switch arms also without it ("... no gn").
Regimes: e8 is the default model; f64 is configs/fine_grained.py (64 experts of width 32, top-8, 2 shared experts),
which drops tokens beyond capacity factor 1.25; f64-dropless is the same model without dropping (its drop rate is
what the capacity would have dropped); f64-long is f64 at 1,200 steps. Every run is 600 steps (1,200 in f64-long):
the aux-coefficient study found the default's drop rates still falling at step 300; whether MaxVio has settled by
the end is the table's `MaxVio drift` column, and f64-long says whether the f64 arms that had not are ranked the
same once they have.

    python configs/experiments/balance.py [--regime=e8] [--seeds=0] [--jobs=2] [--nice=0] [--only=TEXT]
                                          [--arms=NAME,NAME]

trains the runs that are not finished into experiments/balance/<regime>/seed<N>/<arm> (a run cut short resumes from
its last checkpoint; the finished runs' metrics.jsonl are kept in the repository and their checkpoints are not, so
the command re-reports without training), writes one `skymoe report --compare` page per seed, and prints the tables:
per arm the final eval loss (mean and spread over seeds), drop rate, MaxVio (global and per sequence), the busiest
expert's share, Max1/Max2, alpha, the bias spread, how far MaxVio still moved; the windowed trajectories; and which
differences from the paper's arm exceed the seed noise (skymoe_jax/metrics/study.py states the rule). --nice runs
the trainings at that niceness, so they use only the cycles other work leaves.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from skymoe_jax.metrics import study
from skymoe_jax.metrics.study import drift, finished, noise, windows, workdir

WINDOW = 100
OUT = "experiments/balance"
SEEDS = "0"
COMMON = [f"--config.train.eval_every={WINDOW}", "--config.train.progress=False"]
FINE_GRAINED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fine_grained.py")
REGIMES = {
    "e8": [],
    "f64": [f"--config={os.path.normpath(FINE_GRAINED)}"],
    "f64-dropless": [f"--config={os.path.normpath(FINE_GRAINED)}", "--config.moe.dropless=True"],
    "f64-long": [f"--config={os.path.normpath(FINE_GRAINED)}"],
}
# f64-long: the f64 runs at twice the length, for whether f64's arms have settled by 600 steps.
STEPS = {"e8": 600, "f64": 600, "f64-dropless": 600, "f64-long": 1200}
PAPER_ARM = "eq4 adaptive"


def _aux(loss: str, mode: str, alpha: str = "") -> list[str]:
    flags = [f"--config.moe.aux_loss={loss}", f"--config.aux_coef.mode={mode}"]
    return flags + ([f"--config.aux_coef.initial_alpha={alpha}"] if alpha else [])


def _bias(rate: str, balance: str = "bias") -> list[str]:
    return [f"--config.moe.balance={balance}", f"--config.moe.bias_update_rate={rate}"]


NO_GN = ["--config.moe.gate_norm=False"]


def arms() -> dict[str, list[str]]:
    """Arm name -> its flags; the paper's own arm is PAPER_ARM."""
    switch, eq4 = _aux("switch", "adaptive"), _aux("paper", "adaptive")
    out = {
        "none": ["--config.moe.aux_loss=paper", "--config.aux_coef.mode=fixed", "--config.aux_coef.initial_alpha=0"],
        "eq4 adaptive": eq4,
        "switch adaptive": switch,
        "eq4 fixed 1e-2": _aux("paper", "fixed", "1e-2"),
        "bias 1e-3": _bias("1e-3"),
        "bias 1e-2": _bias("1e-2"),
        "bias+switch adaptive": _bias("1e-3", "aux+bias") + switch,
        "bias+eq4 adaptive": _bias("1e-3", "aux+bias") + eq4,
        "seq switch adaptive": switch + ["--config.moe.aux_scope=sequence"],
    }
    without = [arm for arm in out if arm.startswith("bias") or arm == "switch adaptive"]
    out.update({f"{arm} no gn": out[arm] + NO_GN for arm in without})
    return out


def train_command(path: str, regime: str, seed: int, flags: list[str]) -> list[str]:
    steps = STEPS[regime]
    length = [f"--config.train.steps={steps}", f"--config.train.checkpoint_every={steps // 4}"]
    return study.train_command(path, seed, [*REGIMES[regime], *length, *COMMON, *flags])


def _or_dash(value: float) -> str:
    """Runs trained before the mixed-row statistic existed have none."""
    return "-" if np.isnan(value) else f"{value:.2f}"


def _fmt(values: list[float], spec: str) -> str:
    return " / ".join(format(v, spec) for v in values)


def tables(out: str, regime: str, seeds: list[int]) -> str:
    """The summary table, the windowed trajectories and the seed-noise verdicts of the finished runs."""
    from skymoe_jax.metrics.runs import load_run, summarize

    rows, trajectories, per_metric = [], [], {"eval loss": {}, "drop rate %": {}, "MaxVio": {}}
    for arm in arms():
        done = [s for s in seeds if finished(workdir(out, regime, s, arm), STEPS[regime])]
        if not done:
            continue
        runs = [load_run(workdir(out, regime, s, arm)) for s in done]
        summaries = [summarize(r) for r in runs]
        for metric, values in per_metric.items():
            values[arm] = {s: m[metric] for s, m in zip(done, summaries)}
        loss = np.array(list(per_metric["eval loss"][arm].values()))

        def mean(key: str, summaries=summaries) -> float:
            return float(np.mean([m.get(key, np.nan) for m in summaries]))

        biased = runs[0].has("expert_bias")
        alpha = float(np.mean([r.series("alpha")[1][-1] for r in runs]))
        bias = mean("expert bias spread") if biased else 0.0
        rows.append(
            f"| {arm} | {len(runs)} | {loss.mean():.3f} | {np.ptp(loss):.3f} | {mean('drop rate %'):.1f} | "
            f"{mean('MaxVio'):.2f} | {mean('MaxVio of the mean load'):.2f} | "
            f"{mean('seq MaxVio'):.2f} | {_or_dash(mean('seq MaxVio shuffled'))} | "
            f"{mean('busiest expert / uniform'):.2f} | "
            f"{mean('Max1/Max2'):.2f} | {alpha:.3g} | {bias:.3g} | "
            f"{np.mean([drift(r, 'max_vio', WINDOW) for r in runs]):+.0%} |"
        )

        def by_window(key: str, reduce=np.mean, scale: float = 1.0, runs=runs) -> list[float]:
            return list(np.mean([windows(r, key, WINDOW, reduce) for r in runs], axis=0) * scale)

        moved = (by_window("expert_bias", np.ptp), ".3f") if biased else (by_window("alpha"), ".4f")
        trajectories.append(
            f"| {arm} | {_fmt([per_metric['eval loss'][arm][s] for s in done], '.3f')} | "
            f"{_fmt(by_window('drop_rate', scale=100), '.1f')} | {_fmt(by_window('max_vio'), '.2f')} | "
            f"{'bias spread' if biased else 'alpha'} {_fmt(*moved)} |"
        )
    head = [
        f"{regime}, {STEPS[regime]} steps; eval loss at the last step; the routing columns average the last 20% of "
        "steps and the MoE layers (of the mean load: the MaxVio of the expert load averaged over those steps, the "
        "part of the imbalance that persists from batch to batch; mixed rows: the per-sequence MaxVio of rows mixed "
        "from the batch's sequences); alpha (mean over layers) and the bias spread (max - min over experts, mean "
        f"over layers) at the end; MaxVio drift: its mean over the last {WINDOW} steps against the {WINDOW} before",
        "",
        "| arm | seeds | eval loss | spread | drop rate % | MaxVio | of the mean load | seq MaxVio | mixed rows | "
        "busiest expert / uniform | Max1/Max2 | alpha | bias spread | MaxVio drift |",
        "| --- " * 14 + "|",
    ]
    windowed = [
        "",
        f"Per arm, the eval loss per seed; then, averaged over seeds and layers, in windows of {WINDOW} steps: "
        "the drop rate %, MaxVio, and the bias spread (bias arms) or alpha",
        "",
        "| arm | eval loss per seed | drop rate % by window | MaxVio by window | alpha or bias by window |",
        "| --- | --- | --- | --- | --- |",
    ]
    formats = {"eval loss": "{:+.3f}", "drop rate %": "{:+.1f}", "MaxVio": "{:+.2f}"}
    verdicts = [
        line for metric, fmt in formats.items() for line in ["", *noise(metric, per_metric[metric], fmt, PAPER_ARM)]
    ]
    return "\n".join(head + rows + windowed + trajectories + verdicts)


def main() -> int:
    return study.main(sys.modules[__name__])


if __name__ == "__main__":
    sys.exit(main())
