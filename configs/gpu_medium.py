"""A mid-size MoE for one GPU (H100 / H200 class): 12 layers, hidden 1024,
16 heads (4 KV heads), 16 experts top-2 of width 2048, bf16 compute.
About 1.24B total and 0.18B activated parameters; byte tokens on the built-in
corpus by default.
"""

from skymoe_jax.config import base_config


def get_config():
    config = base_config()
    config.name = "gpu_medium"

    m = config.model
    m.d_model = 1024
    m.num_layers = 12
    m.num_heads = 16
    m.num_kv_heads = 4
    m.ffn_dim = 4096
    m.init_std = 0.02
    m.dtype = "bfloat16"
    m.remat = "dots"

    e = config.moe
    e.num_experts = 16
    e.top_k = 2
    e.expert_ffn_dim = 2048
    e.capacity_factor = 1.25
    e.group_size = 2048

    o = config.optim
    o.lr = 1e-3
    o.warmup_steps = 500

    d = config.data
    d.seq_len = 2048
    d.batch_size = 32

    t = config.train
    t.steps = 20_000
    t.log_every = 20
    t.eval_every = 1000
    t.eval_batches = 16
    t.checkpoint_every = 1000
    return config
