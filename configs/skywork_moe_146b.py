"""Skywork-MoE at the paper's full shapes: 52 layers, hidden 4608, 36 heads of 128
(no grouped-query attention), 16 experts top-2 of width 12288, vocabulary 65536,
sequence length 8192. About 146B total and 22B activated parameters.

Not trainable on one device; used for `skymoe params` and, with the parallel
settings of later work, on a GPU cluster. The corpus here is the built-in one with
byte tokens: point data.* at real data and a 65536-token tokenizer for a real run.
"""

from skymoe_jax.config import base_config


def get_config():
    config = base_config()
    config.name = "skywork_moe_146b"

    m = config.model
    m.vocab_size = 65536
    m.d_model = 4608
    m.num_layers = 52
    m.num_heads = 36
    m.num_kv_heads = 36
    m.ffn_dim = 12288
    m.init_std = 0.01  # the released config
    m.dtype = "bfloat16"
    m.remat = "full"

    e = config.moe
    e.num_experts = 16
    e.top_k = 2
    e.expert_ffn_dim = 12288
    e.router_init_std = 0.01
    e.gate_norm = True
    e.gate_norm_lambda = 1.0
    e.gate_norm_ddof = 1  # as in the released inference code
    e.aux_loss = "paper"
    e.capacity_factor = 1.25
    e.group_size = 8192

    a = config.aux_coef  # the paper's values
    a.mode = "adaptive"
    a.xi = 0.2
    a.beta = 0.99
    a.alpha_max = 0.01

    o = config.optim
    o.lr = 6e-4
    o.warmup_steps = 2000
    o.min_lr_ratio = 0.1
    o.b2 = 0.95
    o.weight_decay = 0.1

    d = config.data
    d.seq_len = 8192
    d.batch_size = 512

    t = config.train
    t.steps = 100_000
    t.log_every = 10
    t.eval_every = 1000
    t.checkpoint_every = 1000
    return config
