"""Programs compiled by XLA:GPU for GPUs that are not here (compile-only devices, parallel/targets.py): the
platform choices follow the devices a program is compiled for, not the machine it is traced on."""

import re

import pytest

from skymoe_jax.config import load_config
from skymoe_jax.kernels import cpu_ffi
from skymoe_jax.parallel import targets
from skymoe_jax.training.compiled import compile_train_step

pytestmark = pytest.mark.skipif(
    not targets.plugin_available(), reason="XLA:GPU compiles need JAX's CUDA plugin: pip install -e '.[aot]'"
)
TRITON = "__gpu$xla.gpu.triton"


def _custom_calls(config_overrides, target):
    c = load_config("configs/default.py", ["--config.parallel.mesh=(1,1,1)", *config_overrides])
    text = compile_train_step(c, targets.devices(target, 1)).compiled.as_text()
    return re.findall(r'custom_call_target="([^"]+)"', text)


@pytest.mark.parametrize("target", ["A800-80GB", pytest.param("H100-80GB", marks=pytest.mark.long)])
def test_pallas_kernels_are_compiled_for_triton_on_compile_only_gpus(target):
    """The Pallas routing and flash-attention kernels become Triton calls, not the interpreter's plain XLA ops,
    though this machine's default backend is the CPU."""
    impl = ["--config.model.dtype=bfloat16", "--config.moe.routing_impl={}", "--config.model.attention_impl={}"]
    pallas = _custom_calls([f.format("pallas") for f in impl], target)
    assert pallas.count(TRITON) >= 6, pallas  # route, dispatch, combine, gather; attention forward and backward
    assert TRITON not in _custom_calls([f.format("xla") for f in impl], target)


def test_a_float32_program_for_a_gpu_takes_no_cpu_kernels():
    """The default config is float32, where the CPU would run its C++ kernels (attention, the experts' FFN and
    their weight gradients): compiled for a GPU, none of them may appear."""
    calls = _custom_calls([], "A800-80GB")
    assert not set(calls) & set(cpu_ffi.TARGETS), calls
