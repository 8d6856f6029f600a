"""Pallas GPU kernels for MoE routing (route, capacity positions, dispatch, combine), each with an
XLA twin of the same signature; `ops.routing_ops` picks one set per `moe.routing_impl`. Also the GPU
flash attention (attention.py) and the dropless experts' grouped matmul (grouped_matmul.py), and C++ kernels
for the CPU through jax.ffi (cpu_ffi.py builds them): attention (cpu_attention.py), the experts' FFN
with its weight gradients (cpu_expert_ffn.py) and the dense projections' weight gradients (cpu_matmul.py)."""
