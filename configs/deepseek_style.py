"""DeepSeek-V3's routing on a CPU-sized model: sigmoid scores, group-limited routing, loss-free bias balancing with
a small sequence-wise aux loss, and a shared expert beside fine-grained routed ones.

The default config's model (4 layers, width 128, byte tokens) with each MoE layer as 64 routed experts of width 32
in 8 groups, top-8 inside each token's best 4 groups, beside one shared expert of width 256.
"""

from skymoe_jax.config import base_config


def get_config():
    config = base_config()
    config.name = "deepseek_style"
    # As configs/default.py (a config file is loaded by path, so it cannot import another): four layers unrolled,
    # and synchronous saves that keep no second copy of the state in the CPU's memory.
    config.model.scan_layers = False
    config.train.async_checkpointing = False
    e = config.moe
    # DeepSeek-V3's shapes scaled down: 256 routed experts of width 2048 in 8 groups, top-8 in the best 4 groups,
    # one shared expert. Here 64 of width 32 in 8 groups; 8 x 32 routed and 256 shared hidden units per token,
    # 512 in all, as the default's top-2 of 256 (and its dense layers, model.ffn_dim).
    e.num_experts = 64
    e.top_k = 8
    e.expert_ffn_dim = 32
    e.num_shared_experts = 1
    e.shared_expert_ffn_dim = 256
    e.num_groups = 8
    e.top_groups = 4
    # Sigmoid scores, the chosen ones renormalized and scaled by 2.5 (V3's routed_scaling_factor); no gate logit
    # normalization, which is Skywork's and not DeepSeek's.
    e.score = "sigmoid"
    e.gate_norm = False
    e.routed_scale = 2.5
    # Balance by the selection bias, moved 1e-3 a step by the sign of each expert's load error, with V3's
    # "extremely small" sequence-wise aux loss beside it: the Switch form per sequence at a fixed 1e-4.
    e.balance = "aux+bias"
    e.bias_update_rate = 1e-3
    e.aux_loss = "switch"
    e.aux_scope = "sequence"
    config.aux_coef.mode = "fixed"
    config.aux_coef.initial_alpha = 1e-4
    # V3 drops no tokens; here tokens beyond the capacity factor of 1.25 drop, as in the other configs:
    # --config.moe.dropless=True trains without dropping.
    return config
