"""Fine-grained MoE with shared experts (DeepSeekMoE, Qwen-MoE) on the built-in corpus, sized for a CPU.

The default config's model (4 layers, width 128, byte tokens) with each MoE layer as 64 experts of width 32,
top-8, beside 2 always-on shared experts of width 128. Trains on a 2-core CPU in a few minutes: 300 steps to
val loss 1.711 (the default's 1.888).
"""

from skymoe_jax.config import base_config


def get_config():
    config = base_config()
    config.name = "fine_grained"
    # As configs/default.py (a config file is loaded by path, so it cannot import another): four layers unrolled,
    # and synchronous saves that keep no second copy of the state in the CPU's memory.
    config.model.scan_layers = False
    config.train.async_checkpointing = False
    e = config.moe
    # The default's experts (8 of width 256, top-2) cut 8 ways, as DeepSeekMoE's fine-grained segmentation does:
    # 64 of width 32 hold the same 2048 hidden units per layer. Each token activates 8 x 32 routed units and the
    # 2 x 128 shared ones, 512 in all as in the default (and as its dense layers, model.ffn_dim): 1.08M activated
    # parameters against 1.05M, 7.1 MFLOP per token against 6.9. The CPU step is still ~1.4x the default's
    # (`skymoe bench layers`: the MoE block 266 ms against 175): top-8 dispatches and combines 4x the token
    # copies of top-2, and 64 experts of width 32 make small matmuls.
    e.num_experts = 64
    e.top_k = 8
    e.expert_ffn_dim = 32
    e.num_shared_experts = 2
    e.shared_expert_ffn_dim = 128
    # These widths also upcycle the default dense model (model.ffn_dim=512) exactly: the shared experts take
    # 256 of its hidden units and 8 routed slices of 32 the rest (docs/upcycling.md).
    # The paper's aux loss, sum_j (1/E - P_j)^2, shrinks with the expert count (its gradient is 1/E-sized);
    # the Switch form, E sum_j f_j P_j, is 1.0 when balanced for any E (DeepSeekMoE's expert-level loss).
    e.aux_loss = "switch"
    return config
