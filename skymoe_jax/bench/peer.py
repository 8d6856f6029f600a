"""The PyTorch peer of `skymoe bench step`: transformers' MixtralForCausalLM (LlamaForCausalLM for a
dense config) with the config's shapes, trained the same way (AdamW with the config's betas, eps and
weight decay, global-norm clipping, cross-entropy plus the router's load-balancing loss), timed beside
the skymoe step in one run, the two taking turns of a few steps, so both see the same machine load.

Each side runs in a worker process of its own, started by `compare` with the same environment (so the
same allocator settings: the `skymoe` command's huge pages reach the peer too), and steps only while the
other waits. The peer is dropless (transformers' Mixtral drops nothing) and runs PyTorch eager
with SDPA attention on as many threads as XLA's CPU backend uses (all cores). Peak memory is each
worker's, so neither side's allocations count for the other.
"""

from __future__ import annotations

import math
import os
import pickle
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import ml_collections
import numpy as np

from skymoe_jax.bench.paired import paired_ratio
from skymoe_jax.errors import ConfigError


def _torch():
    try:
        import torch
        import transformers
    except ImportError:
        raise ConfigError(
            "--peer=hf needs PyTorch and transformers: pip install torch && pip install -e '.[hf]'"
        ) from None
    return torch, transformers


def peer_model(config: ml_collections.ConfigDict):
    """(transformers model in train mode, torch optimizer) with config's shapes and optimizer settings."""
    torch, transformers = _torch()
    m, e, o = config.model, config.moe, config.optim
    shapes = dict(
        vocab_size=m.vocab_size,
        hidden_size=m.d_model,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_heads,
        num_key_value_heads=m.num_kv_heads,
        head_dim=m.head_dim or None,  # None: hidden_size / num_attention_heads, as model.head_dim=0
        rope_theta=m.rope_theta,
        rms_norm_eps=m.norm_eps,
        initializer_range=m.init_std,
        max_position_embeddings=config.data.seq_len,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(config.seed)
    if e.num_experts:
        model = transformers.MixtralForCausalLM(
            transformers.MixtralConfig(
                **shapes,
                intermediate_size=e.expert_ffn_dim,
                num_local_experts=e.num_experts,
                num_experts_per_tok=e.top_k,
                output_router_logits=True,
                router_aux_loss_coef=config.aux_coef.initial_alpha,
            )
        )
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**shapes, intermediate_size=m.ffn_dim))
    model.train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=o.lr, betas=(o.b1, o.b2), eps=o.eps, weight_decay=o.weight_decay
    )
    return model, optimizer


def peer_step_fn(config: ml_collections.ConfigDict, tokens: np.ndarray):
    """A function that runs one training step of the peer on tokens [batch, seq + 1]."""
    torch, _ = _torch()
    torch.set_num_threads(os.cpu_count() or 1)
    model, optimizer = peer_model(config)
    inputs = torch.from_numpy(tokens[:, :-1].astype(np.int64))
    targets = torch.from_numpy(tokens[:, 1:].astype(np.int64))
    clip = config.optim.grad_clip

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        out = model(input_ids=inputs)
        loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1).float(), targets.flatten())
        if getattr(out, "aux_loss", None) is not None:
            loss = loss + model.config.router_aux_loss_coef * out.aux_loss
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        return float(loss.detach())

    return step


# Each side takes turns of 1 + TIMED_PER_TURN steps and the first is reported but not counted: on the
# development VM a skymoe step that followed a pause of its process (the other side's turn) took 28-41%
# longer, its fresh memory zeroed more slowly after the pause, while one that followed its own step did not;
# a training run's steps follow each other (docs/BENCHMARKS.md).
TIMED_PER_TURN = 2
_REPLY = "skymoe-bench-peer:"  # marks the worker's answers among anything else a library prints


