"""Run configuration: the defaults every config file starts from, loading with
command-line overrides, and validation before anything compiles.

Every field a run needs lives here with its default. Config files under configs/
call `base_config()` and change what they need; `load_config` applies
`--config.a.b=value` overrides the ml-collections way; `validate` turns every
mistake a user can type into one `ConfigError` sentence naming the field.
"""

from __future__ import annotations

import copy
import difflib
import math
import os
from collections.abc import Iterable, Sequence

import ml_collections

from skymoe_jax.errors import ConfigError, first_line

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# configs/ sits beside the package in a checkout (editable install) and inside it when installed from a wheel.
BUILTIN_CONFIG_DIR = next(
    (
        d
        for d in (os.path.join(os.path.dirname(_PACKAGE_DIR), "configs"), os.path.join(_PACKAGE_DIR, "configs"))
        if os.path.isdir(d)
    ),
    "configs",
)
DEFAULT_CONFIG = "configs/default.py"


def base_config() -> ml_collections.ConfigDict:
    """Every field with its default: a tiny MoE that trains on the built-in corpus."""
    c = ml_collections.ConfigDict()
    c.name = "default"
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.vocab_size = 256
    c.model.d_model = 128
    c.model.num_layers = 4
    c.model.num_heads = 4
    c.model.num_kv_heads = 2
    c.model.head_dim = 0  # width of each attention head; 0: model.d_model / model.num_heads (Qwen3-MoE sets its own)
    c.model.ffn_dim = 512  # width of dense (non-MoE) feed-forward layers
    c.model.rope_theta = 10000.0
    c.model.norm_eps = 1e-6
    c.model.init_std = 0.02
    c.model.dtype = "float32"  # compute dtype: float32 | bfloat16 (router always float32)
    c.model.param_dtype = "float32"
    c.model.qkv_bias = False  # biases on the q/k/v projections (Qwen2)
    # RMSNorm of the queries and keys before the rotary embedding: none | head (each head's, Qwen3) | full (all
    # heads' together, OLMoE)
    c.model.qk_norm = "none"
    # auto: chunked (memory linear in the sequence; see model/chunked_attention.py) from 512 tokens on the CPU
    # and 1024 elsewhere; below, blocked on the CPU (model/blocked_attention.py) and xla elsewhere
    # auto | xla (dense [S, S] scores) | blocked | chunked | pallas (Triton flash) | cpu (C++ kernel, float32)
    c.model.attention_impl = "auto"
    c.model.remat = "none"  # none | full | dots: activation rematerialization per layer
    # True: lax.scan over each stack's layers (compile time independent of depth); False: the same layers
    # unrolled, which spares the scan's stacked residual buffers (faster on the CPU, slower to compile).
    # A pipelined model always scans its stage's layers (model/pipeline.py).
    c.model.scan_layers = True

    c.moe = ml_collections.ConfigDict()
    c.moe.num_experts = 8  # 0 = dense model
    c.moe.top_k = 2
    c.moe.expert_ffn_dim = 256
    # Shared experts: an FFN every token goes through beside the routed experts (DeepSeek, Qwen2-MoE), as wide as
    # num_shared_experts x shared_expert_ffn_dim (0: moe.expert_ffn_dim), split like the dense FFNs. Its output is
    # added to the routed experts' one, scaled per token by sigmoid(x w) with shared_expert_gate=sigmoid (Qwen2-MoE).
    c.moe.num_shared_experts = 0
    c.moe.shared_expert_ffn_dim = 0
    c.moe.shared_expert_gate = "none"
    c.moe.first_k_dense = 0  # the first k layers use a dense FFN
    c.moe.moe_every = 1  # after those, every n-th layer is MoE (the others dense)
    c.moe.router_init_std = 0.02
    c.moe.gate_norm = True  # Skywork gating logit normalization
    c.moe.gate_norm_lambda = 1.0
    c.moe.gate_norm_ddof = 0  # 0: population std; 1: unbiased (the released inference code)
    c.moe.gate_norm_eps = 1e-6
    c.moe.renormalize = True  # renormalize the top-k gate weights to sum to 1
    c.moe.score = "softmax"  # softmax | sigmoid (DeepSeek-V3: each expert's own sigmoid score)
    c.moe.routed_scale = 1.0  # multiplies the routed experts' combine weights (DeepSeek-V3's routed_scaling_factor)
    # Group-limited routing: experts in num_groups contiguous groups (1 = off), each token's top-k taken inside
    # its top_groups best groups.
    c.moe.num_groups = 1
    c.moe.top_groups = 1
    c.moe.aux_loss = "paper"  # paper: sum_j (1/n - mean_t g_tj)^2 | switch: n sum_j f_j P_j
    c.moe.aux_scope = "batch"  # batch: the aux loss over the global batch | sequence: per sequence (row), averaged
    c.moe.z_loss_coef = 0.0
    # aux: the aux loss | bias: DeepSeek-V3's loss-free balancing, a per-expert bias on the selection scores
    # moved by bias_update_rate * sign(load error) each step (training/balance_bias.py) | aux+bias: both
    c.moe.balance = "aux"
    c.moe.bias_update_rate = 1e-3
    c.moe.capacity_factor = 1.25
    c.moe.eval_capacity_factor = 2.0
    c.moe.group_size = 512  # tokens per routing group (capacity is per expert per group); 0 = one sequence
    c.moe.drop_policy = "position"  # position: earliest tokens keep their slot | probs: highest gate prob
    c.moe.dropless = False
    # auto: ragged where the grouped matmul is fast (the CPU kernels, GPUs), else padded | ragged: the assignments
    # sorted by expert through a grouped matmul | padded: every expert sized for the whole group
    c.moe.dropless_impl = "auto"
    # auto: XLA until the Pallas kernels pass `skymoe acceptance` on a GPU | xla | pallas (interpreted off GPU)
    c.moe.routing_impl = "auto"

    c.aux_coef = ml_collections.ConfigDict()
    c.aux_coef.mode = "adaptive"  # adaptive (paper) | fixed
    c.aux_coef.initial_alpha = 0.001
    c.aux_coef.xi = 0.2
    c.aux_coef.beta = 0.99
    c.aux_coef.alpha_max = 0.01

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 3e-3
    c.optim.schedule = "cosine"  # cosine | wsd | constant (all with linear warmup)
    c.optim.warmup_steps = 30
    c.optim.min_lr_ratio = 0.1
    c.optim.decay_fraction = 0.2  # wsd: fraction of steps spent decaying at the end
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.1
    c.optim.decay_embeddings = False  # weight decay on embedding and output head
    c.optim.grad_clip = 1.0  # global-norm clipping; 0 disables
    c.optim.expert_lr_multiplier = 1.0

    c.data = ml_collections.ConfigDict()
    c.data.source = "builtin"  # builtin (Python standard library sources) | files | prepared (skymoe prepare-data)
    c.data.train_files = ""  # files: comma-separated globs
    c.data.val_files = ""  # files: comma-separated globs; empty = split train_files by document
    c.data.format = "text"  # text (one document per file) | jsonl (one document per line)
    c.data.jsonl_field = "text"
    c.data.tokenizer = "byte"  # byte | path to a Hugging Face tokenizers JSON file
    c.data.val_fraction = 0.05  # share of documents held out when no val_files are given
    c.data.seq_len = 256
    c.data.batch_size = 16
    c.data.shuffle_seed = 0
    c.data.shuffle_window = 4096  # packed sequences shuffled together; 0 or 1 = no sequence shuffling
    c.data.num_streams = 8  # independent packing streams, each filling batch_size / num_streams rows
    # Each stream reads documents ahead of its packer on read_threads threads, read_ahead documents at most
    # (grain's ReadOptions; with its defaults, 16 and 500, the training iterator held 299 MiB of the built-in
    # corpus's documents, tokenized and repeated). Raise both for slow (network) storage.
    c.data.read_threads = 2
    c.data.read_ahead = 16
    # prepared: "DIR:WEIGHT,DIR:WEIGHT" (weights normalized; DIR/val, if present, is that source's validation set)
    c.data.sources = ""

    c.init = ml_collections.ConfigDict()
    c.init.upcycle_from = ""  # workdir of a dense run: upcycle its latest checkpoint at start-up
    c.init.upcycle_mode = "copy"  # copy: experts copy the dense FFN | fine_grained: experts are slices of it
    c.init.upcycle_noise = 0.0  # Gaussian noise on the expert copies, in units of each tensor's std
    c.init.from_checkpoint = ""  # workdir whose latest parameters start this run (fresh optimizer)

    c.parallel = ml_collections.ConfigDict()
    c.parallel.mesh = (1, -1, 1)  # (pipeline, data, expert) sizes; one may be -1 for the remaining devices
    c.parallel.layout = "gshard"  # gshard: expert axis doubles as data parallelism | edp: Skywork EDP
    c.parallel.zero1 = False  # split the optimizer state over `data`
    c.parallel.fsdp = False  # split the parameters (and optimizer state) over `data`
    # layers per pipeline stage, e.g. (5, 5, 5, 5, 4); with pipeline_repeats R, per virtual stage (pipeline x R of
    # them, in the order a microbatch runs them); () = even split
    c.parallel.pipeline_stage_layers = ()
    c.parallel.num_microbatches = 1  # pipeline microbatches per step
    # virtual stages per device: 1 = GPipe; R > 1 = a circular schedule, layers dealt round-robin in pipeline x R
    # chunks, bubble (P - 1) / (M R + P - 1); needs num_microbatches >= the pipeline axis
    c.parallel.pipeline_repeats = 1
    c.parallel.stage_remat = ()  # per-stage activation rematerialization (none | full | dots); () = model.remat

    c.train = ml_collections.ConfigDict()
    c.train.steps = 300
    c.train.log_every = 10
    c.train.eval_every = 100
    c.train.eval_batches = 8
    c.train.checkpoint_every = 100
    c.train.keep_checkpoints = 2  # the last K checkpoints are kept
    c.train.keep_every = 0  # and every checkpoint at a multiple of M steps (0: none)
    # Asynchronous saves: training goes on while a thread writes a host copy of the state. False: the step
    # waits for the write, and no second copy of the state lives beside the next steps.
    c.train.async_checkpointing = True
    c.train.nonfinite = "stop"  # non-finite loss or gradients: stop | skip the step (counted in the metrics)
    c.train.progress = True  # progress bar on a terminal or in a notebook
    # Several processes agree on a SIGTERM/SIGINT stop every N steps (a collective that waits for the step)
    c.train.stop_check_every = 10
    # With several processes: a process that has not been heard from for this long is taken for dead and the
    # run ends (JAX's distributed heartbeat), and a stop by signal gives up its save if a peer does not answer.
    # Read from the command line at start-up (the processes join before a checkpoint is read).
    c.train.peer_timeout_s = 30
    # JAX's persistent compilation cache for training and evaluation (run/compile_cache.py): a rerun loads its
    # compiled programs. '' = off; JAX_COMPILATION_CACHE_DIR in the environment wins.
    c.train.compilation_cache_dir = "~/.cache/skymoe_jax/xla"

    c.metrics = ml_collections.ConfigDict()
    c.metrics.similarity_every = 100  # expert similarity every N steps and at the last; 0 = never
    c.metrics.tensorboard = True  # TensorBoard event files under WORKDIR/tensorboard
    # MFU denominator; 0 = the data-sheet table in metrics/flops.py by device kind (no MFU where unknown, e.g. CPU)
    c.metrics.peak_flops_per_device = 0.0
    # Experiment trackers (docs/trackers.md), each an extra: the metrics records and this config, from process 0,
    # into one tracker run per workdir that a resumed run goes on with (WORKDIR/trackers.json).
    c.metrics.wandb = ml_collections.ConfigDict()
    # Weights & Biases project; '' = no W&B. Entity, API key and WANDB_MODE=offline come from W&B's environment.
    c.metrics.wandb.project = ""
    c.metrics.wandb.name = ""  # the run's display name; '' = the workdir's folder name
    c.metrics.wandb.tags = ""  # comma-separated, e.g. 'ablation,edp'
    c.metrics.mlflow = ml_collections.ConfigDict()
    c.metrics.mlflow.experiment = ""  # MLflow experiment, made if missing; '' = no MLflow
    # '' = MLFLOW_TRACKING_URI, else MLflow's default (a SQLite file, which needs the full mlflow package)
    c.metrics.mlflow.tracking_uri = ""
    return c


