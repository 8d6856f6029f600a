"""`skymoe report` on hand-written metrics.jsonl files: bad input gives one line and status 2,
compared runs are overlaid, runs without MoE metrics still get a report, resumed runs count
each step once. (A report on a real finished run: test_metrics.py.)"""

import json
import os
import warnings

import numpy as np
import pytest
from matplotlib import colors as matplotlib_colors

from skymoe_jax.cli import main
from skymoe_jax.metrics import plots
from skymoe_jax.metrics.runs import load_run, summarize

LAYERS, EXPERTS = 3, 4


def _records(drop: float, steps=range(10, 110, 10), moe: bool = True) -> list[dict]:
    out = []
    for step in steps:
        r = {"step": step, "loss": 5.0 - step / 50, "ce_loss": 5.0 - step / 50, "tokens_per_sec": 1000.0 + step}
        if moe:
            load = np.full((LAYERS, EXPERTS), 1 / EXPERTS)
            load[:, 0] += 0.1
            load[:, 1] -= 0.1
            r.update(
                drop_rate=[drop * (i + 1) for i in range(LAYERS)],
                alpha=[0.001 * step / 100] * LAYERS,
                max1_max2=[2.0 + i for i in range(LAYERS)],
                max2_max3=[1.5] * LAYERS,
                expert_load=load.tolist(),
                max_vio=[0.1 * (i + 1) for i in range(LAYERS)],
                seq_max_vio=[step / 100] * LAYERS,
                expert_bias=(np.linspace(-1, 1, EXPERTS) * 1e-5 * step * np.arange(1, LAYERS + 1)[:, None]).tolist(),
            )
            if step % 50 == 0:
                r["expert_similarity"] = [0.5 - step / 1000] * LAYERS
        if step % 50 == 0:
            r["eval_loss"] = 5.1 - step / 50
        out.append(r)
    return out


def _workdir(tmp_path, name: str, records) -> str:
    path = tmp_path / name
    path.mkdir()
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _fails(capsys, argv, needle):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_bad_input_is_one_line_and_status_2(tmp_path, capsys):
    good = _workdir(tmp_path, "good", _records(0.01))
    empty = _workdir(tmp_path, "empty", [])
    (tmp_path / "no_metrics").mkdir()
    damaged = _workdir(tmp_path, "damaged", _records(0.01))
    with open(os.path.join(damaged, "metrics.jsonl"), "a") as f:
        f.write('{"step": 110, "loss"\n')
    _fails(capsys, ["report", f"--workdir={tmp_path / 'missing'}"], "missing: no such directory")
    _fails(capsys, ["report", f"--workdir={tmp_path / 'no_metrics'}"], "metrics.jsonl not found")
    _fails(capsys, ["report", f"--workdir={empty}"], "metrics.jsonl is empty")
    _fails(capsys, ["report", f"--workdir={damaged}"], "metrics.jsonl line 11 is not JSON")
    _fails(capsys, ["report", f"--workdir={good}", "--compare", str(tmp_path / "missing")], "no such directory")
    _fails(capsys, ["report", f"--workdir={good}", "--compare"], "--compare needs at least one directory")
    _fails(capsys, ["report"], "skymoe report takes --workdir=DIR")
    assert not os.path.exists(os.path.join(good, "report"))  # nothing written on bad input


def test_compared_runs_are_overlaid(tmp_path, capsys):
    a, b, c = (_workdir(tmp_path, name, _records(drop)) for name, drop in (("a", 0.01), ("b", 0.02), ("c", 0.03)))
    out = str(tmp_path / "out")
    assert main(["report", f"--workdir={a}", "--compare", b, f"--compare={c}", f"--out={out}"]) == 0
    assert sorted(os.listdir(out)) == sorted([f"{stem}.png" for stem, _, _ in plots.FIGURES] + ["report.html"])
    page = open(os.path.join(out, "report.html"), encoding="utf-8").read()
    assert all(f"<td>{name}</td>" in page for name in "abc")
    assert "| a | 100 |" in capsys.readouterr().out

    runs = [load_run(w) for w in (a, b, c)]
    labels = [line.get_label() for line in plots.loss_figure(runs).axes[0].get_lines()]
    assert labels == ["a: train", "a: eval", "b: train", "b: eval", "c: train", "c: eval"]
    drop = plots.drop_rate_figure(runs)
    heatmaps = [ax for ax in drop.axes if ax.get_title().endswith("drop rate per layer")]
    assert [ax.get_title() for ax in heatmaps] == [f"{n}: drop rate per layer" for n in "abc"]
    # Each heatmap holds its run's percentages (layer x step); the overlay panel the layer means.
    np.testing.assert_allclose(heatmaps[1].collections[0].get_array().reshape(LAYERS, 10)[:, 0], [2, 4, 6])
    overlay = drop.axes[len(runs)]
    np.testing.assert_allclose([line.get_ydata()[-1] for line in overlay.get_lines()], [2, 4, 6])
    # MaxVio over the batch: the layer mean of 0.1, 0.2, 0.3; per sequence: step / 100.
    batch, sequence = plots.max_vio_figure(runs).axes
    assert [line.get_label() for line in batch.get_lines()] == ["a", "b", "c", "0 = balanced"]
    np.testing.assert_allclose(batch.get_lines()[0].get_ydata(), 0.2)
    np.testing.assert_allclose(sequence.get_lines()[2].get_ydata(), np.arange(10, 110, 10) / 100)
    # A run that logged the imbalance of rows mixed from its sequences adds that panel, with its values.
    records = [{**r, "seq_max_vio_shuffled": [0.05 * (i + 1) for i in range(LAYERS)]} for r in _records(0.01)]
    mixed_run = load_run(_workdir(tmp_path, "mixed", records))
    *_, mixed = plots.max_vio_figure([*runs, mixed_run]).axes
    assert [line.get_label() for line in mixed.get_lines()] == ["mixed", "0 = balanced"]
    np.testing.assert_allclose(mixed.get_lines()[0].get_ydata(), 0.1)
    assert len(plots.max_vio_figure(runs).axes) == 2


