"""The `skymoe` command.

    skymoe train  [--config=PATH] [--config.a.b=VALUE ...] [--workdir=DIR] [--stop_exit_code=N]
    skymoe config [--config=PATH | --workdir=DIR] [--config.a.b=VALUE ...] [--json]
    skymoe eval   --workdir=DIR [--config.a.b=VALUE ...] [--json]
    skymoe sample --workdir=DIR --prompt=TEXT [--max_tokens=N] [--temperature=T] [--top_p=P] [--seed=S]
                  [--tokenizer=byte|PATH]
    skymoe upcycle --dense=DIR --out=DIR [--config=MOE_CONFIG] [--config.a.b=VALUE ...]
    skymoe import-hf --hf_dir=DIR --out=DIR
    skymoe export-hf --workdir=DIR --out=DIR [--step=N] [--dtype=fp32|bf16] [--max_shard_size=5GB]
    skymoe advise --dense_params=N --dense_tokens=D --moe_tokens=D [--top_k=2] [--no_dense] [--json]
    skymoe params [--config=PATH] [--config.a.b=VALUE ...] [--mesh=PIPE,DATA,EXPERT] [--device_memory=80GB|H100-80GB]
                  [--compile=cpu|A800-80GB|A100-80GB|H100-80GB|H200] [--json]
    skymoe plan   --devices=N --device=A800-80GB|A100-80GB|H100-80GB|H200 [--config=PATH] [--config.a.b=VALUE ...]
                  [--mfu=0.4] [--memory_fraction=0.9] [--top=10] [--json]
    skymoe bench step [--config=PATH] [--config.a.b=VALUE ...] [--steps=N] [--peer=hf] [--json]
    skymoe bench layers [--config=PATH] [--config.a.b=VALUE ...] [--repeats=N] [--json]
    skymoe bench data [--config=PATH] [--config.a.b=VALUE ...] [--workers=N] [--batches=N] [--json]
    skymoe bench routing [--small] [--ragged] [--impls=xla,pallas] [--repeats=N] [--json]
    skymoe prepare-data --input=GLOB --tokenizer=PATH|byte --out=DIR [--format=text|jsonl] [--field=text]
                        [--workers=N] [--shard_docs=N]
    skymoe report --workdir=DIR [--compare DIR ...] [--out=DIR]
    skymoe acceptance [--out=acceptance.json] [--reduced]
    skymoe --version

`skymoe COMMAND --help` lists a command's flags and what they do; every command reads
--flagfile=PATH (one flag per line). User mistakes (bad flag, config, data file, checkpoint, a workdir another run
trains in) print one line to stderr and exit with status 2; nothing is written. A run that cannot go on (a failed
checkpoint or metrics write, a peer process gone) prints one line saying what was kept and exits with status 1.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import os
import signal
import sys
import textwrap
from collections.abc import Callable, Sequence

from skymoe_jax.args import Args, Flag, Help
from skymoe_jax.errors import ConfigError, RunFailure, UserError
from skymoe_jax.run import host_memory

USAGE = __doc__.split("\n\n")[1]


def _config(args: Args):
    from skymoe_jax.config import DEFAULT_CONFIG, load_config

    return load_config(args.config or DEFAULT_CONFIG, args.overrides)


PLAN_MFU = 0.4  # what skymoe plan assumes of the step's compute unless --mfu says otherwise

TRAIN_ABOUT = "Train on a config (the built-in default without --config); resumes when --workdir holds checkpoints."
TRAIN_FLAGS = {  # also read by the launch tests, which parse the commands in the launch manifests
    "workdir": Flag(
        "",
        "the run's directory, or s3://BUCKET/PATH or gs://BUCKET/PATH: checkpoints, metrics.jsonl, config",
        shown="runs/NAME, the config's name",
    ),
    "stop_exit_code": Flag(0, "exit status after a stop by signal, so a launcher restarts the run"),
}


def cmd_train(argv: Sequence[str]) -> int:
    from skymoe_jax.checkpoint.manager import has_checkpoint, saved_config
    from skymoe_jax.config import DEFAULT_CONFIG, apply_overrides, load_file, resolve_config_path, shape_changes
    from skymoe_jax.parallel.distributed import initialize
    from skymoe_jax.run.loop import train

    args = Args(argv, "train", TRAIN_ABOUT, TRAIN_FLAGS, config=True)
    if not 0 <= args.stop_exit_code <= 255:
        raise ConfigError(f"--stop_exit_code={args.stop_exit_code} must be an exit status between 0 and 255")
    from_file = load_file(resolve_config_path(args.config or DEFAULT_CONFIG))
    workdir = args.workdir or os.path.join("runs", from_file.name)
    # The processes join before a resumed run's checkpoint is read (reading it starts JAX), so the peer timeout is
    # the command line's: the config file's, or the override.
    own = [o for o in args.overrides if o.split("=")[0] == "--config.train.peer_timeout_s"]
    peer_timeout_s = apply_overrides(from_file, own).train.peer_timeout_s
    initialize(peer_timeout_s)
    # Over a file-size limit (ulimit -f) a write then fails with EFBIG, which the run reports in one line, instead
    # of the signal killing the process mid-save.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    if has_checkpoint(workdir):
        # Resume: the saved config wins; overrides may change how the run continues, not the model's shapes.
        saved = saved_config(workdir)
        config = apply_overrides(saved, args.overrides)
        changed = shape_changes(saved, config) or (
            shape_changes(saved, apply_overrides(from_file, args.overrides)) if args.config else ""
        )
        if changed:
            raise ConfigError(
                f"{workdir} holds checkpoints of another model shape ({changed}); "
                "use a new --workdir or drop the override"
            )
        config.train.peer_timeout_s = peer_timeout_s
    else:
        config = apply_overrides(from_file, args.overrides)
    # A stop by signal saved a checkpoint; a non-zero status tells a launcher that restarts failed
    # groups (a Kubernetes JobSet) to run it again, which resumes.
    return args.stop_exit_code if train(config, workdir).get("stopped") else 0


def cmd_config(argv: Sequence[str]) -> int:
    from skymoe_jax.checkpoint.manager import saved_config
    from skymoe_jax.config import apply_overrides, flatten

    args = Args(
        argv,
        "config",
        "Print the config a command would run, resolved and validated: the file's (or a run's saved one) with "
        "the overrides applied.",
        {
            "workdir": Flag("", "a run's workdir: its saved config, as resuming it would run"),
            "json": Flag(False, "print it as one JSON object"),
        },
        config=True,
    )
    if args.workdir and args.config:
        raise ConfigError("give --config=PATH or --workdir=DIR, not both: a run's saved config is what it resumes with")
    config = apply_overrides(saved_config(args.workdir), args.overrides) if args.workdir else _config(args)
    if args.json:
        print(json.dumps(config.to_dict(), indent=2))
    else:
        print("\n".join(f"{key} = {value!r}" for key, value in flatten(config)))
    return 0


def cmd_eval(argv: Sequence[str]) -> int:
    from skymoe_jax.checkpoint.manager import saved_config
    from skymoe_jax.config import apply_overrides
    from skymoe_jax.run.loop import evaluate

    args = Args(
        argv,
        "eval",
        "Evaluate a run's latest checkpoint on its validation data, with the config saved in the run.",
        {"workdir": Flag("", "the run's directory"), "json": Flag(False, "print one JSON object")},
        config=True,
    )
    if not args.workdir:
        raise ConfigError("skymoe eval needs --workdir=DIR (a directory written by skymoe train)")
    if args.config:
        raise ConfigError("skymoe eval reads the config saved in --workdir; pass --config.a.b=value overrides only")
    config = apply_overrides(saved_config(args.workdir), args.overrides)
    result = evaluate(config, args.workdir)
    if args.json:
        print(
            json.dumps(
                {
                    "step": result["step"],
                    "eval_loss": result["eval_loss"],
                    "eval_drop_rate": [float(x) for x in result.get("eval_drop_rate", [])],
                }
            )
        )
    else:
        line = f"step {result['step']}: eval loss {result['eval_loss']:.4f}"
        if "eval_drop_rate" in result:
            line += f", eval drop rate {100 * float(result['eval_drop_rate'].mean()):.2f}%"
        print(line)
    return 0


def cmd_sample(argv: Sequence[str]) -> int:
    from skymoe_jax.run.sample import sample

    args = Args(
        argv,
        "sample",
        "Continue a prompt with a run's model (its checkpoint on one local device, whatever mesh it trained on), "
        "decoded with a KV cache and every token routed to its experts (none dropped); prints the continuation.",
        {
            "workdir": Flag("", "a run's workdir (its latest checkpoint) or WORKDIR/checkpoints/STEP"),
            "prompt": Flag("", "the text to continue"),
            "max_tokens": Flag(100, "new tokens at most (fewer where the tokenizer's end-of-text token comes)"),
            "temperature": Flag(1.0, "softmax temperature of the draws; 0 = greedy (always the most likely token)"),
            "top_p": Flag(1.0, "nucleus sampling: draw among the most likely tokens holding this share of probability"),
            "seed": Flag(0, "random seed of the draws"),
            "tokenizer": Flag("", "byte or a tokenizer.json instead of the run's data.tokenizer (an imported model's)"),
        },
    )
    if not args.workdir:
        raise ConfigError("skymoe sample needs --workdir=DIR (a run's workdir or WORKDIR/checkpoints/STEP)")
    print(
        sample(
            args.workdir,
            args.prompt,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
            tokenizer=args.tokenizer or None,
        )
    )
    return 0


def cmd_upcycle(argv: Sequence[str]) -> int:
    from skymoe_jax.checkpoint.upcycle import upcycle
    from skymoe_jax.metrics.flops import param_counts
    from skymoe_jax.model.spec import ModelSpec

    args = Args(
        argv,
        "upcycle",
        "Turn a dense run's checkpoint into the MoE config's experts (moe.*, init.upcycle_mode), as a new run.",
        {
            "dense": Flag("", "the dense run's workdir, or WORKDIR/checkpoints/STEP"),
            "out": Flag("", "a new workdir for the MoE run"),
        },
        config=True,
    )
    if not args.dense or not args.out:
        raise ConfigError("skymoe upcycle needs --dense=DIR (a dense run's workdir) and --out=DIR (a new workdir)")
    config = _config(args)
    path = upcycle(config, args.dense, args.out)
    counts = param_counts(ModelSpec.from_config(config))
    print(
        f"upcycled {args.dense} into {path}: {config.moe.num_experts} experts top-{config.moe.top_k} "
        f"({config.init.upcycle_mode}), {_count(counts.total)} parameters ({_count(counts.active)} activated); "
        f"train it with: skymoe train --workdir={args.out}"
    )
    return 0


def cmd_import_hf(argv: Sequence[str]) -> int:
    from skymoe_jax.checkpoint.hf import import_hf
    from skymoe_jax.metrics.flops import param_counts
    from skymoe_jax.model.spec import ModelSpec

    args = Args(
        argv,
        "import-hf",
        "Import a local Hugging Face Llama, Mistral, Qwen2, Qwen3, Mixtral, Qwen2-MoE, Qwen3-MoE or OLMoE checkpoint "
        "as a run with a config file.",
        {
            "hf_dir": Flag("", "a directory with config.json and *.safetensors"),
            "out": Flag("", "a new workdir (checkpoint at step 0 and config.py)"),
        },
    )
    if not args.hf_dir or not args.out:
        raise ConfigError("skymoe import-hf takes --hf_dir=DIR (config.json + safetensors) and --out=DIR")
    config = import_hf(args.hf_dir, args.out)
    counts = param_counts(ModelSpec.from_config(config))
    print(
        f"imported {args.hf_dir} ({config.name}, {_count(counts.total)} parameters) into "
        f"{os.path.join(args.out, 'checkpoints', '0')} with its config {os.path.join(args.out, 'config.py')}; "
        f"use it with skymoe upcycle --dense={args.out} ... or skymoe train --config={args.out}/config.py "
        f"--config.init.from_checkpoint={args.out}"
    )
    return 0


def cmd_export_hf(argv: Sequence[str]) -> int:
    from skymoe_jax.checkpoint.hf_export import export_hf
    from skymoe_jax.parallel.devices import parse_size

    args = Args(
        argv,
        "export-hf",
        "Write a checkpoint as a Hugging Face model (Mixtral, Qwen2-MoE, Qwen3-MoE or OLMoE for MoE, Llama, Qwen2 "
        "or Qwen3 for dense) for vLLM, SGLang or transformers.",
        {
            "workdir": Flag("", "a run's workdir (its latest checkpoint) or WORKDIR/checkpoints/STEP"),
            "out": Flag("", "a new directory for config.json, safetensors and tokenizer files"),
            "step": Flag(-1, "the checkpoint step to export (-1: the latest, or the one in --workdir)"),
            "dtype": Flag("fp32", "tensor type on disk: fp32 or bf16"),
            "max_shard_size": Flag("5GB", "largest safetensors file; bigger models get several and an index"),
        },
    )
    if not args.workdir or not args.out:
        raise ConfigError(
            "skymoe export-hf takes --workdir=DIR (a run's workdir or WORKDIR/checkpoints/STEP) and --out=DIR "
            "(a new directory), and optionally --step, --dtype and --max_shard_size"
        )
    done = export_hf(
        args.workdir,
        args.out,
        step=None if args.step < 0 else args.step,
        dtype=args.dtype,
        max_shard_bytes=parse_size(args.max_shard_size, "max_shard_size"),
    )
    files = "1 safetensors file" if done.files == 1 else f"{done.files} safetensors files with an index"
    print(f"exported step {done.step} of {args.workdir} as {done.architecture} to {done.out} ({files})")
    for note in done.notes:
        print(f"note: {note}")
    return 0


def cmd_advise(argv: Sequence[str]) -> int:
    from skymoe_jax.advise import advise, describe

    args = Args(
        argv,
        "advise",
        "Upcycle a dense checkpoint or train the MoE from scratch? The paper's cost rule for a token budget.",
        {
            "dense_params": Flag("", "the dense model's parameters (3e8, 300M, 0.3B)"),
            "dense_tokens": Flag("", "tokens the dense checkpoint was trained on"),
            "moe_tokens": Flag("", "the MoE training budget in tokens"),
            "top_k": Flag(2, "experts per token"),
            "ffn_share": Flag("", "share of the dense FLOPs in the FFN", shown="the model family's"),
            "comm_overhead": Flag("", "MoE step-time overhead for all-to-all, as a fraction"),
            "no_dense": Flag(False, "there is no dense checkpoint yet (its training counts as a cost)"),
            "json": Flag(False, "print one JSON object"),
        },
    )
    numbers = {name: _number(name, getattr(args, name)) for name in ("dense_params", "dense_tokens", "moe_tokens")}
    extra = {name: _number(name, getattr(args, name)) for name in ("ffn_share", "comm_overhead") if getattr(args, name)}
    a = advise(**numbers, top_k=args.top_k, have_dense=not args.no_dense, **extra)
    if args.json:
        print(
            json.dumps(
                {
                    "recommendation": a.recommendation,
                    "reason": a.reason,
                    "dense_cost_flops": a.dense_cost,
                    "moe_cost_flops": a.moe_cost,
                    "cost_factor": a.cost_factor,
                    "ratio": a.ratio,
                }
            )
        )
    else:
        print(describe(a))
    return 0


def _number(name: str, text: str) -> float:
    """1e9, 300e9, 0.3B, 100B, 2T: parameter and token counts the way people write them."""
    if not text:
        raise ConfigError(f"skymoe advise needs --{name}")
    scale = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}.get(text[-1].upper(), 1.0)
    try:
        return float(text[:-1] if scale != 1.0 else text) * scale
    except ValueError:
        raise ConfigError(f"--{name}={text!r} is not a number (e.g. 3e8, 300M, 0.3B, 1.2T)") from None


def cmd_params(argv: Sequence[str]) -> int:
    from skymoe_jax.metrics.flops import flops_per_token, param_counts
    from skymoe_jax.model.spec import ModelSpec
    from skymoe_jax.parallel import targets
    from skymoe_jax.parallel.devices import parse_device_memory
    from skymoe_jax.parallel.plan import parse_mesh, plan

    args = Args(
        argv,
        "params",
        "Parameter and FLOP counts of a config; with --mesh, the per-device memory plan (state and activations); "
        "with --compile, XLA's own per-device bytes for the train and eval steps compiled for that target beside the "
        "plan.",
        {
            "mesh": Flag("", "PIPELINE,DATA,EXPERT sizes to plan for, e.g. 12,32,4"),
            "device_memory": Flag("", "memory per device to check the plan against: 80GB, 80GiB or a device name"),
            "compile": Flag(
                "",
                f"compile the train and eval steps on the mesh for {' | '.join(targets.TARGETS)} (GPUs need no GPU "
                "here, but JAX's CUDA plugin: pip install 'skymoe-jax[aot]') and print the compiler's per-device bytes",
            ),
            "json": Flag(False, "print one JSON object"),
        },
        config=True,
    )
    mesh = parse_mesh(args.mesh) if args.mesh else None
    if args.device_memory and not mesh:
        raise ConfigError("--device_memory needs --mesh=PIPE,DATA,EXPERT: memory per device depends on the mesh")
    target = targets.canonical(args.compile) if args.compile else None
    if target and not mesh:
        raise ConfigError("--compile needs --mesh=PIPE,DATA,EXPERT: the program is compiled for that many devices")
    if target and target != "cpu":
        targets.compile_only()
    if target and not args.device_memory and targets.memory(target):
        args.device_memory = target
    device_memory = parse_device_memory(args.device_memory) if args.device_memory else None
    if mesh:  # the planned mesh is the config's, so pipeline settings validate against it
        args.overrides.append(f"--config.parallel.mesh={mesh}")
    config = _config(args)
    spec = ModelSpec.from_config(config)
    counts = param_counts(spec)
    flops = flops_per_token(spec, config.data.seq_len, counts)
    out = {
        "total_params": counts.total,
        "active_params": counts.active,
        "flops_per_token": flops,
        "expert_params": counts.expert,
        "embedding_params": counts.embedding,
        "seq_len": config.data.seq_len,
    }
    lines = [
        f"{config.name}: {_count(counts.total)} total parameters, {_count(counts.active)} activated per token "
        f"({100 * counts.expert / counts.total:.1f}% in experts); "
        f"{_count(flops, billion='G')}FLOP per training token at sequence length {config.data.seq_len}"
    ]
    if mesh:
        p = plan(config, mesh, targets.platform(target) if target else None)
        out["plan"] = {
            "mesh": p.mesh,
            "layout": p.layout,
            "params_bytes": p.params_bytes,
            "grads_bytes": p.grads_bytes,
            "optimizer_bytes": p.optimizer_bytes,
            "all_to_all_bytes_per_step": p.all_to_all_bytes,
            "expert_exchange": p.exchange,
            "tokens_per_device": p.tokens_per_device,
            "stage_layers": p.stage_layers,
            "stage_flops_per_token": p.stage_flops_per_token,
            "microbatches": p.microbatches,
            "pipeline_repeats": p.repeats,
            "pipeline_utilization": p.pipeline_utilization,
            "bubble": 1 - p.pipeline_utilization,
            "state_bytes": p.total_bytes,
            "activation_bytes": p.activations.terms(),
            "peak_bytes": p.peak_bytes,
        }
        opts = "+".join(o for o in ("zero1", "fsdp") if config.parallel[o]) or "no ZeRO/FSDP"
        gib = 2**30
        lines.append(
            f"per device on mesh {'x'.join(map(str, p.mesh))} (pipeline x data x expert), layout "
            f"{p.layout}, {opts}: parameters {p.params_bytes / gib:.2f} GiB, gradients "
            f"{p.grads_bytes / gib:.2f} GiB, Adam state {p.optimizer_bytes / gib:.2f} GiB "
            f"(total {p.total_bytes / gib:.2f} GiB); all-to-all {p.all_to_all_bytes / gib:.2f} GiB sent "
            f"per step for {p.tokens_per_device} tokens" + (f" ({p.exchange})" if p.exchange else "")
        )
        terms = ", ".join(f"{name} {v / gib:.2f}" for name, v in p.activations.terms().items())
        lines.append(
            f"activations {p.activations.total / gib:.2f} GiB (model.remat={config.model.remat}: {terms} "
            f"GiB); peak per device {p.peak_bytes / gib:.2f} GiB"
        )
        if device_memory:
            size, label = device_memory
            fits = p.peak_bytes <= size
            out["plan"].update(device_memory_bytes=size, fits=fits)
            lines.append(
                f"{'fits' if fits else 'does NOT fit'} in {label} ({size / gib:.2f} GiB): "
                f"{abs(size - p.peak_bytes) / gib:.2f} GiB {'to spare' if fits else 'over'}"
            )
        if p.mesh[0] > 1:
            per_stage = p.stage_flops_per_token
            flops = ", ".join(f"{f / 1e9:.2f}" for f in per_stage)
            imbalance = max(per_stage) * len(per_stage) / sum(per_stage)
            kind = f"virtual stages ({p.repeats} chunks per device)" if p.repeats > 1 else "stages"
            lines.append(
                f"pipeline {kind} {p.stage_layers} (layers); training GFLOP per token by stage [{flops}] "
                f"(head on the last); slowest / mean {imbalance:.3f}; with {p.microbatches} microbatches: "
                f"utilization {100 * p.pipeline_utilization:.1f}%, bubble "
                f"{100 * (1 - p.pipeline_utilization):.1f}%"
            )
        if target:
            lines += _compiled_beside_plan(config, mesh, target, p, out)
    print(json.dumps(out) if args.json else "\n".join(lines))
    return 0


def _compiled_beside_plan(config, mesh: tuple[int, int, int], target: str, p, out: dict) -> list[str]:
    """Compiles the train and eval steps for `target` on the mesh's devices; fills out['compiled']; the lines to
    print."""
    from skymoe_jax.parallel import targets
    from skymoe_jax.parallel.devices import DEVICES
    from skymoe_jax.parallel.search import step_time
    from skymoe_jax.training.compiled import compile_steps

    steps = compile_steps(config, targets.devices(target, math.prod(mesh)), ("train", "eval"))
    step, evaluation = steps["train"], steps["eval"]
    m, e = step.memory, evaluation.memory
    planned_temp = p.grads_bytes + p.activations.total
    out["compiled"] = {
        "target": target,
        "device_kind": step.device_kind,
        "devices": step.devices,
        "seconds": step.seconds,
        "argument_bytes": m.arguments,
        "output_bytes": m.outputs,
        "alias_bytes": m.aliased,
        "temp_bytes": m.temporaries,
        "peak_bytes": m.peak,
        "planned_temp_bytes": planned_temp,
        "planned_peak_bytes": p.peak_bytes,
        "eval": {"seconds": evaluation.seconds, "temp_bytes": e.temporaries, "peak_bytes": e.peak},
    }
    lines = [
        f"compiled for {target} ({step.devices} {'compile-only ' if target != 'cpu' else ''}devices, "
        f"{step.device_kind}) in {step.seconds:.0f} s; XLA's buffers per device: arguments {_size(m.arguments)}, "
        f"outputs {_size(m.outputs)} ({_size(m.aliased)} of them written over the donated state), temporaries "
        f"{_size(m.temporaries)}; peak {_size(m.peak)}",
        f"planned: temporaries {_size(planned_temp)} ({planned_temp / m.temporaries:.2f}x the compiler's), "
        f"peak {_size(p.peak_bytes)} ({p.peak_bytes / m.peak:.2f}x)",
        f"the eval step (parameters in, token sums out; at the eval capacity factor) compiled in "
        f"{evaluation.seconds:.0f} s: temporaries {_size(e.temporaries)}, peak {_size(e.peak)}",
    ]
    memory = targets.memory(target)
    if memory:
        fits = m.peak <= memory
        out["compiled"].update(device_memory_bytes=memory, fits=fits)
        lines.append(
            f"the compiled step {'fits' if fits else 'does NOT fit'} in one {target} ({_size(memory)}): "
            f"{_size(abs(memory - m.peak))} {'to spare' if fits else 'over'}"
        )
    lines += _program_lines(step.compiled.as_text(), target, out["compiled"])
    if target in DEVICES:
        model = step_time(config, p, DEVICES[target], PLAN_MFU)
        out["compiled"]["planned_step_seconds"] = model.total
        lines.append(
            f"skymoe plan's step model for this mesh, at {100 * PLAN_MFU:.0f}% MFU: {model.total * 1e3:.1f} ms "
            f"(compute {model.compute * 1e3:.1f}, all-to-all {model.all_to_all * 1e3:.1f}, tensor parallel "
            f"{model.tensor_parallel * 1e3:.1f}, gradients {model.gradients * 1e3:.1f}, pipeline sends "
            f"{model.pipeline * 1e3:.1f})"
        )
    return lines


def _program_lines(text: str, target: str, out: dict) -> list[str]:
    """What the compiled step does per execution on a device (bench/hlo.py): matmul FLOPs, float32 matmuls,
    collectives, kernels, host transfers; fills `out`."""
    from skymoe_jax.bench import hlo
    from skymoe_jax.parallel.devices import DEVICES

    s = hlo.summarize(text)
    f32 = sum(d.flops for d in s.dots if "f32" in (d.lhs, d.rhs))
    out.update(
        matmul_flops=s.flops,
        float32_matmul_flops=f32,
        collectives=s.collectives,
        custom_calls=s.custom_calls,
        triton_fusions=s.triton_fusions,
        host_transfers=s.host_transfers,
    )
    collectives = ", ".join(
        f"{kind} {v['count']:.0f}x {_size(v['bytes'])}" for kind, v in sorted(s.collectives.items())
    )
    kernels = {
        "Pallas kernels (Triton calls)": s.custom_calls.get(hlo.PALLAS_TRITON, 0),
        "XLA Triton fusions": sum(s.triton_fusions.values()),
        "cuBLAS calls": sum(n for t, n in s.custom_calls.items() if "cublas" in t),
    }
    lines = [
        f"per step and device, from the compiled program (loops counted by their trip counts): matmuls "
        f"{s.flops / 1e12:.3f} TFLOP ({100 * f32 / max(s.flops, 1):.1f}% of them with float32 operands); "
        f"collectives: {collectives or 'none'}; "
        + ", ".join(f"{k} {v:.0f}" for k, v in kernels.items())
        + f"; host transfers: {', '.join(s.host_transfers) or 'none'}"
    ]
    if target in DEVICES:
        device = DEVICES[target]
        compute = s.flops / device.peak_flops
        memory = s.memory_bytes / device.memory_bandwidth
        out.update(memory_bytes=s.memory_bytes, compute_bound_seconds=compute, memory_bound_seconds=memory)
        lines.append(
            f"a roofline, not a measurement: the matmuls take at least {compute * 1e3:.1f} ms at the {target}'s dense "
            f"bf16 peak ({device.peak_flops / 1e12:.0f} TFLOP/s); the kernels move {_size(s.memory_bytes)} to and from "
            f"device memory, {memory * 1e3:.1f} ms at its {device.memory_bandwidth / 1e12:.2f} TB/s; so the step "
            f"is {'memory' if memory > compute else 'compute'}-bound and takes at least "
            f"{max(compute, memory) * 1e3:.1f} ms"
        )
    return lines


def _size(n: float) -> str:
    """Bytes as GiB, or MiB below one GiB."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def _fraction(name: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 1:
        raise ConfigError(f"--{name}={text!r} must be a number in (0, 1], e.g. 0.4")
    return value