def resolve_config_path(path: str) -> str:
    """A path as given, or else a built-in config of that name (so `configs/x.py` works anywhere)."""
    if os.path.isfile(path):
        return path
    builtin = os.path.join(BUILTIN_CONFIG_DIR, os.path.relpath(path, "configs") if path.startswith("configs") else path)
    if os.path.isfile(builtin):
        return builtin
    available = sorted(n for n in os.listdir(BUILTIN_CONFIG_DIR) if n.endswith(".py") and not n.startswith("_"))
    raise ConfigError(
        f"config file {path!r} not found; give a path to a .py file with get_config() "
        f"or one of the built-in configs: {', '.join('configs/' + n for n in available)}"
    )


def load_config(path: str = DEFAULT_CONFIG, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Load a config file, apply `--config.a.b=value` overrides, and validate."""
    return apply_overrides(load_file(resolve_config_path(path)), overrides)


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> ml_collections.ConfigDict:
    """A copy of config with `--config.a.b=value` overrides applied (typed as the field), validated."""
    from absl import flags
    from ml_collections import config_flags

    for arg in overrides:
        _check_override_key(config, arg)
    # The last value of a field wins, as for any flag (config_flags would join two tuple values into one).
    last = {arg.split("=", 1)[0]: arg for arg in overrides}
    argv = ["skymoe", *last.values()]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_dict("config", copy.deepcopy(config), flag_values=fv, lock_config=True, sys_argv=argv)
    try:
        fv(argv)
    except (flags.Error, AttributeError, KeyError, ValueError, TypeError) as e:
        raise ConfigError(first_line(e, lines=2)) from None
    result = fv.config
    validate(result)
    return result


def load_file(path: str) -> ml_collections.ConfigDict:
    import importlib.util

    spec = importlib.util.spec_from_file_location("_skymoe_config_file", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # the file is user code: report it, don't crash on it
        raise ConfigError(f"config file {path} failed to load: {type(e).__name__}: {first_line(e, lines=2)}") from None
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path} has no get_config() function")
    return module.get_config()


def _check_override_key(config: ml_collections.ConfigDict, arg: str) -> None:
    if not arg.startswith("--config."):
        raise ConfigError(f"unrecognised flag {arg.split('=')[0]!r}; config overrides look like --config.moe.top_k=2")
    key = arg[len("--config.") :].split("=", 1)[0]
    node = config
    walked = []
    for part in key.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            options = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            guess = difflib.get_close_matches(part, options, n=1)
            prefix = ".".join(walked)
            hint = (
                f"; did you mean '{'.'.join(walked + guess)}'?"
                if guess
                else (f"; fields of '{prefix or 'config'}' are: {', '.join(options)}" if options else "")
            )
            raise ConfigError(f"unknown config field '{key}'{hint}")
        node = node[part]
        walked.append(part)


_CHOICES = {
    "model.dtype": ("float32", "bfloat16"),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.remat": ("none", "full", "dots"),
    "model.attention_impl": ("auto", "xla", "blocked", "chunked", "pallas", "cpu"),
    "model.qk_norm": ("none", "head", "full"),
    "moe.shared_expert_gate": ("none", "sigmoid"),
    "moe.aux_loss": ("paper", "switch"),
    "moe.aux_scope": ("batch", "sequence"),
    "moe.score": ("softmax", "sigmoid"),
    "moe.balance": ("aux", "bias", "aux+bias"),
    "moe.drop_policy": ("position", "probs"),
    "moe.dropless_impl": ("auto", "ragged", "padded"),
    "moe.routing_impl": ("auto", "xla", "pallas"),
    "aux_coef.mode": ("adaptive", "fixed"),
    "optim.schedule": ("cosine", "wsd", "constant"),
    "data.source": ("builtin", "files", "prepared"),
    "data.format": ("text", "jsonl"),
    "parallel.layout": ("gshard", "edp"),
    "train.nonfinite": ("stop", "skip"),
    "init.upcycle_mode": ("copy", "fine_grained"),
}


def validate(c: ml_collections.ConfigDict) -> None:
    """Raise ConfigError naming the first field that cannot work."""

    def get(key):
        node = c
        for part in key.split("."):
            node = node[part]
        return node

    def need(ok: bool, message: str):
        if not ok:
            raise ConfigError(message)

    for key, choices in _CHOICES.items():
        need(get(key) in choices, f"{key}={get(key)!r} is not one of {', '.join(choices)}")
    for key in (
        "model.vocab_size",
        "model.d_model",
        "model.num_layers",
        "model.num_heads",
        "model.num_kv_heads",
        "model.ffn_dim",
        "data.seq_len",
        "data.batch_size",
        "train.steps",
        "train.log_every",
        "train.eval_batches",
        "moe.moe_every",
        "train.stop_check_every",
        "train.peer_timeout_s",
        "data.read_ahead",
    ):
        need(isinstance(get(key), int) and get(key) > 0, f"{key}={get(key)!r} must be a positive integer")
    for key in (
        "train.eval_every",
        "train.checkpoint_every",
        "optim.warmup_steps",
        "moe.first_k_dense",
        "moe.group_size",
        "train.keep_checkpoints",
        "data.shuffle_window",
        "data.read_threads",
        "train.keep_every",
        "metrics.similarity_every",
    ):
        need(isinstance(get(key), int) and get(key) >= 0, f"{key}={get(key)!r} must be a non-negative integer")

    m = c.model
    need(
        isinstance(m.head_dim, int) and m.head_dim >= 0,
        f"model.head_dim={m.head_dim!r} must be a non-negative integer (0: model.d_model / model.num_heads)",
    )
    need(
        m.head_dim or m.d_model % m.num_heads == 0,
        f"model.num_heads={m.num_heads} does not divide model.d_model={m.d_model}; pick a head count that divides it "
        "or set model.head_dim",
    )
    head_dim = m.head_dim or m.d_model // m.num_heads
    need(head_dim % 2 == 0, f"the head dimension {head_dim} must be even for rotary embeddings (model.head_dim)")
    if m.attention_impl == "pallas":  # Triton's tl.dot takes tiles of at least 16 along every dimension
        need(
            c.data.seq_len % 16 == 0 and head_dim >= 16 and head_dim & (head_dim - 1) == 0,
            f"model.attention_impl=pallas needs data.seq_len ({c.data.seq_len}) a multiple of 16 and the head "
            f"dimension ({head_dim}, model.head_dim or model.d_model / model.num_heads) a power of two >= 16; change "
            "them or use model.attention_impl=chunked",
        )
    need(
        m.attention_impl != "cpu" or m.dtype == "float32",
        f"model.attention_impl=cpu computes in float32, not model.dtype={m.dtype}; set model.dtype=float32 or "
        "model.attention_impl=auto",
    )
    need(
        m.num_heads % m.num_kv_heads == 0,
        f"model.num_kv_heads={m.num_kv_heads} must divide model.num_heads={m.num_heads} (grouped-query attention)",
    )
    need(
        m.init_std > 0 and m.norm_eps > 0 and m.rope_theta > 0,
        "model.init_std, model.norm_eps and model.rope_theta must be positive",
    )

    e = c.moe
    need(
        isinstance(e.num_experts, int) and e.num_experts >= 0,
        f"moe.num_experts={e.num_experts!r} must be 0 (dense) or a positive integer",
    )
    for key in ("num_shared_experts", "shared_expert_ffn_dim"):
        need(
            isinstance(e[key], int) and e[key] >= 0 and (not e[key] or e.num_experts > 0),
            f"moe.{key}={e[key]!r} must be a non-negative integer, and 0 in a dense model (moe.num_experts=0)",
        )
    need(
        e.shared_expert_gate == "none" or e.num_shared_experts > 0,
        f"moe.shared_expert_gate={e.shared_expert_gate} gates shared experts: set moe.num_shared_experts too",
    )
    if e.num_experts > 0:
        need(e.num_experts >= 2, f"moe.num_experts={e.num_experts} must be at least 2 (or 0 for a dense model)")
        need(
            isinstance(e.top_k, int) and 1 <= e.top_k <= e.num_experts,
            f"moe.top_k={e.top_k} must be between 1 and moe.num_experts={e.num_experts}",
        )
        need(
            isinstance(e.expert_ffn_dim, int) and e.expert_ffn_dim > 0,
            f"moe.expert_ffn_dim={e.expert_ffn_dim!r} must be a positive integer",
        )
        need(
            e.capacity_factor > 0,
            f"moe.capacity_factor={e.capacity_factor} must be > 0 (1.0 = exactly balanced "
            "capacity; use moe.dropless=True for no dropping)",
        )
        need(e.eval_capacity_factor > 0, f"moe.eval_capacity_factor={e.eval_capacity_factor} must be > 0")
        need(e.gate_norm_ddof in (0, 1), f"moe.gate_norm_ddof={e.gate_norm_ddof} must be 0 or 1")
        need(not (e.gate_norm_ddof == 1 and e.num_experts < 2), "moe.gate_norm_ddof=1 needs at least 2 experts")
        need(
            e.gate_norm_lambda > 0 and e.gate_norm_eps > 0,
            "moe.gate_norm_lambda and moe.gate_norm_eps must be positive",
        )
        need(e.z_loss_coef >= 0, f"moe.z_loss_coef={e.z_loss_coef} must be >= 0")
        need(e.routed_scale > 0, f"moe.routed_scale={e.routed_scale} must be > 0")
        _validate_groups(e)
        need(e.router_init_std > 0, f"moe.router_init_std={e.router_init_std} must be > 0")
        need(e.bias_update_rate > 0, f"moe.bias_update_rate={e.bias_update_rate} must be > 0 (the default is 1e-3)")
        need(
            e.balance == "aux" or e.routing_impl != "pallas",
            f"moe.balance={e.balance} selects experts by biased scores, which the Pallas routing kernel does not "
            "take: set moe.routing_impl=xla (or auto)",
        )
        need(
            e.first_k_dense < m.num_layers,
            f"moe.first_k_dense={e.first_k_dense} leaves no MoE layer in model.num_layers={m.num_layers}; "
            "set moe.num_experts=0 for a dense model",
        )
        need(
            (m.num_layers - e.first_k_dense) % e.moe_every == 0,
            f"moe.moe_every={e.moe_every} must divide the {m.num_layers - e.first_k_dense} layers after "
            f"moe.first_k_dense={e.first_k_dense}",
        )
        tokens = c.data.batch_size * c.data.seq_len
        need(
            tokens % (e.group_size or c.data.seq_len) == 0,
            f"moe.group_size={e.group_size} must divide the {tokens} tokens of a batch "
            "(data.batch_size * data.seq_len); 0 means one sequence per group",
        )

    a = c.aux_coef
    need(
        a.initial_alpha >= 0 and a.alpha_max >= 0 and a.xi >= 0,
        "aux_coef.initial_alpha, aux_coef.alpha_max and aux_coef.xi must be >= 0",
    )
    need(0 <= a.beta < 1, f"aux_coef.beta={a.beta} must be in [0, 1)")

    o = c.optim
    need(o.lr > 0, f"optim.lr={o.lr} must be > 0")
    need(0 <= o.min_lr_ratio <= 1, f"optim.min_lr_ratio={o.min_lr_ratio} must be in [0, 1]")
    need(0 < o.decay_fraction <= 1, f"optim.decay_fraction={o.decay_fraction} must be in (0, 1]")
    need(
        o.warmup_steps < c.train.steps or o.schedule == "constant",
        f"optim.warmup_steps={o.warmup_steps} must be smaller than train.steps={c.train.steps}",
    )
    need(0 <= o.b1 < 1 and 0 <= o.b2 < 1, "optim.b1 and optim.b2 must be in [0, 1)")
    need(
        o.weight_decay >= 0 and o.grad_clip >= 0 and o.eps > 0,
        "optim.weight_decay and optim.grad_clip must be >= 0, optim.eps > 0",
    )
    need(o.expert_lr_multiplier > 0, f"optim.expert_lr_multiplier={o.expert_lr_multiplier} must be > 0")

    i = c.init
    need(not (i.upcycle_from and i.from_checkpoint), "set init.upcycle_from or init.from_checkpoint, not both")
    need(not i.upcycle_from or c.moe.num_experts > 0, "init.upcycle_from needs an MoE config (moe.num_experts > 0)")
    for key in ("init.upcycle_from", "init.from_checkpoint"):
        path = get(key)
        need(
            not path
            or os.path.isdir(os.path.join(path, "checkpoints"))
            or os.path.basename(os.path.dirname(os.path.abspath(path))) == "checkpoints"
            and os.path.isdir(path),
            f"{key}={path!r} is neither a run's workdir (with checkpoints/) nor WORKDIR/checkpoints/STEP",
        )
    need(math.isfinite(i.upcycle_noise) and i.upcycle_noise >= 0, f"init.upcycle_noise={i.upcycle_noise} must be >= 0")

    peak = c.metrics.peak_flops_per_device
    need(
        isinstance(peak, (int, float)) and math.isfinite(peak) and peak >= 0,
        f"metrics.peak_flops_per_device={peak!r} must be >= 0 (FLOP/s of one device, e.g. 989e12; 0 = table)",
    )

    _validate_trackers(c)
    _validate_pipeline(c)

    d = c.data
    need(0 <= d.val_fraction < 1, f"data.val_fraction={d.val_fraction} must be in [0, 1)")
    need(
        isinstance(d.num_streams, int) and d.num_streams > 0 and d.batch_size % d.num_streams == 0,
        f"data.num_streams={d.num_streams} must be a positive divisor of data.batch_size={d.batch_size}",
    )
    if d.source == "files":
        need(bool(d.train_files.strip()), "data.source='files' needs data.train_files (comma-separated globs)")
    if d.source == "prepared":
        for directory, _ in parse_sources(d.sources):
            need(
                os.path.isdir(directory),
                f"data.sources: no directory {directory!r}; prepare it with skymoe prepare-data --out={directory}",
            )
    need(
        d.tokenizer == "byte" or os.path.isfile(d.tokenizer),
        f"data.tokenizer={d.tokenizer!r}: no such file; give 'byte' or a Hugging Face tokenizer.json path",
    )


def _validate_groups(e: ml_collections.ConfigDict) -> None:
    """Group-limited routing: whole groups of experts, top_groups of them, room for top_k inside them."""
    groups, top = e.num_groups, e.top_groups
    if not (isinstance(groups, int) and groups >= 1 and e.num_experts % groups == 0):
        raise ConfigError(
            f"moe.num_groups={groups!r} must be a positive integer dividing moe.num_experts={e.num_experts}"
        )
    if not (isinstance(top, int) and 1 <= top <= groups):
        raise ConfigError(f"moe.top_groups={top!r} must be between 1 and moe.num_groups={groups}")
    if e.top_k > top * (e.num_experts // groups):
        raise ConfigError(
            f"moe.top_k={e.top_k} exceeds the {top * (e.num_experts // groups)} experts in moe.top_groups={top} "
            f"groups of {e.num_experts // groups}; raise moe.top_groups or lower moe.top_k"
        )
    if groups > 1 and e.routing_impl == "pallas":
        raise ConfigError(
            f"moe.routing_impl=pallas has no group-limited routing: set moe.routing_impl=xla with "
            f"moe.num_groups={groups}"
        )


def _validate_trackers(c: ml_collections.ConfigDict) -> None:
    w, m = c.metrics.wandb, c.metrics.mlflow
    if any(ch in w.project for ch in "/\\#?%:"):
        raise ConfigError(
            f"metrics.wandb.project={w.project!r} may not contain / \\ # ? % : (W&B's rule); the entity (team) "
            "goes in WANDB_ENTITY"
        )
    if (w.name or w.tags) and not w.project:
        raise ConfigError(
            "metrics.wandb.name and metrics.wandb.tags need metrics.wandb.project, the W&B project to log to"
        )
    for tag in wandb_tags(w.tags):
        if len(tag) > 64:
            raise ConfigError(f"metrics.wandb.tags: the tag {tag!r} is longer than W&B's 64 characters; shorten it")
    if m.tracking_uri and not m.experiment:
        raise ConfigError(
            "metrics.mlflow.tracking_uri needs metrics.mlflow.experiment, the MLflow experiment to log to"
        )


def wandb_tags(tags: str) -> list[str]:
    """metrics.wandb.tags 'a, b,' -> ['a', 'b'] (a string: command-line overrides take plain values)."""
    return [t.strip() for t in tags.split(",") if t.strip()]


def require_extras(c: ml_collections.ConfigDict) -> None:
    """Raise ConfigError where a tracker is on and its package is not installed. Checked when a run starts, not in
    validate(): a checkpoint's config is validated wherever the model is loaded, trackers or not."""
    import importlib.util

    # A tracker's config section, its module and the extra that installs it share its name.
    for tracker, field in (("wandb", "project"), ("mlflow", "experiment")):
        value = c.metrics[tracker][field]
        if value and importlib.util.find_spec(tracker) is None:
            key = f"metrics.{tracker}.{field}"
            raise ConfigError(
                f"{key}={value!r} needs {tracker}, which is not installed: pip install 'skymoe-jax[{tracker}]' "
                f"(pip install -e '.[{tracker}]' in a clone), or set {key}=''"
            )


def _validate_pipeline(c: ml_collections.ConfigDict) -> None:
    p = c.parallel
    stages = p.mesh[0] if len(p.mesh) == 3 else 1
    m = p.num_microbatches
    if not (isinstance(m, int) and m >= 1 and c.data.batch_size % m == 0):
        raise ConfigError(
            f"parallel.num_microbatches={m} must be a positive divisor of data.batch_size={c.data.batch_size}"
        )
    if stages == -1:
        raise ConfigError("parallel.mesh: the pipeline size cannot be -1; give it explicitly (1 for none)")
    repeats = p.pipeline_repeats
    if not (isinstance(repeats, int) and repeats >= 1):
        raise ConfigError(f"parallel.pipeline_repeats={repeats!r} must be a positive integer (1 for GPipe)")
    if stages == 1:
        if p.pipeline_stage_layers or p.stage_remat or repeats > 1:
            raise ConfigError(
                "parallel.pipeline_stage_layers, parallel.stage_remat and parallel.pipeline_repeats need a pipeline "
                "axis (parallel.mesh=(STAGES, ..., ...) with STAGES > 1)"
            )
        return
    virtual = stages * repeats
    layers = tuple(p.pipeline_stage_layers)
    if layers and (len(layers) != virtual or sum(layers) != c.model.num_layers or min(layers) < 1):
        what = f"{stages} stages (the pipeline axis)"
        if repeats > 1:
            what = f"{virtual} virtual stages (the pipeline axis {stages} x parallel.pipeline_repeats={repeats})"
        raise ConfigError(
            f"parallel.pipeline_stage_layers={layers} must give {what} "
            f"of at least one layer summing to model.num_layers={c.model.num_layers}"
        )
    if c.model.num_layers < virtual:
        raise ConfigError(
            f"model.num_layers={c.model.num_layers} cannot fill {virtual} pipeline stages"
            + (f" ({stages} devices x parallel.pipeline_repeats={repeats})" if repeats > 1 else "")
        )
    if repeats > 1 and m < stages:
        raise ConfigError(
            f"parallel.pipeline_repeats={repeats} needs parallel.num_microbatches >= the pipeline axis ({stages}), "
            f"not {m}: a microbatch comes back to the first stage after {stages} ticks"
        )
    if c.moe.num_experts and (c.moe.first_k_dense or c.moe.moe_every != 1):
        raise ConfigError(
            "pipeline parallelism needs identical layers: moe.first_k_dense=0 and moe.moe_every=1 (or a dense model)"
        )
    remat = tuple(p.stage_remat)
    if remat and (len(remat) != stages or any(r not in ("none", "full", "dots") for r in remat)):
        raise ConfigError(
            f"parallel.stage_remat={remat} must give one of none | full | dots for each of the {stages} stages"
        )


# Fields that change parameter shapes or the layer layout: a checkpoint only fits the same values.
SHAPE_FIELDS = (
    "model.vocab_size",
    "model.d_model",
    "model.num_layers",
    "model.num_heads",
    "model.num_kv_heads",
    "model.head_dim",
    "model.ffn_dim",
    "model.param_dtype",
    "model.qkv_bias",
    "model.qk_norm",
    "moe.num_shared_experts",
    "moe.shared_expert_ffn_dim",
    "moe.shared_expert_gate",
    "moe.num_experts",
    "moe.expert_ffn_dim",
    "moe.first_k_dense",
    "moe.moe_every",
    "parallel.pipeline_stage_layers",
    "parallel.pipeline_repeats",
)


def shape_changes(old: ml_collections.ConfigDict, new: ml_collections.ConfigDict) -> str:
    """'field old -> new' for each shape field that differs; empty if none."""
    flat_old, flat_new = dict(flatten(old)), dict(flatten(new))
    return ", ".join(f"{k} {flat_old[k]} -> {flat_new[k]}" for k in SHAPE_FIELDS if flat_old[k] != flat_new[k])


def capacity(tokens_per_group: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Slots per expert per group: ceil(capacity_factor * tokens * k / n)."""
    return max(1, math.ceil(capacity_factor * tokens_per_group * top_k / num_experts))


def flatten(c: ml_collections.ConfigDict, prefix: str = "") -> Iterable[tuple[str, object]]:
    for k, v in c.items():
        if isinstance(v, ml_collections.ConfigDict):
            yield from flatten(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


SOURCES_EXAMPLE = "data/en:0.7,data/zh:0.2,data/code:0.1"


def parse_sources(spec: str) -> list[tuple[str, float]]:
    """data.sources 'DIR:WEIGHT,...' -> [(DIR, weight)], weights summing to 1 (a string, because command-line
    overrides of ml-collections fields take plain values). A weight may be left out (1). Directories may not
    contain ':' or ','."""
    entries = [e.strip() for e in spec.split(",") if e.strip()]
    if not entries:
        raise ConfigError(
            f"data.source='prepared' needs data.sources, e.g. '{SOURCES_EXAMPLE}' (directories "
            "written by skymoe prepare-data, each with a weight)"
        )
    parsed = []
    for entry in entries:
        path, colon, weight_text = entry.rpartition(":")
        if not colon:
            path, weight_text = entry, "1"
        try:
            weight = float(weight_text)
        except ValueError:
            raise ConfigError(
                f"data.sources entry {entry!r}: {weight_text!r} is not a weight; write DIR:WEIGHT "
                f"entries separated by commas, e.g. '{SOURCES_EXAMPLE}'"
            ) from None
        if not path or not math.isfinite(weight) or weight <= 0:
            raise ConfigError(
                f"data.sources entry {entry!r} needs a directory and a positive weight, e.g. '{SOURCES_EXAMPLE}'"
            )
        parsed.append((path, weight))
    total = sum(w for _, w in parsed)
    return [(p, w / total) for p, w in parsed]