def _peak_rss() -> float:
    """This process's peak RSS in bytes (VmHWM, not getrusage's ru_maxrss, which Linux carries over from
    the parent across exec)."""
    with open("/proc/self/status", encoding="ascii") as f:
        return next(float(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def _serve(side: str, config: ml_collections.ConfigDict) -> None:
    """The worker: build one side, run a warm-up step, then one timed step per `step` line on stdin,
    answering its seconds; `peak` answers the peak RSS and ends."""
    from skymoe_jax.bench.step import random_tokens, skymoe_step_fn

    tokens = random_tokens(config)
    step = peer_step_fn(config, tokens) if side == "hf" else skymoe_step_fn(config, tokens)[0]
    step()  # compilation, allocator pools
    print(_REPLY, "ready", flush=True)
    for line in sys.stdin:
        if line.strip() == "peak":
            print(_REPLY, _peak_rss(), flush=True)
            return
        start = time.perf_counter()
        step()
        print(_REPLY, time.perf_counter() - start, flush=True)


class _Worker:
    """One side in a process of its own, stepping when asked: each library runs with its own allocator and
    threads, as its users run it, and the peak RSS it reports is its own."""

    def __init__(self, side: str, argv: list[str], log: Any):
        self.side = side
        self.log = log
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )

    def ask(self, command: str | None = None) -> str:
        if command is not None:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith(_REPLY):
                return line[len(_REPLY) :].strip()
        self.proc.wait()
        self.log.seek(0)
        raise RuntimeError(f"the {self.side} benchmark worker failed: {self.log.read().strip()[-2000:]}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def take_turns(
    step: Callable[[str], float], sides: list[str], steps: int
) -> tuple[dict[str, list[list[float]]], dict[str, list[float]]]:
    """Rounds of one turn per side, each turn 1 + TIMED_PER_TURN calls of step(side) (seconds), until about
    `steps` steps of each side are timed: (each turn's timed seconds, each turn's untimed first step)."""
    timed: dict[str, list[list[float]]] = {side: [] for side in sides}
    first: dict[str, list[float]] = {side: [] for side in sides}
    order = list(sides)
    for _ in range(max(1, math.ceil(steps / TIMED_PER_TURN))):
        for side in order:
            turn = [step(side) for _ in range(1 + TIMED_PER_TURN)]
            first[side].append(turn[0])
            timed[side].append(turn[1:])
        # Each side goes first in every other round, so neither always follows the other.
        order.reverse()
    return timed, first


def compare(config: ml_collections.ConfigDict, steps: int) -> dict[str, Any]:
    """skymoe's train step and the peer's, each in a process of its own, timed in turns; their ratio and
    each process's peak memory.

    A round is one turn of each side (1 + TIMED_PER_TURN steps, the first untimed); about `steps` steps of
    each side are timed. speedup is peer time / skymoe time (above 1: skymoe is faster), the median over
    the rounds of each round's ratio of the turns' medians, with a 90% bootstrap interval; the step times
    are each side's median over all its timed steps."""
    _torch()  # before starting anything: say what to install
    with (
        tempfile.TemporaryDirectory() as tmp,
        tempfile.TemporaryFile("w+") as log_a,
        tempfile.TemporaryFile("w+") as log_b,
    ):
        path = os.path.join(tmp, "config.pkl")
        with open(path, "wb") as f:
            pickle.dump(config, f)
        workers = {
            side: _Worker(side, [sys.executable, "-m", "skymoe_jax.bench.peer", side, path], log)
            for side, log in (("skymoe", log_a), ("hf", log_b))
        }
        try:
            for worker in workers.values():  # both build and warm up at once
                worker.ask()
            times, first = take_turns(lambda side: float(workers[side].ask("step")), list(workers), steps)
            peak = {side: float(worker.ask("peak")) for side, worker in workers.items()}
        finally:
            for worker in workers.values():
                worker.close()
    tokens_per_step = config.data.batch_size * config.data.seq_len
    step_s = {side: float(np.median(turns)) for side, turns in times.items()}
    speedup = paired_ratio(*(np.median(times[side], axis=1) for side in ("hf", "skymoe")))
    return {
        "peer": "transformers " + ("MixtralForCausalLM" if config.moe.num_experts else "LlamaForCausalLM"),
        "skymoe_step_s": step_s["skymoe"],
        "peer_step_s": step_s["hf"],
        "skymoe_tokens_per_sec": tokens_per_step / step_s["skymoe"],
        "peer_tokens_per_sec": tokens_per_step / step_s["hf"],
        "speedup": speedup.median,
        "speedup_interval": [speedup.low, speedup.high],
        "rounds": speedup.rounds,
        "skymoe_min_step_s": float(np.min(times["skymoe"])),
        "peer_min_step_s": float(np.min(times["hf"])),
        # reported, not counted: the untimed first step of each turn
        "skymoe_first_step_s": float(np.median(first["skymoe"])),
        "peer_first_step_s": float(np.median(first["hf"])),
        "skymoe_peak_rss": peak["skymoe"],
        "peer_peak_rss": peak["hf"],
        "threads": os.cpu_count() or 1,
    }


if __name__ == "__main__":  # a _Worker: SIDE CONFIG_PICKLE
    with open(sys.argv[2], "rb") as f:
        _serve(sys.argv[1], pickle.load(f))