def cmd_plan(argv: Sequence[str]) -> int:
    from skymoe_jax.parallel.devices import find_device
    from skymoe_jax.parallel.search import Candidate, layout_key, search

    args = Args(
        argv,
        "plan",
        "Rank every mesh, layout, ZeRO-1/FSDP, remat and pipeline split of a config on N devices by predicted speed.",
        {
            "devices": Flag(0, "how many accelerators"),
            "device": Flag("", "the accelerator: A800-80GB, A100-80GB, H100-80GB or H200"),
            "mfu": Flag(str(PLAN_MFU), "model FLOPs utilization assumed for compute time, in (0, 1]"),
            "memory_fraction": Flag("0.9", "share of device memory a layout may plan to use, in (0, 1]"),
            "top": Flag(10, "how many layouts to print"),
            "json": Flag(False, "print one JSON object"),
        },
        config=True,
    )
    if args.devices < 1 or not args.device:
        raise ConfigError("skymoe plan needs --devices=N (how many accelerators) and --device=NAME (e.g. A800-80GB)")
    if args.top < 1:
        raise ConfigError(f"--top={args.top} must be at least 1")
    device = find_device(args.device)
    mfu, fraction = _fraction("mfu", args.mfu), _fraction("memory_fraction", args.memory_fraction)
    config = _config(args)
    result = search(config, args.devices, device, mfu=mfu, memory_fraction=fraction)
    own = next(((rank, c) for rank, c in enumerate(result.candidates, 1) if c.key == layout_key(config)), None)
    gib = 2**30

    def row(rank: int, c: Candidate) -> dict:
        return {
            "rank": rank,
            "layout": c.describe(),
            "fits": c.fits,
            "peak_gib": c.plan.peak_bytes / gib,
            "state_gib": c.plan.total_bytes / gib,
            "activations_gib": {k: v / gib for k, v in c.plan.activations.terms().items()},
            "step_s": c.step.total,
            "step_parts_s": dataclasses.asdict(c.step),
            "tokens_per_sec_per_device": c.tokens_per_sec_per_device,
        }

    fitting = [(rank, c) for rank, c in enumerate(result.candidates, 1) if c.fits]
    shown = (
        fitting[: args.top] or sorted(enumerate(result.candidates, 1), key=lambda rc: rc[1].plan.peak_bytes)[: args.top]
    )
    out = {
        "config": config.name,
        "devices": args.devices,
        "device": device.name,
        "mfu": mfu,
        "usable_gib": result.usable_bytes / gib,
        "layouts": len(result.candidates),
        "fitting": len(fitting),
        "refused": result.refused,
        "shown": [row(r, c) for r, c in shown],
        "config_layout": row(*own) if own else None,
    }
    if args.json:
        print(json.dumps(out))
        return 0
    lines = [
        f"{config.name} on {args.devices} x {device.name} ({result.usable_bytes / gib:.1f} GiB usable, "
        f"compute at {100 * mfu:.0f}% of {device.peak_flops / 1e12:.0f} TFLOP/s): {len(result.candidates)} layouts "
        f"run ({result.refused} more cannot: batch, experts or routing groups do not divide), {len(fitting)} fit"
    ]
    lines.append(
        f"the {len(shown)} fastest that fit:"
        if fitting
        else f"none fits; the {len(shown)} with the smallest peak (rank = place by step time among all layouts):"
    )
    header = (
        f"{'rank':>5}  {'layout':<60} {'peak GiB':>8} {'step s':>7} {'tok/s/dev':>9}  memory: state + activations (GiB)"
    )
    lines.append(header)

    def text(rank: int, c: Candidate) -> str:
        terms = " ".join(f"{k} {v / gib:.1f}" for k, v in c.plan.activations.terms().items())
        return (
            f"{rank:>5}  {c.describe():<60} {c.plan.peak_bytes / gib:>8.1f} {c.step.total:>7.2f} "
            f"{c.tokens_per_sec_per_device:>9.0f}  state {c.plan.total_bytes / gib:.1f} + {terms}"
        )

    lines += [text(r, c) for r, c in shown]
    if own:
        rank, c = own
        parts = ", ".join(f"{k} {v:.2f}" for k, v in dataclasses.asdict(c.step).items())
        place = f"#{fitting.index(own) + 1} of the {len(fitting)} that fit" if c.fits else "does not fit"
        lines.append(
            f"this config's layout ({c.describe()}): #{rank} of {len(result.candidates)} by step time, {place}; "
            f"step {c.step.total:.2f} s ({parts}); peak {c.plan.peak_bytes / gib:.1f} GiB"
        )
    else:
        lines.append(
            f"this config's layout (mesh {tuple(config.parallel.mesh)}) is not among them: its mesh does not use "
            f"{args.devices} devices, or the config cannot run on it"
        )
    print("\n".join(lines))
    return 0


