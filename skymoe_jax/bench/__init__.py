"""Benchmarks and the GPU acceptance run: `skymoe bench step|data|routing` (step.py, data.py, routing.py)
and `skymoe acceptance` (acceptance.py, with the kernel checks of kernel_checks.py)."""