@pytest.mark.parametrize("count", [3, 11, 25])
def test_every_compared_run_has_its_own_colour(tmp_path, count):
    # The aux-coef study compares 11 arms; tab10 alone gave the 11th the first one's colour.
    runs = [load_run(_workdir(tmp_path, f"r{i}", _records(0.01 * (i + 1)))) for i in range(count)]
    overlay = plots.drop_rate_figure(runs).axes[count]
    colours = {tuple(np.round(matplotlib_colors.to_rgba(line.get_color()), 6)) for line in overlay.get_lines()}
    assert len(overlay.get_lines()) == count and len(colours) == count


def test_run_without_moe_metrics(tmp_path):
    dense = _workdir(tmp_path, "dense", _records(0.0, moe=False))
    assert main(["report", f"--workdir={dense}"]) == 0
    assert sorted(os.listdir(os.path.join(dense, "report"))) == ["loss.png", "report.html"]
    page = open(os.path.join(dense, "report", "report.html"), encoding="utf-8").read()
    assert page.count("Not logged by these runs.") == len(plots.FIGURES) - 1


def test_resumed_run_keeps_each_steps_latest_record(tmp_path):
    # Killed after step 40, resumed from a step-20 checkpoint: steps 30 and 40 are logged again.
    first, again = _records(0.01, steps=range(10, 50, 10)), _records(0.02, steps=range(30, 70, 10))
    run = load_run(_workdir(tmp_path, "resumed", first + again))
    steps, drop = run.series("drop_rate")
    assert steps.tolist() == [10, 20, 30, 40, 50, 60]
    np.testing.assert_allclose(drop[:, 0], [0.01, 0.01, 0.02, 0.02, 0.02, 0.02])


def test_summary_averages_the_tail_and_takes_the_last_eval():
    from skymoe_jax.metrics.runs import Run

    s = summarize(Run("r", ".", _records(0.01)))
    assert s["eval loss"] == pytest.approx(5.1 - 2)  # step 100
    assert s["train CE"] == pytest.approx(np.mean([5 - 90 / 50, 5 - 100 / 50]))  # steps 90 and 100 (last 20%)
    assert s["drop rate %"] == pytest.approx(2.0)  # layers at 1, 2, 3 %
    assert s["expert similarity"] == pytest.approx(0.4)
    assert s["busiest expert / uniform"] == pytest.approx((1 / EXPERTS + 0.1) * EXPERTS)  # expert 0, every layer
    # The load averaged over the tail, then its MaxVio; with a per-record swap of the two busiest experts the
    # average is even between them, where each record's own MaxVio stays high.
    records = _records(0.01)
    for i, r in enumerate(records):
        load = np.full((LAYERS, EXPERTS), 1 / EXPERTS)
        load[:, i % 2] += 0.1
        load[:, 2] -= 0.1
        r["expert_load"] = load.tolist()
    swapped = summarize(Run("r", ".", records))
    assert swapped["busiest expert / uniform"] == pytest.approx((1 / EXPERTS + 0.1) * EXPERTS)
    assert swapped["MaxVio of the mean load"] == pytest.approx((1 / EXPERTS + 0.05) * EXPERTS - 1)
    assert s["MaxVio"] == pytest.approx(np.mean([0.1 * (i + 1) for i in range(LAYERS)]))
    assert s["seq MaxVio"] == pytest.approx(np.mean([0.9, 1.0]))
    assert s["expert bias spread"] == pytest.approx(2e-3 * 2)  # step 100's: 2e-3 x layers 1, 2, 3 averaged


def test_two_expert_runs_have_no_max2_max3(tmp_path):
    records = _records(0.01)
    for r in records:
        r["max2_max3"] = [None] * LAYERS  # no third expert: logged as null
    run = load_run(_workdir(tmp_path, "two", records))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no all-NaN means
        assert "Max2/Max3" not in summarize(run) and "Max1/Max2" in summarize(run)
        assert plots.router_ratio_figure([run]).axes[1].get_lines()[0].get_label() == "1 = the two are equal"