def _count(n: float, billion: str = "B") -> str:
    for unit, scale in (("T", 1e12), (billion, 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def cmd_bench(argv: Sequence[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        raise Help(
            f"usage: skymoe bench {'|'.join(BENCHES)} [flags]\n\nBenchmarks of the train step, its blocks, the input "
            "pipeline and the routing kernels; `skymoe bench NAME --help` lists each one's flags."
        )
    if not argv or argv[0] not in BENCHES:
        raise ConfigError(f"skymoe bench needs one of: {', '.join(BENCHES)} (e.g. skymoe bench step)")
    return BENCHES[argv[0]](argv[1:])


def bench_step(argv: Sequence[str]) -> int:
    from skymoe_jax.bench.step import step_benchmark

    args = Args(
        argv,
        "bench step",
        "Time the train step of a config (and its dense twin), in tokens/s and MFU; with --peer=hf, against "
        "transformers' Mixtral (Llama when dense) with the same shapes, each in a process of its own, taking turns.",
        {
            "steps": Flag(10, "timed steps after compilation"),
            "peer": Flag("", "hf: compare with the transformers model (needs torch and the hf extra)"),
            "json": Flag(False, "print one JSON object"),
        },
        config=True,
    )
    if args.peer not in ("", "hf"):
        raise ConfigError(f"--peer={args.peer!r} is not a known peer; the one there is: hf")
    config = _config(args)
    if args.peer:
        from skymoe_jax.bench.peer import compare

        result = compare(config, args.steps)
        gib = 2**30
        result["summary"] = (
            f"{config.name}: skymoe {result['skymoe_tokens_per_sec']:,.0f} tokens/s "
            f"({1e3 * result['skymoe_step_s']:.0f} ms/step, peak RSS {result['skymoe_peak_rss'] / gib:.2f} GiB); "
            f"{result['peer']} {result['peer_tokens_per_sec']:,.0f} tokens/s "
            f"({1e3 * result['peer_step_s']:.0f} ms/step, peak RSS {result['peer_peak_rss'] / gib:.2f} GiB); "
            f"skymoe/peer speed {result['speedup']:.2f}x (90% interval {result['speedup_interval'][0]:.2f}-"
            f"{result['speedup_interval'][1]:.2f}, {result['rounds']} rounds of turns), {result['threads']} threads; "
            f"untimed first step of a turn: skymoe {1e3 * result['skymoe_first_step_s']:.0f} ms, "
            f"peer {1e3 * result['peer_first_step_s']:.0f} ms"
        )
    else:
        result = step_benchmark(config, steps=args.steps)
    print(json.dumps(result) if args.json else result["summary"])
    return 0


def bench_layers(argv: Sequence[str]) -> int:
    from skymoe_jax.bench.layers import layer_benchmark

    args = Args(
        argv,
        "bench layers",
        "Where a train step's time goes: each block (attention, MoE, dense FFN, head and loss) jitted alone, "
        "forward and backward, on the config's batch.",
        {"repeats": Flag(10, "timed repeats per block"), "json": Flag(False, "print one JSON object")},
        config=True,
    )
    if args.repeats < 1:
        raise ConfigError(f"--repeats={args.repeats} must be at least 1")
    result = layer_benchmark(_config(args), args.repeats)
    print(json.dumps(result) if args.json else result["summary"])
    return 0


def cmd_report(argv: Sequence[str]) -> int:
    from skymoe_jax.checkpoint.storage import is_url
    from skymoe_jax.metrics.report import write_report
    from skymoe_jax.metrics.runs import load_runs, summary_table

    args = Args(
        _spread(argv, "compare"),
        "report",
        "Figures (loss, drop rate, alpha, expert load) and a summary table of a run, overlaying others.",
        {
            "workdir": Flag("", "the run's workdir"),
            "compare": Flag([], "runs to overlay: --compare DIR ... or --compare=DIR, repeated"),
            "out": Flag("", "where the figures go", shown="WORKDIR/report"),
        },
    )
    compare = args.compare
    if not args.workdir:
        raise ConfigError(
            "skymoe report takes --workdir=DIR (a run's workdir), optionally --compare DIR ... "
            "(runs to overlay) and --out=DIR (default: WORKDIR/report)"
        )
    remote = [w for w in [args.workdir, *compare] if is_url(w)]
    if remote:
        raise ConfigError(
            f"skymoe report reads local workdirs only; copy {remote[0]}/metrics.jsonl into a local directory and "
            "give that"
        )
    runs = load_runs([args.workdir, *compare])  # bad input stops here, before anything is written
    written = write_report(runs, args.out or os.path.join(args.workdir, "report"))
    print(summary_table(runs))
    figures = len(written) - 1
    print(f"wrote {figures} figure{'s' * (figures != 1)} (PNG) and {written[-1]}")
    return 0


def _spread(argv: Sequence[str], name: str) -> list[str]:
    """argv with `--name A B ...` (values up to the next flag) written as --name=A --name=B, as absl's
    repeated flags take them."""
    out, i = [], 0
    while i < len(argv):
        arg, i = argv[i], i + 1
        if arg == f"--{name}":
            taken = list(itertools.takewhile(lambda a: not a.startswith("--"), argv[i:]))
            i += len(taken)
        elif arg.startswith(f"--{name}="):
            taken = [arg.partition("=")[2]] if arg.partition("=")[2] else []
        else:
            out.append(arg)
            continue
        if not taken:
            raise ConfigError(f"--{name} needs at least one directory")
        out += [f"--{name}={value}" for value in taken]
    return out


def bench_data(argv: Sequence[str]) -> int:
    from skymoe_jax.bench.data import data_benchmark

    args = Args(
        argv,
        "bench data",
        "Time the input pipeline of a config in batches/s and tokens/s, against the step's rate.",
        {
            "workers": Flag(
                os.cpu_count() or 1, "grain worker processes (0: in the main process)", shown="this machine's cores"
            ),
            "batches": Flag(512, "batches to read"),
            "step_tokens_per_sec": Flag("", "the train step's tokens/s, to say whether data keeps up"),
            "json": Flag(False, "print one JSON object"),
        },
        config=True,
    )
    if args.workers < 0 or args.batches < 1:
        raise ConfigError("skymoe bench data needs --workers >= 0 (0: none) and --batches >= 1")
    step_rate = _number("step_tokens_per_sec", args.step_tokens_per_sec) if args.step_tokens_per_sec else 0.0
    result = data_benchmark(_config(args), args.batches, args.workers, step_rate)
    print(json.dumps(result) if args.json else result["summary"])
    return 0


def cmd_prepare_data(argv: Sequence[str]) -> int:
    from skymoe_jax.data.prepare import prepare

    args = Args(
        argv,
        "prepare-data",
        "Tokenize documents once into array_record shards for data.source=prepared.",
        {
            "input": Flag("", "a glob of input files"),
            "tokenizer": Flag("", "byte, or a Hugging Face tokenizer.json"),
            "out": Flag("", "a new directory for the shards and their metadata"),
            "format": Flag("text", "text (one document per file) or jsonl"),
            "field": Flag("text", "the JSON field holding a document's text (jsonl)"),
            "workers": Flag(os.cpu_count() or 1, "tokenizing processes", shown="this machine's cores"),
            "shard_docs": Flag(10_000, "documents per shard"),
        },
    )
    if not (args.input and args.tokenizer and args.out):
        raise ConfigError(
            "skymoe prepare-data takes --input=GLOB, --tokenizer=PATH|byte and --out=DIR "
            "(and optionally --format, --field, --workers, --shard_docs)"
        )
    if args.format not in ("text", "jsonl"):
        raise ConfigError(f"--format={args.format!r} is not one of text (one document per file), jsonl")
    if args.workers < 1 or args.shard_docs < 1:
        raise ConfigError("--workers and --shard_docs must be positive integers")
    result = prepare(
        args.input,
        args.tokenizer,
        args.out,
        fmt=args.format,
        field=args.field,
        workers=args.workers,
        shard_docs=args.shard_docs,
    )
    print(result["summary"])
    return 0


def cmd_acceptance(argv: Sequence[str]) -> int:
    from skymoe_jax.bench.acceptance import main as acceptance

    return acceptance(argv)


BENCHES: dict[str, Callable[[Sequence[str]], int]] = {
    "step": bench_step,
    "layers": bench_layers,
    "data": bench_data,
    "routing": lambda argv: __import__("skymoe_jax.bench.routing", fromlist=["main"]).main(argv),
}
COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "train": cmd_train,
    "config": cmd_config,
    "eval": cmd_eval,
    "sample": cmd_sample,
    "upcycle": cmd_upcycle,
    "import-hf": cmd_import_hf,
    "export-hf": cmd_export_hf,
    "advise": cmd_advise,
    "params": cmd_params,
    "plan": cmd_plan,
    "bench": cmd_bench,
    "report": cmd_report,
    "prepare-data": cmd_prepare_data,
    "acceptance": cmd_acceptance,
}
# Commands that run on devices join a multi-process run when the environment describes one.
DISTRIBUTED = {"eval", "upcycle", "export-hf", "bench"}  # train joins the run itself, with its peer timeout


REFERENCE = "docs/cli.md"  # written by tools/cli_reference.py; tests/test_docs.py keeps it equal to reference()


def _help(command: Callable[[Sequence[str]], int], words: str) -> str:
    try:
        command(["--help"])
    except Help as e:
        return str(e)
    raise AssertionError(f"skymoe {words} --help printed no help")


def reference() -> str:
    """The command-line reference (docs/cli.md) as markdown: `skymoe --help`, then every command's --help, the
    bench subcommands' included, each verbatim in a text block. Runs no command; imports each one's modules."""
    pages = [("skymoe", textwrap.dedent(USAGE))]
    for name, command in COMMANDS.items():
        pages.append((f"skymoe {name}", _help(command, name)))
        if command is cmd_bench:
            pages += [(f"skymoe bench {b}", _help(bench, f"bench {b}")) for b, bench in BENCHES.items()]
    lines = [
        "# Command-line reference",
        "",
        "Every `skymoe` command's `--help`, as the commands print it. Generated: after changing a command's flags "
        "or help text, run `python tools/cli_reference.py` (tests/test_docs.py fails until this file matches). "
        "Every command also reads `--flagfile=PATH`, one flag per line; config overrides are the fields of "
        "`skymoe_jax/config.py`, which `skymoe config` prints with their values.",
        "",
        " · ".join(f"[`{title}`](#{title.replace(' ', '-')})" for title, _ in pages[1:]),
    ]
    for title, text in pages:
        lines += ["", f"## {title}", "", "```text", text.rstrip(), "```"]
    return "\n".join(lines) + "\n"


def version() -> str:
    from importlib import metadata

    import jax

    return f"skymoe-jax {metadata.version('skymoe-jax')} (jax {jax.__version__}, {jax.default_backend()})"


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:  # the process's entry point, not a call from Python: it may start itself again
        host_memory.restart_with_huge_pages()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] == "--version":
        print(version())
        return 0
    command = COMMANDS.get(argv[0])
    if command is None:
        print(f"skymoe: unknown command {argv[0]!r}; commands are {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)  # orbax's progress chatter is not for the console
    try:
        if argv[0] in DISTRIBUTED:
            from skymoe_jax.parallel.distributed import initialize

            initialize()
        return command(argv[1:])
    except Help as e:
        print(e)
        return 0
    except UserError as e:
        print(f"skymoe {argv[0]}: error: {e}", file=sys.stderr)
        return 2
    except RunFailure as e:
        print(f"skymoe {argv[0]}: failed: {e}", file=sys.stderr)
        # A failed save's write tasks report their error again when the interpreter collects them at exit, after
        # the run's log file is closed: the line above and that file (run/library_logs.py) have said it.
        logging.getLogger("asyncio").disabled = True
        return 1
    except KeyboardInterrupt:
        print(f"skymoe {argv[0]}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`skymoe params | head -1`): not an error to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit-time flush stays quiet
        return 0


if __name__ == "__main__":
    sys.exit(main())
