"""The report's figures, one function per figure, each over one or more runs (overlaid or side
by side when several are compared). Each returns a matplotlib Figure, or None when no run has
the metric (a dense model has no drop rate; similarity needs metrics.similarity_every).

Figures are built without pyplot, so they neither need a display nor leak into a global state;
in a notebook the returned Figure shows inline.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib import cm, colormaps, colors
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from skymoe_jax.metrics.runs import Run

PANEL = (5.2, 3.8)  # inches per subplot
MAX_COLUMNS = 3  # more panels wrap onto further rows, so the page stays readable
LAYER_LEGEND_MAX = 10  # more layers than this get a colour bar instead of a legend
BAND = "\n(line: mean over MoE layers, band: min to max)"


def _colors(runs: Sequence[Run]) -> list:
    """One distinct colour per run: tab10's, tab20's beyond 10 runs (a study of 11 arms repeated tab10's
    first colour), and evenly spaced hues beyond 20."""
    n = len(runs)
    if n <= 20:
        palette = colormaps["tab10" if n <= 10 else "tab20"]
        return [palette(i) for i in range(n)]
    return list(colormaps["turbo"](np.linspace(0.0, 1.0, n)))


def _figure(panels: int) -> tuple[Figure, list[Axes]]:
    ncols = min(panels, MAX_COLUMNS)
    nrows = -(-panels // ncols)
    fig = Figure(figsize=(PANEL[0] * ncols, PANEL[1] * nrows), layout="constrained")
    axes = list(fig.subplots(nrows, ncols, squeeze=False).ravel())
    for unused in axes[panels:]:
        fig.delaxes(unused)
    return fig, axes[:panels]


def _with(runs: Sequence[Run], key: str) -> list[tuple[Run, object]]:
    return [(run, color) for run, color in zip(runs, _colors(runs)) if run.has(key)]


def _layer_band(ax: Axes, runs: Sequence[Run], key: str, scale: float = 1.0, marker: str = "") -> None:
    """Per run: the mean over MoE layers as a line, the range over layers as an unlabelled band."""
    for run, color in _with(runs, key):
        steps, values = run.series(key)
        _band(ax, steps, values * scale, color, run.name, marker or ("o" if len(steps) == 1 else ""))
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)


def _band(ax: Axes, steps: np.ndarray, values: np.ndarray, color, label: str, marker: str = "") -> None:
    """values [steps, layers]: their mean over layers as a line, their range as an unlabelled band."""
    ax.plot(steps, np.nanmean(values, axis=1), color=color, marker=marker, markersize=3, label=label)
    ax.fill_between(steps, np.nanmin(values, axis=1), np.nanmax(values, axis=1), color=color, alpha=0.15, linewidth=0)


def _layer_expert_maps(
    fig: Figure, axes: Sequence[Axes], present, last: Sequence[np.ndarray], norm, what: str, label: str
):
    """One heatmap (MoE layer x expert) per run of its last logged values, on one colour scale."""
    for ax, (run, _), values in zip(axes, present, last):
        image = ax.imshow(values, cmap="coolwarm", norm=norm, aspect="auto", interpolation="nearest")
        ax.set(xlabel="expert", ylabel="MoE layer", title=f"{run.name}: {what} at step {run.last_step}")
        ax.set_xticks(range(values.shape[1]))
        ax.set_yticks(_layer_ticks(values.shape[0]))
    fig.colorbar(image, ax=axes, label=label)


def loss_figure(runs: Sequence[Run]) -> Figure | None:
    if not any(run.has("ce_loss") for run in runs):
        return None
    fig, axes = _figure(2)
    for ax in axes:
        for run, color in zip(runs, _colors(runs)):
            ax.plot(*run.series("ce_loss"), color=color, label=f"{run.name}: train")
            if run.has("eval_loss"):
                ax.plot(*run.series("eval_loss"), color=color, linestyle="--", marker="o", label=f"{run.name}: eval")
        ax.set(xlabel="step", ylabel="cross-entropy (nats per token)")
        ax.grid(alpha=0.3)
    axes[0].set_title("Training and evaluation loss")
    axes[0].legend(fontsize=7)
    # Runs being compared differ by little at the end: the second panel zooms into the second half.
    half = max(run.last_step for run in runs) / 2
    late = []
    for run in runs:
        for key in ("ce_loss", "eval_loss"):
            steps, values = run.series(key)
            late.extend(values[steps >= half])
    late = np.asarray(late)
    axes[1].set_xlim(half, None)
    if late.size and np.isfinite(late).any():
        margin = 0.05 * (np.nanmax(late) - np.nanmin(late)) or 0.01
        axes[1].set_ylim(np.nanmin(late) - margin, np.nanmax(late) + margin)
    axes[1].set_title("Second half (zoom)")
    return fig


def drop_rate_figure(runs: Sequence[Run]) -> Figure | None:
    """A heatmap (step x MoE layer) per run on one colour scale, and the layer means overlaid."""
    present = _with(runs, "drop_rate")
    if not present:
        return None
    fig, axes = _figure(len(present) + 1)
    vmax = max(np.nanmax(run.series("drop_rate")[1]) for run, _ in present) * 100 or 1.0
    for ax, (run, _) in zip(axes, present):
        steps, values = run.series("drop_rate")
        mesh = ax.pcolormesh(
            _edges(steps), _edges(np.arange(values.shape[1])), 100 * values.T, cmap="magma", vmin=0, vmax=vmax
        )
        ax.set(xlabel="step", ylabel="MoE layer", title=f"{run.name}: drop rate per layer")
        ax.set_yticks(_layer_ticks(values.shape[1]))
        ax.invert_yaxis()
    fig.colorbar(mesh, ax=axes[:-1], label="drop rate (% of k x tokens)")
    _layer_band(axes[-1], runs, "drop_rate", scale=100)
    axes[-1].set(ylabel="drop rate (%)", title=f"Drop rate{BAND}")
    axes[-1].legend(fontsize=7)
    return fig


def alpha_figure(runs: Sequence[Run]) -> Figure | None:
    """One panel per run with a line per MoE layer, on a shared y axis."""
    present = _with(runs, "alpha")
    if not present:
        return None
    fig, axes = _figure(len(present))
    top = max(np.nanmax(run.series("alpha")[1]) for run, _ in present)
    for ax, (run, _) in zip(axes, present):
        steps, values = run.series("alpha")
        layers = values.shape[1]
        shades = colormaps["viridis"](np.linspace(0, 0.9, layers))
        for layer in range(layers):
            ax.plot(steps, values[:, layer], color=shades[layer], label=f"MoE layer {layer}")
        ax.set(
            xlabel="step",
            ylabel="alpha (aux-loss coefficient)",
            title=f"{run.name}: alpha per layer",
            ylim=(0, top * 1.05 or None),
        )
        ax.grid(alpha=0.3)
        if layers <= LAYER_LEGEND_MAX:
            ax.legend(fontsize=7)
        else:
            scale = cm.ScalarMappable(colors.Normalize(0, layers - 1), colormaps["viridis"])
            fig.colorbar(scale, ax=ax, label="MoE layer")
    return fig


def router_ratio_figure(runs: Sequence[Run]) -> Figure | None:
    """Max1/Max2 and Max2/Max3 (gate probability ratios, averaged over tokens) side by side."""
    panels = (
        ("max1_max2", "Max1/Max2 (mean over tokens)", f"Max1/Max2 of the gate probabilities{BAND}"),
        ("max2_max3", "Max2/Max3 (mean over tokens)", f"Max2/Max3 of the gate probabilities{BAND}"),
    )
    return _side_by_side(runs, panels, 1.0, "1 = the two are equal")


def max_vio_figure(runs: Sequence[Run]) -> Figure | None:
    """The load imbalance MaxVio (E x the busiest expert's share of the assignments - 1) over the global batch,
    per sequence (averaged over sequences), and per row of tokens mixed from the sequences, side by side."""
    panels = (
        ("max_vio", "MaxVio over the batch", f"Load imbalance over the global batch{BAND}"),
        ("seq_max_vio", "MaxVio per sequence (mean)", f"Load imbalance within sequences{BAND}"),
    )
    if any(run.has("seq_max_vio_shuffled") for run in runs):
        panels += (("seq_max_vio_shuffled", "MaxVio per mixed row (mean)", f"Rows mixed from the sequences{BAND}"),)
    return _side_by_side(runs, panels, 0.0, "0 = balanced")


def _side_by_side(runs: Sequence[Run], panels, reference: float, meaning: str) -> Figure | None:
    """A panel of per-layer bands per (key, y label, title), with a dotted line at the reference value; None when
    no run has the first key."""
    if not any(run.has(panels[0][0]) for run in runs):
        return None
    fig, axes = _figure(len(panels))
    for ax, (key, ylabel, title) in zip(axes, panels):
        _layer_band(ax, runs, key)
        ax.axhline(reference, color="gray", linestyle=":", label=meaning)
        ax.set(ylabel=ylabel, title=title)
        ax.legend(fontsize=7)
    return fig


def expert_load_figure(runs: Sequence[Run]) -> Figure | None:
    """Per run, the last logged load (MoE layer x expert) relative to a uniform share; and the
    most loaded expert's share over the steps, all runs overlaid."""
    present = _with(runs, "expert_load")
    if not present:
        return None
    fig, axes = _figure(len(present) + 1)
    series = [run.series("expert_load") for run, _ in present]
    relative = [load * load.shape[-1] for _, load in series]  # [steps, layers, experts], 1 = uniform share
    vmax = max(2.0, max(np.nanmax(r[-1]) for r in relative))
    norm = colors.TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=vmax)
    last = [rel[-1] for rel in relative]
    _layer_expert_maps(
        fig, axes[:-1], present, last, norm, "expert load", "share of assignments / uniform share (1 = balanced)"
    )
    ax = axes[-1]
    for (run, color), (steps, _), rel in zip(present, series, relative):
        _band(ax, steps, np.nanmax(rel, axis=2), color, run.name)  # the busiest expert's, [steps, layers]
    ax.axhline(1.0, color="gray", linestyle=":", label="1 = balanced")
    ax.set(xlabel="step", ylabel="busiest expert's load / uniform share", title=f"Busiest expert{BAND}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def expert_bias_figure(runs: Sequence[Run]) -> Figure | None:
    """Loss-free balancing's selection bias: per run, the last logged bias (MoE layer x expert); and its spread
    over the experts (max - min) over the steps, all runs overlaid."""
    present = _with(runs, "expert_bias")
    if not present:
        return None
    fig, axes = _figure(len(present) + 1)
    series = [run.series("expert_bias") for run, _ in present]  # [steps, layers, experts]
    top = max(np.nanmax(np.abs(bias[-1])) for _, bias in series) or 1.0
    norm = colors.TwoSlopeNorm(vmin=-top, vcenter=0.0, vmax=top)
    last = [bias[-1] for _, bias in series]
    _layer_expert_maps(fig, axes[:-1], present, last, norm, "expert bias", "bias added to the gate probability")
    ax = axes[-1]
    for (run, color), (steps, bias) in zip(present, series):
        _band(ax, steps, np.nanmax(bias, axis=2) - np.nanmin(bias, axis=2), color, run.name)
    ax.set(xlabel="step", ylabel="max - min of the experts' bias", title=f"Expert bias spread{BAND}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def similarity_figure(runs: Sequence[Run]) -> Figure | None:
    if not any(run.has("expert_similarity") for run in runs):
        return None
    fig, (ax,) = _figure(1)
    fig.set_size_inches(PANEL[0] * 1.6, PANEL[1] * 1.2)
    _layer_band(ax, runs, "expert_similarity", marker="o")  # sparse: every metrics.similarity_every steps
    ax.set(ylabel="mean pairwise cosine similarity of experts", title=f"Expert similarity{BAND}")
    ax.legend(fontsize=8)
    return fig


def _edges(centers: np.ndarray) -> np.ndarray:
    """Cell edges halfway between (unevenly spaced) centres, so a cell spans the steps it stands for;
    a single centre gets a cell of width 1."""
    c = np.asarray(centers, dtype=np.float64)
    if len(c) == 1:
        return np.array([c[0] - 0.5, c[0] + 0.5])
    mid = (c[1:] + c[:-1]) / 2
    return np.concatenate([[2 * c[0] - mid[0]], mid, [2 * c[-1] - mid[-1]]])


def _layer_ticks(layers: int) -> list[int]:
    return list(range(0, layers, max(1, layers // 8)))


# (file stem, title, figure function): the report's figures in page order.
FIGURES = (
    ("loss", "Loss", loss_figure),
    ("drop_rate", "Token drop rate per MoE layer", drop_rate_figure),
    ("alpha", "Adaptive aux-loss coefficient per MoE layer", alpha_figure),
    ("router_ratios", "Gate sharpness: Max1/Max2 and Max2/Max3", router_ratio_figure),
    ("max_vio", "Load imbalance: MaxVio over the batch and per sequence", max_vio_figure),
    ("expert_load", "Expert load", expert_load_figure),
    ("expert_bias", "Expert selection bias (loss-free balancing)", expert_bias_figure),
    ("expert_similarity", "Expert similarity", similarity_figure),
)
