"""A 24-layer MoE for comparing pipeline splits (Skywork-MoE's uneven split):

    skymoe params --config=configs/experiments/pipeline_24l.py --mesh=4,1,1 \\
        --config.parallel.pipeline_stage_layers='(6,6,6,6)'
    skymoe params --config=configs/experiments/pipeline_24l.py --mesh=5,1,1 \\
        --config.parallel.pipeline_stage_layers='(5,5,5,5,4)'

The head on the last stage costs about 0.8 of a layer here, so the even 4-stage split
leaves the last stage the slowest, and the 5-stage split with one layer less at the end
balances the stages.
"""

from skymoe_jax.config import base_config


def get_config():
    config = base_config()
    config.name = "pipeline_24l"
    m = config.model
    m.num_layers = 24
    m.d_model = 2048
    m.num_heads = 16
    m.num_kv_heads = 16
    m.vocab_size = 32000
    m.dtype = "bfloat16"
    config.moe.num_experts = 16
    config.moe.top_k = 2
    config.moe.expert_ffn_dim = 5632
    config.moe.group_size = 4096
    config.data.seq_len = 4096
    config.data.batch_size = 64
    config.parallel.num_microbatches = 16
    return config
