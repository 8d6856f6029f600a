"""The shape of Skywork-MoE's upcycle-vs-scratch study (paper section 2) on the built-in corpus.

Paper: a 0.3B dense model trained 300B tokens (cosine 3e-3 -> 3e-4); 8-expert MoE runs with
100B and 300B-token budgets, from scratch (peak 3e-3) or upcycled from the 100B and 300B
dense checkpoints with several LR schedules. Here, in steps of the default 4-layer model
(4096 tokens a step): a dense model trained 390 steps with checkpoints at 130 ("100B") and
390 ("300B"); MoE budgets of 130 and 260 steps; per budget one run from scratch and, from
each dense checkpoint, an upcycled run with a cosine schedule (peak 1.8e-3) and one with a
small constant LR (3e-4). Experts are as wide as the dense FFN (256), so upcycling copies it.

    python configs/experiments/upcycle_vs_scratch.py --out=runs/upcycle_vs_scratch

prints a markdown table of final eval losses and writes loss curves to OUT/curves.png.
Re-running skips finished runs (each is a resumable workdir).
"""

from __future__ import annotations

import argparse
import os
import sys

COMMON = ["--config.model.ffn_dim=256", "--config.moe.expert_ffn_dim=256", "--config.train.eval_every=65",
          "--config.train.eval_batches=8", "--config.train.log_every=13", "--config.train.progress=False"]
DENSE = ["--config.moe.num_experts=0", "--config.train.steps=390", "--config.optim.lr=3e-3",
         "--config.optim.min_lr_ratio=0.1", "--config.train.checkpoint_every=130", "--config.train.keep_checkpoints=3"]
BUDGETS = (130, 260)
SCHEDULES = {
    "cosine 1.8e-3": ["--config.optim.lr=1.8e-3", "--config.optim.schedule=cosine", "--config.optim.warmup_steps=10"],
    "constant 3e-4": ["--config.optim.lr=3e-4", "--config.optim.schedule=constant", "--config.optim.warmup_steps=10"],
}


def runs(out: str) -> list[tuple[str, int, list[str]]]:
    """(name, budget, flags) of every MoE run."""
    plan = []
    for budget in BUDGETS:
        steps = [f"--config.train.steps={budget}", f"--config.train.checkpoint_every={budget}"]
        plan.append((f"scratch 3e-3, {budget} steps", budget, [*steps, "--config.optim.lr=3e-3"]))
        for dense_step in (130, 390):
            source = os.path.join(out, "dense", "checkpoints", str(dense_step))
            for schedule, flags in SCHEDULES.items():
                plan.append((f"upcycled from dense@{dense_step}, {schedule}, {budget} steps", budget,
                             [*steps, *flags, f"--config.init.upcycle_from={source}"]))
    return plan


def final_eval(workdir: str) -> tuple[float, list[tuple[int, float]]]:
    from skymoe_jax.metrics.writers import read_jsonl

    curve = [(r["step"], r["eval_loss"]) for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))
             if "eval_loss" in r]
    return curve[-1][1], curve


def main() -> int:
    from skymoe_jax.cli import main as skymoe

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/upcycle_vs_scratch")
    out = parser.parse_args().out
    dense_dir = os.path.join(out, "dense")
    if not os.path.isdir(os.path.join(dense_dir, "checkpoints", "390")):
        assert skymoe(["train", f"--workdir={dense_dir}", *COMMON, *DENSE]) == 0
    results = []
    for index, (name, budget, flags) in enumerate(runs(out)):
        workdir = os.path.join(out, f"moe_{index}")
        if not os.path.isdir(os.path.join(workdir, "checkpoints", str(budget))):
            assert skymoe(["train", f"--workdir={workdir}", *COMMON, *flags]) == 0
        results.append((name, budget, *final_eval(workdir)))
    dense_loss, dense_curve = final_eval(dense_dir)
    plot(results, dense_curve, os.path.join(out, "curves.png"))
    print(f"| run | MoE steps | final eval loss |\n| --- | --- | --- |\n| dense (390 steps) | - | {dense_loss:.3f} |")
    for name, budget, loss, _ in results:
        print(f"| {name.rsplit(',', 1)[0]} | {budget} | {loss:.3f} |")
    return 0


def plot(results, dense_curve, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(BUDGETS), figsize=(6 * len(BUDGETS), 4.5), sharey=True)
    for ax, budget in zip(axes, BUDGETS):
        for name, b, _, curve in results:
            if b == budget:
                steps, losses = zip(*curve)
                ax.plot(steps, losses, marker="o", label=name.rsplit(",", 1)[0])
        ax.set_title(f"MoE budget {budget} steps ({budget * 4096 / 1e6:.1f}M tokens)")
        ax.set_xlabel("MoE training step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("eval loss (nats / byte)")
    fig.suptitle("Upcycling vs training from scratch (8 experts top-2, built-in corpus)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
