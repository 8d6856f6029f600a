"""The PyTorch peer of `skymoe bench step`: transformers' MixtralForCausalLM (LlamaForCausalLM for a
dense config) with the config's shapes, trained the same way (AdamW with the config's betas, eps and
weight decay, global-norm clipping, cross-entropy plus the router's load-balancing loss), timed in
the same process as the skymoe step, one step of each in turn, so both see the same machine load.

The peer is dropless (transformers' Mixtral drops nothing) and runs PyTorch eager with SDPA attention
on as many threads as XLA's CPU backend uses (all cores). Peak memory is measured per side in a
fresh Python process, so neither side's allocations count for the other.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tempfile
import time
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


def _peak_rss_of(side: str, config: ml_collections.ConfigDict, steps: int) -> float:
    """Build one side, run `steps` steps, return this process's peak RSS in bytes."""
    from skymoe_jax.bench.step import random_tokens, skymoe_step_fn

    tokens = random_tokens(config)
    step = peer_step_fn(config, tokens) if side == "hf" else skymoe_step_fn(config, tokens)[0]
    for _ in range(steps):
        step()
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over from the parent across exec.
    with open("/proc/self/status", encoding="ascii") as f:
        return next(float(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def peak_memory(config: ml_collections.ConfigDict, steps: int = 3) -> dict[str, float]:
    """Peak RSS in bytes of a fresh Python process training each side for a few steps."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "config.pkl")
        with open(path, "wb") as f:
            pickle.dump(config, f)
        for side in ("skymoe", "hf"):
            run = subprocess.run(
                [sys.executable, "-m", "skymoe_jax.bench.peer", side, path, str(steps)],
                capture_output=True,
                text=True,
                check=False,
            )
            if run.returncode:
                raise RuntimeError(f"measuring {side}'s memory failed: {run.stderr.strip()[-2000:]}")
            out[side] = float(run.stdout.split()[-1])
    return out


def compare(config: ml_collections.ConfigDict, steps: int) -> dict[str, Any]:
    """skymoe's train step and the peer's, timed alternately in this process; their ratio and peak memory.

    speedup is peer time / skymoe time (above 1: skymoe is faster), the median over the rounds of each
    round's ratio, with a 90% bootstrap interval; the step times are each side's median."""
    from skymoe_jax.bench.step import random_tokens, skymoe_step_fn

    _torch()  # before compiling anything: say what to install
    tokens = random_tokens(config)
    sides = {"skymoe": skymoe_step_fn(config, tokens)[0], "hf": peer_step_fn(config, tokens)}
    for step in sides.values():  # warm-up: compilation, allocator pools
        step()
    times: dict[str, list[float]] = {side: [] for side in sides}
    order = list(sides)
    for _ in range(steps):
        for side in order:
            start = time.perf_counter()
            sides[side]()
            times[side].append(time.perf_counter() - start)
        # Each side follows the other equally often: what one step leaves behind (spinning threads, freed
        # memory) does not fall on one side only.
        order.reverse()
    tokens_per_step = config.data.batch_size * config.data.seq_len
    step_s = {side: float(np.median(t)) for side, t in times.items()}
    speedup = paired_ratio(times["hf"], times["skymoe"])
    memory = peak_memory(config)
    return {
        "peer": "transformers " + ("MixtralForCausalLM" if config.moe.num_experts else "LlamaForCausalLM"),
        "skymoe_step_s": step_s["skymoe"],
        "peer_step_s": step_s["hf"],
        "skymoe_tokens_per_sec": tokens_per_step / step_s["skymoe"],
        "peer_tokens_per_sec": tokens_per_step / step_s["hf"],
        "speedup": speedup.median,
        "speedup_interval": [speedup.low, speedup.high],
        "rounds": speedup.rounds,
        "skymoe_min_step_s": min(times["skymoe"]),
        "peer_min_step_s": min(times["hf"]),
        "skymoe_peak_rss": memory["skymoe"],
        "peer_peak_rss": memory["hf"],
        "threads": os.cpu_count() or 1,
    }


if __name__ == "__main__":  # peak_memory's child: SIDE CONFIG_PICKLE STEPS
    with open(sys.argv[2], "rb") as f:
        print(_peak_rss_of(sys.argv[1], pickle.load(f), int(sys.argv[3])))
