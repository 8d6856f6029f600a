"""Experiment studies (configs/experiments/): the arms of a study trained as `skymoe train` subprocesses that
resume where they stopped, and the comparisons across seeds their tables print.

A run is finished when its metrics.jsonl holds the last step's evaluation, so a study's finished runs can live in
the repository and re-report without training."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import types
from collections.abc import Sequence

import numpy as np

from skymoe_jax.metrics.runs import Run, load_runs


def finished(path: str, steps: int) -> bool:
    """Whether the run in workdir `path` logged step `steps` with its evaluation."""
    try:
        with open(os.path.join(path, "metrics.jsonl"), encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return False
    return any(r.get("step") == steps and "eval_loss" in r for r in records)


def workdir(out: str, regime: str, seed: int, arm: str) -> str:
    """Where a study keeps one arm's run: OUT/<regime>/seed<N>/<arm, spaces as underscores>."""
    return os.path.join(out, regime, f"seed{seed}", arm.replace(" ", "_"))


def train_command(path: str, seed: int, flags: Sequence[str]) -> list[str]:
    """`skymoe train` into workdir `path` with the seed setting both the initialisation and the data order, so the
    arms of a seed see the same batches; `flags` (a --config=FILE first, where one is given) follow."""
    head = [a for a in flags if a.startswith("--config=")]
    rest = [a for a in flags if not a.startswith("--config=")]
    return [
        sys.executable,
        "-m",
        "skymoe_jax.cli",
        "train",
        f"--workdir={path}",
        *head,
        f"--config.seed={seed}",
        f"--config.data.shuffle_seed={seed}",
        *rest,
    ]


