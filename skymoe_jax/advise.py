"""Upcycle or train from scratch? The Skywork-MoE rule of thumb, with its costs.

C_dense = 6 * N_dense * D_dense: what the dense model cost to train.
C_moe   = 6 * N_dense * f * D_moe: the MoE budget, where f is the MoE's cost per token
          relative to the dense model. With experts the size of the dense FFN, a top-k
          MoE activates 1 + (k - 1) * s times the dense parameters (s: the FFN share of
          them, 2/3 in a Llama-style block), and expert-parallel communication adds a
          factor c; the paper's top-2 estimate is about 1.7 * 1.2 ~ 2.
Rule: no dense checkpoint -> scratch; C_moe >= 2 * C_dense -> scratch; C_moe below C_dense
-> upcycle (the paper's 100B-token MoE upcycled from a 300B-token dense model won);
in between the two converge, and upcycling buys early quality.
"""

from __future__ import annotations

import dataclasses

from skymoe_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Advice:
    recommendation: str  # "upcycle", "scratch" or "either"
    reason: str
    dense_cost: float  # FLOPs
    moe_cost: float  # FLOPs
    cost_factor: float  # MoE cost per token / dense cost per token

    @property
    def ratio(self) -> float:
        return self.moe_cost / self.dense_cost if self.dense_cost else float("inf")


def advise(
    dense_params: float,
    dense_tokens: float,
    moe_tokens: float,
    *,
    top_k: int = 2,
    ffn_share: float = 2 / 3,
    comm_overhead: float = 1.2,
    have_dense: bool = True,
    upcycle_below: float = 1.0,
) -> Advice:
    for name, value in (("dense_params", dense_params), ("moe_tokens", moe_tokens)):
        if value <= 0:
            raise ConfigError(f"--{name}={value} must be positive")
    if dense_tokens < 0 or top_k < 1 or not 0 < ffn_share <= 1 or comm_overhead < 1:
        raise ConfigError("--dense_tokens must be >= 0, --top_k >= 1, --ffn_share in (0, 1], --comm_overhead >= 1")
    factor = (1 + (top_k - 1) * ffn_share) * comm_overhead
    dense_cost = 6 * dense_params * dense_tokens
    moe_cost = 6 * dense_params * factor * moe_tokens
    if not have_dense or dense_tokens == 0:
        return Advice("scratch", "there is no trained dense model to start from", dense_cost, moe_cost, factor)
    ratio = moe_cost / dense_cost
    if ratio >= 2 - 1e-9:  # exactly 2x counts as 2x despite rounding
        return Advice(
            "scratch",
            f"the MoE budget is {ratio:.2f}x the dense model's cost (>= 2x): a model trained "
            "from scratch catches up and ends better (experts start less similar)",
            dense_cost,
            moe_cost,
            factor,
        )
    if ratio <= upcycle_below:
        return Advice(
            "upcycle",
            f"the MoE budget is only {ratio:.2f}x the dense model's cost: upcycling reuses "
            "that investment and stays ahead for the whole budget",
            dense_cost,
            moe_cost,
            factor,
        )
    return Advice(
        "either",
        f"the MoE budget is {ratio:.2f}x the dense model's cost, between the regimes: "
        "upcycling starts ahead, scratch closes the gap near 2x",
        dense_cost,
        moe_cost,
        factor,
    )


def describe(a: Advice) -> str:
    lines = [
        f"recommendation: {a.recommendation.upper()}: {a.reason}.",
        f"dense cost C_dense = 6 N D = {a.dense_cost:.3e} FLOPs; MoE budget C_moe = 6 N f D_moe = "
        f"{a.moe_cost:.3e} FLOPs with f = {a.cost_factor:.2f} (cost per token relative to dense); "
        f"C_moe / C_dense = {a.ratio:.2f}.",
    ]
    if a.recommendation != "scratch":
        lines.append(
            "if you upcycle: use a decaying schedule with a peak near the dense model's (e.g. cosine); "
            "the paper's upcycled run with a small constant LR was the worst; "
            "skymoe upcycle --dense=DIR --out=DIR"
        )
    return "\n".join(lines)
