"""Test setup: 8 simulated CPU devices, so sharding and expert parallelism run for real."""

import os

# The simulated devices are threads that meet at every collective, and XLA ends the process when they have not
# all arrived within 40 s ("Termination timeout ... of 40 seconds exceeded"): a loaded 2-core machine reached that
# in the long fuzz run. A real hang still ends, after 10 minutes.
FLAGS = {"--xla_force_host_platform_device_count": "8", "--xla_cpu_collective_call_terminate_timeout_seconds": "600"}
os.environ["XLA_FLAGS"] = " ".join(
    [f for f in os.environ.get("XLA_FLAGS", "").split() if f.split("=")[0] not in FLAGS]
    + [f"{k}={v}" for k, v in FLAGS.items()]
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402  (after XLA_FLAGS: nothing may import jax before they are set)

LONG = "SKYMOE_LONG"


def pytest_configure(config):
    config.addinivalue_line("markers", f"long: a case the default run leaves to the long profile ({LONG}=1)")


def pytest_collection_modifyitems(config, items):
    """Cases marked long repeat a property a default case already checks, on another mesh or setting; the
    default run skips them to stay near 20 minutes on 2 cores, SKYMOE_LONG=1 runs them."""
    if os.environ.get(LONG) == "1":
        return
    skip = pytest.mark.skip(reason=f"long profile ({LONG}=1)")
    for item in items:
        if "long" in item.keywords:
            item.add_marker(skip)