def train_all(jobs: Sequence[tuple[str, list[str]]], parallel: int, niceness: int = 0) -> bool:
    """Run (workdir, command) jobs, `parallel` at a time, each pinned to its share of the cores (on 2 cores, two
    one-core runs finish more work than one two-core run), at `niceness` (a study can then use only the cycles
    other work leaves); logs in WORKDIR.log. False when one failed."""
    cores = sorted(os.sched_getaffinity(0))
    share = max(1, len(cores) // parallel)
    slots = [cores[i * share : (i + 1) * share] for i in range(parallel)]
    running: dict[int, tuple[subprocess.Popen, str, object]] = {}
    pending, ok = list(jobs), True
    while pending or running:
        for slot in range(parallel):
            if slot not in running and pending:
                path, command = pending.pop(0)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                log = open(path + ".log", "a", encoding="utf-8")
                pinned = ["taskset", "-c", ",".join(map(str, slots[slot]))] if parallel > 1 else []
                niced = ["nice", "-n", str(niceness)] if niceness else []
                print(f"training {path}", flush=True)
                process = subprocess.Popen(niced + pinned + command, stdout=log, stderr=subprocess.STDOUT)
                running[slot] = (process, path, log)
        time.sleep(2)
        for slot, (process, path, log) in list(running.items()):
            if process.poll() is None:
                continue
            del running[slot]
            log.close()
            if process.returncode:
                print(f"{path} failed (exit {process.returncode}); see {path}.log", flush=True)
                ok = False
    return ok


def write_reports(out: str, regime: str, seeds: Sequence[int], arms: Sequence[str], steps: int) -> None:
    """Per seed, the `skymoe report --compare` figures and page of the arms that finished, in
    OUT/<regime>/seed<N>/report."""
    from skymoe_jax.metrics.report import write_report

    for seed in seeds:
        done = [path for path in (workdir(out, regime, seed, arm) for arm in arms) if finished(path, steps)]
        if len(done) > 1:
            write_report(load_runs(done), os.path.join(out, regime, f"seed{seed}", "report"))


def noise(metric: str, per_arm: dict[str, dict[int, float]], fmt: str, reference: str) -> list[str]:
    """Which arms' metric (per arm, per seed) differs from the reference arm's by more than the seed noise: the
    mean difference over the seeds both finished beyond twice its standard error, and beyond the largest spread
    (max - min over seeds) of any arm."""
    ref = per_arm.get(reference, {})
    if len(ref) < 2:
        return [f"{metric}: the seed noise needs at least two seeds of {reference}"]
    spread = max(np.ptp(list(v.values())) for v in per_arm.values() if len(v) > 1)
    lines = [f"{metric}: largest seed spread of any arm {fmt.format(spread).lstrip('+')}"]
    for arm, values in per_arm.items():
        common = sorted(set(values) & set(ref))
        if arm == reference or len(common) < 2:
            continue
        diff = np.array([values[s] - ref[s] for s in common])
        error = diff.std(ddof=1) / np.sqrt(len(common))
        beyond = abs(diff.mean()) > max(2 * error, spread)
        lines.append(
            f"{metric}, {arm} - {reference}: {fmt.format(diff.mean())} over {len(common)} seeds "
            f"(paired standard error {fmt.format(error).lstrip('+')}): "
            + ("beyond the seed noise" if beyond else "within the seed noise")
        )
    return lines


def windows(run: Run, key: str, width: int, reduce=np.mean) -> list[float]:
    """The metric averaged over its layers (and any further axes reduced by `reduce` first, e.g. np.ptp over the
    experts), then over windows of `width` steps: steps 1..width, width+1..2*width, ... up to the last step."""
    steps, values = run.series(key)
    while values.ndim > 2:
        values = reduce(values, axis=-1)
    per_step = values.mean(axis=-1) if values.ndim == 2 else values
    edges = range(0, run.last_step, width)
    return [float(np.nanmean(per_step[(steps > lo) & (steps <= lo + width)])) for lo in edges]


def drift(run: Run, key: str, width: int) -> float:
    """How far a metric still moved at the end: the mean over the last window of `width` steps minus the mean
    over the window before, over the latter (a settled metric is near 0)."""
    last, before = windows(run, key, width)[-2:][::-1]
    return (last - before) / before if before else float("nan")


def regime_steps(script: types.ModuleType, regime: str) -> int:
    """A study's run length in `regime`: its STEPS, or STEPS[regime] where the regimes differ."""
    return script.STEPS if isinstance(script.STEPS, int) else script.STEPS[regime]


def main(script: types.ModuleType) -> int:
    """A study script's command line: train the arms not yet finished (--jobs at a time, at --nice), write each
    seed's report, and print the tables. The script names its study: OUT, REGIMES (the first is the default),
    SEEDS, STEPS (an int, or per regime a dict), arms() -> {arm: flags}, train_command(workdir, regime, seed, flags)
    and tables(out, regime, seeds); its docstring's first paragraph is the description."""
    description, out, regimes, seeds = script.__doc__.split("\n\n")[0], script.OUT, list(script.REGIMES), script.SEEDS
    arms, command, tables = script.arms(), script.train_command, script.tables
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", default=out)
    parser.add_argument("--regime", default=regimes[0], choices=sorted(regimes))
    parser.add_argument("--seeds", default=seeds, help="comma-separated seeds")
    parser.add_argument("--jobs", type=int, default=1, help="trainings at once, each pinned to its own cores")
    parser.add_argument("--nice", type=int, default=0, help="niceness of the trainings (0-19)")
    parser.add_argument("--only", default="", help="train only the arms whose name contains this text")
    parser.add_argument("--arms", default="", help="train only these arms (comma-separated names)")
    args = parser.parse_args()
    chosen = [int(s) for s in args.seeds.split(",")]
    named = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = sorted(set(named) - set(arms))
    if unknown:
        parser.error(f"--arms: no arm named {', '.join(map(repr, unknown))}; the arms: {', '.join(arms)}")
    steps = regime_steps(script, args.regime)
    jobs = [
        (path, command(path, args.regime, seed, flags))
        for seed in chosen
        for arm, flags in arms.items()
        if args.only in arm
        and (not named or arm in named)
        and not finished(path := workdir(args.out, args.regime, seed, arm), steps)
    ]
    if not train_all(jobs, max(1, args.jobs), args.nice):
        return 1
    write_reports(args.out, args.regime, chosen, list(arms), steps)
    print(tables(args.out, args.regime, chosen))
    return 0
