"""`skymoe report`: the figures of metrics/plots.py as PNG files, and one self-contained HTML
page (the PNGs embedded as base64, no other files needed) with a summary table per run."""

from __future__ import annotations

import base64
import datetime
import html
import os
from collections.abc import Sequence

from skymoe_jax.metrics.runs import TAIL, ReportError, Run, summarize

DPI = 110


def write_report(runs: Sequence[Run], out: str) -> list[str]:
    """Write OUT/<figure>.png and OUT/report.html for runs (overlaid where there are several);
    returns the paths written, the HTML page last."""
    try:
        from skymoe_jax.metrics import plots
    except ImportError as e:
        raise ReportError(
            f"skymoe report needs matplotlib ({e}); install it with pip install 'skymoe-jax[report]' "
            "or pip install -e '.[report]' in a clone"
        ) from None
    os.makedirs(out, exist_ok=True)
    written, sections = [], []
    for stem, title, make in plots.FIGURES:
        fig = make(runs)
        if fig is None:
            sections.append(f"<h2>{html.escape(title)}</h2><p class=note>Not logged by these runs.</p>")
            continue
        path = os.path.join(out, f"{stem}.png")
        fig.savefig(path, dpi=DPI)
        written.append(path)
        with open(path, "rb") as f:
            data = base64.b64encode(f.read()).decode("ascii")
        sections.append(
            f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' src='data:image/png;base64,{data}'>"
        )
    page = os.path.join(out, "report.html")
    with open(page, "w", encoding="utf-8") as f:
        f.write(_page(runs, sections))
    written.append(page)
    return written


def _page(runs: Sequence[Run], sections: Sequence[str]) -> str:
    summaries = [summarize(run) for run in runs]
    headings = list(dict.fromkeys(h for s in summaries for h in s))
    head = "".join(f"<th>{html.escape(h)}</th>" for h in ["run", "workdir", "steps", *headings])
    rows = []
    for run, s in zip(runs, summaries):
        cells = [
            html.escape(run.name),
            html.escape(os.path.abspath(run.workdir)),
            str(run.last_step),
            *(f"{s[h]:.4g}" if h in s else "-" for h in headings),
        ]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    title = "skymoe report: " + ", ".join(run.name for run in runs)
    generated = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.9em; }}
td, th {{ border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }}
td:first-child, td:nth-child(2), th {{ text-align: left; }}
img {{ max-width: 100%; border: 1px solid #eee; }}
.note {{ color: #666; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p class=note>Generated {generated} from each workdir's metrics.jsonl. Train CE, drop rate, Max1/Max2,
Max2/Max3, tokens/s and MFU average the last {TAIL:.0%} of steps; eval loss, alpha, the expert bias spread (max - min
over the experts) and expert similarity are the last logged values; per-layer metrics are averaged over MoE
layers.</p>
<table><tr>{head}</tr>
{chr(10).join(rows)}
</table>
{chr(10).join(sections)}
</body></html>
"""
