"""The shape of Skywork-MoE's upcycle-vs-scratch study (paper section 2) on the built-in corpus.

Paper: a 0.3B dense model trained 300B tokens (cosine 3e-3 -> 3e-4); 8-expert MoE runs with
100B and 300B-token budgets, from scratch (peak 3e-3) or upcycled from the 100B and 300B
dense checkpoints with several LR schedules. Here, in steps of the default 4-layer model
(4096 tokens a step, 130 steps standing for 100B tokens): a dense model trained 390 steps
(cosine 3e-3 -> 3e-4) with checkpoints at 130 ("100B") and 390 ("300B"); MoE budgets of 130
and 390 steps; per budget one run from scratch (cosine, peak 3e-3) and, from each dense
checkpoint, an upcycled run with a cosine schedule (peak 1.8e-3) and one with a small constant
LR (3e-4). Experts are as wide as the dense FFN (256), so upcycling copies it.

    python configs/experiments/upcycle_vs_scratch.py --out=runs/upcycle_vs_scratch

prints a markdown table of final eval losses with each budget's cost relative to the dense
model (from the models' own FLOP counts) and writes loss curves to OUT/curves.png. Re-running
skips finished runs (each is a resumable workdir).
"""

from __future__ import annotations

import argparse
import os
import sys

COMMON = [
    "--config.model.ffn_dim=256",
    "--config.moe.expert_ffn_dim=256",
    "--config.train.eval_every=65",
    "--config.train.eval_batches=8",
    "--config.train.log_every=13",
    "--config.train.progress=False",
    "--config.metrics.similarity_every=65",
]
DENSE_STEPS = 390
DENSE = [
    "--config.moe.num_experts=0",
    f"--config.train.steps={DENSE_STEPS}",
    "--config.optim.lr=3e-3",
    "--config.optim.min_lr_ratio=0.1",
    "--config.train.checkpoint_every=130",
    "--config.train.keep_checkpoints=3",
]
DENSE_CHECKPOINTS = (130, 390)
BUDGETS = (130, 390)
SCHEDULES = {
    "cosine 1.8e-3": ["--config.optim.lr=1.8e-3", "--config.optim.schedule=cosine", "--config.optim.warmup_steps=10"],
    "constant 3e-4": ["--config.optim.lr=3e-4", "--config.optim.schedule=constant", "--config.optim.warmup_steps=10"],
}


def runs(out: str) -> list[tuple[str, int, list[str]]]:
    """(name, budget, flags) of every MoE run."""
    plan = []
    for budget in BUDGETS:
        steps = [f"--config.train.steps={budget}", f"--config.train.checkpoint_every={budget}"]
        plan.append(("scratch, cosine 3e-3", budget, [*steps, "--config.optim.lr=3e-3"]))
        for dense_step in DENSE_CHECKPOINTS:
            source = os.path.join(out, "dense", "checkpoints", str(dense_step))
            for schedule, flags in SCHEDULES.items():
                plan.append(
                    (
                        f"upcycled from dense@{dense_step}, {schedule}",
                        budget,
                        [*steps, *flags, f"--config.init.upcycle_from={source}"],
                    )
                )
    return plan


def eval_curve(workdir: str) -> list[tuple[int, float]]:
    from skymoe_jax.metrics.writers import read_jsonl

    return [(r["step"], r["eval_loss"]) for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "eval_loss" in r]


def final_similarity(workdir: str) -> float:
    """Expert similarity at the last step, averaged over MoE layers."""
    from skymoe_jax.metrics.writers import read_jsonl

    last = [r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "expert_similarity" in r][-1]
    return sum(last["expert_similarity"]) / len(last["expert_similarity"])


def cost_ratio(moe_steps: int) -> float:
    """Training FLOPs of an MoE budget over the dense model's whole run, from both models' FLOP counts
    (equal tokens per step)."""
    from skymoe_jax.config import load_config
    from skymoe_jax.metrics.flops import flops_per_token
    from skymoe_jax.model.spec import ModelSpec

    def per_token(flags: list[str]) -> int:
        config = load_config(overrides=[*COMMON, *flags])
        return flops_per_token(ModelSpec.from_config(config), config.data.seq_len)

    return per_token([]) * moe_steps / (per_token(DENSE) * DENSE_STEPS)


def main() -> int:
    from skymoe_jax.cli import main as skymoe

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/upcycle_vs_scratch")
    out = parser.parse_args().out
    dense_dir = os.path.join(out, "dense")
    if not os.path.isdir(os.path.join(dense_dir, "checkpoints", str(DENSE_STEPS))):
        if skymoe(["train", f"--workdir={dense_dir}", *COMMON, *DENSE]) != 0:
            return 1
    results = []
    for index, (name, budget, flags) in enumerate(runs(out)):
        workdir = os.path.join(out, f"moe_{index}")
        if not os.path.isdir(os.path.join(workdir, "checkpoints", str(budget))):
            if skymoe(["train", f"--workdir={workdir}", *COMMON, *flags]) != 0:
                return 1
        results.append((name, budget, eval_curve(workdir), final_similarity(workdir)))
    dense_curve = eval_curve(dense_dir)
    plot(results, dense_curve, os.path.join(out, "curves.png"))
    print(
        f"| run | MoE steps | C_moe / C_dense | final eval loss | expert similarity at the end |\n"
        f"| --- | --- | --- | --- | --- |\n| dense ({DENSE_STEPS} steps) | - | - | {dense_curve[-1][1]:.3f} | - |"
    )
    for name, budget, curve, similarity in results:
        print(f"| {name} | {budget} | {cost_ratio(budget):.2f} | {curve[-1][1]:.3f} | {similarity:.3f} |")
    return 0


def plot(results, dense_curve, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(BUDGETS), figsize=(6.5 * len(BUDGETS), 5.4), sharey=True)
    for ax, budget in zip(axes, BUDGETS):
        for name, b, curve, _ in results:
            if b == budget:
                steps, losses = zip(*curve)
                ax.plot(steps, losses, marker="o", label=name)
        for step, loss in dense_curve:
            if step in DENSE_CHECKPOINTS:
                ax.axhline(loss, color="gray", linestyle=":", linewidth=1)
                ax.annotate(f"dense@{step}", (budget, loss), fontsize=7, color="gray", ha="right", va="bottom")
        ax.set_title(f"MoE budget {budget} steps ({budget * 4096 / 1e6:.1f}M tokens)")
        ax.set_xlabel("MoE training step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("eval loss (nats / byte)")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=9)
    fig.suptitle("Upcycling vs training from scratch (8 experts top-2, built-in corpus; dotted: dense checkpoints)")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
