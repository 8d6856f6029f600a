"""Pallas GPU kernels for MoE routing (route, capacity positions, dispatch, combine), each with an
XLA twin of the same signature; `ops.routing_ops` picks one set per `moe.routing_impl`. Also the GPU
flash attention (attention.py) and a C++ kernel for weight gradients on the CPU (cpu_matmul.py)."""
